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
    # Without branches on the kind: in a fault storm reads and writes come
    # in any order, and a branch on them would be mispredicted half the time.
    cdef uint32_t code = (bits | <uint32_t>(kind == PKS_WRITE) * PKS_PF_W
                          | <uint32_t>_user_mode(c, implicit) * PKS_PF_U)
    # SDM §4.7: I/D is reported only if SMEP=1, or NXE=1 with PAE-type paging.
    if kind == PKS_FETCH and ((c.cr4 & PKS_CR4_SMEP) or (c.efer & PKS_EFER_NXE)):
        code |= PKS_PF_I
    return <int32_t>code


cdef inline uint64_t _rsvd_mask(pks_cpu_t *c, int level, uint64_t e) noexcept nogil:
    """Reserved bits of entry ``e`` at ``level`` (5 = PML5E ... 1 = PTE), SDM §4.5 tables 4-15..4-20.
    Read from the tables _derive_rsvd builds on EFER writes."""
    if (e & PKS_PTE_PS) and (level == 2 or level == 3):
        return c.rsvd_large[level]
    return c.rsvd_table[level]


cdef void _derive_rsvd(pks_cpu_t *c) noexcept nogil:
    cdef uint64_t r = c.rsvd_phys
    cdef int level
    if not (c.efer & PKS_EFER_NXE):
        r |= PKS_PTE_XD
    for level in range(6):
        c.rsvd_table[level] = r | (PKS_PTE_PS if level >= 4 else 0)
    c.rsvd_large[0] = r
    c.rsvd_large[1] = r
    c.rsvd_large[2] = r | 0x1FE000ULL                  # bits 20:13 of a 2-MiB leaf
    if c.features & PKS_FEAT_1G or c.compat == PKS_COMPAT_QEMU:
        c.rsvd_large[3] = r | 0x3FFFE000ULL            # bits 29:13 of a 1-GiB leaf
    else:
        c.rsvd_large[3] = r | PKS_PTE_PS               # no 1-GiB pages: PS itself is reserved


cdef inline uint8_t *_frame(pks_cpu_t *c, uint64_t pfn) noexcept nogil:
    """Host page of frame ``pfn`` (NULL if never written), through the CPU's frame cache."""
    cdef uint32_t i = <uint32_t>(pfn & 4095)   # enough for the tables of 8 GiB of 4-KiB pages
    cdef uint8_t *page
    if c.frame_cache[i].pfn == pfn:
        return c.frame_cache[i].page
    return _frame_slow(c, pfn)


cdef uint8_t *_frame_slow(pks_cpu_t *c, uint64_t pfn) noexcept nogil:
    cdef uint32_t i = <uint32_t>(pfn & 4095)
    cdef uint8_t *page = pks_mem_frame(c.mem, pfn, False)
    if page != NULL:
        c.frame_cache[i].pfn = pfn
        c.frame_cache[i].page = page
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


cdef extern from *:
    """
    /* Synthesized-leaf bits (docs in _core.pxd, pks_tlb_entry_t). */
    #define PKS_LEAF_XD (1ULL << 3)        /* XD_any */
    #define PKS_LEAF_EN (1ULL << 4)        /* the key register's enable at fill time */
    #define PKS_PSC_EPOCH_ONE (1ULL << 44)
    #include <stdio.h>
    #include <stdlib.h>
    static void pks_debug_mismatch(const char *what, unsigned long long a, unsigned long long b) {
        fprintf(stderr, "pks_emu debug build: %s: %#llx != %#llx\\n", what, a, b);
        abort();
    }
    """
    const uint64_t PKS_LEAF_XD, PKS_LEAF_EN, PKS_PSC_EPOCH_ONE
    void pks_debug_mismatch(const char *what, unsigned long long a, unsigned long long b) noexcept nogil


cdef inline uint64_t _psc_key(uint64_t va, int level) noexcept nogil:
    # The linear-address bits above what an entry at ``level`` maps.
    return va >> (12 + 9 * (level - 1))


cdef void _psc_flush(pks_cpu_t *c) noexcept nogil:
    """Invalidate every paging-structure-cache entry (bump the epoch)."""
    c.psc_epoch += PKS_PSC_EPOCH_ONE
    if c.psc_epoch == 0:                # 2^20 flushes: wrap, clear for real
        memset(c.psc, 0, sizeof(c.psc))
        c.psc_epoch = PKS_PSC_EPOCH_ONE


cdef inline void _psc_drop_va(pks_cpu_t *c, uint64_t va) noexcept nogil:
    """SDM §4.10.4.1: a #PF invalidates the paging-structure-cache entries
    that would be used for the faulting linear address."""
    cdef int level
    cdef uint64_t key
    cdef pks_psc_entry_t *pe
    if not c.psc_on:
        return
    for level in range(2, <int>c.levels + 1):
        key = _psc_key(va, level)
        pe = &c.psc[level - 2][key & 511]
        if pe.tag == (key | c.psc_epoch):
            pe.tag = 0


