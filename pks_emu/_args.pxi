# Argument checks shared by the def functions of the core (included by _core.pyx).
#
# Cython converts a Python float to a C integer by truncation (cpu.access(1.5)
# read address 1): integer arguments go through _int first, which takes what
# has __index__ (int, bool, numpy integers) and refuses floats, strings, None.

from cpython.number cimport PyIndex_Check


cdef int _not_int(object x, str name) except -1:
    # out of line, so that the checks below stay small enough to inline
    raise TypeError(f"{name} must be an integer (int or numpy integer), not {type(x).__name__}")


cdef inline object _int(object x, str name):
    if not PyIndex_Check(x):
        _not_int(x, name)
    return x


cdef inline object _u64(object x, str name):
    """_int, and 0..2**64-1 (OverflowError otherwise, as a typed argument gives)."""
    cdef uint64_t v
    if not PyIndex_Check(x):
        _not_int(x, name)
    v = x
    return x


cdef inline uint64_t _c_u64(object x, str name) except? 0xFFFFFFFFFFFFFFFF:
    """_u64 as a C value, for the hot single-access path."""
    if not PyIndex_Check(x):
        _not_int(x, name)
    return x


cdef inline uint32_t _c_u32(object x, str name) except? 0xFFFFFFFF:
    if not PyIndex_Check(x):
        _not_int(x, name)
    return x
