"""The C ABI (issue 5): a small C extension, built here against
``pks_emu.get_include()``, imports the capsule through ``pks_emu.h`` and
calls the check without the GIL; its results must match ``CPU.translate``.
"""
from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pks_emu
import pks_emu._capi as capi
from pks_emu import constants as C
from pks_emu.embed import get_include
from test_cimport import (SUP_OPEN_VA, SUP_VA, USER_VA, accesses, build_extension, expected,
                          scenario)

CONSUMER_C = r'''
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include "pks_emu.h"

/* check(cpu, [va...], [kind...]) -> [(code, pa)...], the loop runs without the GIL */
static PyObject *check(PyObject *self, PyObject *args)
{
    PyObject *cpu_obj, *vas, *kinds, *out = NULL;
    if (!PyArg_ParseTuple(args, "OO!O!", &cpu_obj, &PyList_Type, &vas, &PyList_Type, &kinds))
        return NULL;
    pks_emu_cpu cpu = PKS_EMU_API->cpu_handle(cpu_obj);
    if (cpu == NULL)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(vas);
    if (PyList_GET_SIZE(kinds) != n) {
        PyErr_SetString(PyExc_ValueError, "length mismatch");
        return NULL;
    }
    uint64_t *va = malloc(sizeof(uint64_t) * (n + 1)), *pa = calloc(n + 1, sizeof(uint64_t));
    int *kind = malloc(sizeof(int) * (n + 1));
    int32_t *err = malloc(sizeof(int32_t) * (n + 1));
    if (!va || !pa || !kind || !err) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        va[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(vas, i));
        kind[i] = (int)PyLong_AsLong(PyList_GET_ITEM(kinds, i));
        if (PyErr_Occurred()) goto done;
    }
    PKS_EMU_API->enter_nogil(cpu);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        err[i] = PKS_EMU_API->access(cpu, va[i], kind[i], 1, 0, &pa[i]);
    Py_END_ALLOW_THREADS
    PKS_EMU_API->leave_nogil(cpu);
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++)
        PyList_SET_ITEM(out, i, Py_BuildValue("(iK)", (int)err[i], (unsigned long long)pa[i]));
done:
    free(va); free(pa); free(kind); free(err);
    return out;
}

/* op(cpu, name, a, b, c) -> (result, value): one table entry */
static PyObject *op(PyObject *self, PyObject *args)
{
    PyObject *cpu_obj;
    const char *name;
    unsigned long long a = 0, b = 0, c = 0;
    if (!PyArg_ParseTuple(args, "Os|KKK", &cpu_obj, &name, &a, &b, &c))
        return NULL;
    pks_emu_cpu cpu = PKS_EMU_API->cpu_handle(cpu_obj);
    if (cpu == NULL)
        return NULL;
    int32_t r = 0;
    uint64_t v = 0;
    uint32_t v32 = 0;
    if (!strcmp(name, "access")) r = PKS_EMU_API->access(cpu, a, (int)b, (uint32_t)c, 0, &v);
    else if (!strcmp(name, "translate")) r = PKS_EMU_API->translate(cpu, a, (int)b, 0, &v);
    else if (!strcmp(name, "wrmsr")) r = PKS_EMU_API->wrmsr(cpu, (uint32_t)a, b);
    else if (!strcmp(name, "rdmsr")) r = PKS_EMU_API->rdmsr(cpu, (uint32_t)a, &v);
    else if (!strcmp(name, "wrpkru")) r = PKS_EMU_API->wrpkru(cpu, (uint32_t)a, (uint32_t)b, (uint32_t)c);
    else if (!strcmp(name, "rdpkru")) { r = PKS_EMU_API->rdpkru(cpu, (uint32_t)a, &v32); v = v32; }
    else if (!strcmp(name, "cr0")) r = PKS_EMU_API->write_cr0(cpu, a);
    else if (!strcmp(name, "cr3")) r = PKS_EMU_API->write_cr3(cpu, a);
    else if (!strcmp(name, "cr4")) r = PKS_EMU_API->write_cr4(cpu, a);
    else if (!strcmp(name, "invlpg")) PKS_EMU_API->invlpg(cpu, a);
    else if (!strcmp(name, "flush")) PKS_EMU_API->flush_tlb(cpu, (int)a);
    else if (!strcmp(name, "get_reg")) r = PKS_EMU_API->get_reg(cpu, (int)a, &v);
    else if (!strcmp(name, "set_reg")) r = PKS_EMU_API->set_reg(cpu, (int)a, b);
    else if (!strcmp(name, "peek")) {            /* byte at physical a, no allocation */
        uint8_t *f = PKS_EMU_API->frame(cpu, a, 0);
        r = f ? PKS_EMU_OK : PKS_EMU_EINVAL;
        v = f ? f[a & 0xFFF] : 0;
    }
    else if (!strcmp(name, "poke")) {            /* byte b at physical a, allocating */
        uint8_t *f = PKS_EMU_API->frame(cpu, a, 1);
        r = f ? PKS_EMU_OK : PKS_EMU_EINVAL;
        if (f) f[a & 0xFFF] = (uint8_t)b;
    }
    else if (!strcmp(name, "enter")) PKS_EMU_API->enter_nogil(cpu);
    else if (!strcmp(name, "leave")) PKS_EMU_API->leave_nogil(cpu);
    else { PyErr_Format(PyExc_ValueError, "unknown op %s", name); return NULL; }
    return Py_BuildValue("(iK)", (int)r, (unsigned long long)v);
}

static PyObject *info(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("(IIKn)", PKS_EMU_API->abi_version, PKS_EMU_API->api_version,
                         (unsigned long long)PKS_EMU_API->size, (Py_ssize_t)sizeof(pks_emu_c_api));
}

static PyObject *reimport(PyObject *self, PyObject *noargs)
{
    if (pks_emu_import() < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"check", check, METH_VARARGS, NULL},
    {"op", op, METH_VARARGS, NULL},
    {"info", info, METH_NOARGS, NULL},
    {"reimport", reimport, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "pks_capi_consumer", NULL, -1, methods};

PyMODINIT_FUNC PyInit_pks_capi_consumer(void)
{
    if (pks_emu_import() < 0)
        return NULL;
    return PyModule_Create(&moddef);
}
'''

