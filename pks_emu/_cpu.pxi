# The CPU object: Python-visible registers and the single-access API
# (included by _core.pyx).

import weakref

from .errors import GeneralProtectionFault, InvalidOpcode, PageFault

cdef dict _KIND_NAMES = {"read": PKS_READ, "write": PKS_WRITE, "fetch": PKS_FETCH,
                         "r": PKS_READ, "w": PKS_WRITE, "x": PKS_FETCH}
cdef dict _FEATURE_BITS = {"pku": PKS_FEAT_PKU, "pks": PKS_FEAT_PKS, "smep": PKS_FEAT_SMEP,
                           "smap": PKS_FEAT_SMAP, "nx": PKS_FEAT_NX, "1g": PKS_FEAT_1G,
                           "la57": PKS_FEAT_LA57}
cdef dict _COMPAT = {"sdm": PKS_COMPAT_SDM, "qemu": PKS_COMPAT_QEMU}

STALE_LOG_CAPACITY = 4096


cdef inline int _kind_of(object kind) except -1:
    cdef long k
    if isinstance(kind, int):
        k = kind
        if 0 <= k <= 2:
            return <int>k
        raise ValueError(f"access kind {kind!r} out of range: expected 0 (read), 1 (write) or 2 (fetch)")
    try:
        return _KIND_NAMES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"access kind {kind!r} not understood: expected 'read', 'write' or 'fetch'") from None


def feature_bits(features):
    """Bit mask of a set of feature names; unknown names are an error."""
    cdef uint32_t bits = 0
    for name in features:
        try:
            bits |= _FEATURE_BITS[name]
        except KeyError:
            raise ValueError(
                f"unknown feature {name!r}: expected some of {sorted(_FEATURE_BITS)}") from None
    return bits


cdef pks_cpu_t *cpu_state_of(CPU cpu) noexcept:
    return &cpu.st


cdef class Translation:
    """Outcome of ``CPU.translate``: either ``ok`` with ``pa``, or a fault."""
    cdef readonly bint ok
    cdef readonly object pa
    cdef readonly object vector
    cdef readonly object error_code
    cdef readonly uint64_t address
    cdef readonly object pkey
    cdef readonly object cpu

    def exception(self):
        """The exception ``CPU.access`` would raise, or None."""
        if self.ok:
            return None
        if self.vector == 13:
            return GeneralProtectionFault(f"non-canonical address {self.address:#x}")
        return PageFault(self.address, self.error_code, pkey=self.pkey, cpu=self.cpu)

    def __repr__(self):
        if self.ok:
            return f"Translation(ok=True, pa={self.pa:#x}, pkey={self.pkey})"
        if self.vector == 13:
            return f"Translation(ok=False, #GP(0), address={self.address:#x})"
        return (f"Translation(ok=False, #PF, address={self.address:#x}, "
                f"error_code={self.error_code:#x}, pkey={self.pkey})")


cdef str _cr_reason(CPU cpu, int n, uint64_t value, str otherwise):
    if cpu.st.cpl != 0:
        return f"MOV to CR{n} at CPL {cpu.st.cpl}"
    return f"MOV to CR{n} of {value:#x}: {otherwise}"


cdef str _gp_text(object va, object size):
    # #GP of an access: its last byte wraps past 2**64, or an end is non-canonical.
    if va + size > (1 << 64):
        return f"the access of {size} bytes at {va:#x} wraps past 2**64"
    return f"non-canonical address {va:#x} (size {size})"


cdef int _raise(int32_t r, str what) except -1:
    if r == PKS_GP:
        raise GeneralProtectionFault(what)
    if r == PKS_UD:
        raise InvalidOpcode(what)
    return 0


