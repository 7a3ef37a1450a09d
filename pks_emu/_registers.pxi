# Control registers, MSRs and PKRU (included by _core.pyx).

cdef extern from *:
    """
    /* CR4 bits that exist whatever the feature set (no effect on paging
       beyond PSE/PAE/PGE): VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR
       OSXMMEXCPT UMIP FSGSBASE OSXSAVE. */
    #define PKS_CR4_BASE 0x50FFFULL
    /* CR4 bits whose change flushes the TLB. SDM §4.10.4.1 requires it for
       PGE, PAE and SMEP 0->1; we also flush on PKE, PKS, SMAP and SMEP 1->0,
       which the SDM permits (a TLB may drop entries at any time). */
    #define PKS_CR4_FLUSH_SDM  ((1ULL<<4)|(1ULL<<5)|(1ULL<<7)|(1ULL<<12)|(1ULL<<20)|(1ULL<<21)|(1ULL<<22)|(1ULL<<24))
    /* QEMU 7.2 cpu_x86_update_cr4: PGE PAE PSE SMEP SMAP LA57, not PKE/PKS. */
    #define PKS_CR4_FLUSH_QEMU ((1ULL<<4)|(1ULL<<5)|(1ULL<<7)|(1ULL<<12)|(1ULL<<20)|(1ULL<<21))
    #define PKS_EFER_KNOWN ((1ULL<<0)|(1ULL<<8)|(1ULL<<10)|(1ULL<<11))
    /* CR0: PE MP EM TS ET NE WP AM NW CD PG */
    #define PKS_CR0_DEFINED 0xE005003FULL
    """
    const uint64_t PKS_CR4_BASE, PKS_CR4_FLUSH_SDM, PKS_CR4_FLUSH_QEMU, PKS_EFER_KNOWN, PKS_CR0_DEFINED


cdef inline uint64_t _cr4_allowed(pks_cpu_t *c) noexcept nogil:
    cdef uint64_t ok = PKS_CR4_BASE
    if c.features & PKS_FEAT_LA57:
        ok |= PKS_CR4_LA57
    if c.features & PKS_FEAT_SMEP:
        ok |= PKS_CR4_SMEP
    if c.features & PKS_FEAT_SMAP:
        ok |= PKS_CR4_SMAP
    if c.features & PKS_FEAT_PKU:
        ok |= PKS_CR4_PKE
    if c.features & PKS_FEAT_PKS:
        ok |= PKS_CR4_PKS
    return ok


cdef int32_t pks_write_cr0(pks_cpu_t *c, uint64_t value) noexcept nogil:
    """MOV to CR0 (SDM Vol. 2B MOV—Move to/from Control Registers)."""
    cdef uint64_t changed
    if c.cpl != 0:
        return PKS_GP                       # MOV to CRn is privileged
    if value >> 32:
        return PKS_GP                       # bits 63:32 reserved
    # SDM §2.5: ET is hardwired to 1 (P6 and later); the other reserved bits
    # of 31:0 are ignored and read as 0 (KVM and QEMU do the same).
    value = (value & PKS_CR0_DEFINED) | PKS_CR0_ET
    changed = value ^ c.cr0
    if (value & PKS_CR0_PG) and not (value & PKS_CR0_PE):
        return PKS_GP
    if (value & PKS_CR0_NW) and not (value & PKS_CR0_CD):
        return PKS_GP
    if not (value & PKS_CR0_PG) and (c.efer & PKS_EFER_LMA):
        return PKS_GP                       # the model executes 64-bit code: cannot leave paging
    c.cr0 = value
    # SDM: only PG 1->0 flushes (impossible here). QEMU flushes on PG/WP/PE.
    if c.compat == PKS_COMPAT_QEMU and (changed & (PKS_CR0_PG | PKS_CR0_WP | PKS_CR0_PE)):
        pks_flush_tlb(c, False)
    else:
        _derive_all(c)                      # CR0.WP is in the permission tables
    return PKS_OK


cdef int32_t pks_write_cr3(pks_cpu_t *c, uint64_t value) noexcept nogil:
    """MOV to CR3: with CR4.PCIDE=0, bits 63:MAXPHYADDR must be 0; flushes
    non-global entries (all entries when CR4.PGE=0), SDM §4.10.4.1."""
    if c.cpl != 0:
        return PKS_GP
    if value & ~((<uint64_t>1 << c.maxphyaddr) - 1):
        return PKS_GP
    c.cr3 = value
    if c.compat == PKS_COMPAT_QEMU:
        pks_flush_tlb(c, False)             # QEMU TCG ignores global pages here
    else:
        pks_flush_tlb(c, (c.cr4 & PKS_CR4_PGE) != 0)
    return PKS_OK


cdef int32_t pks_write_cr4(pks_cpu_t *c, uint64_t value) noexcept nogil:
    """MOV to CR4: #GP for reserved bits and bits of absent features; in IA-32e
    mode PAE cannot be cleared and LA57 cannot change (SDM Vol. 2B, MOV CR)."""
    cdef uint64_t changed = value ^ c.cr4
    if c.cpl != 0:
        return PKS_GP
    if value & ~_cr4_allowed(c):
        return PKS_GP
    if (c.efer & PKS_EFER_LMA) and not (value & PKS_CR4_PAE):
        return PKS_GP
    if (c.efer & PKS_EFER_LMA) and (changed & PKS_CR4_LA57):
        return PKS_GP
    c.cr4 = value
    if changed:
        c.memo_epoch += 1                   # leaf fill bits, LA57
    if changed & (PKS_CR4_FLUSH_QEMU if c.compat == PKS_COMPAT_QEMU else PKS_CR4_FLUSH_SDM):
        pks_flush_tlb(c, False)             # rebuilds the permission tables too
    else:
        _derive_all(c)
    return PKS_OK