cdef inline int32_t _walk(pks_cpu_t *c, uint64_t va, int kind, bint implicit, bint update,
                          uint64_t *leaf_out, uint64_t **leaf_entry) noexcept nogil:
    """Walk the tables for ``va``. On reaching a leaf, store the synthesized
    leaf and a pointer to the leaf entry and return PKS_OK; otherwise return
    the #PF error code of the not-present or reserved-bit fault.

    With ``update``, the Accessed flag is set in each non-leaf entry as the walk
    passes it (after its P and reserved-bit checks), as QEMU 7.2 does and SDM
    §4.8 describes ("whenever the processor uses a paging-structure entry");
    the leaf's A/D are set by the caller once the access is allowed.

    With ``update`` and the paging-structure caches on (SDM §4.10.3), the walk
    starts from the deepest cached entry for ``va`` (a PDE, PDPTE, PML4E or
    PML5E cache entry holds the next table's address and the rights combined
    down to it, so the entries above are not read, exactly as on hardware:
    their A flags were set when the entry was cached), and caches every
    non-leaf entry it passes, once its A flag is 1.
    """
    cdef uint64_t table = c.cr3 & c.addr_mask
    cdef uint64_t e = 0, ea, key
    cdef uint64_t *entry = NULL
    cdef uint8_t *page
    cdef uint64_t combined = PKS_PTE_RW | PKS_PTE_US
    cdef uint64_t xd = 0
    cdef uint64_t page_mask, frame
    cdef int level = <int>c.levels
    cdef int shift, lv
    cdef bint psc = update and c.psc_on
    cdef pks_psc_entry_t *pe
    c.counters.walks += 1
    if psc:
        key = va >> 21
        pe = &c.psc[0][key & 511]
        if pe.tag == (key | c.psc_epoch):       # a PDE-cache hit: only the PTE is read
            table = pe.table
            combined = pe.attrs
            xd = pe.attrs
            level = 1
            c.counters.psc_hits[2] += 1
        else:
            for lv in range(3, <int>c.levels + 1):
                key = _psc_key(va, lv)
                pe = &c.psc[lv - 2][key & 511]
                if pe.tag == (key | c.psc_epoch):
                    table = pe.table
                    combined = pe.attrs
                    xd = pe.attrs
                    level = lv - 1
                    c.counters.psc_hits[lv] += 1
                    break
    shift = 12 + 9 * (level - 1)
    while True:
        ea = table + (((va >> shift) & 511) << 3)
        page = _frame(c, ea >> 12)
        if page != NULL:
            entry = <uint64_t *>(page + (ea & 0xFF8))
            e = entry[0]
        else:
            e = 0                               # untouched memory reads as zero
        if not (e & PKS_PTE_P):
            return _pf_error(c, kind, implicit, 0)
        if e & _rsvd_mask(c, level, e):
            # SDM: RSVD is reported with P=1; QEMU 7.2 reports RSVD alone.
            return _pf_error(c, kind, implicit, PKS_PF_RSVD if c.compat == PKS_COMPAT_QEMU
                             else PKS_PF_P | PKS_PF_RSVD)
        combined &= e
        xd |= e
        if level == 1 or (e & PKS_PTE_PS):
            break
        if update and not (e & PKS_PTE_A):
            entry[0] = e | PKS_PTE_A
        table = e & c.addr_mask
        if psc:
            key = va >> shift
            pe = &c.psc[level - 2][key & 511]
            pe.tag = key | c.psc_epoch
            c.psc_fills += 1
            pe.table = table
            pe.attrs = (combined & (PKS_PTE_RW | PKS_PTE_US)) | (xd & PKS_PTE_XD)
            pe.page = _frame(c, table >> 12)
        level -= 1
        shift -= 9
    if update and level == 3 and c.compat == PKS_COMPAT_QEMU and not (e & PKS_PTE_A):
        # QEMU 7.2 sets A on a PDPTE before testing PS, so a 1-GiB leaf gets A
        # even when the access then faults.
        entry[0] = e | PKS_PTE_A
    page_mask = (<uint64_t>1 << shift) - 1
    frame = (e & c.addr_mask & ~page_mask) | (va & page_mask & ~<uint64_t>0xFFF)
    combined &= PKS_PTE_RW | PKS_PTE_US
    # fill_bits[US]: CR4.PKE/PKS now (bits 52/53) and the enable of the key
    # register for this address type (bit 4), for compat="qemu".
    leaf_out[0] = (frame | PKS_PTE_P | combined
                   | (e & (PKS_PTE_D | PKS_PTE_G | PKS_PKEY_FIELD))
                   | ((xd >> 60) & PKS_LEAF_XD)
                   | (<uint64_t>(level - 1) << PKS_LEAF_SIZE_SHIFT)
                   | c.fill_bits[combined >> 2])
    leaf_entry[0] = entry
    return PKS_OK


