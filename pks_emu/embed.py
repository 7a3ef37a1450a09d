"""Where embedders find pks_emu's C header and Cython declarations.

``get_include()`` is for C/C++ code (``#include "pks_emu.h"``, the capsule
ABI); ``get_cython_include()`` is for Cython code that cimports pks_emu when
the package is not on ``sys.path`` as a plain directory (editable installs
use an import hook that Cython does not follow). See docs/embedding.md.
"""
from __future__ import annotations

import os

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def get_include() -> str:
    """The folder holding ``pks_emu.h``, for ``Extension(include_dirs=[...])``."""
    path = os.path.join(_PKG_DIR, "include")
    if not os.path.isfile(os.path.join(path, "pks_emu.h")):
        raise FileNotFoundError(
            f"pks_emu.h is missing from {path}: this pks_emu installation was built "
            "without its package data (include/*.h); reinstall pks_emu")
    return path


def get_cython_include() -> str:
    """The folder that contains the ``pks_emu`` package (with its ``.pxd``
    files), for ``cythonize(..., include_path=[...])``."""
    if not os.path.isfile(os.path.join(_PKG_DIR, "_core.pxd")):
        raise FileNotFoundError(
            f"_core.pxd is missing from {_PKG_DIR}: this pks_emu installation was built "
            "without its .pxd files; reinstall pks_emu")
    return os.path.dirname(_PKG_DIR)


__all__ = ["get_cython_include", "get_include"]
