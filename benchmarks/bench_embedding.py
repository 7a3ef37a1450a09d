"""asv benchmarks: the cost per access of each way to embed pks_emu (issue 5).

* Python: ``CPU.access`` in a loop, and ``pks_emu.access_batch`` (baselines);
* Cython API: a separate extension that cimports ``pks_emu._core`` and calls
  ``pks_access`` in a ``with nogil:`` loop;
* C ABI: a C extension that calls ``PKS_EMU_API->access`` through the capsule
  table in a GIL-free loop;
* Unicorn: guest stores in a loop (every store hits Unicorn's TLB) and a
  guest that touches a new page per store (every store is a TLB fill that
  runs pks_emu's walk and key check from the Python hook).

The two consumer extensions are compiled once by ``setup_cache`` (Cython,
setuptools and a C compiler are needed, as for building pks_emu); if that
fails, those benchmarks are skipped. Each ``time_*`` runs ``N`` accesses, so
divide by ``N`` (or ``FILL_PAGES`` / ``HIT_STORES`` for Unicorn) for the
cost per access. ``python benchmarks/bench_embedding.py`` prints the costs
per access without asv.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

import pks_emu
from pks_emu.constants import CR4_PKE, CR4_PKS, PKR_AD_KEY, PKR_WD_KEY
from pks_emu.embed import get_cython_include, get_include

N = 100_000             # accesses per compiled/batch benchmark
N_PY = 10_000           # accesses per pure-Python benchmark
PAGES = 64              # distinct pages the accesses spread over (all in the TLB)
HIT_STORES = 100_000    # guest stores that hit Unicorn's TLB
FILL_PAGES = 256        # guest stores that each need a TLB fill
SEED = 20240501

DATA_VA = 0xFFFF_8880_0000_0000
CODE_VA = 0xFFFF_FFFF_8100_0000

CYTHON_SRC = '''
# cython: language_level=3, boundscheck=False, wraparound=False
from libc.stdint cimport int32_t, uint8_t, uint64_t
from pks_emu._core cimport CPU, cpu_state_of, pks_access, pks_cpu_t

def run(CPU cpu, const uint64_t[::1] va, const uint8_t[::1] kind, uint64_t[::1] pa, int32_t[::1] err):
    cdef pks_cpu_t *c = cpu_state_of(cpu)
    cdef Py_ssize_t i, n = va.shape[0]
    if kind.shape[0] != n or pa.shape[0] != n or err.shape[0] != n:
        raise ValueError("length mismatch")
    for i in range(n):
        if kind[i] > 2:
            raise ValueError("kind out of range")
    with nogil:
        for i in range(n):
            err[i] = pks_access(c, va[i], kind[i], 1, False, &pa[i])
'''

C_SRC = r'''
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "pks_emu.h"

static PyObject *run(PyObject *self, PyObject *args)
{
    PyObject *cpu_obj;
    Py_buffer va, kind, pa, err;
    if (!PyArg_ParseTuple(args, "Ow*w*w*w*", &cpu_obj, &va, &kind, &pa, &err))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = va.len / 8;
    pks_emu_cpu cpu = PKS_EMU_API->cpu_handle(cpu_obj);
    if (cpu == NULL)
        goto out;
    if (kind.len != n || pa.len != 8 * n || err.len != 4 * n) {
        PyErr_SetString(PyExc_ValueError, "length mismatch");
        goto out;
    }
    const uint64_t *v = va.buf;
    const uint8_t *k = kind.buf;
    uint64_t *p = pa.buf;
    int32_t *e = err.buf;
    PKS_EMU_API->enter_nogil(cpu);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        e[i] = PKS_EMU_API->access(cpu, v[i], k[i], 1, 0, &p[i]);
    Py_END_ALLOW_THREADS
    PKS_EMU_API->leave_nogil(cpu);
    ret = Py_None;
    Py_INCREF(ret);
out:
    PyBuffer_Release(&va); PyBuffer_Release(&kind); PyBuffer_Release(&pa); PyBuffer_Release(&err);
    return ret;
}

static PyMethodDef methods[] = {{"run", run, METH_VARARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "bench_capi_consumer", NULL, -1, methods};

PyMODINIT_FUNC PyInit_bench_capi_consumer(void)
{
    if (pks_emu_import() < 0)
        return NULL;
    return PyModule_Create(&moddef);
}
'''

SETUP_PY = '''
from Cython.Build import cythonize
from setuptools import Extension, setup
setup(name="bench_consumers", ext_modules=cythonize(
    [Extension("bench_cython_consumer", ["bench_cython_consumer.pyx"])],
    include_path=[{pxd!r}], language_level=3, quiet=True) + [
    Extension("bench_capi_consumer", ["bench_capi_consumer.c"], include_dirs=[{h!r}],
              extra_compile_args=["-O2"])])
'''


def build_consumers(folder: str) -> None:
    """Compile the Cython and the C consumer into ``folder``."""
    with open(os.path.join(folder, "bench_cython_consumer.pyx"), "w") as f:
        f.write(CYTHON_SRC)
    with open(os.path.join(folder, "bench_capi_consumer.c"), "w") as f:
        f.write(C_SRC)
    with open(os.path.join(folder, "setup.py"), "w") as f:
        f.write(SETUP_PY.format(pxd=get_cython_include(), h=get_include()))
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=folder,
                   check=True, capture_output=True, timeout=600)


def load(folder: str, name: str):
    for f in os.listdir(folder):
        if f.startswith(name + ".") and f.endswith((".so", ".pyd")):
            spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise NotImplementedError(f"{name} was not built (see setup_cache)")


def machine():
    """PAGES supervisor pages with keys 1..3, PKS on, key 3 write-disabled."""
    m = pks_emu.Machine()
    a = m.address_space()
    for i in range(PAGES):
        a.map(DATA_VA + i * 4096, 0x100_0000 + i * 4096, pkey=1 + i % 3)
    cpu = m.cpus[0]
    a.activate(cpu)
    cpu.cr4 |= CR4_PKE | CR4_PKS
    cpu.wrmsr(pks_emu.MSR_IA32_PKRS, PKR_WD_KEY(3) | PKR_AD_KEY(7))
    return m, a, cpu


def workload(n: int):
    rng = np.random.default_rng(SEED)
    offset = rng.integers(0, PAGES, n) * 4096 + rng.integers(0, 4096, n)
    va = np.uint64(DATA_VA) + offset.astype(np.uint64)
    kind = rng.integers(0, 2, n).astype(np.uint8)
    return va, kind


_CACHE: dict[str, object] = {}


def _consumer(folder: str, name: str):
    if name not in _CACHE:
        _CACHE[name] = load(folder, name)
    return _CACHE[name]


class _PerAccess:
    """``N`` accesses on a warm TLB over PAGES pages, mixed reads and writes,
    about a sixth denied by key 3's WD bit."""

    timeout = 600

    def setup_cache(self) -> str:
        # One build shared by the three classes (each setup_cache runs in its
        # own folder): keyed by the consumers' sources and the pks_emu core
        # they are compiled against.
        core = pks_emu._core.__file__
        key = hashlib.sha1((CYTHON_SRC + C_SRC + SETUP_PY + core
                            + str(os.stat(core).st_mtime_ns)).encode()).hexdigest()[:16]
        folder = os.path.join(tempfile.gettempdir(), f"pks_emu_bench_consumers-{key}")
        done = os.path.join(folder, ".built")
        if not os.path.exists(done):
            os.makedirs(folder, exist_ok=True)
            try:
                build_consumers(folder)
                open(done, "w").close()
            except (OSError, subprocess.SubprocessError):
                pass    # the compiled benchmarks skip (NotImplementedError in setup)
        return folder

    def setup(self, folder: str) -> None:
        self.m, self.a, self.cpu = machine()
        self.va, self.kind = workload(N)
        self.pa = np.zeros(N, dtype=np.uint64)
        self.err = np.zeros(N, dtype=np.int32)
        pks_emu.access_batch(self.cpu, self.va, self.kind)   # warm the TLB


