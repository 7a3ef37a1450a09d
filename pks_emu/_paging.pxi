# The page walk and the access-rights check (included by _core.pyx).
#
# Rules and their sources are tabulated in docs/semantics.md. In short:
#   * 4-level and 5-level IA-32e paging (SDM §4.5); leaves are the PTE, a PDE
#     with PS=1 (2 MiB) and a PDPTE with PS=1 (1 GiB, only with the 1G feature).
#   * P=0 and reserved-bit faults end the walk before any rights or key check
#     (SDM §4.7; KVM "no PKRU/PKRS check for !PRESENT or RSVD faults").
#   * Rights combine U/S and R/W over all levels, XD over all levels (SDM §4.6.1).
#   * The key register is chosen by the *address* type (user page -> PKRU,
#     supervisor page -> PKRS); AD blocks data reads and writes; WD blocks user
#     writes always and supervisor writes only with CR0.WP=1; fetches ignore
#     keys (SDM §4.6.2; KVM update_pkr_bitmask, Xen guest_walk, QEMU 7.2 agree).
#   * PK is reported whenever the key denies, even if another check fails too
#     (SDM §4.7; Xen 8f2e3d89 "key checks are performed ahead").

cdef extern from *:
    """
    /* Synthesized-leaf fields that are not architectural entry bits. */
    #define PKS_LEAF_SIZE_SHIFT 9          /* 0 = 4K, 1 = 2M, 2 = 1G      */
    #define PKS_LEAF_SIZE_MASK (3ULL << 9)
    #define PKS_LEAF_PKE (1ULL << 52)      /* CR4.PKE when the entry was filled */
    #define PKS_LEAF_PKS (1ULL << 53)      /* CR4.PKS when the entry was filled */
    #define PKS_PKEY_FIELD (0xFULL << 59)
    """
    const int PKS_LEAF_SIZE_SHIFT
    const uint64_t PKS_LEAF_SIZE_MASK, PKS_LEAF_PKE, PKS_LEAF_PKS, PKS_PKEY_FIELD


cdef inline bint _user_mode(pks_cpu_t *c, bint implicit) noexcept nogil:
    # SDM §4.6.1: CPL 3 accesses are user-mode unless implicit (GDT/IDT/TSS...).
    return c.cpl == 3 and not implicit


cdef inline int32_t _pf_error(pks_cpu_t *c, int kind, bint implicit, uint32_t bits) noexcept nogil:
    """Complete a #PF error code with W/R, U/S and I/D, which describe the access."""
    cdef uint32_t code = bits
    if kind == PKS_WRITE:
        code |= PKS_PF_W
    if _user_mode(c, implicit):
        code |= PKS_PF_U
    # SDM §4.7: I/D is reported only if SMEP=1, or NXE=1 with PAE-type paging.
    if kind == PKS_FETCH and ((c.cr4 & PKS_CR4_SMEP) or (c.efer & PKS_EFER_NXE)):
        code |= PKS_PF_I
    return <int32_t>code


cdef inline uint64_t _rsvd_mask(pks_cpu_t *c, int level, uint64_t e) noexcept nogil:
    """Reserved bits of entry ``e`` at ``level`` (5 = PML5E ... 1 = PTE), SDM §4.5 tables 4-15..4-20."""
    cdef uint64_t r = c.rsvd_phys
    if not (c.efer & PKS_EFER_NXE):
        r |= PKS_PTE_XD
    if level >= 4:
        r |= PKS_PTE_PS
    elif level == 3 and (e & PKS_PTE_PS):
        if c.features & PKS_FEAT_1G or c.compat == PKS_COMPAT_QEMU:
            r |= 0x3FFFE000ULL          # bits 29:13 of a 1-GiB leaf
        else:
            r |= PKS_PTE_PS             # no 1-GiB pages: PS itself is reserved
    elif level == 2 and (e & PKS_PTE_PS):
        r |= 0x1FE000ULL                # bits 20:13 of a 2-MiB leaf
    return r


cdef inline uint8_t *_frame(pks_cpu_t *c, uint64_t pfn) noexcept nogil:
    """Host page of frame ``pfn`` (NULL if never written), through the CPU's frame cache."""
    cdef uint32_t i = <uint32_t>(pfn & 4095)   # enough for the tables of 8 GiB of 4-KiB pages
    cdef uint8_t *page
    if c.frame_cache_pfn[i] == pfn:
        return c.frame_cache_page[i]
    page = pks_mem_frame(c.mem, pfn, False)
    if page != NULL:
        c.frame_cache_pfn[i] = pfn
        c.frame_cache_page[i] = page
    return page


