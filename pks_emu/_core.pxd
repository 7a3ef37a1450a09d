# cython: language_level=3
"""C-level interface of the pks_emu core, for other Cython code.

    from pks_emu._core cimport pks_cpu_t, pks_access, cpu_state_of

Every function below is ``noexcept nogil`` and works on a ``pks_cpu_t*``
obtained with ``cpu_state_of(cpu)`` from a ``pks_emu.CPU``. The pointer stays
valid while the CPU object is alive; a Machine is not thread-safe, so use one
CPU from one thread at a time. Return conventions:

* ``pks_access``/``pks_translate``: ``PKS_OK`` (-1) on success with the
  physical address stored in ``*pa``; ``PKS_GP`` (-2) for a non-canonical
  address (#GP(0)); otherwise the #PF error code (>= 0).
* ``pks_wrmsr``/``pks_rdmsr``/``pks_wrpkru``/``pks_rdpkru``/``pks_write_cr*``:
  ``PKS_OK`` on success, ``PKS_GP`` for #GP, ``PKS_UD`` for #UD.

Preconditions, not checked inside (the point of these functions is a
check-free inner loop; validate once before it, as ``access_batch`` does):
``kind`` is 0, 1 or 2; ``size`` is 1..4096; one thread uses a CPU at a time,
and no Python code writes the machine's memory while a GIL-free loop runs
(hold ``mem.busy`` as ``access_batch`` does). The C capsule (``pks_emu.h``)
checks its arguments and returns ``PKS_EMU_EINVAL`` instead.

The constants mirror ``pks_emu/constants.py`` (checked by the test suite).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

cdef enum:
    # access kinds
    PKS_READ = 0
    PKS_WRITE = 1
    PKS_FETCH = 2
    # results
    PKS_OK = -1
    PKS_GP = -2
    PKS_UD = -3
    # compat modes
    PKS_COMPAT_SDM = 0
    PKS_COMPAT_QEMU = 1
    # feature bits (pks_cpu_t.features)
    PKS_FEAT_PKU = 1
    PKS_FEAT_PKS = 2
    PKS_FEAT_SMEP = 4
    PKS_FEAT_SMAP = 8
    PKS_FEAT_NX = 16
    PKS_FEAT_1G = 32
    PKS_FEAT_LA57 = 64

# Architectural bits (SDM Vol. 3A; Linux names in constants.py).
cdef extern from *:
    """
    #define PKS_CR0_PE  (1ULL << 0)
    #define PKS_CR0_ET  (1ULL << 4)
    #define PKS_CR0_WP  (1ULL << 16)
    #define PKS_CR0_NW  (1ULL << 29)
    #define PKS_CR0_CD  (1ULL << 30)
    #define PKS_CR0_PG  (1ULL << 31)
    #define PKS_CR4_PSE (1ULL << 4)
    #define PKS_CR4_PAE (1ULL << 5)
    #define PKS_CR4_PGE (1ULL << 7)
    #define PKS_CR4_LA57 (1ULL << 12)
    #define PKS_CR4_PCIDE (1ULL << 17)
    #define PKS_CR4_SMEP (1ULL << 20)
    #define PKS_CR4_SMAP (1ULL << 21)
    #define PKS_CR4_PKE (1ULL << 22)
    #define PKS_CR4_PKS (1ULL << 24)
    #define PKS_EFER_SCE (1ULL << 0)
    #define PKS_EFER_LME (1ULL << 8)
    #define PKS_EFER_LMA (1ULL << 10)
    #define PKS_EFER_NXE (1ULL << 11)
    #define PKS_RFLAGS_AC (1ULL << 18)
    #define PKS_RFLAGS_FIXED (1ULL << 1)
    #define PKS_RFLAGS_KNOWN 0x3F7FD5ULL
    #define PKS_INIT_VALUE 0x55555554ULL
    #define PKS_MSR_IA32_EFER 0xC0000080U
    #define PKS_MSR_IA32_PKRS 0x6E1U
    #define PKS_PTE_P  (1ULL << 0)
    #define PKS_PTE_RW (1ULL << 1)
    #define PKS_PTE_US (1ULL << 2)
    #define PKS_PTE_A  (1ULL << 5)
    #define PKS_PTE_D  (1ULL << 6)
    #define PKS_PTE_PS (1ULL << 7)
    #define PKS_PTE_G  (1ULL << 8)
    #define PKS_PTE_XD (1ULL << 63)
    #define PKS_PTE_PKEY_SHIFT 59
    #define PKS_PF_P    (1U << 0)
    #define PKS_PF_W    (1U << 1)
    #define PKS_PF_U    (1U << 2)
    #define PKS_PF_RSVD (1U << 3)
    #define PKS_PF_I    (1U << 4)
    #define PKS_PF_PK   (1U << 5)
    """
    const uint64_t PKS_CR0_PE, PKS_CR0_ET, PKS_CR0_WP, PKS_CR0_NW, PKS_CR0_CD, PKS_CR0_PG
    const uint64_t PKS_CR4_PSE, PKS_CR4_PAE, PKS_CR4_PGE, PKS_CR4_LA57, PKS_CR4_PCIDE
    const uint64_t PKS_CR4_SMEP, PKS_CR4_SMAP, PKS_CR4_PKE, PKS_CR4_PKS
    const uint64_t PKS_EFER_SCE, PKS_EFER_LME, PKS_EFER_LMA, PKS_EFER_NXE, PKS_RFLAGS_AC
    const uint64_t PKS_RFLAGS_FIXED, PKS_RFLAGS_KNOWN, PKS_INIT_VALUE
    const uint32_t PKS_MSR_IA32_EFER, PKS_MSR_IA32_PKRS
    const uint64_t PKS_PTE_P, PKS_PTE_RW, PKS_PTE_US, PKS_PTE_A, PKS_PTE_D, PKS_PTE_PS
    const uint64_t PKS_PTE_G, PKS_PTE_XD
    const int PKS_PTE_PKEY_SHIFT
    const uint32_t PKS_PF_P, PKS_PF_W, PKS_PF_U, PKS_PF_RSVD, PKS_PF_I, PKS_PF_PK


# Sparse physical memory: 4-KiB frames allocated on first write, found through
# an open-addressing hash table keyed by frame number.
ctypedef struct pks_mem_t:
    uint64_t *keys          # frame numbers; PKS_MEM_EMPTY marks a free slot
    uint8_t **pages
    uint64_t capacity       # power of two
    uint64_t count
    uint32_t busy           # > 0 while a GIL-free loop reads this memory
    uint8_t **slabs         # frames are carved from 2-MiB slabs (huge pages)
    uint64_t nslabs, cap_slabs
    uint32_t slab_used      # frames used in the newest slab
    # Bumped by the replay loop when a run starts and before every record it
    # does not answer in line (only those can write memory during a run): a
    # walk memo stamped with the current value was compared with memory
    # since the last write there can have been (pks_memo_t.checked).
    uint64_t replay_epoch


# One TLB entry caches a 4-KiB translation (large pages are cached per 4-KiB
# piece, tagged with their page size so that INVLPG drops the whole page).
# ``leaf`` is a synthesized entry: frame | P | RW_all (bit 1) | US_all (bit 2)
# | XD_any (bit 63, copied to bit 3) | key-enable at fill (bit 4: CR4.PKE for
# a user page, CR4.PKS for a supervisor page; used only by compat="qemu")
# | D | G | key, plus the page-size level in bits 10:9 and CR4.PKE/PKS at
# fill time in bits 52/53. Bits 4:1 index the CPU's permission table.
# ``tag`` (linear page | 1 when valid) admits reads and fetches; ``tag_w``
# equals ``tag`` when the leaf's D is 1 and admits writes (a write through
# an entry with D=0 misses and walks again, SDM §4.8).
ctypedef struct pks_tlb_entry_t:
    uint64_t tag
    uint64_t tag_w
    uint64_t leaf
    uint64_t pad


# Paging-structure caches (SDM §4.10.3): one direct-mapped cache per level of
# non-leaf entry (PML5E, PML4E, PDPTE, PDE). ``tag`` is the linear-address
# bits above the level's span (va >> 21 for a PDE) | the cache epoch << 44;
# ``table`` the physical address of the table the entry references; ``attrs``
# RW and US ANDed, XD ORed over the entries from the top down to this one;
# ``page`` the host page of ``table`` (NULL if that frame was never written
# when the entry was made: frames never move or go away while the memory
# lives, so the pointer stays valid; the TLB miss path reads the PTE through
# it without a frame look-up).
ctypedef struct pks_psc_entry_t:
    uint64_t tag
    uint64_t table
    uint64_t attrs
    uint8_t *page


# A record of the last faulting walk of a page (an emulator-internal memo,
# not an architectural cache): the host addresses of the entries it read
# and their values. While every one of those words still holds that value
# (and CR3/CR4/EFER are unchanged: ``epoch``), a walk of the page would read
# the same entries and reach the same outcome, so it is replayed from here:
# that is what keeps a fault storm from re-walking every level every time.
ctypedef struct pks_memo_t:
    uint64_t tag                # linear page | 1; 0 = empty
    uint64_t epoch
    uint64_t *ptr[5]
    uint64_t val[5]
    uint64_t leaf               # the synthesized leaf, when the walk reached one
    uint32_t n                  # entries read
    uint32_t fault_bits         # the walk's P/RSVD fault bits, or 0xFFFFFFFF: reached a leaf
    uint64_t psc_stamp          # psc_fills when no paging-structure-cache entry for the page
                                # existed and the slots of the levels walked were empty
    uint64_t checked            # the memory's replay_epoch when the replay compared ptr/val


# One slot of the walker's frame-pointer cache: the frame number and its
# host page side by side (one cache line per lookup).
ctypedef struct pks_frame_cache_t:
    uint64_t pfn
    uint8_t *page


ctypedef struct pks_counters_t:
    uint64_t accesses[3][2]     # [kind][user_mode]
    uint64_t tlb_hits
    uint64_t tlb_misses
    uint64_t walks
    uint64_t page_faults
    uint64_t gp_faults
    uint64_t tlb_flushes        # full or non-global flushes
    uint64_t invlpg
    uint64_t wrmsr_pkrs
    uint64_t wrpkru
    uint64_t stale_uses
    # TLB hits of the inlined fast path, by (kind << 3 | CPL==3 << 2 |
    # implicit << 1 | EFLAGS.AC): counted once here, and added to
    # ``accesses`` and ``tlb_hits`` when the counters are read.
    uint64_t fast_hits[24]
    # TLB misses of the inlined fast path (a PDE-cache hit), same index:
    # each is one access, one TLB miss, one walk and one PDE-cache hit.
    uint64_t fast_misses[24]
    uint64_t psc_hits[6]        # walks that started from a cached entry, by its level (2 = PDE)


ctypedef struct pks_stale_t:
    uint64_t va
    uint64_t cached_leaf
    uint64_t fresh_leaf         # 0 when the fresh walk faults
    int32_t fresh_error         # PKS_OK or the error code of the fresh walk


ctypedef struct pks_cpu_t:
    pks_mem_t *mem
    uint64_t cr0
    uint64_t cr3
    uint64_t cr4
    uint64_t efer
    uint64_t rflags
    uint64_t pkrs
    uint32_t pkru
    uint32_t cpl
    uint32_t features
    uint32_t compat
    uint32_t maxphyaddr
    uint32_t levels             # 4 or 5 (follows CR4.LA57)
    uint64_t addr_mask          # physical-address bits of an entry (MAXPHYADDR-1:12)
    uint64_t rsvd_phys          # entry bits 51:MAXPHYADDR, reserved at every level
    pks_tlb_entry_t *tlb
    uint32_t tlb_mask
    uint32_t tlb_has_large
    uint32_t stale_check
    uint32_t stale_cap
    uint64_t stale_len
    pks_stale_t *stale_log
    int32_t last_pkey           # key of the last translation that reached a leaf, else -1
    uint64_t last_fault_va      # address (CR2) of the last #PF
    pks_counters_t counters
    # --- derived state, recomputed on the register writes it depends on ---
    # perm[kind << 7 | smode << 4 | leaf bits 4:1]: bit 0 = the paging rule
    # denies; bits 3:1 = which deny mask of the key rule applies (0 none,
    # 1 PKRS AD, 2 PKRS AD|WD, 3 PKRU AD, 4 PKRU AD|WD). smode = CPL==3 << 2
    # | implicit << 1 | EFLAGS.AC. Recomputed on CR0/CR4/EFER writes and TLB
    # flushes. perm_fast is perm with bit 0 forced while stale_check is on,
    # plus a kind-3 row of 1s: the replay's hot loop indexes it with the
    # record's two-bit op field unchecked, and an op of 3 (invalid) must
    # leave it for the full path, which refuses the record.
    uint8_t perm[384]
    uint8_t perm_fast[512]
    # pf_code[kind << 3 | smode]: the #PF error-code bits that describe the
    # access, P | W/R | U/S | I/D (SDM §4.7), built with perm; a fault adds PK.
    uint32_t pf_code[24]
    # deny[sel]: bit k = key k is denied by that mask (recomputed on WRMSR
    # IA32_PKRS and WRPKRU, through a two-entry cache of recent values).
    uint16_t deny[8]
    # (PKRS, PKRU): the last values the masks were built for. All zero at
    # first, which is right: the masks of the value 0 are 0.
    uint32_t deny_key[2][2]
    uint32_t deny_val[2][2]     # their AD | AD-or-WD << 16 masks
    uint32_t deny_next[2]
    uint64_t rsvd_table[6]      # reserved bits of a non-leaf entry by level
    uint64_t rsvd_large[4]      # reserved bits of a PS=1 entry at level 2 / 3
    uint64_t derived_cr0, derived_cr4, derived_efer   # the values perm was built from
    uint64_t fill_bits[2]       # synthesized-leaf bits from CR4 at fill time, by US_all
    # Paging-structure caches (SDM §4.10.3); off in compat="qemu" by default.
    uint32_t psc_on
    uint32_t psc_pad
    uint64_t psc_epoch          # << 44, or'ed into every valid tag; a flush bumps it
    pks_psc_entry_t psc[4][512] # [level - 2]: PDE, PDPTE, PML4E, PML5E caches
    uint64_t memo_epoch         # bumped by TLB flushes and CR4/EFER writes
    pks_memo_t memo[256]        # by linear page number
    uint64_t psc_fills          # paging-structure-cache entries made (see psc_stamp)
    # Large pages with pieces in the TLB (so that dropping one page scans
    # only the slots of a large page that contains it); overflow: scan all.
    uint64_t large_base[8]
    uint64_t large_mask[8]
    uint32_t n_large
    uint32_t large_overflow
    # Frame-pointer cache of the walker: physical frame number -> host page.
    # Frames are never freed while the memory lives, so a cached pointer
    # stays valid; this caches host lookups, not paging structures.
    pks_frame_cache_t frame_cache[4096]


# --- memory ---------------------------------------------------------------
cdef uint8_t *pks_mem_frame(pks_mem_t *m, uint64_t pfn, bint create) noexcept nogil
cdef uint64_t pks_mem_read_u64(pks_mem_t *m, uint64_t pa) noexcept nogil
cdef int pks_mem_write_u64(pks_mem_t *m, uint64_t pa, uint64_t value) noexcept nogil

# --- the access check -----------------------------------------------------
cdef int32_t pks_access(pks_cpu_t *c, uint64_t va, int kind, uint32_t size,
                        bint implicit, uint64_t *pa) noexcept nogil
cdef int32_t pks_translate(pks_cpu_t *c, uint64_t va, int kind, bint implicit,
                           uint64_t *pa) noexcept nogil

# --- registers and TLB ----------------------------------------------------
cdef int32_t pks_wrmsr(pks_cpu_t *c, uint32_t msr, uint64_t value) noexcept nogil
cdef int32_t pks_rdmsr(pks_cpu_t *c, uint32_t msr, uint64_t *value) noexcept nogil
cdef int32_t pks_wrpkru(pks_cpu_t *c, uint32_t eax, uint32_t ecx, uint32_t edx) noexcept nogil
cdef int32_t pks_rdpkru(pks_cpu_t *c, uint32_t ecx, uint32_t *eax) noexcept nogil
cdef int32_t pks_write_cr0(pks_cpu_t *c, uint64_t value) noexcept nogil
cdef int32_t pks_write_cr3(pks_cpu_t *c, uint64_t value) noexcept nogil
cdef int32_t pks_write_cr4(pks_cpu_t *c, uint64_t value) noexcept nogil
cdef void pks_invlpg(pks_cpu_t *c, uint64_t va) noexcept nogil
cdef void pks_flush_tlb(pks_cpu_t *c, bint keep_global) noexcept nogil


cdef class PhysicalMemory:
    cdef pks_mem_t m
    cdef object __weakref__


cdef class CPU:
    cdef pks_cpu_t st
    cdef readonly int index
    cdef readonly PhysicalMemory memory
    cdef object _machine_ref
    cdef object __weakref__


cdef pks_cpu_t *cpu_state_of(CPU cpu) noexcept
