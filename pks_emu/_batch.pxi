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


def access_batch(CPU cpu not None, va, kind, size=1, implicit=False, *, out=None):
    """Check many accesses with ``cpu``'s current registers, in order, through its TLB.

    ``va``: uint64 array; ``kind``: uint8 array (0 read, 1 write, 2 fetch) or
    one kind for all; ``size``: scalar or uint16 array (1..4096);
    ``implicit``: bool scalar or array. Returns ``(pa, error_code)``: uint64
    physical addresses (0 where the access faulted) and int32 error codes,
    -1 where the access succeeded, -2 for #GP (non-canonical), else the #PF
    error code. ``out=(pa, error_code)`` writes into arrays you keep
    (contiguous uint64 and int32 of len(va)) instead of allocating new ones:
    a simulator checking chunk after chunk saves the page faults of fresh
    output memory, about a tenth of the time on TLB hits.
    """
    # Values are range-checked *before* the cast to the narrow loop dtypes: a
    # cast first turned size=65537 into 1 and kind=-1 into 255 (a silent wrong
    # answer, or an error quoting a value the caller never passed).
    cdef const uint64_t[::1] vas = _batch_va(va)
    cdef Py_ssize_t n = vas.shape[0]
    cdef Py_ssize_t i
    if isinstance(kind, str):
        kind = _kind_of(kind)
    elif isinstance(kind, (list, tuple)) and any(isinstance(k, str) for k in kind):
        kind = [_batch_kind(i, k) for i, k in enumerate(kind)]
    kinds_arr = _batch_arg("kind", kind, n, np.uint8, 0, 2, "0 (read), 1 (write) or 2 (fetch)")
    sizes_arr = _batch_arg("size", size, n, np.uint16, 1, 4096, "1..4096")
    impl_arr = _batch_arg("implicit", implicit, n, np.uint8, 0, 1, "a bool")
    cdef const uint8_t[::1] kinds = kinds_arr
    cdef const uint16_t[::1] sizes = sizes_arr
    cdef const uint8_t[::1] impl = impl_arr
    # A scalar argument stays one element (index mask 0) instead of being
    # broadcast into an n-element array that the loop would stream through.
    cdef Py_ssize_t kmask = 0 if kinds.shape[0] == 1 and n != 1 else -1
    cdef Py_ssize_t smask = 0 if sizes.shape[0] == 1 and n != 1 else -1
    cdef Py_ssize_t imask = 0 if impl.shape[0] == 1 and n != 1 else -1
    if out is None:
        pa_out = np.empty(n, dtype=np.uint64)
        err_out = np.empty(n, dtype=np.int32)
    else:
        try:
            pa_out, err_out = out
        except (TypeError, ValueError):
            raise TypeError("out must be a pair of arrays (pa, error_code)") from None
        for name, arr, dt in (("pa", pa_out, np.uint64), ("error_code", err_out, np.int32)):
            if (not isinstance(arr, np.ndarray) or arr.dtype != dt or arr.ndim != 1
                    or arr.shape[0] != n or not arr.flags.c_contiguous or not arr.flags.writeable):
                raise ValueError(f"out {name} must be a writable contiguous {np.dtype(dt).name} "
                                 f"array of {n} elements (one per va)")
    cdef uint64_t[::1] pas = pa_out
    cdef int32_t[::1] errs = err_out
    cdef pks_cpu_t *c = &cpu.st
    cdef int32_t r
    cdef uint32_t smode0, imp
    # Raw pointers and masks in locals: the loop's stores (pa, error codes,
    # counters) could alias memoryview structs, which would be reloaded from
    # the stack on every access.
    cdef const uint64_t *vp = &vas[0] if n else NULL
    cdef const uint8_t *kp = &kinds[0] if n else NULL
    cdef const uint16_t *sp = &sizes[0] if n else NULL
    cdef const uint8_t *ip = &impl[0] if n else NULL
    cdef uint64_t *pp = &pas[0] if n else NULL
    cdef int32_t *ep = &errs[0] if n else NULL
    _enter_nogil(cpu)
    try:
        with nogil:
            # The registers cannot change during the loop: CPL and EFLAGS.AC
            # are read once (the implicit bit goes into bit 1 of smode).
            smode0 = _smode(c, False)
            if n and smask == 0 and imask == 0:
                # The common call: one size and one implicit flag for all
                # (fewer live values: the loop stays in registers).
                _batch_loop_scalar_p(c, vp, kp, kmask, sp[0], smode0 | (<uint32_t>ip[0] << 1),
                                   pp, ep, n)
                n = 0
            for i in range(n):
                imp = ip[i & imask]
                r = _access_m(c, vp[i], kp[i & kmask], sp[i & smask], imp != 0,
                              smode0 | (imp << 1), &pp[i])
                ep[i] = r
                if r != PKS_OK:
                    pp[i] = 0
    finally:
        _leave_nogil(cpu)
    return pa_out, err_out


