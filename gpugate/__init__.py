"""gpugate operator toolkit: stack spec, bundle rendering and validation, CLI."""

__version__ = "0.1.0"