# --- the rights and key rules, as tables ---------------------------------
#
# Everything the rules read except CPL, EFLAGS.AC, PKRU and PKRS changes only
# on MOV to CR0/CR4 and WRMSR EFER: _derive_perm folds it into one byte per
# (kind, CPL==3, implicit, AC, RW_all, US_all, XD_any, key enable). PKRU and
# PKRS become two 16-bit deny masks each (_derive_deny), rebuilt on WRPKRU and
# WRMSR IA32_PKRS. A TLB hit is then a tag compare and two table lookups.

cdef inline uint32_t _smode(pks_cpu_t *c, bint implicit) noexcept nogil:
    return ((<uint32_t>(c.cpl == 3)) << 2) | ((<uint32_t>implicit) << 1) | <uint32_t>((c.rflags >> 18) & 1)


cdef void _derive_perm(pks_cpu_t *c) noexcept nogil:
    cdef int kind, smode, attr
    cdef bint cpl3, implicit, ac, user, rw, us, xd, en, fault, key_on
    cdef bint wp = (c.cr0 & PKS_CR0_WP) != 0
    cdef bint qemu = c.compat == PKS_COMPAT_QEMU
    cdef bint smep = (c.cr4 & PKS_CR4_SMEP) != 0
    cdef bint smap = (c.cr4 & PKS_CR4_SMAP) != 0
    cdef bint nxe = (c.efer & PKS_EFER_NXE) != 0
    cdef uint32_t sel, i
    for kind in range(3):
        for smode in range(8):
            cpl3 = (smode >> 2) & 1
            implicit = (smode >> 1) & 1
            ac = smode & 1
            user = cpl3 and not implicit
            # As _pf_error: I/D only with SMEP=1, or NXE=1 (SDM §4.7).
            c.pf_code[(kind << 3) | smode] = (PKS_PF_P | (PKS_PF_W if kind == PKS_WRITE else 0)
                                              | (PKS_PF_U if user else 0)
                                              | (PKS_PF_I if kind == PKS_FETCH and (smep or nxe) else 0))
            for attr in range(16):
                rw = attr & 1
                us = (attr >> 1) & 1
                xd = (attr >> 2) & 1
                en = (attr >> 3) & 1
                fault = False
                sel = 0
                if kind == PKS_FETCH:
                    # Keys never apply to instruction fetches (SDM §4.6.2).
                    if xd and nxe:
                        fault = True
                    elif user:
                        fault = not us
                    else:
                        fault = us and smep
                else:
                    if c.efer & PKS_EFER_LMA:
                        # compat="qemu": QEMU caches the key decision in its TLB
                        # and does not flush on CR4.PKE/PKS changes, so the
                        # fill-time enable applies.
                        if qemu:
                            key_on = en
                        else:
                            key_on = (c.cr4 & (PKS_CR4_PKE if us else PKS_CR4_PKS)) != 0
                        if key_on:
                            sel = 3 if us else 1
                            if kind == PKS_WRITE and (user or wp):
                                sel += 1            # WD counts too
                    if user:
                        if not us:
                            fault = True
                            if qemu:
                                sel = 0     # QEMU 7.2 returns from the U/S check before the key check
                        elif kind == PKS_WRITE and not rw:
                            fault = True
                    else:
                        if us and smap:
                            # SDM §4.6.1: explicit accesses may touch user pages only
                            # with EFLAGS.AC=1; implicit ones never. QEMU lets an
                            # implicit access at CPL<3 with AC=1 through.
                            if implicit:
                                fault = not (qemu and not cpl3 and ac)
                            else:
                                fault = not ac
                        if not fault and kind == PKS_WRITE and wp and not rw:
                            fault = True
                i = (<uint32_t>kind << 7) | (<uint32_t>smode << 4) | <uint32_t>attr
                c.perm[i] = <uint8_t>((1 if fault else 0) | (sel << 1))
                c.perm_fast[i] = c.perm[i] | (1 if c.stale_check else 0)
    for i in range(384, 512):
        c.perm_fast[i] = 1
    c.fill_bits[0] = ((PKS_LEAF_PKE if c.cr4 & PKS_CR4_PKE else 0)
                      | (PKS_LEAF_PKS if c.cr4 & PKS_CR4_PKS else 0))
    c.fill_bits[1] = c.fill_bits[0] | (PKS_LEAF_EN if c.cr4 & PKS_CR4_PKE else 0)
    c.fill_bits[0] |= PKS_LEAF_EN if c.cr4 & PKS_CR4_PKS else 0
    c.derived_cr0 = c.cr0
    c.derived_cr4 = c.cr4
    c.derived_efer = c.efer


cdef inline uint32_t _even_bits(uint32_t x) noexcept nogil:
    """Bits 0, 2, ..., 30 of ``x`` packed into bits 15:0."""
    x &= 0x55555555U
    x = (x | (x >> 1)) & 0x33333333U
    x = (x | (x >> 2)) & 0x0F0F0F0FU
    x = (x | (x >> 4)) & 0x00FF00FFU
    return (x | (x >> 8)) & 0x0000FFFFU


