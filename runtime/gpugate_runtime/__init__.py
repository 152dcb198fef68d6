"""gpugate's host runtime: the services that run on every gateway host."""

__version__ = "0.1.0"
