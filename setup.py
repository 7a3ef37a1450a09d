"""Build the compiled core.

``pip install .`` cythonizes the ``.pyx`` modules; no other step is needed.
Set ``PKS_EMU_DEBUG=1`` for a debug build: bounds checks and assertions back on,
``-O0 -g``, so the test suite runs against a checked core.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PKS_EMU_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "embedsignature": True,
    "binding": True,
    "cdivision": True,
    # Bounds are validated once at each boundary (see _core.pyx); the debug
    # build turns the per-index checks back on to prove that validation holds.
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
}

cflags = ["-O0", "-g", "-UNDEBUG", "-DPKS_EMU_DEBUG=1"] if DEBUG else ["-O3"]

# Every pks_emu/*.pyx is one extension module (the .pxi files are included).
extensions = [
    Extension("pks_emu." + os.path.basename(path)[:-4], [path], extra_compile_args=cflags)
    for path in sorted(glob.glob("pks_emu/*.pyx"))
]

# Generated C goes to a directory per build mode: the directives differ, and
# cythonize decides what to regenerate by timestamps alone, so a shared
# output would let a debug build compile release C (or the reverse).
setup(ext_modules=cythonize(extensions, compiler_directives=directives,
                            build_dir="build/cython-debug" if DEBUG else "build/cython-release"))