# _DENY_BYTE[b]: the deny bits of the four keys whose fields make up byte
# ``b`` of a key register (SDM §4.6.2: bit 2k is AD, bit 2k+1 WD): AD of
# those keys in bits 3:0, AD-or-WD in bits 19:16. A register's two masks
# are then four lookups, whatever its value.
cdef uint32_t _DENY_BYTE[256]


cdef void _init_deny_byte() noexcept nogil:
    cdef uint32_t b, k, f, v
    for b in range(256):
        v = 0
        for k in range(4):
            f = (b >> (2 * k)) & 3
            if f & 1:
                v |= <uint32_t>1 << k
            if f:
                v |= <uint32_t>1 << (16 + k)
        _DENY_BYTE[b] = v


_init_deny_byte()


cdef inline uint32_t _deny_pair(uint32_t x) noexcept nogil:
    """The AD mask (bits 15:0) and the AD-or-WD mask (bits 31:16) of a key register."""
    return (_DENY_BYTE[x & 255] | (_DENY_BYTE[(x >> 8) & 255] << 4)
            | (_DENY_BYTE[(x >> 16) & 255] << 8) | (_DENY_BYTE[x >> 24] << 12))


cdef uint32_t _deny_fill(pks_cpu_t *c, int reg, uint32_t x) noexcept nogil:
    cdef uint32_t v = _deny_pair(x)
    cdef uint32_t slot = c.deny_next[reg]
    c.deny_next[reg] = slot ^ 1
    c.deny_key[reg][slot] = x
    c.deny_val[reg][slot] = v
    return v


cdef inline void _set_deny(pks_cpu_t *c, int reg, uint32_t x) noexcept nogil:
    """The two deny masks of a key register (reg 0 = PKRS, 1 = PKRU). Kernels
    switch a CPU's PKRS between a few values (the task's, the default in a
    handler), so two recent values are kept: then a write costs a compare
    and a load; any other value four table lookups (out of line)."""
    cdef uint32_t v
    if c.deny_key[reg][0] == x:
        v = c.deny_val[reg][0]
    elif c.deny_key[reg][1] == x:
        v = c.deny_val[reg][1]
    else:
        v = _deny_fill(c, reg, x)
    memcpy(&c.deny[1 + 2 * reg], &v, 4)     # deny[1 + 2reg] = AD, deny[2 + 2reg] = AD or WD


cdef inline void _derive_deny_pkrs(pks_cpu_t *c) noexcept nogil:
    _set_deny(c, 0, <uint32_t>(c.pkrs & 0xFFFFFFFFULL))


cdef inline void _derive_deny_pkru(pks_cpu_t *c) noexcept nogil:
    _set_deny(c, 1, c.pkru)


cdef inline void _derive_deny(pks_cpu_t *c) noexcept nogil:
    c.deny[0] = 0
    _derive_deny_pkrs(c)
    _derive_deny_pkru(c)
    if PKS_EMU_DEBUG:
        if (c.deny[1] != _even_bits(<uint32_t>c.pkrs) or c.deny[2] != _even_bits(<uint32_t>(c.pkrs | (c.pkrs >> 1)))
                or c.deny[3] != _even_bits(c.pkru) or c.deny[4] != _even_bits(c.pkru | (c.pkru >> 1))):
            pks_debug_mismatch("deny masks", c.deny[1], _even_bits(<uint32_t>c.pkrs))


cdef void _derive_all(pks_cpu_t *c) noexcept nogil:
    """Rebuild every table derived from the registers (after any direct write of them)."""
    if c.derived_cr0 != c.cr0 or c.derived_cr4 != c.cr4 or c.derived_efer != c.efer:
        _derive_perm(c)
        _derive_rsvd(c)
    _derive_deny(c)


cdef inline int32_t _verdict(pks_cpu_t *c, uint64_t leaf, int kind, bint implicit) noexcept nogil:
    """Rights and key check of an access through a (cached or fresh) leaf:
    PKS_OK or the #PF error code (docs/semantics.md, decision tables)."""
    cdef uint32_t p = c.perm[(<uint32_t>kind << 7) | (_smode(c, implicit) << 4) | <uint32_t>((leaf >> 1) & 15)]
    cdef uint32_t pk = (c.deny[p >> 1] >> <uint32_t>(leaf >> PKS_PTE_PKEY_SHIFT)) & 1
    cdef int32_t r = PKS_OK
    if (p | pk) & 1:
        r = _pf_error(c, kind, implicit, PKS_PF_P | (PKS_PF_PK if pk else 0))
    if PKS_EMU_DEBUG:
        if r != _check(c, leaf, kind, implicit):
            pks_debug_mismatch("permission tables disagree with the direct check",
                               <unsigned long long>r, <unsigned long long>_check(c, leaf, kind, implicit))
    return r