cdef class CPU:
    """One logical processor. Build it through ``pks_emu.Machine``.

    Registers are properties; writing one is the MOV/WRMSR of the SDM, with
    its #GP checks. ``access`` and ``translate`` run the full check through
    the TLB.
    """

    def __cinit__(self):
        self.st.tlb = NULL
        self.st.stale_log = NULL

    def __init__(self, PhysicalMemory memory not None, int index=0, *, features=None,
                 str compat="sdm", int paging_levels=4, int maxphyaddr=52,
                 int tlb_entries=1024, machine=None):
        if paging_levels not in (4, 5):
            raise ValueError(f"paging_levels {paging_levels} not supported: expected 4 or 5")
        if not 36 <= maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr {maxphyaddr} out of range: expected 36..52")
        if tlb_entries < 1 or tlb_entries > (1 << 24) or (tlb_entries & (tlb_entries - 1)):
            raise ValueError(f"tlb_entries {tlb_entries} must be a power of two in 1..2**24")
        if compat not in _COMPAT:
            raise ValueError(f"compat {compat!r} not understood: expected 'sdm' or 'qemu'")
        cdef uint32_t feats = feature_bits(features if features is not None else _FEATURE_BITS)
        if paging_levels == 5 and not (feats & PKS_FEAT_LA57):
            raise ValueError("paging_levels=5 needs the 'la57' feature")
        self.memory = memory
        self.index = index
        self._machine_ref = weakref.ref(machine) if machine is not None else None
        memset(&self.st, 0, sizeof(pks_cpu_t))
        for i in range(4096):
            self.st.frame_cache[i].pfn = ~<uint64_t>0       # no frame has this number
        self.st.mem = &memory.m
        self.st.features = feats
        self.st.compat = _COMPAT[compat]
        self.st.maxphyaddr = maxphyaddr
        self.st.addr_mask = ((<uint64_t>1 << maxphyaddr) - 1) & ~<uint64_t>0xFFF
        self.st.rsvd_phys = ((<uint64_t>1 << 52) - 1) & ~((<uint64_t>1 << maxphyaddr) - 1)
        self.st.tlb = <pks_tlb_entry_t *>calloc(tlb_entries, sizeof(pks_tlb_entry_t))
        if self.st.tlb == NULL:
            raise MemoryError("cannot allocate the TLB")
        self.st.tlb_mask = tlb_entries - 1
        self.st.levels = paging_levels
        # A new machine runs 64-bit code at CPL 0 (issue #2): long mode with
        # paging, PAE, and LA57 for 5-level paging. PKRS is 0 at RESET
        # (KVM PKS v5); PKRU is 0 at RESET (SDM §2.7).
        self.st.cr0 = PKS_CR0_PE | PKS_CR0_ET | PKS_CR0_PG     # ET is hardwired to 1 (SDM §2.5)
        self.st.cr4 = PKS_CR4_PAE | (PKS_CR4_LA57 if paging_levels == 5 else 0)
        self.st.efer = PKS_EFER_LME | PKS_EFER_LMA
        self.st.rflags = 0x2
        self.st.last_pkey = -1
        # Paging-structure caches (SDM §4.10.3): on in sdm mode; QEMU 7.2 TCG
        # has none, so compat="qemu" starts with them off.
        self.st.psc_on = self.st.compat == PKS_COMPAT_SDM
        self.st.psc_epoch = PKS_PSC_EPOCH_ONE
        self.st.memo_epoch = 1
        self.st.derived_cr0 = ~<uint64_t>0          # force the first build
        _derive_all(&self.st)

    def __dealloc__(self):
        free(self.st.tlb)
        free(self.st.stale_log)

    @property
    def machine(self):
        return self._machine_ref() if self._machine_ref is not None else None

    # --- registers ---------------------------------------------------------
    @property
    def cr0(self):
        return self.st.cr0

    @cr0.setter
    def cr0(self, value):
        value = _u64(value, "cr0")
        _raise(pks_write_cr0(&self.st, value), _cr_reason(self, 0, value,
               "bits 63:32 set, PG without PE, NW without CD, or PG cleared in IA-32e mode"))

    @property
    def cr3(self):
        return self.st.cr3

    @cr3.setter
    def cr3(self, value):
        value = _u64(value, "cr3")
        _raise(pks_write_cr3(&self.st, value), _cr_reason(self, 3, value,
               f"bits above MAXPHYADDR ({self.st.maxphyaddr}) set"))

    @property
    def cr4(self):
        return self.st.cr4

    @cr4.setter
    def cr4(self, value):
        value = _u64(value, "cr4")
        _raise(pks_write_cr4(&self.st, value), _cr_reason(self, 4, value,
               "reserved bit, absent feature, or PAE/LA57 change in IA-32e mode"))

    @property
    def efer(self):
        return self.st.efer

    @efer.setter
    def efer(self, value):
        value = _u64(value, "efer")
        _raise(_write_efer(&self.st, value),
               f"WRMSR IA32_EFER at CPL {self.st.cpl}" if self.st.cpl else
               f"write of IA32_EFER {value:#x}: reserved bit, absent feature, or LME change with paging on")

    @property
    def rflags(self):
        return self.st.rflags

    @rflags.setter
    def rflags(self, value):
        value = _u64(value, "rflags")
        # Bit 1 reads as 1; bits 3, 5, 15 and 63:22 read as 0 (SDM §3.4.3).
        self.st.rflags = (value & PKS_RFLAGS_KNOWN) | PKS_RFLAGS_FIXED

    @property
    def cpl(self):
        return self.st.cpl

    @cpl.setter
    def cpl(self, value):
        value = _int(value, "cpl")
        if not 0 <= value <= 3:
            raise ValueError(f"CPL {value} out of range: expected 0..3")
        self.st.cpl = value

    @property
    def pkrs(self):
        """IA32_PKRS, read without the CPL check of RDMSR (for inspection)."""
        return self.st.pkrs

    @property
    def pkru(self):
        """PKRU, read without the CR4.PKE check of RDPKRU (for inspection)."""
        return self.st.pkru

    @property
    def features(self):
        return frozenset(n for n, b in _FEATURE_BITS.items() if self.st.features & b)

    @property
    def compat(self):
        return "qemu" if self.st.compat == PKS_COMPAT_QEMU else "sdm"

    @property
    def paging_levels(self):
        return self.st.levels

    @property
    def maxphyaddr(self):
        return self.st.maxphyaddr

    @property
    def tlb_entries(self):
        return self.st.tlb_mask + 1

    def wrmsr(self, msr, value):
        """WRMSR. #GP at CPL>0, for unknown MSRs, for IA32_PKRS without PKS or with bits 63:32 set."""
        msr, value = _int(msr, "msr"), _int(value, "value")
        if not 0 <= msr < (1 << 32):
            raise ValueError(f"MSR number {msr!r} does not fit in ECX (32 bits)")
        if not 0 <= value < (1 << 64):
            raise ValueError(f"MSR value {value!r} does not fit in EDX:EAX (64 bits)")
        r = pks_wrmsr(&self.st, msr, value)
        if r != PKS_OK:
            raise GeneralProtectionFault(self._msr_reason("WRMSR", msr, value))

    def rdmsr(self, msr):
        """RDMSR. #GP at CPL>0, for unknown MSRs, for IA32_PKRS without PKS."""
        cdef uint64_t v = 0
        msr = _int(msr, "msr")
        if not 0 <= msr < (1 << 32):
            raise ValueError(f"MSR number {msr!r} does not fit in ECX (32 bits)")
        if pks_rdmsr(&self.st, msr, &v) != PKS_OK:
            raise GeneralProtectionFault(self._msr_reason("RDMSR", msr, None))
        return v

    def _msr_reason(self, op, msr, value):
        if self.st.cpl != 0:
            return f"{op} {msr:#x} at CPL {self.st.cpl}"
        if msr == PKS_MSR_IA32_PKRS and not (self.st.features & PKS_FEAT_PKS):
            return f"{op} IA32_PKRS: the CPU has no PKS"
        if msr == PKS_MSR_IA32_PKRS and value is not None and value >> 32:
            return f"{op} IA32_PKRS of {value:#x}: bits 63:32 are reserved"
        if msr == PKS_MSR_IA32_EFER:
            return f"{op} IA32_EFER of {value:#x}: reserved bit, absent feature, or LME change with paging on"
        return f"{op} {msr:#x}: MSR not implemented"

    def wrpkru(self, value, ecx=0, edx=0):
        """WRPKRU with EAX=value. #UD if CR4.PKE=0; #GP if ECX or EDX is not 0.
        Bits 63:32 of RAX, RCX and RDX are ignored, as on hardware."""
        for name, v in (("value", value), ("ecx", ecx), ("edx", edx)):
            _int(v, name)
            if not 0 <= v < (1 << 64):
                raise ValueError(f"{name} {v!r} does not fit in a 64-bit register")
        r = pks_wrpkru(&self.st, value & 0xFFFFFFFF, ecx & 0xFFFFFFFF, edx & 0xFFFFFFFF)
        _raise(r, "WRPKRU with CR4.PKE=0" if r == PKS_UD else "WRPKRU with ECX or EDX not 0")

    def rdpkru(self, ecx=0):
        """RDPKRU: returns PKRU. #UD if CR4.PKE=0; #GP if ECX is not 0."""
        cdef uint32_t v = 0
        ecx = _int(ecx, "ecx")
        if not 0 <= ecx < (1 << 64):
            raise ValueError(f"ecx {ecx!r} does not fit in a 64-bit register")
        r = pks_rdpkru(&self.st, ecx & 0xFFFFFFFF, &v)
        _raise(r, "RDPKRU with CR4.PKE=0" if r == PKS_UD else "RDPKRU with ECX not 0")
        return v

    def cpuid(self, leaf, subleaf=0):
        leaf, subleaf = _int(leaf, "leaf"), _int(subleaf, "subleaf")
        """CPUID: (eax, ebx, ecx, edx) for the leaves that describe paging and keys."""
        cdef uint32_t f = self.st.features
        cdef uint32_t ecx7 = 0, ebx7 = 1  # EBX[0] FSGSBASE
        if leaf == 0:
            # max leaf 7, "GenuineIntel"
            return (7, 0x756E6547, 0x6C65746E, 0x49656E69)
        if leaf == 1:
            # EDX: FPU PSE MSR PAE CX8 PGE CMOV PAT FXSR SSE SSE2; ECX: XSAVE, OSXSAVE mirrors CR4
            return (0x000906A0, self.index << 24, (1 << 26) | ((1 << 27) if self.st.cr4 & (1 << 18) else 0),
                    0x078BA169)
        if leaf == 7:
            if subleaf != 0:
                return (0, 0, 0, 0)
            if f & PKS_FEAT_SMEP:
                ebx7 |= 1 << 7
            if f & PKS_FEAT_SMAP:
                ebx7 |= 1 << 20
            ecx7 |= 1 << 2  # UMIP
            if f & PKS_FEAT_PKU:
                ecx7 |= 1 << 3
                if self.st.cr4 & PKS_CR4_PKE:
                    ecx7 |= 1 << 4  # OSPKE mirrors CR4.PKE
            if f & PKS_FEAT_LA57:
                ecx7 |= 1 << 16
            if f & PKS_FEAT_PKS:
                ecx7 |= 1 << 31
            return (0, ebx7, ecx7, 0)
        if leaf == 0x80000000:
            return (0x80000008, 0, 0, 0)
        if leaf == 0x80000001:
            edx = (1 << 29) | (1 << 11)  # LM, SYSCALL
            if f & PKS_FEAT_NX:
                edx |= 1 << 20
            if f & PKS_FEAT_1G:
                edx |= 1 << 26
            return (0, 0, 1, edx)
        if leaf == 0x80000008:
            return ((57 if f & PKS_FEAT_LA57 else 48) << 8 | self.st.maxphyaddr, 0, 0, 0)
        return (0, 0, 0, 0)

    # --- TLB ---------------------------------------------------------------
    def invlpg(self, va):
        va = _u64(va, "va")
        """INVLPG: drop the TLB entries of the page that contains ``va``."""
        pks_invlpg(&self.st, va)

    def flush_tlb(self, *, bint keep_global=False):
        """Drop every TLB entry (or every non-global one)."""
        pks_flush_tlb(&self.st, keep_global)

    def tlb_occupancy(self):
        """Number of valid TLB entries."""
        cdef uint32_t i, n = 0
        for i in range(self.st.tlb_mask + 1):
            if self.st.tlb[i].tag:
                n += 1
        return n

    @property
    def paging_structure_caches(self):
        """Whether walks use and fill the paging-structure caches (SDM
        §4.10.3: PML5E, PML4E, PDPTE and PDE caches). On by default in sdm
        mode, off in compat="qemu" (QEMU has none). Turning them off or on
        invalidates every entry."""
        return bool(self.st.psc_on)

    @paging_structure_caches.setter
    def paging_structure_caches(self, bint on):
        _psc_flush(&self.st)
        self.st.psc_on = on

    @property
    def stale_check(self):
        """Opt-in: on every TLB hit, compare with a fresh walk and log stale uses."""
        return bool(self.st.stale_check)

    @stale_check.setter
    def stale_check(self, bint on):
        if on and self.st.stale_log == NULL:
            self.st.stale_log = <pks_stale_t *>calloc(STALE_LOG_CAPACITY, sizeof(pks_stale_t))
            if self.st.stale_log == NULL:
                raise MemoryError("cannot allocate the stale-use log")
            self.st.stale_cap = STALE_LOG_CAPACITY
        self.st.stale_check = on
        _derive_perm(&self.st)          # the fast path steps aside while the check is on

    @property
    def stale_uses(self):
        """The logged stale uses, oldest first: dicts with ``va``, ``cached_pa``,
        ``cached_pkey``, ``fresh_pa``/``fresh_pkey`` (None if the fresh walk
        faults) and ``fresh_error``. The newest 4096 are kept; the counter
        ``stale_uses`` in ``counters()`` counts all of them."""
        cdef uint64_t n = min(self.st.stale_len, self.st.stale_cap)
        cdef uint64_t start = self.st.stale_len - n
        # Typed, so that the struct is copied as a struct; an untyped name
        # made Cython convert it to a dict and ``s.va`` raised AttributeError.
        cdef pks_stale_t s
        out = []
        for i in range(start, self.st.stale_len):
            s = self.st.stale_log[i % self.st.stale_cap]
            ok = s.fresh_error == PKS_OK
            out.append({
                "va": s.va,
                "cached_pa": s.cached_leaf & self.st.addr_mask,
                "cached_pkey": (s.cached_leaf >> 59) & 0xF,
                "fresh_pa": (s.fresh_leaf & self.st.addr_mask) if ok else None,
                "fresh_pkey": ((s.fresh_leaf >> 59) & 0xF) if ok else None,
                "fresh_error": None if ok else s.fresh_error,
            })
        return out

    # --- accesses ----------------------------------------------------------
    def access(self, va, kind, size=8, bint implicit=False):
        """Check an access of ``size`` bytes at ``va`` and return its physical
        address, or raise ``PageFault`` / ``GeneralProtectionFault``.

        ``kind`` is ``'read'``, ``'write'``, ``'fetch'`` or an ``AccessKind``.
        ``implicit`` marks an implicit supervisor-mode access (descriptor
        tables, IDT, TSS), which is supervisor-mode even at CPL 3.
        """
        cdef uint64_t v = _c_u64(va, "va")
        cdef uint32_t sz = _c_u32(size, "size")
        cdef uint64_t pa = 0
        cdef int k = _kind_of(kind)
        if sz == 0 or sz > 4096:
            raise ValueError(f"access size {size} out of range: expected 1..4096")
        _check_writable(self.st.mem)
        cdef int32_t r = pks_access(&self.st, v, k, sz, implicit, &pa)
        if r == PKS_OK:
            return pa
        if r == PKS_GP:
            raise GeneralProtectionFault(_gp_text(v, sz))
        raise PageFault(self.st.last_fault_va, r,
                        pkey=self.st.last_pkey if self.st.last_pkey >= 0 else None, cpu=self.index)

    def access_batch(self, va, kind, size=1, implicit=False, *, out=None):
        """Check many accesses with this CPU's current registers, in order,
        through its TLB: ``(pa, error_code)`` arrays, error code -1 where the
        access succeeded, -2 for #GP. See ``pks_emu.access_batch``."""
        return access_batch(self, va, kind, size, implicit, out=out)

    def translate(self, va, kind, size=8, bint implicit=False):
        """Like ``access`` (same checks, TLB use and A/D updates) but returns a
        ``Translation`` instead of raising."""
        cdef uint64_t v = _c_u64(va, "va")
        cdef uint32_t sz = _c_u32(size, "size")
        cdef uint64_t pa = 0
        cdef int k = _kind_of(kind)
        if sz == 0 or sz > 4096:
            raise ValueError(f"access size {size} out of range: expected 1..4096")
        _check_writable(self.st.mem)
        cdef int32_t r = pks_access(&self.st, v, k, sz, implicit, &pa)
        cdef Translation t = Translation.__new__(Translation)
        t.cpu = self.index
        t.pkey = self.st.last_pkey if self.st.last_pkey >= 0 else None
        if r == PKS_OK:
            t.ok = True
            t.pa = pa
            t.address = va
        elif r == PKS_GP:
            t.ok = False
            t.vector = 13
            t.error_code = 0
            t.address = va
        else:
            t.ok = False
            t.vector = 14
            t.error_code = r
            t.address = self.st.last_fault_va
        return t

    def walk(self, va):
        """The paging-structure entries that translate ``va``, top level first,
        as ``(level, entry_address, entry)`` tuples; no side effects, no TLB.
        The list stops at the leaf or at the first not-present entry."""
        va = _u64(va, "va")
        _check_writable(self.st.mem)
        cdef uint64_t eas[5]
        cdef uint64_t es[5]
        cdef int n = _walk_entries(self.st.mem, self.st.cr3, <int>self.st.levels, self.st.addr_mask,
                                   va, eas, es)
        return [(<int>self.st.levels - i, eas[i], es[i]) for i in range(n)]

    # --- statistics --------------------------------------------------------
    def counters(self):
        """Event counters of this CPU as a dict (see docs/api.md)."""
        cdef pks_counters_t *k = &self.st.counters
        cdef uint64_t acc[3][2]
        cdef uint64_t hits = k.tlb_hits, fm = 0
        cdef int kind, smode
        for kind in range(3):
            acc[kind][0] = k.accesses[kind][0]
            acc[kind][1] = k.accesses[kind][1]
            for smode in range(8):
                # fast hits by smode = CPL==3 << 2 | implicit << 1 | AC: user-mode iff CPL 3, explicit
                acc[kind][1 if (smode >> 1) == 2 else 0] += k.fast_hits[kind * 8 + smode]
                hits += k.fast_hits[kind * 8 + smode]
                acc[kind][1 if (smode >> 1) == 2 else 0] += k.fast_misses[kind * 8 + smode]
                fm += k.fast_misses[kind * 8 + smode]
        return {
            "reads_supervisor": acc[0][0], "reads_user": acc[0][1],
            "writes_supervisor": acc[1][0], "writes_user": acc[1][1],
            "fetches_supervisor": acc[2][0], "fetches_user": acc[2][1],
            "tlb_hits": hits, "tlb_misses": k.tlb_misses + fm, "walks": k.walks + fm,
            "page_faults": k.page_faults, "gp_faults": k.gp_faults,
            "tlb_flushes": k.tlb_flushes, "invlpg": k.invlpg,
            "wrmsr_pkrs": k.wrmsr_pkrs, "wrpkru": k.wrpkru, "stale_uses": k.stale_uses,
            "pde_cache_hits": k.psc_hits[2] + fm, "pdpte_cache_hits": k.psc_hits[3],
            "pml4e_cache_hits": k.psc_hits[4], "pml5e_cache_hits": k.psc_hits[5],
        }

    def reset_counters(self):
        memset(&self.st.counters, 0, sizeof(pks_counters_t))

    def __repr__(self):
        return (f"<pks_emu.CPU {self.index} cpl={self.st.cpl} cr0={self.st.cr0:#x} "
                f"cr3={self.st.cr3:#x} cr4={self.st.cr4:#x} efer={self.st.efer:#x} "
                f"pkru={self.st.pkru:#010x} pkrs={self.st.pkrs:#010x}>")
