# cython: language_level=3
"""C ABI of pks_emu: a PyCapsule holding a versioned table of function pointers.

C and C++ simulators include ``pks_emu.h`` (folder: ``pks_emu.get_include()``)
and call ``pks_emu_import()``, which fetches the capsule
``pks_emu._capi.PKS_EMU_C_API`` (the numpy ``import_array`` pattern). The
struct is declared once, in the header, and this module compiles against
that same header, so the table this module fills and the table a consumer
reads cannot disagree in layout.

The entries are thin wrappers over the ``noexcept nogil`` functions of
``pks_emu._core`` (declared in ``_core.pxd``) that take an opaque handle and
validate the arguments a C caller could get wrong (kind, size, register id)
instead of indexing out of bounds.

The module also holds the compiled helpers of ``pks_emu.hooks`` and
``pks_emu.integrations.unicorn`` (they live here so that the core files
stay untouched).
"""
from cpython.exc cimport PyErr_SetString
from cpython.pycapsule cimport PyCapsule_New
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from pks_emu._core cimport (CPU, PhysicalMemory, cpu_state_of, pks_access, pks_cpu_t,
                            pks_flush_tlb, pks_invlpg, pks_mem_frame, pks_rdmsr, pks_rdpkru,
                            pks_translate, pks_write_cr0, pks_write_cr3, pks_write_cr4,
                            pks_wrmsr, pks_wrpkru)

import numpy as np

from .errors import MachineBusyError

cdef extern from *:
    # The module fills the table; it does not import itself.
    """
    #define PKS_EMU_NO_IMPORT_HELPER 1
    """

cdef extern from "include/pks_emu.h":
    ctypedef void *pks_emu_cpu
    ctypedef struct pks_emu_c_api:
        uint32_t abi_version
        uint32_t api_version
        uint64_t size
        pks_emu_cpu (*cpu_handle)(PyObject *) noexcept
        int32_t (*access)(pks_emu_cpu, uint64_t, int, uint32_t, int, uint64_t *) noexcept nogil
        int32_t (*translate)(pks_emu_cpu, uint64_t, int, int, uint64_t *) noexcept nogil
        int32_t (*wrmsr)(pks_emu_cpu, uint32_t, uint64_t) noexcept nogil
        int32_t (*rdmsr)(pks_emu_cpu, uint32_t, uint64_t *) noexcept nogil
        int32_t (*wrpkru)(pks_emu_cpu, uint32_t, uint32_t, uint32_t) noexcept nogil
        int32_t (*rdpkru)(pks_emu_cpu, uint32_t, uint32_t *) noexcept nogil
        int32_t (*write_cr0)(pks_emu_cpu, uint64_t) noexcept nogil
        int32_t (*write_cr3)(pks_emu_cpu, uint64_t) noexcept nogil
        int32_t (*write_cr4)(pks_emu_cpu, uint64_t) noexcept nogil
        void (*invlpg)(pks_emu_cpu, uint64_t) noexcept nogil
        void (*flush_tlb)(pks_emu_cpu, int) noexcept nogil
        int32_t (*get_reg)(pks_emu_cpu, int, uint64_t *) noexcept nogil
        int32_t (*set_reg)(pks_emu_cpu, int, uint64_t) noexcept nogil
        uint8_t *(*frame)(pks_emu_cpu, uint64_t, int) noexcept nogil
        void (*enter_nogil)(pks_emu_cpu) noexcept
        void (*leave_nogil)(pks_emu_cpu) noexcept
    const unsigned PKS_EMU_C_ABI_VERSION, PKS_EMU_C_API_VERSION
    const char *PKS_EMU_CAPSULE_NAME
    enum:
        PKS_EMU_OK, PKS_EMU_GP, PKS_EMU_UD, PKS_EMU_EINVAL
        PKS_EMU_REG_CPL, PKS_EMU_REG_RFLAGS, PKS_EMU_REG_CR0, PKS_EMU_REG_CR3
        PKS_EMU_REG_CR4, PKS_EMU_REG_EFER, PKS_EMU_REG_PKRS, PKS_EMU_REG_PKRU
        PKS_EMU_REG_LAST_FAULT_VA, PKS_EMU_REG_LAST_PKEY


# --- the table entries -------------------------------------------------------

cdef pks_emu_cpu _c_cpu_handle(PyObject *obj) noexcept:
    if obj == NULL or not isinstance(<object>obj, CPU):
        PyErr_SetString(TypeError, "pks_emu cpu_handle: expected a pks_emu.CPU object")
        return NULL
    return <pks_emu_cpu>cpu_state_of(<CPU>obj)


cdef int32_t _c_access(pks_emu_cpu h, uint64_t va, int kind, uint32_t size, int implicit,
                       uint64_t *pa) noexcept nogil:
    # The core indexes its counters by kind and checks size only in Python:
    # a C caller's bad value must be an error, not an out-of-bounds write.
    if kind < 0 or kind > 2 or size == 0 or size > 4096 or pa == NULL:
        return PKS_EMU_EINVAL
    return pks_access(<pks_cpu_t *>h, va, kind, size, implicit != 0, pa)


