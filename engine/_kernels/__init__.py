"""Compiled Cython kernels (built from kernels/*.pyx by setup.py)."""
