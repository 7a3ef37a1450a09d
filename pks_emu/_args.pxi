# Argument checks shared by the def functions of the core (included by _core.pyx).
#
# Cython converts a Python float to a C integer by truncation (cpu.access(1.5)
# read address 1): integer arguments go through _int first, which takes what
# has __index__ (int, bool, numpy integers) and refuses floats, strings, None.

from cpython.number cimport PyIndex_Check


cdef inline object _int(object x, str name):
    if not PyIndex_Check(x):
        raise TypeError(f"{name} must be an integer (int or numpy integer), not {type(x).__name__}")
    return x


cdef inline object _u64(object x, str name):
    """_int, and 0..2**64-1 (OverflowError otherwise, as a typed argument gives)."""
    cdef uint64_t v
    if not PyIndex_Check(x):
        raise TypeError(f"{name} must be an integer (int or numpy integer), not {type(x).__name__}")
    v = x
    return x