SETUP_PY = '''
from setuptools import Extension, setup

setup(name="pks_capi_consumer",
      ext_modules=[Extension("pks_capi_consumer", ["pks_capi_consumer.c"],
                             include_dirs=[{include!r}],
                             extra_compile_args=["-Wall", "-Werror", "-Wno-unused-function"])])
'''


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capsule")
    (tmp / "pks_capi_consumer.c").write_text(CONSUMER_C)
    return build_extension(tmp, "pks_capi_consumer", SETUP_PY.format(include=get_include()))


def test_import_works_in_a_fresh_interpreter(ext, tmp_path):
    """pks_emu_import() must import pks_emu._capi itself (PyCapsule_Import
    alone imports only the top-level package)."""
    code = (f"import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('pks_capi_consumer', {ext.__file__!r})\n"
            f"mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            f"assert 'pks_emu._capi' in sys.modules\n"
            f"print(mod.info())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ext.info())


def test_capsule_and_version_fields(ext):
    assert "pks_emu._capi.PKS_EMU_C_API" in repr(capi.PKS_EMU_C_API)
    abi, api, size, header_size = ext.info()
    assert (abi, api) == (capi.ABI_VERSION, capi.API_VERSION) == (1, 1)
    assert size == header_size == capi.TABLE_SIZE


@pytest.mark.parametrize("cpl", [0, 3])
def test_nogil_loop_through_capsule_matches_translate(ext, cpl):
    m, cpu = scenario()
    cpu.cpl = cpl
    va, kind = accesses(seed=11)
    got = ext.check(cpu, va.tolist(), kind.tolist())
    want_pa, want_err = expected(cpu, va, kind)
    assert [g[0] for g in got] == want_err.tolist()
    assert [g[1] for g, e in zip(got, want_err) if e == -1] == want_pa[want_err == -1].tolist()
    assert -1 in want_err and -2 in want_err and any(e >= 0 and e & C.PF_PK for e in want_err)


def test_register_entries_read_and_change_the_python_cpu(ext):
    m, cpu = scenario()
    PKRS = pks_emu.MSR_IA32_PKRS
    assert ext.op(cpu, "rdmsr", PKRS) == (-1, C.PKR_WD_KEY(3))
    assert ext.op(cpu, "access", SUP_VA, 1, 8)[0] == C.PF_P | C.PF_W | C.PF_PK
    assert ext.op(cpu, "wrmsr", PKRS, 0) == (-1, 0)
    assert cpu.pkrs == 0 and cpu.translate(SUP_VA, "write").ok
    assert ext.op(cpu, "wrmsr", PKRS, 1 << 32)[0] == -2          # reserved bits: #GP
    assert ext.op(cpu, "rdpkru") == (-1, C.PKR_AD_KEY(5))
    assert ext.op(cpu, "wrpkru", 0, 1, 0)[0] == -2                # ECX != 0: #GP
    assert ext.op(cpu, "wrpkru", C.PKR_WD_KEY(5))[0] == -1
    assert cpu.pkru == C.PKR_WD_KEY(5)
    assert ext.op(cpu, "set_reg", 0, 3) == (-1, 0) and cpu.cpl == 3
    assert ext.op(cpu, "wrmsr", PKRS, 0)[0] == -2                 # CPL 3: #GP
    assert ext.op(cpu, "access", USER_VA + 4, 1, 4)[0] == C.PF_P | C.PF_W | C.PF_U | C.PF_PK
    assert ext.op(cpu, "get_reg", 8) == (-1, USER_VA + 4)         # CR2
    assert ext.op(cpu, "get_reg", 9) == (-1, 5)                   # key of the leaf
    assert ext.op(cpu, "set_reg", 1, 1 << 18) == (-1, 0) and cpu.rflags == (1 << 18) | 2
    cr4 = cpu.cr4
    assert ext.op(cpu, "cr4", cr4 & ~C.CR4_PKE)[0] == -2          # MOV to CR4 at CPL 3: #GP
    assert ext.op(cpu, "set_reg", 0, 0) == (-1, 0) and cpu.cpl == 0
    assert ext.op(cpu, "cr4", cr4 & ~C.CR4_PKE) == (-1, 0) and cpu.cr4 == cr4 & ~C.CR4_PKE
    assert ext.op(cpu, "rdpkru")[0] == -3                         # CR4.PKE=0: #UD
    for reg, value in [(2, cpu.cr0), (3, cpu.cr3), (4, cpu.cr4), (5, cpu.efer), (6, cpu.pkrs),
                       (7, cpu.pkru), (0, 0)]:
        assert ext.op(cpu, "get_reg", reg) == (-1, value)


def test_tlb_entries(ext):
    m, cpu = scenario()
    cpu.translate(SUP_OPEN_VA, "read")
    assert cpu.tlb_occupancy() == 1
    ext.op(cpu, "invlpg", SUP_OPEN_VA + 0x80)
    assert cpu.tlb_occupancy() == 0
    cpu.translate(SUP_OPEN_VA, "read")
    ext.op(cpu, "flush", 0)
    assert cpu.tlb_occupancy() == 0
    pa = ext.op(cpu, "translate", SUP_OPEN_VA + 0x10, 0)
    assert pa == (-1, cpu.translate(SUP_OPEN_VA + 0x10, "read").pa)


def test_bad_arguments_are_errors_not_memory_corruption(ext):
    m, cpu = scenario()
    before = cpu.counters()
    assert ext.op(cpu, "access", SUP_OPEN_VA, 3, 8)[0] == -4      # kind
    assert ext.op(cpu, "access", SUP_OPEN_VA, 0, 0)[0] == -4      # size 0
    assert ext.op(cpu, "access", SUP_OPEN_VA, 0, 4097)[0] == -4   # size > 4096
    assert ext.op(cpu, "translate", SUP_OPEN_VA, -1 & 0xFFFFFFFF)[0] == -4
    assert ext.op(cpu, "get_reg", 99)[0] == -4
    assert ext.op(cpu, "set_reg", 0, 4)[0] == -4                  # CPL 4
    assert ext.op(cpu, "set_reg", 2, 0)[0] == -4                  # CR0 goes through write_cr0
    assert cpu.counters() == before
    with pytest.raises(TypeError, match="expected a pks_emu.CPU"):
        ext.op(object(), "flush")


def test_frames_are_shared_with_python(ext):
    m, cpu = scenario()
    m.memory.write(0x30_0010, b"\x5a")
    assert ext.op(cpu, "peek", 0x30_0010) == (-1, 0x5A)
    assert ext.op(cpu, "peek", 0x40_0000)[0] == -4                # never written: no frame
    assert not m.memory.is_allocated(0x40_0000)
    assert ext.op(cpu, "poke", 0x40_0123, 0xA5)[0] == -1
    assert m.memory.read(0x40_0123, 1) == b"\xa5"
    assert ext.op(cpu, "peek", 1 << 52)[0] == -4                  # beyond 52 bits


def test_enter_nogil_blocks_python_writers(ext):
    m, cpu = scenario()
    ext.op(cpu, "enter")
    try:
        with pytest.raises(pks_emu.MachineBusyError):
            m.memory.write(0x1000, b"x")
        assert ext.op(cpu, "poke", 0x50_0000, 1)[0] == -4         # no allocation while busy
    finally:
        ext.op(cpu, "leave")
    m.memory.write(0x1000, b"x")


class _FakeTable(ctypes.Structure):
    _fields_ = [("abi_version", ctypes.c_uint32), ("api_version", ctypes.c_uint32),
                ("size", ctypes.c_uint64)]


@pytest.mark.parametrize("abi,api,size,match", [
    (2, 1, 1 << 20, "C ABI version 2 does not match the 1"),
    (1, 0, 1 << 20, "C API version 0"),
    (1, 1, 24, "upgrade pks_emu"),
])
def test_import_refuses_incompatible_tables(ext, monkeypatch, abi, api, size, match):
    table = _FakeTable(abi, api, size)
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    name = ctypes.c_char_p(capi.CAPSULE_NAME.encode())
    monkeypatch.setattr(capi, "PKS_EMU_C_API", new(ctypes.addressof(table), name, None))
    with pytest.raises(ImportError, match=match):
        ext.reimport()
    monkeypatch.undo()
    ext.reimport()                       # the real table is accepted again
    assert ext.info()[0] == 1


def test_header_constants_match_python():
    text = (Path(get_include()) / "pks_emu.h").read_text()
    defs = {k: v for k, v in re.findall(r"#define (PKS_EMU_\w+)\s+\(?([-\w<() ]+?)\)?\s*(?:/\*|\n)", text)}

    def val(name):
        return int(eval(defs[name].replace("u", "").replace("U", "")))  # noqa: S307 - our header

    assert [val(f"PKS_EMU_{k}") for k in ("READ", "WRITE", "FETCH")] == [0, 1, 2]
    assert [val(f"PKS_EMU_{k}") for k in ("OK", "GP", "UD", "EINVAL")] == [-1, -2, -3, -4]
    for bit in ("P", "W", "U", "RSVD", "I", "PK"):
        assert val(f"PKS_EMU_PF_{bit}") == getattr(C, f"PF_{bit}"), bit
    assert val("PKS_EMU_MSR_IA32_PKRS") == C.MSR_IA32_PKRS
    assert val("PKS_EMU_MSR_IA32_EFER") == C.MSR_IA32_EFER
    assert f'"{capi.CAPSULE_NAME}"' in text