cdef inline uint64_t *_entry_ptr(pks_cpu_t *c, uint64_t ea) noexcept nogil:
    cdef uint8_t *page = _frame(c, ea >> 12)
    if page == NULL:
        return NULL
    return <uint64_t *>(page + (ea & 0xFF8))


cdef inline void _set_bits(pks_cpu_t *c, uint64_t ea, uint64_t bits) noexcept nogil:
    # The entry was just read as present, so its frame exists.
    cdef uint64_t *p = _entry_ptr(c, ea)
    if p != NULL and (p[0] & bits) != bits:
        p[0] |= bits


cdef int32_t _walk(pks_cpu_t *c, uint64_t va, int kind, bint implicit, bint update,
                   uint64_t *leaf_out, uint64_t *leaf_ea) noexcept nogil:
    """Walk the tables for ``va``. On reaching a leaf, store the synthesized
    leaf and the address of the leaf entry and return PKS_OK; otherwise return
    the #PF error code of the not-present or reserved-bit fault.

    With ``update``, the Accessed flag is set in each non-leaf entry as the walk
    passes it (after its P and reserved-bit checks), as QEMU 7.2 does and SDM
    §4.8 describes ("whenever the processor uses a paging-structure entry");
    the leaf's A/D are set by the caller once the access is allowed.
    """
    cdef uint64_t table = c.cr3 & c.addr_mask
    cdef uint64_t e = 0, ea = 0
    cdef uint64_t *entry = NULL
    cdef uint64_t combined = PKS_PTE_RW | PKS_PTE_US
    cdef uint64_t xd = 0
    cdef uint64_t page_mask, frame
    cdef int level = <int>c.levels
    cdef int shift
    cdef bint qemu = c.compat == PKS_COMPAT_QEMU
    c.counters.walks += 1
    while True:
        shift = 12 + 9 * (level - 1)
        ea = table + (((va >> shift) & 511) << 3)
        entry = _entry_ptr(c, ea)
        e = entry[0] if entry != NULL else 0    # untouched memory reads as zero
        if not (e & PKS_PTE_P):
            return _pf_error(c, kind, implicit, 0)
        if e & _rsvd_mask(c, level, e):
            # SDM: RSVD is reported with P=1; QEMU 7.2 reports RSVD alone.
            return _pf_error(c, kind, implicit, PKS_PF_RSVD if qemu else PKS_PF_P | PKS_PF_RSVD)
        combined &= e
        xd |= e
        if level == 1 or (e & PKS_PTE_PS):
            break
        if update and not (e & PKS_PTE_A):
            entry[0] = e | PKS_PTE_A
        table = e & c.addr_mask
        level -= 1
    if update and qemu and level == 3 and not (e & PKS_PTE_A):
        # QEMU 7.2 sets A on a PDPTE before testing PS, so a 1-GiB leaf gets A
        # even when the access then faults.
        entry[0] = e | PKS_PTE_A
    page_mask = (<uint64_t>1 << shift) - 1
    frame = (e & c.addr_mask & ~page_mask) | (va & page_mask & ~<uint64_t>0xFFF)
    leaf_out[0] = (frame | PKS_PTE_P | (combined & (PKS_PTE_RW | PKS_PTE_US))
                   | (e & (PKS_PTE_D | PKS_PTE_G | PKS_PKEY_FIELD))
                   | (xd & PKS_PTE_XD)
                   | (<uint64_t>(level - 1) << PKS_LEAF_SIZE_SHIFT)
                   | (PKS_LEAF_PKE if c.cr4 & PKS_CR4_PKE else 0)
                   | (PKS_LEAF_PKS if c.cr4 & PKS_CR4_PKS else 0))
    leaf_ea[0] = ea
    return PKS_OK


