"""Local toolchain for the `local` stack: the vLLM CPU virtualenv and the small real model."""