cdef int32_t _c_translate(pks_emu_cpu h, uint64_t va, int kind, int implicit,
                          uint64_t *pa) noexcept nogil:
    if kind < 0 or kind > 2 or pa == NULL:
        return PKS_EMU_EINVAL
    return pks_translate(<pks_cpu_t *>h, va, kind, implicit != 0, pa)


cdef int32_t _c_wrmsr(pks_emu_cpu h, uint32_t msr, uint64_t value) noexcept nogil:
    return pks_wrmsr(<pks_cpu_t *>h, msr, value)


cdef int32_t _c_rdmsr(pks_emu_cpu h, uint32_t msr, uint64_t *value) noexcept nogil:
    if value == NULL:
        return PKS_EMU_EINVAL
    return pks_rdmsr(<pks_cpu_t *>h, msr, value)


cdef int32_t _c_wrpkru(pks_emu_cpu h, uint32_t eax, uint32_t ecx, uint32_t edx) noexcept nogil:
    return pks_wrpkru(<pks_cpu_t *>h, eax, ecx, edx)


cdef int32_t _c_rdpkru(pks_emu_cpu h, uint32_t ecx, uint32_t *eax) noexcept nogil:
    if eax == NULL:
        return PKS_EMU_EINVAL
    return pks_rdpkru(<pks_cpu_t *>h, ecx, eax)


cdef int32_t _c_write_cr0(pks_emu_cpu h, uint64_t value) noexcept nogil:
    return pks_write_cr0(<pks_cpu_t *>h, value)


cdef int32_t _c_write_cr3(pks_emu_cpu h, uint64_t value) noexcept nogil:
    return pks_write_cr3(<pks_cpu_t *>h, value)


cdef int32_t _c_write_cr4(pks_emu_cpu h, uint64_t value) noexcept nogil:
    return pks_write_cr4(<pks_cpu_t *>h, value)


cdef void _c_invlpg(pks_emu_cpu h, uint64_t va) noexcept nogil:
    pks_invlpg(<pks_cpu_t *>h, va)


cdef void _c_flush_tlb(pks_emu_cpu h, int keep_global) noexcept nogil:
    pks_flush_tlb(<pks_cpu_t *>h, keep_global != 0)


cdef int32_t _c_get_reg(pks_emu_cpu h, int reg, uint64_t *value) noexcept nogil:
    cdef pks_cpu_t *c = <pks_cpu_t *>h
    if value == NULL:
        return PKS_EMU_EINVAL
    if reg == PKS_EMU_REG_CPL:
        value[0] = c.cpl
    elif reg == PKS_EMU_REG_RFLAGS:
        value[0] = c.rflags
    elif reg == PKS_EMU_REG_CR0:
        value[0] = c.cr0
    elif reg == PKS_EMU_REG_CR3:
        value[0] = c.cr3
    elif reg == PKS_EMU_REG_CR4:
        value[0] = c.cr4
    elif reg == PKS_EMU_REG_EFER:
        value[0] = c.efer
    elif reg == PKS_EMU_REG_PKRS:
        value[0] = c.pkrs
    elif reg == PKS_EMU_REG_PKRU:
        value[0] = c.pkru
    elif reg == PKS_EMU_REG_LAST_FAULT_VA:
        value[0] = c.last_fault_va
    elif reg == PKS_EMU_REG_LAST_PKEY:
        value[0] = <uint64_t><int64_t>c.last_pkey
    else:
        return PKS_EMU_EINVAL
    return PKS_EMU_OK


cdef int32_t _c_set_reg(pks_emu_cpu h, int reg, uint64_t value) noexcept nogil:
    cdef pks_cpu_t *c = <pks_cpu_t *>h
    if reg == PKS_EMU_REG_CPL:
        if value > 3:
            return PKS_EMU_EINVAL
        c.cpl = <uint32_t>value
        return PKS_EMU_OK
    if reg == PKS_EMU_REG_RFLAGS:
        # As CPU.rflags: bit 1 reads as 1; bits 3, 5, 15 and 63:22 read as 0 (SDM §3.4.3).
        c.rflags = (value & 0x3F7FD5) | 0x2
        return PKS_EMU_OK
    return PKS_EMU_EINVAL


cdef uint8_t *_c_frame(pks_emu_cpu h, uint64_t pa, int create) noexcept nogil:
    cdef pks_cpu_t *c = <pks_cpu_t *>h
    if pa >> 52:
        return NULL
    if create and c.mem.busy:
        # Allocating may grow the frame table under a GIL-free reader.
        return pks_mem_frame(c.mem, pa >> 12, False)
    return pks_mem_frame(c.mem, pa >> 12, create != 0)