cdef inline int32_t _check(pks_cpu_t *c, uint64_t leaf, int kind, bint implicit) noexcept nogil:
    """Rights and key check of an access through a (cached or fresh) leaf."""
    cdef bint user = _user_mode(c, implicit)
    cdef bint user_page = (leaf & PKS_PTE_US) != 0
    cdef bint writable = (leaf & PKS_PTE_RW) != 0
    cdef bint wp = (c.cr0 & PKS_CR0_WP) != 0
    cdef bint qemu = c.compat == PKS_COMPAT_QEMU
    cdef bint fault = False
    cdef bint pk = False
    cdef bint key_on
    cdef uint64_t pkr = 0
    cdef uint32_t rights
    if kind == PKS_FETCH:
        # Keys never apply to instruction fetches (SDM §4.6.2).
        if (leaf & PKS_PTE_XD) and (c.efer & PKS_EFER_NXE):
            fault = True
        elif user:
            fault = not user_page
        else:
            fault = user_page and (c.cr4 & PKS_CR4_SMEP) != 0
        if fault:
            return _pf_error(c, kind, implicit, PKS_PF_P)
        return PKS_OK
    if c.efer & PKS_EFER_LMA:
        # compat="qemu": QEMU caches the key decision in its TLB and does not
        # flush on CR4.PKE/PKS changes, so the fill-time enables apply.
        if user_page:
            key_on = (leaf & PKS_LEAF_PKE) != 0 if qemu else (c.cr4 & PKS_CR4_PKE) != 0
            if key_on:
                pkr = c.pkru
        else:
            key_on = (leaf & PKS_LEAF_PKS) != 0 if qemu else (c.cr4 & PKS_CR4_PKS) != 0
            if key_on:
                pkr = c.pkrs & 0xFFFFFFFFULL
        rights = <uint32_t>(pkr >> (((leaf >> PKS_PTE_PKEY_SHIFT) & 0xF) * 2)) & 3
        if (rights & 1) or (kind == PKS_WRITE and (rights & 2) and (user or wp)):
            pk = True
    if user:
        if not user_page:
            fault = True
            if qemu:
                pk = False      # QEMU 7.2 returns from the U/S check before the key check
        elif kind == PKS_WRITE and not writable:
            fault = True
    else:
        if user_page and (c.cr4 & PKS_CR4_SMAP):
            # SDM §4.6.1: explicit accesses may touch user pages only with
            # EFLAGS.AC=1; implicit ones never. QEMU lets an implicit access at
            # CPL<3 with AC=1 through.
            if implicit:
                fault = not (qemu and c.cpl < 3 and (c.rflags & PKS_RFLAGS_AC))
            else:
                fault = not (c.rflags & PKS_RFLAGS_AC)
        if not fault and kind == PKS_WRITE and wp and not writable:
            fault = True
    if fault or pk:
        return _pf_error(c, kind, implicit, PKS_PF_P | (PKS_PF_PK if pk else 0))
    return PKS_OK


cdef inline bint _canonical(pks_cpu_t *c, uint64_t va) noexcept nogil:
    cdef int shift = 7 if c.levels == 5 else 16
    return <uint64_t>((<int64_t>(va << shift)) >> shift) == va


cdef int32_t pks_translate(pks_cpu_t *c, uint64_t va, int kind, bint implicit,
                           uint64_t *pa) noexcept nogil:
    """Translate and check one access that stays within a 4-KiB page.

    ``va`` must be canonical (pks_access checks). Uses and fills the TLB.
    """
    return _translate(c, va, kind, implicit, pa)


cdef inline int32_t _translate(pks_cpu_t *c, uint64_t va, int kind, bint implicit,
                               uint64_t *pa) noexcept nogil:
    # Inline so that the batch and replay loops get the TLB-hit path without
    # a call; the miss path (_translate_miss) stays out of line.
    cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
    cdef uint64_t tag = (va & ~<uint64_t>0xFFF) | 1
    cdef uint64_t leaf, leaf_ea = 0
    cdef int32_t r
    if t.tag == tag and (kind != PKS_WRITE or (t.leaf & PKS_PTE_D)):
        c.counters.tlb_hits += 1
        leaf = t.leaf
        if c.stale_check:
            _stale_check(c, va, kind, implicit, leaf)
        c.last_pkey = <int32_t>((leaf >> PKS_PTE_PKEY_SHIFT) & 0xF)
        r = _check(c, leaf, kind, implicit)
        if r == PKS_OK:
            pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
            return r
        # SDM §4.10.4.1: a page fault invalidates the TLB entries for the
        # faulting address, so a fault caused by a stale entry happens once.
        _tlb_drop_page(c, va)
        if c.compat == PKS_COMPAT_QEMU:
            # QEMU refills its TLB (a fresh walk) whenever a cached entry does
            # not permit the access, and faults only on the walk's verdict.
            return _translate_miss(c, va, kind, implicit, pa, t, tag)
        return r
    return _translate_miss(c, va, kind, implicit, pa, t, tag)


