# Batch entry points (included by _core.pyx): numpy arrays in, arrays out,
# the Python cost paid once per call. Arguments are validated before the
# GIL-free loop, which then indexes without checks.

import numpy as np


cdef inline int _enter_nogil(CPU cpu) except -1:
    # One GIL-free loop per machine at a time: a replay may allocate frames,
    # which moves the frame table under any other reader.
    _check_writable(cpu.st.mem)
    cpu.st.mem.busy += 1
    return 0


cdef inline void _leave_nogil(CPU cpu):
    cpu.st.mem.busy -= 1


def access_batch(CPU cpu, va, kind, size=1, implicit=False):
    """Check many accesses with ``cpu``'s current registers, in order, through its TLB.

    ``va``: uint64 array; ``kind``: uint8 array (0 read, 1 write, 2 fetch) or
    one kind for all; ``size``: scalar or uint16 array (1..4096);
    ``implicit``: bool scalar or array. Returns ``(pa, error_code)``: uint64
    physical addresses (0 where the access faulted) and int32 error codes,
    -1 where the access succeeded, -2 for #GP (non-canonical), else the #PF
    error code.
    """
    cdef const uint64_t[::1] vas = np.ascontiguousarray(va, dtype=np.uint64)
    cdef Py_ssize_t n = vas.shape[0]
    cdef Py_ssize_t i
    kinds_arr = np.ascontiguousarray(
        np.broadcast_to(np.asarray(kind if not isinstance(kind, str) else _kind_of(kind)), (n,)),
        dtype=np.uint8)
    sizes_arr = np.ascontiguousarray(np.broadcast_to(np.asarray(size), (n,)), dtype=np.uint16)
    impl_arr = np.ascontiguousarray(np.broadcast_to(np.asarray(implicit), (n,)), dtype=np.uint8)
    if n and int(kinds_arr.max()) > 2:
        bad = int(np.argmax(kinds_arr > 2))
        raise ValueError(f"kind[{bad}] = {int(kinds_arr[bad])}: expected 0 (read), 1 (write) or 2 (fetch)")
    if n and (int(sizes_arr.min()) == 0 or int(sizes_arr.max()) > 4096):
        bad = int(np.argmax((sizes_arr == 0) | (sizes_arr > 4096)))
        raise ValueError(f"size[{bad}] = {int(sizes_arr[bad])}: expected 1..4096")
    cdef const uint8_t[::1] kinds = kinds_arr
    cdef const uint16_t[::1] sizes = sizes_arr
    cdef const uint8_t[::1] impl = impl_arr
    pa_out = np.zeros(n, dtype=np.uint64)
    err_out = np.empty(n, dtype=np.int32)
    cdef uint64_t[::1] pas = pa_out
    cdef int32_t[::1] errs = err_out
    cdef pks_cpu_t *c = &cpu.st
    _enter_nogil(cpu)
    try:
        with nogil:
            for i in range(n):
                errs[i] = _access(c, vas[i], kinds[i], sizes[i], impl[i] != 0, &pas[i])
    finally:
        _leave_nogil(cpu)
    return pa_out, err_out