cdef void _c_enter_nogil(pks_emu_cpu h) noexcept:
    (<pks_cpu_t *>h).mem.busy += 1


cdef void _c_leave_nogil(pks_emu_cpu h) noexcept:
    cdef pks_cpu_t *c = <pks_cpu_t *>h
    if c.mem.busy:
        c.mem.busy -= 1


cdef pks_emu_c_api _api
_api.abi_version = PKS_EMU_C_ABI_VERSION
_api.api_version = PKS_EMU_C_API_VERSION
_api.size = sizeof(pks_emu_c_api)
_api.cpu_handle = _c_cpu_handle
_api.access = _c_access
_api.translate = _c_translate
_api.wrmsr = _c_wrmsr
_api.rdmsr = _c_rdmsr
_api.wrpkru = _c_wrpkru
_api.rdpkru = _c_rdpkru
_api.write_cr0 = _c_write_cr0
_api.write_cr3 = _c_write_cr3
_api.write_cr4 = _c_write_cr4
_api.invlpg = _c_invlpg
_api.flush_tlb = _c_flush_tlb
_api.get_reg = _c_get_reg
_api.set_reg = _c_set_reg
_api.frame = _c_frame
_api.enter_nogil = _c_enter_nogil
_api.leave_nogil = _c_leave_nogil

#: The capsule C code imports through ``pks_emu_import()``.
PKS_EMU_C_API = PyCapsule_New(<void *>&_api, PKS_EMU_CAPSULE_NAME, NULL)

ABI_VERSION = PKS_EMU_C_ABI_VERSION
API_VERSION = PKS_EMU_C_API_VERSION
CAPSULE_NAME = (<bytes>PKS_EMU_CAPSULE_NAME).decode()
TABLE_SIZE = sizeof(pks_emu_c_api)


def cpu_handle(CPU cpu not None):
    """The C handle of ``cpu`` as an int (for ctypes or cffi callers). Valid
    while ``cpu`` is alive."""
    return <uint64_t><size_t>cpu_state_of(cpu)


def frame_address(PhysicalMemory memory not None, uint64_t pa, bint create=True):
    """Host address of the 4-KiB frame of ``memory`` that holds ``pa``
    (allocating a zeroed frame if ``create``), or 0 if absent. Frames never
    move while ``memory`` is alive, so the address can back another
    emulator's RAM (``Uc.mem_map_ptr``)."""
    cdef uint8_t *p
    if pa >> 52:
        raise ValueError(f"physical address {pa:#x} exceeds the 52-bit physical address space")
    if create and memory.m.busy:
        raise MachineBusyError(
            "physical memory is in use by a GIL-free batch call on another thread")
    p = pks_mem_frame(&memory.m, pa >> 12, create)
    if p == NULL and create:
        raise MemoryError("out of memory allocating a physical frame")
    return <uint64_t><size_t>p


def last_fault(CPU cpu not None):
    """``(address, pkey)`` of the CPU's last #PF: the CR2 value and the key of
    the leaf the walk reached (None if it reached none)."""
    cdef pks_cpu_t *c = cpu_state_of(cpu)
    return c.last_fault_va, (c.last_pkey if c.last_pkey >= 0 else None)


def _run_until_fault(CPU cpu not None, const uint64_t[::1] va not None, const uint8_t[::1] kind not None,
                     const uint16_t[::1] size not None, const uint8_t[::1] implicit not None,
                     Py_ssize_t start, uint64_t[::1] pa_out not None, int32_t[::1] err_out not None):
    """Run accesses ``start..n-1`` in order and stop after the first fault.

    Returns the index of the faulting access, or n. The arrays are validated
    by ``pks_emu.hooks`` (same length, kinds 0..2, sizes 1..4096); this
    checks the lengths again because the loop indexes without checks.
    """
    cdef Py_ssize_t n = va.shape[0]
    cdef Py_ssize_t i
    cdef int32_t r = PKS_EMU_OK
    cdef pks_cpu_t *c = cpu_state_of(cpu)
    if (kind.shape[0] != n or size.shape[0] != n or implicit.shape[0] != n
            or pa_out.shape[0] != n or err_out.shape[0] != n):
        raise ValueError("_run_until_fault: all arrays must have the same length")
    if start < 0 or start > n:
        raise ValueError(f"_run_until_fault: start {start} out of range 0..{n}")
    for i in range(start, n):
        if kind[i] > 2 or size[i] == 0 or size[i] > 4096:
            raise ValueError(f"access {i}: kind {kind[i]} / size {size[i]} out of range")
    c.mem.busy += 1
    try:
        with nogil:
            i = start
            while i < n:
                r = pks_access(c, va[i], kind[i], size[i], implicit[i] != 0, &pa_out[i])
                err_out[i] = r
                if r != PKS_EMU_OK:
                    break
                i += 1
    finally:
        c.mem.busy -= 1
    return i