cdef int32_t _check(pks_cpu_t *c, uint64_t leaf, int kind, bint implicit) noexcept nogil:
    """The rights and key rules read directly from the registers: the
    definition the tables are built to match (the debug build compares the
    two on every access)."""
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
        if (leaf & PKS_LEAF_XD) and (c.efer & PKS_EFER_NXE):
            fault = True
        elif user:
            fault = not user_page
        else:
            fault = user_page and (c.cr4 & PKS_CR4_SMEP) != 0
        if fault:
            return _pf_error(c, kind, implicit, PKS_PF_P)
        return PKS_OK
    if c.efer & PKS_EFER_LMA:
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
                pk = False
        elif kind == PKS_WRITE and not writable:
            fault = True
    else:
        if user_page and (c.cr4 & PKS_CR4_SMAP):
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
    cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
    cdef uint64_t tag = (va & ~<uint64_t>0xFFF) | 1
    cdef uint64_t leaf
    cdef int32_t r
    if _tlb_hit(t, va, kind):
        c.counters.tlb_hits += 1
        leaf = t.leaf
        if c.stale_check:
            _stale_check(c, va, kind, implicit, leaf)
        c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
        r = _verdict(c, leaf, kind, implicit)
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
        _psc_drop_va(c, va)
        return r
    return _translate_miss(c, va, kind, implicit, pa, t, tag)


cdef int32_t _translate_miss(pks_cpu_t *c, uint64_t va, int kind, bint implicit,
                             uint64_t *pa, pks_tlb_entry_t *t, uint64_t tag) noexcept nogil:
    cdef uint64_t leaf = 0
    cdef uint64_t *leaf_entry = NULL
    cdef int32_t r
    c.counters.tlb_misses += 1
    r = _walk(c, va, kind, implicit, True, &leaf, &leaf_entry)
    if r != PKS_OK:
        c.last_pkey = -1
        _psc_drop_va(c, va)
        _miss_fault_drop(c, va, t)
        return r
    c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
    r = _verdict(c, leaf, kind, implicit)
    if r != PKS_OK:
        _psc_drop_va(c, va)
        _miss_fault_drop(c, va, t)
        return r
    _allowed_fill(c, kind, leaf, leaf_entry, t, tag)
    pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
    return PKS_OK


cdef inline void _allowed_fill(pks_cpu_t *c, int kind, uint64_t leaf, uint64_t *leaf_entry,
                               pks_tlb_entry_t *t, uint64_t tag) noexcept nogil:
    """The access is allowed: set the leaf's A (and D for a write), SDM §4.8,
    then cache the translation."""
    cdef uint64_t bits = PKS_PTE_A | (PKS_PTE_D if kind == PKS_WRITE else 0)
    if (leaf_entry[0] & bits) != bits:
        leaf_entry[0] |= bits
    _tlb_fill(c, t, tag, leaf | (bits & PKS_PTE_D))


cdef inline int32_t _miss(pks_cpu_t *c, uint64_t va, int kind, uint32_t smode,
                          uint64_t *pa, pks_tlb_entry_t *t) noexcept nogil:
    """_access_slow for an access within one page that missed the TLB.

    The common case first, in line: a PDE-cache hit whose table frame exists
    (its host page is in the entry), a present PTE without reserved bits, an
    allowed access.
    That is exactly what _walk and _miss_walk do in that case (same counters,
    same A/D and TLB updates); anything else goes to _miss_walk, and nothing
    was changed before it. A PDE-cache tag match implies a canonical ``va``
    (only canonical addresses are walked, and the tag holds every bit above
    bit 20), and no entry is valid while the caches are off (turning them
    off bumps the epoch; a walk with them off fills nothing). The implicit
    flag is bit 1 of ``smode`` (_smode): one argument fewer, all six in
    registers."""
    cdef uint64_t key = va >> 21, e, leaf, combined
    cdef uint64_t *entry
    cdef pks_psc_entry_t *pe = &c.psc[0][key & 511]
    cdef uint32_t i, p
    if pe.tag == (key | c.psc_epoch):
        if pe.page != NULL:
            entry = <uint64_t *>(pe.page + ((va >> 9) & 0xFF8))
            e = entry[0]
            if (e & PKS_PTE_P) and not (e & c.rsvd_table[1]):
                combined = pe.attrs & e & (PKS_PTE_RW | PKS_PTE_US)
                leaf = ((e & c.addr_mask) | PKS_PTE_P | combined
                        | (e & (PKS_PTE_D | PKS_PTE_G | PKS_PKEY_FIELD))
                        | (((pe.attrs | e) >> 60) & PKS_LEAF_XD)
                        | c.fill_bits[combined >> 2])
                i = (<uint32_t>kind << 7) | (smode << 4) | <uint32_t>((leaf >> 1) & 15)
                p = c.perm[i]
                if ((p | (c.deny[p >> 1] >> <uint32_t>(leaf >> PKS_PTE_PKEY_SHIFT))) & 1) == 0:
                    if PKS_EMU_DEBUG:
                        if (_check(c, leaf, kind, (smode >> 1) & 1) != PKS_OK or not c.psc_on
                                or not _canonical(c, va)):
                            pks_debug_mismatch("miss fast path", leaf, kind)
                    # one access, one TLB miss, one walk, one PDE-cache hit
                    c.counters.fast_misses[i >> 4] += 1
                    c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
                    # _allowed_fill for a 4-KiB leaf: A (and D), then the TLB entry
                    key = PKS_PTE_A | (PKS_PTE_D if kind == PKS_WRITE else 0)
                    if (e & key) != key:
                        entry[0] = e | key
                    leaf |= key & PKS_PTE_D
                    t.tag = (va & ~<uint64_t>0xFFF) | 1
                    t.tag_w = t.tag if leaf & PKS_PTE_D else 0
                    t.leaf = leaf
                    pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
                    return PKS_OK
    return _miss_walk_p(c, va, kind, (smode >> 1) & 1, pa, t)