class PythonPerAccess(_PerAccess):
    def setup(self, folder: str) -> None:
        super().setup(folder)
        self.py_va = self.va[:N_PY].tolist()
        self.py_kind = self.kind[:N_PY].tolist()

    def time_translate_loop(self, folder: str) -> None:
        """N_PY calls of CPU.translate."""
        translate = self.cpu.translate
        for v, k in zip(self.py_va, self.py_kind):
            translate(v, k, 1)

    def time_access_batch(self, folder: str) -> None:
        pks_emu.access_batch(self.cpu, self.va, self.kind)


class CimportPerAccess(_PerAccess):
    def setup(self, folder: str) -> None:
        super().setup(folder)
        self.mod = _consumer(folder, "bench_cython_consumer")

    def time_nogil_loop(self, folder: str) -> None:
        self.mod.run(self.cpu, self.va, self.kind, self.pa, self.err)


class CapsulePerAccess(_PerAccess):
    def setup(self, folder: str) -> None:
        super().setup(folder)
        self.mod = _consumer(folder, "bench_capi_consumer")

    def time_nogil_loop(self, folder: str) -> None:
        self.mod.run(self.cpu, self.va, self.kind, self.pa, self.err)


def _imm(fmt: str, v: int) -> bytes:
    return struct.pack(fmt, v)


