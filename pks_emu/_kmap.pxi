# Replaying a kernel captured under QEMU (included by _core.pyx).
#
# A captured trace carries no page tables: the replay builds them as the
# trace goes, from a kernel policy (docs/kernel-policies.md). KernelMapper
# maps a page the first time an access finds it not present — a supervisor
# page for the kernel half of the address space, a user page for the lower
# half — with the key and rights of the first policy region that holds its
# virtual or its physical address, to the physical frame the record names;
# when a later access to the same virtual page names another frame (vmalloc
# reuse, another process's user page), the leaf is rewritten and the TLB
# entry dropped, as the guest kernel's own PTE change and flush did.
#
# Windows model a consumer that opens its key around an accessor
# (pks_set_readwrite() ... pks_set_noaccess(), or pks_mk_* before V8): while
# a CPU runs a window's function, or one of the window's callees entered
# from it, the key has the window's rights. Every opening and closing is a
# consumer PKRS update through the kernel state (the per-CPU cache decides
# whether it costs a WRMSR), and is counted.

cdef extern from *:
    """
    typedef struct {
        uint64_t start, end;       /* [start, end) of the virtual or physical address */
        uint64_t leaf;             /* leaf flags: P, RW, US, XD and the key field */
        uint8_t by_pa;             /* the range is physical */
    } pks_kregion_t;
    typedef struct {
        uint64_t lo, hi;           /* [lo, hi) of instruction addresses */
        int32_t window;            /* window whose function this is, or -1 */
        uint64_t callee_of;        /* bit w: a callee of window w */
    } pks_krange_t;
    typedef struct {
        int32_t pkey;
        uint32_t open_rights, closed_rights;   /* 2-bit AD|WD values */
    } pks_kwindow_t;
    """
    ctypedef struct pks_kregion_t:
        uint64_t start, end
        uint64_t leaf
        uint8_t by_pa
    ctypedef struct pks_krange_t:
        uint64_t lo, hi
        int32_t window
        uint64_t callee_of
    ctypedef struct pks_kwindow_t:
        int32_t pkey
        uint32_t open_rights, closed_rights

# The physical address of an access the capture could not name (MMIO, ROM):
# trace v2's PA_NONE (pks_emu.trace.v2), as the records carry it.
cdef uint64_t _PA_UNKNOWN = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t _TABLE_FLAGS = 0x7       # P | RW | US: the leaf alone decides (Linux _PAGE_TABLE)

MAX_WINDOWS = 64