cdef int32_t _write_efer(pks_cpu_t *c, uint64_t value) noexcept nogil:
    cdef uint64_t changed
    if c.cpl != 0:
        return PKS_GP                       # WRMSR is privileged
    if value & ~PKS_EFER_KNOWN:
        return PKS_GP
    if (value & PKS_EFER_NXE) and not (c.features & PKS_FEAT_NX):
        return PKS_GP
    # LMA is read-only: writes to it are ignored.
    value = (value & ~PKS_EFER_LMA) | (c.efer & PKS_EFER_LMA)
    changed = value ^ c.efer
    if (changed & PKS_EFER_LME) and (c.cr0 & PKS_CR0_PG):
        return PKS_GP
    c.efer = value
    c.memo_epoch += 1                       # NXE: reserved bits
    # NXE decides whether bit 63 is XD or reserved in cached entries. KVM
    # rebuilds its MMU context on an NX change; we flush. QEMU does not.
    if (changed & PKS_EFER_NXE) and c.compat != PKS_COMPAT_QEMU:
        pks_flush_tlb(c, False)
    else:
        _derive_all(c)                      # NXE: XD checks and reserved bits
    return PKS_OK


# The two key-register writes in pieces, for the replay loop, which runs
# the common case in line: _*_plain says that pks_wrmsr / pks_wrpkru would
# succeed and do nothing but _*_store.

cdef inline bint _wrmsr_pkrs_plain_at0(pks_cpu_t *c, uint64_t value) noexcept nogil:
    # (at CPL 0)
    return (c.features & PKS_FEAT_PKS) != 0 and (value >> 32) == 0 and c.compat != PKS_COMPAT_QEMU


cdef inline bint _wrmsr_pkrs_plain(pks_cpu_t *c, uint64_t value) noexcept nogil:
    return c.cpl == 0 and _wrmsr_pkrs_plain_at0(c, value)


cdef inline void _pkrs_store(pks_cpu_t *c, uint64_t value) noexcept nogil:
    c.pkrs = value
    _derive_deny_pkrs(c)
    c.counters.wrmsr_pkrs += 1


cdef inline bint _wrpkru_plain(pks_cpu_t *c, uint32_t ecx, uint32_t edx) noexcept nogil:
    return (c.cr4 & PKS_CR4_PKE) != 0 and ecx == 0 and edx == 0 and c.compat != PKS_COMPAT_QEMU


cdef inline void _pkru_store(pks_cpu_t *c, uint32_t eax) noexcept nogil:
    c.pkru = eax
    _derive_deny_pkru(c)
    c.counters.wrpkru += 1


cdef int32_t pks_wrmsr(pks_cpu_t *c, uint32_t msr, uint64_t value) noexcept nogil:
    """WRMSR: CPL 0 only. IA32_PKRS (0x6E1) exists only with PKS and has bits
    63:32 reserved. No TLB flush: keys are read on every access (SDM §4.6.2);
    the two PKRS deny masks of the permission check are rebuilt (a few shifts)."""
    if c.cpl != 0:
        return PKS_GP
    if msr == PKS_MSR_IA32_PKRS:
        if not (c.features & PKS_FEAT_PKS) or (value >> 32):
            return PKS_GP
        _pkrs_store(c, value)
        if c.compat == PKS_COMPAT_QEMU:
            pks_flush_tlb(c, False)         # QEMU 7.2 helper_wrmsr flushes on PKRS
        return PKS_OK
    if msr == PKS_MSR_IA32_EFER:
        return _write_efer(c, value)
    return PKS_GP


cdef int32_t pks_rdmsr(pks_cpu_t *c, uint32_t msr, uint64_t *value) noexcept nogil:
    if c.cpl != 0:
        return PKS_GP
    if msr == PKS_MSR_IA32_PKRS:
        if not (c.features & PKS_FEAT_PKS):
            return PKS_GP
        value[0] = c.pkrs
        return PKS_OK
    if msr == PKS_MSR_IA32_EFER:
        value[0] = c.efer
        return PKS_OK
    return PKS_GP


cdef int32_t pks_wrpkru(pks_cpu_t *c, uint32_t eax, uint32_t ecx, uint32_t edx) noexcept nogil:
    """WRPKRU: #UD if CR4.PKE=0 (checked first), #GP(0) if ECX or EDX is not 0."""
    if not (c.cr4 & PKS_CR4_PKE):
        return PKS_UD
    if ecx != 0 or edx != 0:
        return PKS_GP
    _pkru_store(c, eax)
    if c.compat == PKS_COMPAT_QEMU:
        pks_flush_tlb(c, False)             # QEMU 7.2 helper_wrpkru flushes
    return PKS_OK


cdef int32_t pks_rdpkru(pks_cpu_t *c, uint32_t ecx, uint32_t *eax) noexcept nogil:
    """RDPKRU: #UD if CR4.PKE=0, #GP(0) if ECX is not 0."""
    if not (c.cr4 & PKS_CR4_PKE):
        return PKS_UD
    if ecx != 0:
        return PKS_GP
    eax[0] = c.pkru
    return PKS_OK