cdef int32_t _miss_walk(pks_cpu_t *c, uint64_t va, int kind, bint implicit, uint64_t *pa,
                        pks_tlb_entry_t *t) noexcept nogil:
    """_access_slow for an access within one page that missed the TLB: the
    same steps and counters, without the second look at the TLB."""
    cdef uint64_t leaf = 0
    cdef uint64_t *leaf_entry = NULL
    cdef int32_t r
    c.counters.accesses[kind][1 if _user_mode(c, implicit) else 0] += 1
    if not _canonical(c, va):
        c.counters.gp_faults += 1
        c.last_pkey = -1
        return PKS_GP
    c.counters.tlb_misses += 1
    cdef pks_memo_t *m = &c.memo[(va >> 12) & 255]
    cdef bint memo = m.tag == ((va & ~<uint64_t>0xFFF) | 1) and m.epoch == c.memo_epoch
    # No cache entry made since the page last faulted (psc_stamp): none for
    # va exists, and the slots its walk would fill are empty.
    cdef bint cleared = memo and m.psc_stamp == c.psc_fills
    cdef bint top = cleared or not c.psc_on or _psc_none(c, va)    # the walk starts at CR3
    if memo and top and _memo_valid(m):
        # The walk would read exactly the recorded words: replay it.
        c.counters.walks += 1
        if PKS_EMU_DEBUG:
            _memo_debug_check(c, va, m)
            if c.psc_on and not _psc_none(c, va):
                pks_debug_mismatch("psc_stamp: a cache entry for the page exists", va, m.psc_stamp)
        if m.fault_bits != 0xFFFFFFFFU:
            c.last_pkey = -1
            r = _pf_error(c, kind, implicit, m.fault_bits)
        else:
            leaf = m.leaf
            c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
            r = _verdict(c, leaf, kind, implicit)
            if r == PKS_OK:
                _memo_psc_fill(c, va, m)
                _allowed_fill(c, kind, leaf, m.ptr[m.n - 1], t, (va & ~<uint64_t>0xFFF) | 1)
                pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
                return PKS_OK
        # The walk would have cached the non-leaf entries it passed and the
        # #PF would have invalidated them again (SDM §4.10.4.1): their slots
        # end up empty; no other entry for va exists (top).
        if not cleared:
            _memo_psc_clear(c, va, m)
            m.psc_stamp = c.psc_fills
        _miss_fault_drop(c, va, t)
        c.last_fault_va = va
        c.counters.page_faults += 1
        return r
    r = _walk(c, va, kind, implicit, True, &leaf, &leaf_entry)
    if r != PKS_OK:
        c.last_pkey = -1
    else:
        c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
        r = _verdict(c, leaf, kind, implicit)
        if r == PKS_OK:
            _allowed_fill(c, kind, leaf, leaf_entry, t, (va & ~<uint64_t>0xFFF) | 1)
            pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
            return PKS_OK
    if top:
        _memo_record(c, va, m)
    _psc_drop_va(c, va)
    _miss_fault_drop(c, va, t)
    c.last_fault_va = va
    c.counters.page_faults += 1
    return r


# --- the walk memo (pks_memo_t in _core.pxd) ------------------------------

cdef inline bint _psc_none(pks_cpu_t *c, uint64_t va) noexcept nogil:
    """No paging-structure-cache entry for ``va`` at any level."""
    cdef uint64_t ep = c.psc_epoch
    if (c.psc[0][(va >> 21) & 511].tag == ((va >> 21) | ep)
            or c.psc[1][(va >> 30) & 511].tag == ((va >> 30) | ep)
            or c.psc[2][(va >> 39) & 511].tag == ((va >> 39) | ep)):
        return False
    return c.levels == 4 or c.psc[3][(va >> 48) & 511].tag != ((va >> 48) | ep)


cdef inline bint _memo_valid(pks_memo_t *m) noexcept nogil:
    # Five compares, no loop: past the entries read, ptr[j] points at val[j]
    # itself (_memo_record).
    return ((m.ptr[0][0] ^ m.val[0]) | (m.ptr[1][0] ^ m.val[1]) | (m.ptr[2][0] ^ m.val[2])
            | (m.ptr[3][0] ^ m.val[3]) | (m.ptr[4][0] ^ m.val[4])) == 0


