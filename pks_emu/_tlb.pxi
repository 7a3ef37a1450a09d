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

cdef inline void _tlb_fill(pks_cpu_t *c, pks_tlb_entry_t *t, uint64_t tag, uint64_t leaf) noexcept nogil:
    t.tag = tag
    t.leaf = leaf
    if leaf & PKS_LEAF_SIZE_MASK:
        c.tlb_has_large = 1


cdef void pks_flush_tlb(pks_cpu_t *c, bint keep_global) noexcept nogil:
    """Drop all entries, or all but the global ones (MOV to CR3 with CR4.PGE=1)."""
    cdef uint32_t i
    cdef bint large = False
    c.counters.tlb_flushes += 1
    for i in range(c.tlb_mask + 1):
        if keep_global and (c.tlb[i].leaf & PKS_PTE_G) and c.tlb[i].tag:
            if c.tlb[i].leaf & PKS_LEAF_SIZE_MASK:
                large = True
            continue
        c.tlb[i].tag = 0
    c.tlb_has_large = large


cdef void pks_invlpg(pks_cpu_t *c, uint64_t va) noexcept nogil:
    """INVLPG: drop the entries of the page containing ``va`` (global ones too)."""
    c.counters.invlpg += 1
    _tlb_drop_page(c, va)


cdef void _tlb_drop_page(pks_cpu_t *c, uint64_t va) noexcept nogil:
    """Drop every entry caching the page that contains ``va``, whatever its size."""
    cdef uint32_t i
    cdef uint64_t size_mask
    cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
    if (t.tag & ~<uint64_t>1) == (va & ~<uint64_t>0xFFF):
        t.tag = 0
    if c.tlb_has_large:
        for i in range(c.tlb_mask + 1):
            t = &c.tlb[i]
            if t.tag and (t.leaf & PKS_LEAF_SIZE_MASK):
                size_mask = ~((<uint64_t>1 << (12 + 9 * ((t.leaf & PKS_LEAF_SIZE_MASK) >> PKS_LEAF_SIZE_SHIFT))) - 1)
                if (t.tag & size_mask) == (va & size_mask):
                    t.tag = 0


cdef void _stale_check(pks_cpu_t *c, uint64_t va, int kind, bint implicit, uint64_t cached) noexcept nogil:
    """Opt-in debugging aid: compare a TLB hit with a fresh, side-effect-free
    walk and log the hit when the page tables no longer say the same thing
    (an edit of a PTE without INVLPG or a CR3 reload)."""
    cdef uint64_t fresh = 0, ea = 0
    cdef uint64_t cmp = (c.addr_mask | PKS_PTE_RW | PKS_PTE_US | PKS_PTE_XD
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
