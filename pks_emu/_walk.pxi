# A paging-structure walk as a list of entries (included by _core.pyx): the
# debugging view CPU.walk gives, and the lookup the Python-side helpers
# (AddressSpace.lookup/entry_address, the kernel model's lookup_address and
# its pks_handle_key_fault walk) are built on. It reads the tables as the
# translating walk (_paging.pxi) does — the same index bits per level, the
# same end at a leaf (a PTE, or PS=1 at levels 3 and 2) or a not-present
# entry — without its checks or side effects: no A/D bits, no TLB.


cdef int _walk_entries(pks_mem_t *mem, uint64_t cr3, int levels, uint64_t addr_mask, uint64_t va,
                       uint64_t *ea_out, uint64_t *e_out) noexcept nogil:
    """Entry addresses and values from the top level down; the count."""
    cdef uint64_t table = cr3 & addr_mask
    cdef int level = levels, n = 0
    cdef uint64_t e, ea
    while level >= 1:
        ea = table + (((va >> (12 + 9 * (level - 1))) & 511) << 3)
        e = pks_mem_read_u64(mem, ea)
        ea_out[n] = ea
        e_out[n] = e
        n += 1
        if not (e & PKS_PTE_P) or level == 1 or ((e & PKS_PTE_PS) and level <= 3):
            break
        table = e & addr_mask
        level -= 1
    return n


def walk_entries(PhysicalMemory memory not None, uint64_t cr3, int levels, uint64_t va,
                 int maxphyaddr=52):
    """``[(level, entry_address, entry), ...]`` of the walk of ``va`` from
    the tables at ``cr3`` (``levels`` 4 or 5), top level first, ending at the
    leaf or at the first not-present entry."""
    cdef uint64_t eas[5]
    cdef uint64_t es[5]
    cdef int n, i
    if levels != 4 and levels != 5:
        raise ValueError(f"levels {levels}: expected 4 or 5")
    if not 36 <= maxphyaddr <= 52:
        raise ValueError(f"maxphyaddr {maxphyaddr}: expected 36..52")
    n = _walk_entries(&memory.m, cr3, levels, ((<uint64_t>1 << maxphyaddr) - 1) & ~<uint64_t>0xFFF,
                      va, eas, es)
    return [(levels - i, eas[i], es[i]) for i in range(n)]


def is_canonical(uint64_t va, int levels):
    """Whether ``va`` is canonical for 4- or 5-level paging (bits 63:47, or
    63:56, all equal; SDM Vol. 3A §4.5) — the rule the access check applies."""
    if levels != 4 and levels != 5:
        raise ValueError(f"levels {levels}: expected 4 or 5")
    cdef int shift = 7 if levels == 5 else 16
    return <uint64_t>((<int64_t>(va << shift)) >> shift) == va