cdef class KernelMapper:
    """Page tables built on first touch from a kernel policy, and the
    consumer's windows (see the comment at the top of _kmap.pxi).

    ``regions``: ``(start, end, by_pa, pkey, writable, executable)`` in
    priority order; ``kernel_default``/``user_default``: ``(pkey, writable,
    executable)`` of pages outside every region; ``tables``: the first
    physical address and the number of 4-KiB frames reserved for page
    tables; ``windows``: ``(pkey, open_rights, closed_rights)``;
    ``ranges``: ``(lo, hi, window, callee_mask)`` sorted and disjoint.
    """
    cdef pks_kregion_t *regions
    cdef int n_regions
    cdef uint64_t kernel_leaf, user_leaf
    cdef uint64_t table_next, table_end
    cdef pks_krange_t *ranges
    cdef int n_ranges
    cdef pks_kwindow_t *windows
    cdef int n_windows
    cdef int ncpus
    cdef int32_t *open_w           # per CPU: the open window, or -1
    cdef uint64_t *ivl_lo
    cdef uint64_t *ivl_hi
    cdef int32_t *ivl_w
    cdef uint64_t *ivl_mask
    cdef uint64_t *w_opened
    cdef int32_t *saved_w          # per CPU: the window an interrupt closed, or -1
    cdef uint8_t *prev_entry       # per CPU: the previous IP was in the entry text
    cdef uint64_t entry_lo, entry_hi
    cdef readonly uint64_t pages_mapped, pages_remapped, tlb_refreshes, table_frames
    cdef readonly uint64_t window_opens, window_closes, window_ip_lookups

    def __cinit__(self):
        self.regions = NULL
        self.ranges = NULL
        self.windows = NULL
        self.open_w = NULL
        self.ivl_lo = NULL
        self.ivl_hi = NULL
        self.ivl_w = NULL
        self.ivl_mask = NULL
        self.w_opened = NULL
        self.saved_w = NULL
        self.prev_entry = NULL

    def __init__(self, int ncpus, regions, kernel_default, user_default, tables,
                 windows=(), ranges=(), bint nxe=True, entry=(0, 0)):
        cdef int i
        cdef uint64_t prev_hi = 0
        if ncpus < 1:
            raise ValueError("the mapper needs at least one CPU")
        self.ncpus = ncpus
        regions = list(regions)
        windows = list(windows)
        ranges = list(ranges)
        if len(windows) > MAX_WINDOWS:
            raise ValueError(f"{len(windows)} windows: at most {MAX_WINDOWS}")
        self.regions = <pks_kregion_t *>calloc(max(len(regions), 1), sizeof(pks_kregion_t))
        self.windows = <pks_kwindow_t *>calloc(max(len(windows), 1), sizeof(pks_kwindow_t))
        self.ranges = <pks_krange_t *>calloc(max(len(ranges), 1), sizeof(pks_krange_t))
        self.open_w = <int32_t *>malloc(ncpus * sizeof(int32_t))
        self.ivl_lo = <uint64_t *>calloc(ncpus, sizeof(uint64_t))
        self.ivl_hi = <uint64_t *>calloc(ncpus, sizeof(uint64_t))
        self.ivl_w = <int32_t *>calloc(ncpus, sizeof(int32_t))
        self.ivl_mask = <uint64_t *>calloc(ncpus, sizeof(uint64_t))
        self.w_opened = <uint64_t *>calloc(max(len(windows), 1), sizeof(uint64_t))
        self.saved_w = <int32_t *>malloc(ncpus * sizeof(int32_t))
        self.prev_entry = <uint8_t *>calloc(ncpus, sizeof(uint8_t))
        self.entry_lo, self.entry_hi = entry
        if (self.regions == NULL or self.windows == NULL or self.ranges == NULL
                or self.open_w == NULL or self.ivl_lo == NULL or self.ivl_hi == NULL
                or self.ivl_w == NULL or self.ivl_mask == NULL or self.w_opened == NULL
                or self.saved_w == NULL or self.prev_entry == NULL):
            raise MemoryError("cannot allocate the kernel mapper")
        for i, (start, end, by_pa, pkey, writable, executable) in enumerate(regions):
            if not 0 <= start < end <= 1 << 64:
                raise ValueError(f"region {i}: [{start:#x}, {end:#x}) is empty or out of range")
            self.regions[i].start = start
            self.regions[i].end = end - 1 if end == 1 << 64 else end
            self.regions[i].by_pa = bool(by_pa)
            self.regions[i].leaf = _leaf_flags(pkey, writable, executable, False, nxe)
        self.n_regions = len(regions)
        kp, kw, kx = kernel_default
        up, uw, ux = user_default
        self.kernel_leaf = _leaf_flags(kp, kw, kx, False, nxe)
        self.user_leaf = _leaf_flags(up, uw, ux, True, nxe)
        self.table_next, n = tables
        self.table_end = self.table_next + <uint64_t>n * 4096
        for i, (pkey, open_rights, closed_rights) in enumerate(windows):
            if not 0 <= pkey <= 15 or not 0 <= open_rights <= 3 or not 0 <= closed_rights <= 3:
                raise ValueError(f"window {i}: key {pkey} / rights {open_rights}, {closed_rights} out of range")
            self.windows[i].pkey = pkey
            self.windows[i].open_rights = open_rights
            self.windows[i].closed_rights = closed_rights
        self.n_windows = len(windows)
        for i, (lo, hi, window, mask) in enumerate(ranges):
            if not lo < hi or lo < prev_hi:
                raise ValueError(f"window range {i} [{lo:#x}, {hi:#x}) is empty or overlaps the one before")
            if not -1 <= window < self.n_windows or mask >> self.n_windows:
                raise ValueError(f"window range {i} names a window that does not exist")
            self.ranges[i].lo = lo
            self.ranges[i].hi = hi
            self.ranges[i].window = window
            self.ranges[i].callee_of = mask
            prev_hi = hi
        self.n_ranges = len(ranges)
        for i in range(ncpus):
            self.open_w[i] = -1
            self.saved_w[i] = -1
            self.ivl_lo[i] = 1
            self.ivl_hi[i] = 0          # empty: the first IP looks up

    def __dealloc__(self):
        free(self.regions)
        free(self.ranges)
        free(self.windows)
        free(self.open_w)
        free(self.ivl_lo)
        free(self.ivl_hi)
        free(self.ivl_w)
        free(self.ivl_mask)
        free(self.w_opened)
        free(self.saved_w)
        free(self.prev_entry)

    # --- the page tables ------------------------------------------------------------
    cdef uint64_t leaf_for(self, uint64_t va, uint64_t pa, bint user_mode=False) noexcept nogil:
        """Leaf flags of the page holding ``va`` (physical ``pa``): the first
        region that holds either, else the default of its half. A physical
        region's frames are kernel memory: a lower-half alias of them that
        kernel code touches (text_poke's poking_mm maps the page it patches
        at a user address with PAGE_KERNEL) is a supervisor page; only a
        user-mode access (``user_mode``) makes it a user page."""
        cdef int i
        cdef pks_kregion_t *r
        cdef bint user = (va >> 63) == 0
        for i in range(self.n_regions):
            r = &self.regions[i]
            if r.by_pa:
                if pa != _PA_UNKNOWN and r.start <= pa < r.end:
                    return r.leaf | (<uint64_t>(user and user_mode) << 2)
            elif r.start <= va < r.end:
                return r.leaf | (<uint64_t>user << 2)
        return self.user_leaf if user else self.kernel_leaf

    cdef uint64_t *_leaf_slot(self, pks_cpu_t *c, uint64_t va, bint create) noexcept nogil:
        """Host address of the PTE for ``va``, creating the tables on the way."""
        cdef uint64_t table = c.cr3 & c.addr_mask
        cdef uint64_t ea, e, new
        cdef int level = <int>c.levels
        cdef uint8_t *page
        while level > 1:
            ea = table + (((va >> (12 + 9 * (level - 1))) & 511) << 3)
            e = pks_mem_read_u64(c.mem, ea)
            if not (e & PKS_PTE_P):
                if not create:
                    return NULL
                if self.table_next >= self.table_end:
                    return NULL
                new = self.table_next
                self.table_next += 4096
                self.table_frames += 1
                if pks_mem_write_u64(c.mem, ea, new | _TABLE_FLAGS) != 0:
                    return NULL
                e = new | _TABLE_FLAGS
            table = e & c.addr_mask
            level -= 1
        ea = table + ((va >> 12) & 511) * 8
        page = pks_mem_frame(c.mem, ea >> 12, True)
        if page == NULL:
            return NULL
        return <uint64_t *>(page + (ea & 0xFF8))

    cdef int map_page(self, pks_cpu_t *c, uint64_t va, uint64_t pa) noexcept nogil:
        """Map the page of ``va`` to the frame of ``pa`` (frame 0 when the
        capture could not name it). 0, or -1 out of table frames."""
        cdef uint64_t *slot = self._leaf_slot(c, va, True)
        cdef uint64_t frame = 0 if pa == _PA_UNKNOWN else (pa & c.addr_mask)
        if slot == NULL:
            return -1
        slot[0] = (frame & ~<uint64_t>0xFFF) | self.leaf_for(va, pa, c.cpl == 3)
        self.pages_mapped += 1
        return 0

    cdef bint remapped(self, pks_cpu_t *c, uint64_t va, uint64_t pa) noexcept nogil:
        """Whether the page of ``va`` is mapped, in the tables, to another
        frame than that of ``pa``."""
        cdef uint64_t *slot = self._leaf_slot(c, va, False)
        return slot != NULL and (slot[0] & PKS_PTE_P) != 0 and ((slot[0] ^ pa) & c.addr_mask) >> 12 != 0

    cdef int refresh(self, pks_cpu_t *c, uint64_t va, uint64_t pa) noexcept nogil:
        """The record's frame differs from the translation: rewrite the leaf
        if the tables disagree (the guest remapped), then drop this CPU's
        TLB entry. 0, or -1 out of table frames."""
        cdef uint64_t *slot = self._leaf_slot(c, va, True)
        cdef uint64_t want
        if slot == NULL:
            return -1
        want = (pa & c.addr_mask & ~<uint64_t>0xFFF) | self.leaf_for(va, pa, c.cpl == 3)
        if (slot[0] & ~(PKS_PTE_A | PKS_PTE_D)) != want:
            slot[0] = want
            self.pages_remapped += 1
        else:
            self.tlb_refreshes += 1
        pks_invlpg(c, va)
        return 0

    # --- the windows ------------------------------------------------------------------
    cdef void _lookup(self, int cpu, uint64_t ip) noexcept nogil:
        """Find the range holding ``ip`` (or the gap between two) and cache it."""
        cdef int lo = 0, hi = self.n_ranges, mid
        self.window_ip_lookups += 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.ranges[mid].hi <= ip:
                lo = mid + 1
            else:
                hi = mid
        # ranges[lo] is the first range ending above ip
        if lo < self.n_ranges and self.ranges[lo].lo <= ip:
            self.ivl_lo[cpu] = self.ranges[lo].lo
            self.ivl_hi[cpu] = self.ranges[lo].hi
            self.ivl_w[cpu] = self.ranges[lo].window
            self.ivl_mask[cpu] = self.ranges[lo].callee_of
        else:
            self.ivl_lo[cpu] = self.ranges[lo - 1].hi if lo > 0 else 0
            self.ivl_hi[cpu] = self.ranges[lo].lo if lo < self.n_ranges else 0xFFFFFFFFFFFFFFFFULL
            self.ivl_w[cpu] = -1
            self.ivl_mask[cpu] = 0

    cdef inline int32_t _decide(self, int cpu, bint in_entry, bint after_entry,
                                int32_t *saved) noexcept nogil:
        """The rule of window_at for an IP in the cached range of ``cpu``
        (``saved``: the window an interrupt closed, updated): the window
        that should be open."""
        cdef int32_t cur = self.open_w[cpu]
        if self.ivl_w[cpu] >= 0:
            saved[0] = -1
            return self.ivl_w[cpu]
        if cur >= 0 and (self.ivl_mask[cpu] >> cur) & 1:
            return cur
        if cur >= 0 and in_entry:
            saved[0] = cur
        if cur < 0 and saved[0] >= 0 and after_entry and (self.ivl_mask[cpu] >> saved[0]) & 1:
            cur = saved[0]
            saved[0] = -1
            return cur
        return -1

    cdef inline int32_t window_at(self, int cpu, uint64_t ip) noexcept nogil:
        """The window that should be open on ``cpu`` when it runs ``ip``.

        An interrupt or exception taken inside a window (the IP goes to the
        kernel's entry text, ``entry``) closes it, as the handler runs with
        the kernel's PKRS; the return from it (the entry text, then the
        callee it interrupted) reopens it, as the series' exception exit
        restores the interrupted PKRS. A callee entered from anywhere else
        with no window open stays outside."""
        cdef bint in_entry = self.entry_lo <= ip < self.entry_hi
        cdef bint after_entry = self.prev_entry[cpu]
        self.prev_entry[cpu] = in_entry
        if not (self.ivl_lo[cpu] <= ip < self.ivl_hi[cpu]):
            self._lookup(cpu, ip)
        return self._decide(cpu, in_entry, after_entry, &self.saved_w[cpu])

    cdef bint window_stable(self, int cpu, uint64_t ip, uint64_t *lo, uint64_t *span) noexcept nogil:
        """Whether window_at(cpu, ip) would now return the open window and
        change nothing: then it would do the same for every IP in
        [lo, lo + span) (set here), the part of the cached range holding
        ``ip`` on its side of the entry text, until a call that is not a
        no-op changes the state. The replay's hot path skips window_at for
        such records. Reads the state, changes none of it."""
        cdef bint in_entry = self.entry_lo <= ip < self.entry_hi
        cdef int32_t saved = self.saved_w[cpu]
        cdef uint64_t a, b
        if not (self.ivl_lo[cpu] <= ip < self.ivl_hi[cpu]) or self.prev_entry[cpu] != in_entry:
            return False
        # after_entry is prev_entry, which equals in_entry (checked above)
        if self._decide(cpu, in_entry, in_entry, &saved) != self.open_w[cpu] or saved != self.saved_w[cpu]:
            return False
        a = self.ivl_lo[cpu]
        b = self.ivl_hi[cpu]
        if in_entry:
            a = a if a > self.entry_lo else self.entry_lo
            b = b if b < self.entry_hi else self.entry_hi
        elif ip < self.entry_lo:
            b = b if b < self.entry_lo else self.entry_lo
        else:
            a = a if a > self.entry_hi else self.entry_hi
        lo[0] = a
        span[0] = b - a
        return True

    cdef int32_t switch_window(self, KernelState k, int cpu, int32_t to) noexcept nogil:
        """Close the open window of ``cpu`` and open ``to`` (or none), each a
        consumer update of the key through the kernel state."""
        cdef int32_t cur = self.open_w[cpu]
        cdef int32_t r = PKS_OK
        if cur >= 0:
            r = k.update_current(cpu, self.windows[cur].pkey, self.windows[cur].closed_rights)
            self.window_closes += 1
        if to >= 0 and r == PKS_OK:
            r = k.update_current(cpu, self.windows[to].pkey, self.windows[to].open_rights)
            self.window_opens += 1
            self.w_opened[to] += 1
        self.open_w[cpu] = to
        return r

    @property
    def has_windows(self):
        return self.n_windows > 0

    def window_counts(self):
        """How many times each window was opened."""
        return [self.w_opened[i] for i in range(self.n_windows)]

    def open_windows(self):
        return [self.open_w[i] for i in range(self.ncpus)]

    def counters(self):
        return {"pages_mapped": self.pages_mapped, "pages_remapped": self.pages_remapped,
                "tlb_refreshes": self.tlb_refreshes, "table_frames": self.table_frames,
                "window_opens": self.window_opens, "window_closes": self.window_closes,
                "window_ip_lookups": self.window_ip_lookups}

    def py_leaf_for(self, uint64_t va, uint64_t pa=0xFFFFFFFFFFFFFFFF, bint user_mode=False):
        """The leaf flags a first touch of ``va`` (at ``pa``) would get."""
        return self.leaf_for(va, pa, user_mode)


cdef uint64_t _leaf_flags(int pkey, bint writable, bint executable, bint user, bint nxe) except? 0:
    if not 0 <= pkey <= 15:
        raise ValueError(f"pkey {pkey}: expected 0..15")
    return (PKS_PTE_P | (PKS_PTE_RW if writable else 0) | (PKS_PTE_US if user else 0)
            | (PKS_PTE_XD if (nxe and not executable) else 0)
            | (<uint64_t>pkey << PKS_PTE_PKEY_SHIFT))