cdef inline uint64_t _synth_leaf(pks_cpu_t *c, uint64_t va, uint64_t e, uint64_t combined,
                                 uint64_t xd, int level) noexcept nogil:
    cdef int shift = 12 + 9 * (level - 1)
    cdef uint64_t page_mask = (<uint64_t>1 << shift) - 1
    cdef uint64_t frame = (e & c.addr_mask & ~page_mask) | (va & page_mask & ~<uint64_t>0xFFF)
    combined &= PKS_PTE_RW | PKS_PTE_US
    return (frame | PKS_PTE_P | combined
            | (e & (PKS_PTE_D | PKS_PTE_G | PKS_PKEY_FIELD))
            | ((xd >> 60) & PKS_LEAF_XD)
            | (<uint64_t>(level - 1) << PKS_LEAF_SIZE_SHIFT)
            | c.fill_bits[combined >> 2])


cdef void _memo_record(pks_cpu_t *c, uint64_t va, pks_memo_t *m) noexcept nogil:
    """Record the entries a walk of ``va`` from CR3 reads now (just after a
    real walk, so the values are those it left: A set where it set it)."""
    cdef uint64_t table = c.cr3 & c.addr_mask
    cdef uint64_t e, ea, combined = PKS_PTE_RW | PKS_PTE_US, xd = 0
    cdef uint8_t *page
    cdef int level = <int>c.levels
    cdef uint32_t n = 0
    m.tag = 0
    while True:
        ea = table + (((va >> (12 + 9 * (level - 1))) & 511) << 3)
        page = _frame(c, ea >> 12)
        if page == NULL:
            return                      # an absent frame may appear later: no record
        m.ptr[n] = <uint64_t *>(page + (ea & 0xFF8))
        e = m.ptr[n][0]
        m.val[n] = e
        n += 1
        if not (e & PKS_PTE_P):
            m.fault_bits = 0
            break
        if e & _rsvd_mask(c, level, e):
            m.fault_bits = PKS_PF_RSVD if c.compat == PKS_COMPAT_QEMU else PKS_PF_P | PKS_PF_RSVD
            break
        combined &= e
        xd |= e
        if level == 1 or (e & PKS_PTE_PS):
            m.fault_bits = 0xFFFFFFFFU
            m.leaf = _synth_leaf(c, va, e, combined, xd, level)
            break
        table = e & c.addr_mask
        level -= 1
    m.n = n
    while n < 5:
        m.ptr[n] = &m.val[n]
        n += 1
    m.epoch = c.memo_epoch
    # The caller drops the entries this walk made for va next, and makes none.
    m.psc_stamp = c.psc_fills
    m.tag = (va & ~<uint64_t>0xFFF) | 1


cdef void _memo_psc_fill(pks_cpu_t *c, uint64_t va, pks_memo_t *m) noexcept nogil:
    """Cache the non-leaf entries of a replayed walk, as _walk does."""
    cdef uint32_t j
    cdef uint64_t e, key, combined = PKS_PTE_RW | PKS_PTE_US, xd = 0
    cdef pks_psc_entry_t *pe
    if not c.psc_on:
        return
    for j in range(m.n - 1):
        e = m.val[j]
        combined &= e
        xd |= e
        key = va >> (39 + 9 * (<int>c.levels - 4) - 9 * <int>j)
        pe = &c.psc[<int>c.levels - 2 - <int>j][key & 511]
        pe.tag = key | c.psc_epoch
        c.psc_fills += 1
        pe.table = e & c.addr_mask
        pe.attrs = (combined & (PKS_PTE_RW | PKS_PTE_US)) | (xd & PKS_PTE_XD)
        pe.page = _frame(c, pe.table >> 12)


cdef inline void _memo_psc_clear(pks_cpu_t *c, uint64_t va, pks_memo_t *m) noexcept nogil:
    # Entries passed: levels L = levels .. levels - (n - 2); slot of L is psc[L - 2].
    cdef int lowest = <int>c.levels + 2 - <int>m.n      # the deepest non-leaf level passed
    if not c.psc_on or m.n < 2:
        return
    if c.levels == 5:
        c.psc[3][(va >> 48) & 511].tag = 0
    if lowest <= 4:
        c.psc[2][(va >> 39) & 511].tag = 0
    if lowest <= 3:
        c.psc[1][(va >> 30) & 511].tag = 0
    if lowest <= 2:
        c.psc[0][(va >> 21) & 511].tag = 0


cdef void _memo_debug_check(pks_cpu_t *c, uint64_t va, pks_memo_t *m) noexcept nogil:
    """Debug build: a replayed walk must agree with a side-effect-free walk."""
    cdef uint64_t fresh = 0
    cdef uint64_t *ea = NULL
    cdef int32_t r2 = _walk(c, va, PKS_READ, False, False, &fresh, &ea)
    c.counters.walks -= 1
    if (m.fault_bits == 0xFFFFFFFFU) != (r2 == PKS_OK) or (r2 == PKS_OK and fresh != m.leaf):
        pks_debug_mismatch("walk memo disagrees with a fresh walk", m.leaf, fresh)