# Guest loops (hand-assembled, see tests/test_unicorn.py for the encodings):
#   +0   48 BB <imm64>          mov rbx, DATA_VA
#   +10  B9 <imm32>             mov ecx, count
#   +15  89 0B                  mov dword [rbx], ecx
#   +17  FF C9                  dec ecx
#   +19  75 FA                  jnz +15
HIT_LOOP = (b"\x48\xbb" + _imm("<Q", DATA_VA) + b"\xb9" + _imm("<I", HIT_STORES)
            + b"\x89\x0b\xff\xc9\x75\xfa")
#   +0   48 BB <imm64>          mov rbx, DATA_VA
#   +10  B9 <imm32>             mov ecx, count
#   +15  89 0B                  mov dword [rbx], ecx
#   +17  48 81 C3 00 10 00 00   add rbx, 0x1000
#   +24  FF C9                  dec ecx
#   +26  75 F3                  jnz +15
FILL_LOOP = (b"\x48\xbb" + _imm("<Q", DATA_VA) + b"\xb9" + _imm("<I", FILL_PAGES)
             + b"\x89\x0b\x48\x81\xc3\x00\x10\x00\x00\xff\xc9\x75\xf3")


class UnicornPerAccess:
    """Guest stores under pks_emu's MMU: ``time_tlb_hit`` runs HIT_STORES
    stores to one page (loop included), ``time_tlb_fill`` FILL_PAGES stores
    to distinct pages (Unicorn's TLB is flushed at each run)."""

    timeout = 600

    def setup(self) -> None:
        try:
            from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
        except ImportError:
            raise NotImplementedError("unicorn is not installed") from None
        from pks_emu.integrations.unicorn import attach
        m = pks_emu.Machine()
        a = m.address_space()
        a.map(CODE_VA, 0x10_0000)
        a.map(CODE_VA + 0x1000, 0x10_1000)
        a.map_range(DATA_VA, 0x200_0000, FILL_PAGES * 4096, pkey=2)
        cpu = m.cpus[0]
        a.activate(cpu)
        cpu.cr4 |= CR4_PKE | CR4_PKS
        cpu.wrmsr(pks_emu.MSR_IA32_PKRS, PKR_WD_KEY(3) | PKR_AD_KEY(7))
        m.memory.write(0x10_0000, HIT_LOOP)
        m.memory.write(0x10_1000, FILL_LOOP)
        self.att = attach(Uc(UC_ARCH_X86, UC_MODE_64), m)
        self.att.run(CODE_VA, CODE_VA + len(HIT_LOOP))          # translate the code once
        self.att.run(CODE_VA + 0x1000, CODE_VA + 0x1000 + len(FILL_LOOP))

    def time_tlb_hit(self) -> None:
        self.att.run(CODE_VA, CODE_VA + len(HIT_LOOP))

    def time_tlb_fill(self) -> None:
        self.att.run(CODE_VA + 0x1000, CODE_VA + 0x1000 + len(FILL_LOOP))

    def track_fills_per_run(self) -> int:
        before = self.att.stats["tlb_fills"]
        self.time_tlb_fill()
        return self.att.stats["tlb_fills"] - before

    track_fills_per_run.unit = "fills"  # type: ignore[attr-defined]


def _main() -> None:
    """Print the cost per access of each way (best of 5 runs)."""
    import timeit

    with tempfile.TemporaryDirectory() as tmp:
        build_consumers(tmp)
        py, cy, ca = PythonPerAccess(), CimportPerAccess(), CapsulePerAccess()
        for b in (py, cy, ca):
            b.setup(tmp)
        rows = [("Python CPU.translate per call", lambda: py.time_translate_loop(tmp), N_PY),
                ("pks_emu.access_batch", lambda: py.time_access_batch(tmp), N),
                ("Cython cimport, nogil loop", lambda: cy.time_nogil_loop(tmp), N),
                ("C capsule, nogil loop", lambda: ca.time_nogil_loop(tmp), N)]
        u = UnicornPerAccess()
        u.setup()
        rows += [("Unicorn guest store, TLB hit (loop incl.)", u.time_tlb_hit, HIT_STORES),
                 ("Unicorn guest store, TLB fill via pks_emu", u.time_tlb_fill, FILL_PAGES)]
        for name, fn, n in rows:
            best = min(timeit.repeat(fn, number=1, repeat=5))
            print(f"{name:45s} {best / n * 1e9:10.1f} ns/access")
        print(f"(fills per fill run: {u.track_fills_per_run()})")


if __name__ == "__main__":
    _main()