cdef int32_t _translate_miss(pks_cpu_t *c, uint64_t va, int kind, bint implicit,
                             uint64_t *pa, pks_tlb_entry_t *t, uint64_t tag) noexcept nogil:
    cdef uint64_t leaf, leaf_ea = 0
    cdef int32_t r
    c.counters.tlb_misses += 1
    r = _walk(c, va, kind, implicit, True, &leaf, &leaf_ea)
    if r != PKS_OK:
        c.last_pkey = -1
        return r
    c.last_pkey = <int32_t>((leaf >> PKS_PTE_PKEY_SHIFT) & 0xF)
    r = _check(c, leaf, kind, implicit)
    if r != PKS_OK:
        return r
    # The access is allowed: set the leaf's A (and D for a write), SDM §4.8,
    # then cache the translation.
    if kind == PKS_WRITE:
        _set_bits(c, leaf_ea, PKS_PTE_A | PKS_PTE_D)
        leaf |= PKS_PTE_D
    else:
        _set_bits(c, leaf_ea, PKS_PTE_A)
    _tlb_fill(c, t, tag, leaf)
    pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
    return PKS_OK


cdef int32_t pks_access(pks_cpu_t *c, uint64_t va, int kind, uint32_t size,
                        bint implicit, uint64_t *pa) noexcept nogil:
    return _access(c, va, kind, size, implicit, pa)


cdef inline int32_t _access(pks_cpu_t *c, uint64_t va, int kind, uint32_t size,
                            bint implicit, uint64_t *pa) noexcept nogil:
    # Fast path, inlined into the batch and replay loops: a TLB hit for an
    # access within one page. A tag match implies that ``va`` is canonical,
    # since only canonical pages are ever cached.
    cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
    cdef uint64_t leaf = t.leaf
    cdef int32_t r
    if (t.tag == ((va & ~<uint64_t>0xFFF) | 1) and (va & 0xFFF) + size <= 4096
            and (kind != PKS_WRITE or (leaf & PKS_PTE_D)) and not c.stale_check):
        if _check(c, leaf, kind, implicit) == PKS_OK:
            c.counters.accesses[kind][1 if _user_mode(c, implicit) else 0] += 1
            c.counters.tlb_hits += 1
            c.last_pkey = <int32_t>((leaf >> PKS_PTE_PKEY_SHIFT) & 0xF)
            pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
            return PKS_OK
    # Misses, faults, page-crossing accesses and the stale check take the
    # general path, which does everything again from the start.
    return _access_slow(c, va, kind, size, implicit, pa)


cdef int32_t _access_slow(pks_cpu_t *c, uint64_t va, int kind, uint32_t size,
                          bint implicit, uint64_t *pa) noexcept nogil:
    """A data access or fetch of ``size`` bytes (1..4096) at ``va``.

    An access that crosses a 4-KiB boundary is checked on both pages; a fault
    on the second page reports that page's first byte as the address (CR2),
    which the caller reads back from ``c.last_fault_va``.
    """
    cdef uint64_t last, pa1 = 0, pa2 = 0
    cdef int32_t r
    if size == 0:
        size = 1
    last = va + size - 1
    c.counters.accesses[kind][1 if _user_mode(c, implicit) else 0] += 1
    if not _canonical(c, va) or not _canonical(c, last) or last < va:
        c.counters.gp_faults += 1
        c.last_pkey = -1
        return PKS_GP
    r = _translate(c, va, kind, implicit, &pa1)
    if r != PKS_OK:
        c.last_fault_va = va
        c.counters.page_faults += 1
        return r
    if ((va ^ last) >> 12) != 0:
        r = _translate(c, last & ~<uint64_t>0xFFF, kind, implicit, &pa2)
        if r != PKS_OK:
            c.last_fault_va = last & ~<uint64_t>0xFFF
            c.counters.page_faults += 1
            return r
    pa[0] = pa1
    return PKS_OK
