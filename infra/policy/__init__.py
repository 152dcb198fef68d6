"""gpugate's policy pack: the rules in rules.py, served by __main__.py."""