cdef inline Py_ssize_t _batch_misses(pks_cpu_t *c, const uint64_t *vp, const uint8_t *kp,
                                    Py_ssize_t kmask, uint32_t size, uint32_t smode, uint64_t *pp,
                                    int32_t *ep, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Accesses ``i``.. of _batch_loop_scalar while they miss the TLB, from
    access ``i`` (within one page, a miss). Returns the index of the first
    access left to the caller's loop: a hit or a page-crossing access, or
    ``n``. Each access runs exactly what _access_m runs for it (_miss); a run
    of misses (random order over many pages) then costs no call per access."""
    cdef uint64_t va = vp[i]
    cdef int kind = kp[i & kmask]
    cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
    cdef int32_t r
    while True:
        r = _miss(c, va, kind, smode, &pp[i], t)
        if r != PKS_OK:
            pp[i] = 0
        ep[i] = r
        i += 1
        if i == n:
            return n
        va = vp[i]
        kind = kp[i & kmask]
        if (va & 0xFFF) + size > 4096:
            return i
        t = &c.tlb[(va >> 12) & c.tlb_mask]
        if _tlb_hit(t, va, kind):
            return i


cdef inline Py_ssize_t _batch_hits(pks_cpu_t *c, const uint64_t *vp, const uint8_t *kp,
                                   Py_ssize_t kmask, uint32_t size, uint32_t smode, uint64_t *pp,
                                   int32_t *ep, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Accesses ``i``.. of _batch_loop_scalar up to the first one within a
    page that misses the TLB (its index is returned, or ``n``). No miss
    handling in here: the hit loop keeps its values in registers."""
    cdef int32_t r
    while i < n:
        r = _access_m(c, vp[i], kp[i & kmask], size, (smode >> 1) & 1, smode, &pp[i], True)
        ep[i] = r                   # (a deferred miss's is overwritten by _batch_misses)
        if r != PKS_OK:
            if r == _MISS_DEFERRED:
                return i
            pp[i] = 0
        i += 1
    return n


# Two copies of each loop, with the kind mask a constant: one kind per
# access (the common case: one register and two instructions fewer per
# access) or one kind for all.
cdef Py_ssize_t _batch_hits_each(pks_cpu_t *c, const uint64_t *vp, const uint8_t *kp,
                                 Py_ssize_t kmask, uint32_t size, uint32_t smode, uint64_t *pp,
                                 int32_t *ep, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    return _batch_hits(c, vp, kp, -1, size, smode, pp, ep, i, n)


cdef Py_ssize_t _batch_hits_one(pks_cpu_t *c, const uint64_t *vp, const uint8_t *kp,
                                Py_ssize_t kmask, uint32_t size, uint32_t smode, uint64_t *pp,
                                int32_t *ep, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    return _batch_hits(c, vp, kp, 0, size, smode, pp, ep, i, n)


cdef Py_ssize_t _batch_misses_each(pks_cpu_t *c, const uint64_t *vp, const uint8_t *kp,
                                   Py_ssize_t kmask, uint32_t size, uint32_t smode, uint64_t *pp,
                                   int32_t *ep, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    return _batch_misses(c, vp, kp, -1, size, smode, pp, ep, i, n)


cdef Py_ssize_t _batch_misses_one(pks_cpu_t *c, const uint64_t *vp, const uint8_t *kp,
                                  Py_ssize_t kmask, uint32_t size, uint32_t smode, uint64_t *pp,
                                  int32_t *ep, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    return _batch_misses(c, vp, kp, 0, size, smode, pp, ep, i, n)


ctypedef Py_ssize_t (*_batch_run_fn)(pks_cpu_t *, const uint64_t *, const uint8_t *, Py_ssize_t,
                                    uint32_t, uint32_t, uint64_t *, int32_t *,
                                    Py_ssize_t, Py_ssize_t) noexcept nogil
# Called through pointers: out of line, each loop has the registers to itself.
cdef _batch_run_fn _batch_hits_each_p = _batch_hits_each
cdef _batch_run_fn _batch_hits_one_p = _batch_hits_one
cdef _batch_run_fn _batch_misses_each_p = _batch_misses_each
cdef _batch_run_fn _batch_misses_one_p = _batch_misses_one


cdef void _batch_loop_scalar(pks_cpu_t *c, const uint64_t *vp, const uint8_t *kp, Py_ssize_t kmask,
                             uint32_t size, uint32_t smode, uint64_t *pp, int32_t *ep,
                             Py_ssize_t n) noexcept nogil:
    # Hits and runs of misses take turns, each in its own loop.
    cdef Py_ssize_t i = 0
    cdef _batch_run_fn hits = _batch_hits_each_p if kmask else _batch_hits_one_p
    cdef _batch_run_fn misses = _batch_misses_each_p if kmask else _batch_misses_one_p
    while True:
        i = hits(c, vp, kp, kmask, size, smode, pp, ep, i, n)
        if i == n:
            return
        i = misses(c, vp, kp, kmask, size, smode, pp, ep, i, n)
        if i == n:
            return


ctypedef void (*_batch_loop_fn)(pks_cpu_t *, const uint64_t *, const uint8_t *, Py_ssize_t,
                               uint32_t, uint32_t, uint64_t *, int32_t *,
                               Py_ssize_t) noexcept nogil
# Called through a pointer: out of line, the loop has the registers to itself.
cdef _batch_loop_fn _batch_loop_scalar_p = _batch_loop_scalar


def _batch_kind(Py_ssize_t i, k):
    """One element of a list of kinds given by name."""
    if not isinstance(k, str):
        return k                            # numbers are range-checked with the rest
    try:
        return _kind_of(k)
    except ValueError:
        raise ValueError(f"kind[{i}] = {k!r}: expected 'read', 'write' or 'fetch'") from None


def _batch_va(va):
    """``va`` as a contiguous 1-D uint64 array; no silent float or negative conversion."""
    if isinstance(va, np.ndarray):
        if va.dtype.kind not in "ui":
            raise TypeError(f"va must be an integer array (uint64), got dtype {va.dtype}")
        if va.dtype.kind == "i" and va.size and int(va.min()) < 0:
            bad = int(np.argmax(va < 0))
            raise ValueError(f"va[{bad}] = {int(va.flat[bad])}: expected 0..2**64-1")
    else:
        if not isinstance(va, (list, tuple, range)) or not all(
                isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in va):
            # np.array([1.5], dtype=np.uint64) would truncate to 1
            raise TypeError("va must be an integer array (uint64) or a list of ints")
        va = np.array(va, dtype=np.uint64)     # exact for Python ints; OverflowError if < 0
    if va.ndim != 1:
        raise ValueError(f"va must be one-dimensional, got shape {va.shape}")
    return np.ascontiguousarray(va, dtype=np.uint64)


def _batch_arg(str name, value, Py_ssize_t n, dtype, long lo, long hi, str expected):
    """Broadcast a per-access argument to ``n`` values of ``dtype``, after
    checking each value against lo..hi; errors name the first bad index."""
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "ui":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
        raise ValueError(f"{name} has shape {arr.shape}: expected a scalar or {n} values (one per va)")
    if arr.ndim == 0:
        if n and not lo <= int(arr) <= hi:
            raise ValueError(f"{name}[0] = {int(arr)}: expected {expected}")
        return np.full(1, arr, dtype=dtype)          # the loop reads element 0 for every access
    if n and (int(arr.min()) < lo or int(arr.max()) > hi):
        bad = int(np.argmax((arr < lo) | (arr > hi)))
        raise ValueError(f"{name}[{bad}] = {int(arr[bad])}: expected {expected}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _measured_batch(CPU cpu, va, kind, size, out):
    """``access_batch`` under another name: ``pks-emu bench --instructions``
    counts the instructions of this call alone (valgrind --toggle-collect)."""
    return access_batch(cpu, va, kind, size, out=out)
