"""Build the Cython kernels in kernels/*.pyx as extension modules of the engine package.

Compiler directives are set once here. ENGINE_DEBUG_KERNELS=1 turns bounds checking and
wraparound back on for a debug build.
"""

import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("ENGINE_DEBUG_KERNELS", "0") == "1"

DIRECTIVES = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}

extensions = [
    Extension(
        f"engine._kernels.{os.path.splitext(os.path.basename(path))[0]}",
        [path],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
    )
    for path in sorted(glob.glob("kernels/*.pyx"))
]

setup(
    packages=["engine", "engine.testing", "engine._kernels"],
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES),
)
