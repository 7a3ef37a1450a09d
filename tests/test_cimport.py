"""The Cython API (issue 5): a separate extension cimports pks_emu, runs the
access check in a ``with nogil:`` loop, and must agree with ``CPU.translate``.

The extension is built in a temporary folder with cythonize + setuptools, the
way a downstream project would: the only include path is the one the
installed package reports (``pks_emu.embed.get_cython_include()``).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pks_emu
from pks_emu.constants import CR0_WP, CR4_PKE, CR4_PKS, PKR_AD_KEY, PKR_WD_KEY
from pks_emu.embed import get_cython_include, get_include

pytest.importorskip("Cython")

# --- a machine with every outcome class: allowed, key-denied, rights-denied,
# not present, non-canonical (shared with test_capsule.py) --------------------
SUP_VA = 0xFFFF_8880_0000_0000      # supervisor, pkey 3 (PKRS: write-disable)
SUP_OPEN_VA = SUP_VA + 0x1000       # supervisor, pkey 0
USER_VA = 0x0000_7F00_0000_0000     # user, pkey 5 (PKRU: access-disable)
USER_RO_VA = USER_VA + 0x1000       # user, read-only, pkey 0
UNMAPPED_VA = USER_VA + 0x2000
NONCANONICAL_VA = 0x0000_8000_0000_0000


def scenario():
    m = pks_emu.Machine()
    a = m.address_space()
    a.map(SUP_VA, 0x10_0000, pkey=3)
    a.map(SUP_OPEN_VA, 0x10_1000, pkey=0)
    a.map(USER_VA, 0x20_0000, user=True, pkey=5)
    a.map(USER_RO_VA, 0x20_1000, user=True, writable=False)
    cpu = m.cpus[0]
    a.activate(cpu)
    cpu.cr0 = cpu.cr0 | CR0_WP
    cpu.cr4 = cpu.cr4 | CR4_PKE | CR4_PKS
    cpu.wrmsr(pks_emu.MSR_IA32_PKRS, PKR_WD_KEY(3))
    cpu.wrpkru(PKR_AD_KEY(5))
    return m, cpu


def accesses(n=600, seed=5):
    rng = np.random.default_rng(seed)
    pages = np.array([SUP_VA, SUP_OPEN_VA, USER_VA, USER_RO_VA, UNMAPPED_VA, NONCANONICAL_VA],
                     dtype=np.uint64)
    va = pages[rng.integers(0, len(pages), n)] + rng.integers(0, 4096, n).astype(np.uint64)
    kind = rng.integers(0, 3, n).astype(np.uint8)
    return va, kind


def expected(cpu, va, kind):
    """(pa, code) per access from the Python API: code -1 ok, -2 #GP, else #PF error code."""
    pa = np.zeros(len(va), dtype=np.uint64)
    code = np.empty(len(va), dtype=np.int32)
    for i, (v, k) in enumerate(zip(va.tolist(), kind.tolist())):
        t = cpu.translate(v, k, 1)
        if t.ok:
            pa[i], code[i] = t.pa, -1
        else:
            code[i] = -2 if t.vector == 13 else t.error_code
    return pa, code


CONSUMER_PYX = '''
# cython: language_level=3, boundscheck=False, wraparound=False
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from pks_emu._core cimport CPU, cpu_state_of, pks_access, pks_cpu_t
from pks_emu cimport _core
cimport pks_emu


def check(CPU cpu, const uint64_t[::1] va, const uint8_t[::1] kind,
          uint64_t[::1] pa, int32_t[::1] err):
    cdef pks_cpu_t *c = cpu_state_of(cpu)
    cdef Py_ssize_t i, n = va.shape[0]
    # validate before the GIL-free loop: it indexes without checks
    if kind.shape[0] != n or pa.shape[0] != n or err.shape[0] != n:
        raise ValueError("length mismatch")
    for i in range(n):
        if kind[i] > 2:
            raise ValueError(f"kind[{i}] out of range")
    with nogil:
        for i in range(n):
            err[i] = pks_access(c, va[i], kind[i], 1, False, &pa[i])


def one_via_package(CPU cpu, uint64_t va, int kind):
    """The same check through ``cimport pks_emu`` (the package .pxd)."""
    cdef uint64_t pa = 0
    cdef int32_t r = pks_emu.pks_access(pks_emu.cpu_state_of(cpu), va, kind, 1, False, &pa)
    return r, pa


def wrmsr_via_core_module(CPU cpu, uint32_t msr, uint64_t value):
    """WRMSR through ``from pks_emu cimport _core``."""
    return _core.pks_wrmsr(_core.cpu_state_of(cpu), msr, value)


def constants():
    return (_core.PKS_OK, _core.PKS_GP, _core.PKS_UD, _core.PKS_READ, _core.PKS_WRITE,
            _core.PKS_FETCH, _core.PKS_PF_PK, _core.PKS_MSR_IA32_PKRS)
'''

