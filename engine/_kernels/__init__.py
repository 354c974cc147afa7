"""Compiled Cython kernels (built from kernels/*.pyx by setup.py)."""

from __future__ import annotations

import functools
import warnings


@functools.cache
def warn_not_built(module: str, what: str) -> None:
    """Warn once per process that ``engine._kernels.<module>`` is missing and ``what`` uses numpy."""
    warnings.warn(
        f"engine._kernels.{module} is not built; {what} falls back to the numpy reference "
        "(build it with `python setup.py build_ext --inplace`)",
        RuntimeWarning,
        stacklevel=4,
    )
