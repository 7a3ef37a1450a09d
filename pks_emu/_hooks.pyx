# cython: language_level=3
"""Compiled helpers of ``pks_emu.hooks`` (fault callbacks for batches): run
accesses until the first fault without the GIL, and read back the fault.
Not a public API: ``pks_emu.hooks`` validates the arrays first, with the
batch API's own checks."""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint64_t

from pks_emu._core cimport PKS_OK, CPU, cpu_state_of, pks_access, pks_cpu_t


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
    cdef int32_t r = PKS_OK
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
                if r != PKS_OK:
                    break
                i += 1
    finally:
        c.mem.busy -= 1
    return i
