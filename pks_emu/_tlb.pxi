# The TLB (included by _core.pyx).
#
# Direct-mapped, one entry per 4-KiB linear page. A large page is cached in
# 4-KiB pieces, each tagged with its page size, so INVLPG of any address in
# the large page drops every piece (SDM §4.10.4.1: INVLPG invalidates the
# entries for the page containing the address, whatever its size).
#
# Nothing here reads PKRU or PKRS: an entry caches the translation, the
# combined rights and the key, and every access reads the live registers
# (SDM §4.6.2, and the reason keys exist: no flush on WRPKRU/WRMSR).

cdef inline bint _tlb_hit(pks_tlb_entry_t *t, uint64_t va, int kind) noexcept nogil:
    """Whether entry ``t`` caches the page of ``va`` for an access of ``kind``:
    ``tag`` admits reads and fetches, ``tag_w`` (the next word) writes, and
    only while D=1 (a write through a D=0 entry misses, and sets D)."""
    return (<uint64_t *>t)[kind & 1] == ((va & ~<uint64_t>0xFFF) | 1)


cdef inline void _tlb_fill(pks_cpu_t *c, pks_tlb_entry_t *t, uint64_t tag, uint64_t leaf) noexcept nogil:
    t.tag = tag
    t.tag_w = tag if leaf & PKS_PTE_D else 0
    t.leaf = leaf
    if leaf & PKS_LEAF_SIZE_MASK:
        _tlb_note_large(c, tag, leaf)


cdef void _tlb_note_large(pks_cpu_t *c, uint64_t tag, uint64_t leaf) noexcept nogil:
    """Remember a large page that has pieces in the TLB (at most 8; past
    that, dropping a page scans the whole TLB)."""
    cdef uint64_t mask = ~((<uint64_t>1 << (12 + 9 * ((leaf & PKS_LEAF_SIZE_MASK) >> PKS_LEAF_SIZE_SHIFT))) - 1)
    cdef uint64_t base = tag & mask
    cdef uint32_t i
    c.tlb_has_large = 1
    for i in range(c.n_large):
        if c.large_base[i] == base and c.large_mask[i] == mask:
            return
    if c.n_large < 8:
        c.large_base[c.n_large] = base
        c.large_mask[c.n_large] = mask
        c.n_large += 1
    else:
        c.large_overflow = 1


cdef void pks_flush_tlb(pks_cpu_t *c, bint keep_global) noexcept nogil:
    """Drop all entries, or all but the global ones (MOV to CR3 with CR4.PGE=1).
    Either way every paging-structure-cache entry goes too (SDM §4.10.4.1:
    MOV to CR3 invalidates all of them; the model's full flushes are at least
    as strong). Also rebuilds the tables derived from the registers, which a
    direct register load (load_cpu_state) follows with a flush."""
    cdef uint32_t i
    cdef pks_tlb_entry_t *t
    c.counters.tlb_flushes += 1
    c.n_large = 0
    c.large_overflow = 0
    c.tlb_has_large = 0
    for i in range(c.tlb_mask + 1):
        t = &c.tlb[i]
        if keep_global and (t.leaf & PKS_PTE_G) and t.tag:
            if t.leaf & PKS_LEAF_SIZE_MASK:
                _tlb_note_large(c, t.tag, t.leaf)
            continue
        t.tag = 0
        t.tag_w = 0
    _psc_flush(c)
    c.memo_epoch += 1
    _derive_all(c)


cdef void pks_invlpg(pks_cpu_t *c, uint64_t va) noexcept nogil:
    """INVLPG: drop the entries of the page containing ``va`` (global ones
    too), and every paging-structure-cache entry (SDM §4.10.4.1: "regardless
    of the linear addresses to which they correspond")."""
    c.counters.invlpg += 1
    _tlb_drop_page(c, va)
    _psc_flush(c)


