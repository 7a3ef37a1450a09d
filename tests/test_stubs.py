"""The hand-written stubs of the compiled modules must match what was built.

Cython cannot emit ``.pyi`` files, so, as pandas does for its ``_libs``, the
stubs are checked against the binary with ``mypy.stubtest``: a parameter
added, renamed or removed in a ``.pyx`` and not in its ``.pyi`` fails here.
The allowlist (``tests/stubtest-allowlist.txt``) holds only Cython's own
machinery (pickling helpers, the C-API capsule table, ``__test__``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pks_emu

pytest.importorskip("mypy")

TESTS = Path(__file__).resolve().parent
PACKAGE = Path(pks_emu.__file__).resolve().parent


def compiled_modules() -> list[str]:
    """Every compiled module of the package that is importable here."""
    names = sorted({p.name.split(".")[0] for p in PACKAGE.glob("_*.*")
                    if p.suffix in (".so", ".pyd")})
    return [f"pks_emu.{n}" for n in names]


def test_every_compiled_module_ships_a_stub_and_py_typed():
    mods = compiled_modules()
    assert "pks_emu._core" in mods and "pks_emu._lackey" in mods
    missing = [m for m in mods if not (PACKAGE / (m.split(".")[1] + ".pyi")).is_file()]
    assert not missing, f"compiled modules without a .pyi stub: {missing}"
    assert (PACKAGE / "py.typed").is_file()


def test_stubtest_passes(tmp_path):
    # mypy finds the stubs next to the modules it imports. For an editable
    # install (an import hook mypy cannot follow) that means running from the
    # source tree; for an installed wheel, from anywhere but the source tree,
    # so that the uncompiled checkout does not shadow the installed package.
    root = PACKAGE.parent
    cwd = root if (root / "pyproject.toml").is_file() else tmp_path
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy-cache"))
    cmd = [sys.executable, "-m", "mypy.stubtest", "--allowlist",
           str(TESTS / "stubtest-allowlist.txt"), *compiled_modules()]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} (in {cwd}):\n{proc.stdout}\n{proc.stderr}"
    assert "Success" in proc.stdout


def test_mypy_finds_no_error_in_the_package_sources(tmp_path):
    # The package ships py.typed: its own code type-checks against its stubs.
    # Run on the checkout's sources (the .pyi stand in for the compiled
    # modules), so that this also checks something under an installed wheel.
    root = TESTS.parent
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy-cache"))
    cmd = [sys.executable, "-m", "mypy", "pks_emu"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} (in {root}):\n{proc.stdout}\n{proc.stderr}"
    assert "Success: no issues found" in proc.stdout
