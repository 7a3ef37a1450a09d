# cython: language_level=3
"""The compiled CPU core: sparse physical memory, the page walk, the access
rights and protection-key check, the TLB, the registers and the batch entry
points.

Python code should use the public API in ``pks_emu`` (``Machine``, ``CPU``);
Cython code can ``cimport`` the declarations in ``_core.pxd``. The rules live
in the ``.pxi`` files included below, one area each.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport calloc, malloc, free, realloc
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #ifndef PKS_EMU_DEBUG
    #define PKS_EMU_DEBUG 0
    #endif
    """
    const int PKS_EMU_DEBUG

#: True in a debug build (PKS_EMU_DEBUG=1: bounds checks and assertions on).
DEBUG_BUILD = bool(PKS_EMU_DEBUG)

include "_args.pxi"
include "_memory.pxi"
include "_paging.pxi"
include "_tlb.pxi"
include "_registers.pxi"
include "_walk.pxi"
include "_cpu.pxi"
include "_batch.pxi"
include "_kstate.pxi"
include "_sites.pxi"
include "_kmap.pxi"
include "_replay.pxi"