cdef int32_t _hit_fault(pks_cpu_t *c, uint64_t va, int kind, bint implicit, uint64_t *pa,
                        pks_tlb_entry_t *t, uint32_t p) noexcept nogil:
    """_access_slow for a TLB hit within one page that the tables deny
    (``p`` = its permission byte): the fault is decided once, here."""
    cdef uint64_t leaf = t.leaf
    cdef uint32_t pk = (c.deny[p >> 1] >> <uint32_t>(leaf >> PKS_PTE_PKEY_SHIFT)) & 1
    cdef int32_t r
    c.counters.accesses[kind][1 if _user_mode(c, implicit) else 0] += 1
    c.counters.tlb_hits += 1
    c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
    r = _pf_error(c, kind, implicit, PKS_PF_P | (PKS_PF_PK if pk else 0))
    if PKS_EMU_DEBUG:
        if r != _check(c, leaf, kind, implicit):
            pks_debug_mismatch("permission tables disagree with the direct check (hit)",
                               <unsigned long long>r, <unsigned long long>_check(c, leaf, kind, implicit))
    # SDM §4.10.4.1: the fault invalidates the TLB entries of the page and the
    # paging-structure-cache entries for the address.
    _tlb_drop_page(c, va)
    if c.compat == PKS_COMPAT_QEMU:
        r = _translate_miss(c, va, kind, implicit, pa, t, (va & ~<uint64_t>0xFFF) | 1)
        if r == PKS_OK:
            return r
    else:
        _psc_drop_va(c, va)
    c.last_fault_va = va
    c.counters.page_faults += 1
    return r


cdef int32_t pks_access(pks_cpu_t *c, uint64_t va, int kind, uint32_t size,
                        bint implicit, uint64_t *pa) noexcept nogil:
    return _access(c, va, kind, size, implicit, pa)


cdef inline int32_t _access(pks_cpu_t *c, uint64_t va, int kind, uint32_t size,
                            bint implicit, uint64_t *pa) noexcept nogil:
    return _access_m(c, va, kind, size, implicit, _smode(c, implicit), pa)


cdef enum:
    # _access_m(defer_miss=True): an access within one page missed the TLB
    # and nothing was done; the caller runs _miss (an internal code only).
    _MISS_DEFERRED = -16


cdef inline int32_t _access_m(pks_cpu_t *c, uint64_t va, int kind, uint32_t size,
                              bint implicit, uint32_t smode, uint64_t *pa,
                              bint defer_miss=False) noexcept nogil:
    # Fast path, inlined into the batch and replay loops: a TLB hit for an
    # access within one page that the tables allow. ``smode`` is
    # _smode(c, implicit) (a batch computes it once). A tag match implies
    # that ``va`` is canonical, since only canonical pages are ever cached.
    cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
    cdef uint64_t leaf
    cdef uint32_t i, p
    if (va & 0xFFF) + size <= 4096:
        if not _tlb_hit(t, va, kind):
            if defer_miss:
                return _MISS_DEFERRED
            return _miss_p(c, va, kind, smode, pa, t)
        leaf = t.leaf
        i = (<uint32_t>kind << 7) | (smode << 4) | <uint32_t>((leaf >> 1) & 15)
        p = c.perm_fast[i]
        if ((p | (c.deny[p >> 1] >> <uint32_t>(leaf >> PKS_PTE_PKEY_SHIFT))) & 1) == 0:
            c.counters.fast_hits[i >> 4] += 1
            c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
            pa[0] = (leaf & c.addr_mask) | (va & 0xFFF)
            return PKS_OK
        if not c.stale_check:
            return _hit_fault_p(c, va, kind, implicit, pa, t, c.perm[i])
    # Page-crossing accesses and the stale check take the general path.
    return _access_slow_p(c, va, kind, size, implicit, pa)


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


# The slow paths are called through pointers the compiler cannot see
# through, so that they are never inlined into the loops that inline
# _access_m: inlined, they cost the hit path its registers.
ctypedef int32_t (*_miss_fn)(pks_cpu_t *, uint64_t, int, uint32_t, uint64_t *,
                             pks_tlb_entry_t *) noexcept nogil
ctypedef int32_t (*_hit_fault_fn)(pks_cpu_t *, uint64_t, int, bint, uint64_t *,
                                  pks_tlb_entry_t *, uint32_t) noexcept nogil
ctypedef int32_t (*_slow_fn)(pks_cpu_t *, uint64_t, int, uint32_t, bint, uint64_t *) noexcept nogil
cdef _miss_fn _miss_p = _miss
cdef _hit_fault_fn _hit_fault_p = _hit_fault
cdef _slow_fn _access_slow_p = _access_slow
ctypedef int32_t (*_miss_walk_fn)(pks_cpu_t *, uint64_t, int, bint, uint64_t *,
                                  pks_tlb_entry_t *) noexcept nogil
cdef _miss_walk_fn _miss_walk_p = _miss_walk