cdef inline void _tlb_drop_if_in(pks_tlb_entry_t *t, uint64_t va) noexcept nogil:
    cdef uint64_t size_mask
    if t.tag and (t.leaf & PKS_LEAF_SIZE_MASK):
        size_mask = ~((<uint64_t>1 << (12 + 9 * ((t.leaf & PKS_LEAF_SIZE_MASK) >> PKS_LEAF_SIZE_SHIFT))) - 1)
        if (t.tag & size_mask) == (va & size_mask):
            t.tag = 0
            t.tag_w = 0


cdef void _tlb_drop_page(pks_cpu_t *c, uint64_t va) noexcept nogil:
    """Drop every entry caching the page that contains ``va``, whatever its size."""
    cdef uint32_t i, j, n
    cdef uint64_t pieces
    cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
    if (t.tag & ~<uint64_t>1) == (va & ~<uint64_t>0xFFF):
        t.tag = 0
        t.tag_w = 0
    if not c.tlb_has_large:
        return
    if c.large_overflow:
        for i in range(c.tlb_mask + 1):
            _tlb_drop_if_in(&c.tlb[i], va)
        return
    # Only the slots that can hold a piece of a listed large page containing va.
    i = 0
    while i < c.n_large:
        if (va & c.large_mask[i]) != c.large_base[i]:
            i += 1
            continue
        pieces = (~c.large_mask[i] >> 12) + 1
        n = c.tlb_mask + 1 if pieces > c.tlb_mask else <uint32_t>pieces
        for j in range(n):
            _tlb_drop_if_in(&c.tlb[((c.large_base[i] >> 12) + j) & c.tlb_mask], va)
        # It has no pieces left: forget it.
        c.n_large -= 1
        c.large_base[i] = c.large_base[c.n_large]
        c.large_mask[i] = c.large_mask[c.n_large]
    if c.n_large == 0:
        c.tlb_has_large = 0


cdef inline void _miss_fault_drop(pks_cpu_t *c, uint64_t va, pks_tlb_entry_t *t) noexcept nogil:
    """A walk after a TLB miss faulted: drop what the TLB still holds for
    ``va`` (SDM §4.10.4.1: a #PF invalidates the entries for the faulting
    address). A miss can leave some: a write through a D=0 entry misses, and
    pieces of a large page holding ``va`` may sit in other slots. QEMU keeps
    its entries when a refill faults (compat="qemu" does too)."""
    if c.compat != PKS_COMPAT_QEMU and ((t.tag & ~<uint64_t>1) == (va & ~<uint64_t>0xFFF)
                                        or c.tlb_has_large):
        _tlb_drop_page(c, va)


cdef void _stale_check(pks_cpu_t *c, uint64_t va, int kind, bint implicit, uint64_t cached) noexcept nogil:
    """Opt-in debugging aid: compare a TLB hit with a fresh, side-effect-free
    walk and log the hit when the page tables no longer say the same thing
    (an edit of a PTE without INVLPG or a CR3 reload)."""
    cdef uint64_t fresh = 0
    cdef uint64_t *ea = NULL
    cdef uint64_t cmp = (c.addr_mask | PKS_PTE_RW | PKS_PTE_US | PKS_LEAF_XD
                         | PKS_PKEY_FIELD | PKS_LEAF_SIZE_MASK)
    cdef int32_t r = _walk(c, va, kind, implicit, False, &fresh, &ea)
    c.counters.walks -= 1  # the check's walk is not part of the emulated machine's work
    if r == PKS_OK and ((fresh ^ cached) & cmp) == 0:
        return
    c.counters.stale_uses += 1
    if c.stale_log != NULL:
        c.stale_log[c.stale_len % c.stale_cap].va = va
        c.stale_log[c.stale_len % c.stale_cap].cached_leaf = cached
        c.stale_log[c.stale_len % c.stale_cap].fresh_leaf = fresh if r == PKS_OK else 0
        c.stale_log[c.stale_len % c.stale_cap].fresh_error = r
    c.stale_len += 1