SETUP_PY = '''
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="pks_consumer",
    ext_modules=cythonize([Extension("pks_consumer", ["pks_consumer.pyx"])],
                          include_path=[{include!r}], language_level=3, quiet=True),
)
'''


def build_extension(tmp_path, name, setup_py):
    """Run ``python setup.py build_ext --inplace`` in tmp_path and import ``name``."""
    (tmp_path / "setup.py").write_text(setup_py)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"building {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    [so] = list(tmp_path.glob(f"{name}*.so")) + list(tmp_path.glob(f"{name}*.pyd"))
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cimport")
    (tmp / "pks_consumer.pyx").write_text(CONSUMER_PYX)
    return build_extension(tmp, "pks_consumer",
                           SETUP_PY.format(include=get_cython_include()))


def test_pxd_files_are_in_the_installed_package():
    root = get_cython_include()
    import os
    for f in ("pks_emu/__init__.pxd", "pks_emu/_core.pxd"):
        assert os.path.isfile(os.path.join(root, f)), f
    assert os.path.isfile(os.path.join(get_include(), "pks_emu.h"))


@pytest.mark.parametrize("cpl", [0, 3])
def test_nogil_loop_matches_translate(consumer, cpl):
    m, cpu = scenario()
    cpu.cpl = cpl
    va, kind = accesses()
    pa = np.zeros(len(va), dtype=np.uint64)
    err = np.empty(len(va), dtype=np.int32)
    consumer.check(cpu, va, kind, pa, err)

    want_pa, want_err = expected(cpu, va, kind)
    np.testing.assert_array_equal(err, want_err)
    ok = want_err == -1
    np.testing.assert_array_equal(pa[ok], want_pa[ok])
    # the scenario really exercises every outcome class
    assert ok.any() and (err == -2).any()
    assert (err[err >= 0] & pks_emu.PF_PK).any()
    assert ((err >= 0) & ((err & pks_emu.PF_P) == 0)).any()   # not present


def test_cimport_package_and_core_module(consumer):
    m, cpu = scenario()
    r, pa = consumer.one_via_package(cpu, SUP_OPEN_VA + 0x18, 1)
    assert (r, pa) == (-1, cpu.translate(SUP_OPEN_VA + 0x18, "write").pa)
    r, _ = consumer.one_via_package(cpu, SUP_VA + 8, 1)
    assert r == pks_emu.PF_P | pks_emu.PF_W | pks_emu.PF_PK

    # WRMSR through the cimported core opens key 3; the Python API sees it.
    assert consumer.wrmsr_via_core_module(cpu, pks_emu.MSR_IA32_PKRS, 0) == -1
    assert cpu.pkrs == 0
    assert cpu.translate(SUP_VA + 8, "write").ok
    # ...and the #GP convention of the .pxd: bits 63:32 of IA32_PKRS are reserved
    assert consumer.wrmsr_via_core_module(cpu, pks_emu.MSR_IA32_PKRS, 1 << 32) == -2


def test_pxd_constants_match_python(consumer):
    assert consumer.constants() == (-1, -2, -3, 0, 1, 2, pks_emu.PF_PK, pks_emu.MSR_IA32_PKRS)


def test_consumer_validates_before_nogil(consumer):
    m, cpu = scenario()
    va = np.array([SUP_VA], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"kind\[0\]"):
        consumer.check(cpu, va, np.array([7], dtype=np.uint8), np.zeros(1, np.uint64),
                       np.zeros(1, np.int32))
