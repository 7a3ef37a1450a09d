# The compiled trace-replay loop (included by _core.pyx).
#
# Records are the 24-byte records of docs/trace-format.md. Each record is
# checked by record_problem() (the one validity table, which
# pks_emu.trace.format turns into messages) in the same pass that executes
# it; the first bad record stops the replay with its index. Everything the
# loop meets that the emulated machine would report — #PF, #GP, #UD — is
# appended to the fault log; nothing is dropped.
#
# The kernel's side — context switches, exception entry/exit, fork/exec and
# the consumer's PKRS writes — is the KernelState of _kstate.pxi, the same
# code the Python kernel model runs, under the trace's series version.

cdef extern from *:
    """
    typedef struct {
        uint8_t type, cpu, op, flags;
        uint16_t size;
        uint8_t cpl, pad;
        uint64_t addr, value;
    } pks_record_t;
    typedef struct {
        uint64_t record, address;
        int32_t error_code;
        uint8_t cpu, vector;
        int8_t pkey;
        uint8_t kind;      /* access kind, or 255 for a non-access record */
    } pks_fault_t;
    """
    ctypedef struct pks_record_t:
        uint8_t type, cpu, op, flags
        uint16_t size
        uint8_t cpl, pad
        uint64_t addr, value
    ctypedef struct pks_fault_t:
        uint64_t record, address
        int32_t error_code
        uint8_t cpu, vector
        signed char pkey
        uint8_t kind

from libc.stdlib cimport realloc

cdef extern from *:
    """
    /* The key of the replay's hot path is a record's first eight bytes
       (little-endian) without the low two bits of the op field (the access
       kind) and without the size field; with those bits set,
       PKS_REC_NO_KEY equals no such key. */
    #define PKS_REC_OP_KIND (3ULL << 16)
    #define PKS_REC_NOT_KEY (PKS_REC_OP_KIND | (0xFFFFULL << 32))
    #define PKS_REC_NO_KEY (~0ULL)
    """
    const uint64_t PKS_REC_OP_KIND, PKS_REC_NOT_KEY, PKS_REC_NO_KEY

cdef enum:
    REC_ACCESS = 0
    REC_WRMSR = 1
    REC_RDMSR = 2
    REC_WRPKRU = 3
    REC_MOV_CR = 4
    REC_INVLPG = 5
    REC_PTE_WRITE = 6
    REC_CONTEXT_SWITCH = 7
    REC_EXCEPTION_ENTRY = 8
    REC_EXCEPTION_EXIT = 9
    REC_SET_RFLAGS = 10
    REC_TASK_FORK = 11
    REC_TASK_EXEC = 12
    REC_PKS_UPDATE = 13
    REC_PKS_ABANDON = 14
    REC_COUNT = 15

# Why a record is invalid: record_problem() returns one of these; the
# messages (with the record's fields filled in) are RECORD_PROBLEMS in
# pks_emu.trace.format, in the same order.
cdef enum:
    BAD_NONE = 0
    BAD_TYPE = 1
    BAD_CPU = 2
    BAD_KIND = 3
    BAD_SIZE = 4
    BAD_CPL = 5
    BAD_CR = 6
    BAD_TASK = 7
    BAD_PTE_ADDR = 8
    BAD_MSR = 9
    BAD_PKEY = 10
    BAD_PROT = 11
    BAD_ABANDON_API = 12

# Status of a run() call.
cdef enum:
    _GO_ON = -1                 # (from _step: the run goes on)
    _NOT_MINE = -2              # (from _fault_again: _step must run the record)
    REPLAY_DONE = 0
    REPLAY_STOPPED = 1          # max_faults reached
    REPLAY_EXIT_WITHOUT_ENTRY = 2
    REPLAY_OUT_OF_MEMORY = 3
    REPLAY_INVALID = 4          # a record failed validation (error_record)

REPLAY_STATUS = {"done": REPLAY_DONE, "stopped": REPLAY_STOPPED,
                 "exit_without_entry": REPLAY_EXIT_WITHOUT_ENTRY, "out_of_memory": REPLAY_OUT_OF_MEMORY,
                 "invalid": REPLAY_INVALID}

FAULT_DTYPE_FIELDS = [("record", "<u8"), ("address", "<u8"), ("error_code", "<i4"),
                      ("cpu", "u1"), ("vector", "u1"), ("pkey", "i1"), ("kind", "u1")]


cdef inline int record_problem(const pks_record_t *r, int ncpus, uint64_t max_tasks,
                               int api) noexcept nogil:
    """The record-validity table: BAD_NONE, or why the record must not run.
    Access records come first: they are nearly all of a trace."""
    if r.type == REC_ACCESS:
        if r.cpu >= ncpus:
            return BAD_CPU
        if r.op > 2:
            return BAD_KIND
        if <uint32_t>r.size - 1 > 4095:
            return BAD_SIZE
        if r.cpl > 3 and r.cpl != 0xFF:
            return BAD_CPL
        return BAD_NONE
    if r.type >= REC_COUNT:
        return BAD_TYPE
    if r.cpu >= ncpus:
        return BAD_CPU
    if r.type == REC_WRMSR or r.type == REC_RDMSR:
        if r.addr >> 32:
            return BAD_MSR
    elif r.type == REC_MOV_CR:
        if r.op != 0 and r.op != 3 and r.op != 4:
            return BAD_CR
    elif r.type == REC_PTE_WRITE:
        if (r.addr & 7) or r.addr >= (<uint64_t>1 << 52):
            return BAD_PTE_ADDR
    elif r.type == REC_CONTEXT_SWITCH or r.type == REC_TASK_FORK or r.type == REC_TASK_EXEC:
        if r.value >= max_tasks:
            return BAD_TASK
    elif r.type == REC_PKS_UPDATE:
        if r.value > 15:
            return BAD_PKEY
        if r.op > 3:
            return BAD_PROT
    elif r.type == REC_PKS_ABANDON:
        if r.value > 15:
            return BAD_PKEY
        if api != KAPI_V7:
            return BAD_ABANDON_API
    return BAD_NONE


cdef inline const pks_record_t *_window_run(const pks_record_t *r, const pks_record_t *recs,
                                            const pks_record_t *end, const uint64_t *ipp,
                                            uint64_t wlo, uint64_t wspan, int most) noexcept nogil:
    # The first record from r on (at most ``most`` on, and not past end)
    # whose instruction pointer is outside [wlo, wlo + wspan).
    cdef const pks_record_t *stop = r + most if end - r > most else end
    cdef const uint64_t *ip = ipp + (r - recs)
    while r < stop and ip[0] - wlo < wspan:
        r += 1
        ip += 1
    return r


cdef class ReplayEngine:
    """Replays record chunks on a machine's CPUs (see pks_emu.trace.replay),
    with the kernel's PKS state in a KernelState under series version ``api``.

    Task ids 0..max_tasks-1 are the trace's; each CPU starts out running a
    boot task of its own (slot max_tasks + cpu) whose value is the CPU's
    initial IA32_PKRS, and the per-CPU cache starts at that value too.
    """
    cdef pks_cpu_t **cpus
    cdef list _cpu_objs
    cdef PhysicalMemory _memory
    cdef int ncpus
    cdef readonly KernelState kernel
    cdef int api
    cdef uint64_t max_tasks
    cdef pks_fault_t *faults
    cdef uint64_t *fault_ips
    cdef uint64_t n_faults, cap_faults
    cdef readonly uint64_t max_faults
    cdef readonly uint64_t total_faults
    cdef readonly uint64_t log_limit
    cdef readonly FaultSites sites
    cdef readonly KernelMapper mapper
    cdef uint32_t pkrs_init
    cdef uint64_t rec_counts[REC_COUNT]
    cdef readonly uint64_t max_exception_depth, records_done
    cdef readonly uint64_t error_record
    # the chunk _run is on: its records, the index of the first, the IPs
    cdef const pks_record_t *chunk
    cdef uint64_t chunk_first
    cdef const uint64_t *chunk_ips
    cdef const uint64_t *chunk_pas       # a mapper's trace: each record's physical address
    cdef readonly int error_problem

    def __cinit__(self):
        self.cpus = NULL
        self.faults = NULL
        self.fault_ips = NULL

    def __init__(self, machine, uint64_t max_tasks=65536, uint32_t pkrs_init=PKS_INIT_VALUE,
                 uint64_t max_faults=0, str api="v10", *, uint64_t log_limit=0,
                 FaultSites sites=None, KernelMapper mapper=None):
        cdef int i
        cdef CPU cpu
        cpus = list(machine.cpus)
        self.ncpus = len(cpus)
        self._cpu_objs = cpus
        self._memory = machine.memory
        if max_tasks < 1:
            raise ValueError(f"max_tasks {max_tasks}: expected at least 1")
        self.max_tasks = max_tasks
        self.pkrs_init = pkrs_init
        self.max_faults = max_faults
        # Every fault is counted by site; the per-fault log keeps the first
        # ``log_limit`` (0: all) until take_faults() hands them out.
        self.log_limit = log_limit
        self.sites = sites if sites is not None else FaultSites()
        if mapper is not None and mapper.ncpus != self.ncpus:
            raise ValueError(f"the kernel mapper has {mapper.ncpus} CPUs, the machine {self.ncpus}")
        self.mapper = mapper
        pks = bool((<CPU>cpus[0]).st.features & PKS_FEAT_PKS)
        # A task the trace never set up starts with the init task's value
        # (INIT_THREAD .pkrs = PKS_INIT_VALUE; fork copies it).
        self.kernel = KernelState(machine, api, init_value=pkrs_init, pks_active=pks,
                                  ntasks=max_tasks + self.ncpus, task_value=pkrs_init,
                                  force_cpl0=True)
        self.api = self.kernel.kapi
        self.cpus = <pks_cpu_t **>calloc(self.ncpus, sizeof(pks_cpu_t *))
        self.cap_faults = 1024
        self.faults = <pks_fault_t *>malloc(self.cap_faults * sizeof(pks_fault_t))
        self.fault_ips = <uint64_t *>malloc(self.cap_faults * sizeof(uint64_t))
        if self.cpus == NULL or self.faults == NULL or self.fault_ips == NULL:
            raise MemoryError("cannot allocate the replay state")
        for i in range(self.ncpus):
            cpu = cpus[i]
            self.cpus[i] = &cpu.st
            self.kernel.task_pkrs[max_tasks + i] = cpu.st.pkrs
            self.kernel.current[i] = <int64_t>(max_tasks + i)
            self.kernel.cache[i] = cpu.st.pkrs
        memset(self.rec_counts, 0, sizeof(self.rec_counts))
        self.error_problem = BAD_NONE

    def __dealloc__(self):
        free(self.cpus)
        free(self.faults)
        free(self.fault_ips)

    @property
    def api(self):
        return self.kernel.api

    @property
    def context_switches(self):
        return self.kernel.total("context_switches")

    @property
    def pkrs_writes(self):
        return self.kernel.total("pkrs_writes")

    @property
    def pkrs_writes_avoided(self):
        return self.kernel.total("pkrs_writes_avoided")

    @property
    def exceptions(self):
        """Exception entries, NMIs (vector 2) included."""
        return self.kernel.total("exceptions") + self.kernel.total("nmis")

    @property
    def nmis(self):
        return self.kernel.total("nmis")

    cdef inline int _log_fault(self, uint64_t index, int cpu, uint8_t vector, int32_t code,
                               uint64_t address, int pkey, uint8_t kind,
                               uint64_t ip=0) noexcept nogil:
        cdef pks_fault_t *grown
        cdef uint64_t *grown_ips
        if self.sites.add(index, <uint8_t>cpu, ip, address, pkey, code, vector, kind) != 0:
            return -1
        self.total_faults += 1
        if self.log_limit and self.n_faults >= self.log_limit:
            return 0
        if self.n_faults == self.cap_faults:
            grown = <pks_fault_t *>realloc(self.faults, 2 * self.cap_faults * sizeof(pks_fault_t))
            if grown == NULL:
                return -1
            self.faults = grown
            grown_ips = <uint64_t *>realloc(self.fault_ips, 2 * self.cap_faults * sizeof(uint64_t))
            if grown_ips == NULL:
                return -1
            self.fault_ips = grown_ips
            self.cap_faults *= 2
        self.fault_ips[self.n_faults] = ip
        self.faults[self.n_faults].record = index
        self.faults[self.n_faults].address = address
        self.faults[self.n_faults].error_code = code
        self.faults[self.n_faults].cpu = <uint8_t>cpu
        self.faults[self.n_faults].vector = vector
        self.faults[self.n_faults].pkey = <signed char>pkey
        self.faults[self.n_faults].kind = kind
        self.n_faults += 1
        return 0

    cdef inline int _insn_fault(self, uint64_t index, int cpu, int32_t r, uint64_t addr,
                                uint64_t ip=0) noexcept nogil:
        if r == PKS_OK:
            return 0
        return self._log_fault(index, cpu, 6 if r == PKS_UD else 13, 0, addr, -1, 255, ip)

    cdef inline int _invalid(self, uint64_t index, int why) noexcept nogil:
        self.error_record = index
        self.error_problem = why
        self.records_done = index
        return REPLAY_INVALID

    def run(self, const uint8_t[::1] data not None, uint64_t first_index,
            const uint64_t[::1] ip=None, const uint64_t[::1] pa=None):
        """Replay the records in ``data`` (a multiple of 24 bytes), with the
        instruction pointer (``ip``) and physical address (``pa``) of each
        record when the trace has them. Returns a status code (REPLAY_*); an
        invalid record stops the run, with its index in ``error_record`` and
        the reason in ``error_problem``."""
        if data.shape[0] % sizeof(pks_record_t):
            raise ValueError(f"record buffer of {data.shape[0]} bytes is not a multiple of 24")
        cdef uint64_t n = data.shape[0] // sizeof(pks_record_t)
        if ip is not None and <uint64_t>ip.shape[0] != n:
            raise ValueError(f"ip has {ip.shape[0]} entries for {n} records")
        if pa is not None and <uint64_t>pa.shape[0] != n:
            raise ValueError(f"pa has {pa.shape[0]} entries for {n} records")
        if n == 0:
            return REPLAY_DONE
        cdef const pks_record_t *recs = <const pks_record_t *>&data[0]
        cdef const uint64_t *ipp = &ip[0] if ip is not None else NULL
        cdef const uint64_t *pap = &pa[0] if pa is not None else NULL
        cdef int status = REPLAY_DONE
        _check_writable(&self._memory.m)     # one GIL-free loop per machine at a time
        self._memory.m.busy += 1
        try:
            with nogil:
                status = self._run(recs, n, first_index, ipp, pap)
        finally:
            self._memory.m.busy -= 1
        return status

    cdef int32_t _demand(self, pks_cpu_t *c, const pks_record_t *r, int32_t res, uint64_t got,
                         uint64_t want) noexcept nogil:
        """A captured kernel's access: map what is not mapped yet, follow
        the guest's remappings, then the access again. Returns its result,
        or PKS_UD when the mapper ran out of page-table frames."""
        cdef int tries
        cdef uint64_t fva, fpa
        for tries in range(3):
            if res == PKS_OK:
                if want == _PA_UNKNOWN or ((got ^ want) >> 12) == 0:
                    return res
                if self.mapper.refresh(c, r.addr, want) != 0:
                    return PKS_UD
            elif res >= 0 and not (res & (PKS_PF_P | PKS_PF_RSVD)):
                fva = c.last_fault_va
                fpa = _PA_UNKNOWN
                if want != _PA_UNKNOWN:
                    fpa = want + (fva & ~<uint64_t>0xFFF) - (r.addr & ~<uint64_t>0xFFF)
                if self.mapper.map_page(c, fva, fpa) != 0:
                    return PKS_UD
            elif (res >= 0 and want != _PA_UNKNOWN and ((c.last_fault_va ^ r.addr) >> 12) == 0
                    and self.mapper.remapped(c, r.addr, want)):
                # A present page faulted, but the guest had mapped it to
                # another frame (a vmalloc or kmap address reused): its key
                # is the new frame's. Follow the remap, then the access again.
                if self.mapper.refresh(c, r.addr, want) != 0:
                    return PKS_UD
            else:
                return res
            res = _access(c, r.addr, r.op, r.size, (r.flags & 1) != 0, &got)
        return res

    cdef int _step(self, const pks_record_t *r, uint64_t i, uint64_t first,
                   const uint64_t *ipp, const uint64_t *pap) noexcept nogil:
        """Access record ``i`` of a chunk (global index ``first + i``) through
        the full path: validated, executed, its fault logged. _GO_ON, or the
        status that ends the run."""
        cdef uint64_t pa = 0, ipv = 0, rfl = 0
        cdef int32_t w
        cdef bint windows = self.mapper is not None and self.mapper.n_windows > 0
        cdef pks_cpu_t *c
        cdef int32_t res
        cdef int cpu, why
        cpu = r.cpu
        why = record_problem(r, self.ncpus, self.max_tasks, self.api)
        if why != BAD_NONE:
            return self._invalid(first + i, why)
        c = self.cpus[cpu]
        if r.cpl != 0xFF:
            c.cpl = r.cpl
        if ipp != NULL:
            ipv = ipp[i]
            if windows and ipv != 0:
                w = self.mapper.window_at(cpu, ipv)
                if w != self.mapper.open_w[cpu]:
                    res = self.mapper.switch_window(self.kernel, cpu, w)
                    if self._insn_fault(first + i, cpu, res, PKS_MSR_IA32_PKRS, ipv) != 0:
                        return REPLAY_OUT_OF_MEMORY
        if r.flags & 2:
            # Kernel code between stac and clac (a capture's FLAG_AC).
            rfl = c.rflags
            c.rflags = rfl | PKS_RFLAGS_AC
        res = _access(c, r.addr, r.op, r.size, (r.flags & 1) != 0, &pa)
        if self.mapper is not None:
            res = self._demand(c, r, res, pa, pap[i] if pap != NULL else _PA_UNKNOWN)
            if res == PKS_UD:
                self.error_record = first + i
                return REPLAY_OUT_OF_MEMORY
        if r.flags & 2:
            c.rflags = rfl
        if res == PKS_OK:
            return _GO_ON
        if res == PKS_GP:
            if self._log_fault(first + i, cpu, 13, 0, r.addr, -1, r.op, ipv) != 0:
                return REPLAY_OUT_OF_MEMORY
        elif self._log_fault(first + i, cpu, 14, res, c.last_fault_va, c.last_pkey, r.op,
                             ipv) != 0:
            return REPLAY_OUT_OF_MEMORY
        if self.max_faults and self.total_faults >= self.max_faults:
            self.records_done = first + i + 1
            return REPLAY_STOPPED
        return _GO_ON

    cdef inline int _fault_again(self, pks_cpu_t *c, const pks_record_t *r, uint32_t sm) noexcept nogil:
        """_fault_again_body for a record whose page has a memo of a faulting
        walk; _NOT_MINE at once for any other (a random-order miss trace's
        records: the call and its register saves cost 48 instructions)."""
        cdef pks_memo_t *m = &c.memo[(r.addr >> 12) & 255]
        if m.tag != ((r.addr & ~<uint64_t>0xFFF) | 1) or m.fault_bits != 0xFFFFFFFFU:
            return _NOT_MINE
        return self._fault_again_body(c, r, sm, m)

    cdef int _fault_again_body(self, pks_cpu_t *c, const pks_record_t *r, uint32_t sm,
                               pks_memo_t *m) noexcept nogil:
        """A hot-path access record (``sm``: its smode << 4) that the tables
        deny and that the walk memo answers: what _step does for it, in one
        call. That is an access record within one page that misses the TLB,
        with no paging-structure-cache entry for its address and an
        up-to-date memo of a walk that reached a leaf, whose verdict is a
        fault: every access to a page a fault invalidated (SDM §4.10.4.1)
        that faults again, the bulk of a fault storm. _access would take
        _miss, then _miss_walk's memo branch, and _demand keeps a fault with
        P=1 as it is; so the counters, the caches and the log end as they
        would. _NOT_MINE for any other record (nothing was changed), else
        _GO_ON or the status that ends the run."""
        cdef uint64_t va = r.addr, leaf, want
        cdef uint32_t kind = r.op
        cdef bint implicit = r.flags & 1
        cdef pks_tlb_entry_t *t = &c.tlb[(va >> 12) & c.tlb_mask]
        cdef uint32_t idx, p, pk
        cdef int32_t code
        cdef bint cleared
        cdef uint64_t i, index
        # Within one page, with a size of 1..4096 (0 wraps to 2**32 - 1).
        if kind > 2 or (va & 0xFFF) + <uint64_t>(<uint32_t>r.size - 1) > 4095:
            return _NOT_MINE
        # The TLB misses: the caller compared this slot's tag for the kind
        # with the page of the record's last byte, which is va's page here.
        # (_fault_again compared m, the memo of va's page, with va and its
        # fault bits.)
        if m.epoch != c.memo_epoch:
            return _NOT_MINE
        # No cache entry made since the memo's page last faulted: the slots
        # its walk would fill are still empty (psc_stamp).
        cleared = m.psc_stamp == c.psc_fills
        if not cleared and c.psc_on and not _psc_none(c, va):
            return _NOT_MINE
        # The paging entries the memo read are compared with memory once
        # between two records that can write memory (see replay_epoch).
        if m.checked != c.mem.replay_epoch:
            if not _memo_valid(m):
                return _NOT_MINE
            m.checked = c.mem.replay_epoch
        leaf = m.leaf
        # A captured kernel's record in another frame than the memo's: the
        # guest remapped the page, which _demand follows.
        if self.chunk_pas != NULL:
            want = self.chunk_pas[r - self.chunk]
            if want != _PA_UNKNOWN and ((want ^ leaf) & c.addr_mask) >> 12 != 0:
                return _NOT_MINE
        idx = (kind << 7) | sm | <uint32_t>((leaf >> 1) & 15)
        p = c.perm[idx]
        pk = (c.deny[p >> 1] >> <uint32_t>(leaf >> PKS_PTE_PKEY_SHIFT)) & 1
        if ((p | pk) & 1) == 0:
            return _NOT_MINE
        code = <int32_t>(c.pf_code[(kind << 3) | (sm >> 4)] | (pk << 5))
        if PKS_EMU_DEBUG:
            if (record_problem(r, self.ncpus, self.max_tasks, self.api) != BAD_NONE
                    or _tlb_hit(t, va, <int>kind) or (pk << 5) != PKS_PF_PK * pk
                    or code != _check(c, leaf, <int>kind, implicit) or c != self.cpus[r.cpu]
                    or sm != _smode(c, implicit) << 4 or (c.psc_on and not _psc_none(c, va))
                    or c.mem != &self._memory.m or not _memo_valid(m)
                    or m != &c.memo[(va >> 12) & 255] or m.tag != ((va & ~<uint64_t>0xFFF) | 1)
                    or m.fault_bits != 0xFFFFFFFFU):
                pks_debug_mismatch("replay repeated fault", va, leaf)
            _memo_debug_check(c, va, m)
        # _miss_walk's memo branch, faulting
        c.counters.accesses[kind][(<uint32_t>code >> 2) & 1] += 1      # U/S: a user-mode access
        c.counters.tlb_misses += 1
        c.counters.walks += 1
        c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
        if not cleared:
            _memo_psc_clear(c, va, m)
            m.psc_stamp = c.psc_fills
        _miss_fault_drop(c, va, t)
        c.last_fault_va = va
        c.counters.page_faults += 1
        # _step's fault branch
        i = <uint64_t>(r - self.chunk)
        index = self.chunk_first + i
        if self._log_fault(index, r.cpu, 14, code, va, c.last_pkey, <uint8_t>kind,
                           self.chunk_ips[i] if self.chunk_ips != NULL else 0) != 0:
            return REPLAY_OUT_OF_MEMORY
        if self.max_faults and self.total_faults >= self.max_faults:
            self.records_done = index + 1
            return REPLAY_STOPPED
        return _GO_ON

    cdef int _miss(self, pks_cpu_t *c, const pks_record_t *r, const pks_record_t *recs,
                   uint64_t first, const uint64_t *ipp, uint32_t sm) noexcept nogil:
        """A hot-path access record that missed the TLB and that _fault_again
        declined: what _step does for it, in a trace without a kernel mapper
        and if its op (0..2) and size (1..4096) are valid; else _NOT_MINE. The
        rest of the record is valid then (the key's bytes were validated), its
        CPU's CPL is the record's and smode is the key's (see _run), it has no
        EFLAGS.AC flag (no key has), and without a mapper there are no windows
        and no _demand: _step's work is then _access and the fault's log.
        _GO_ON, or the status that ends the run."""
        cdef uint64_t pa = 0, va = r.addr
        cdef uint64_t i = <uint64_t>(r - recs)
        cdef uint64_t ipv
        cdef bint implicit = (r.flags & 1) != 0
        cdef int32_t res
        cdef uint32_t size = r.size
        if r.op > 2 or size - 1 > 4095 or self.mapper is not None:
            return _NOT_MINE
        if PKS_EMU_DEBUG:
            if (record_problem(r, self.ncpus, self.max_tasks, self.api) != BAD_NONE
                    or c != self.cpus[r.cpu] or (r.flags & 2)
                    or (r.cpl != 0xFF and c.cpl != r.cpl) or sm != _smode(c, implicit) << 4):
                pks_debug_mismatch("replay miss in line", r.addr, r.op)
        # A walk may set A/D bits: walk memos are compared with memory again.
        c.mem.replay_epoch += 1
        if (va & 0xFFF) + size <= 4096:
            # _access_m's miss branch: the caller's tag compare was _tlb_hit's.
            res = _miss_p(c, va, r.op, sm >> 4, &pa, &c.tlb[(va >> 12) & c.tlb_mask])
        else:
            res = pks_access(c, va, r.op, size, implicit, &pa)
        if res == PKS_OK:
            return _GO_ON
        ipv = ipp[i] if ipp != NULL else 0
        if res == PKS_GP:
            if self._log_fault(first + i, r.cpu, 13, 0, r.addr, -1, r.op, ipv) != 0:
                return REPLAY_OUT_OF_MEMORY
        elif self._log_fault(first + i, r.cpu, 14, res, c.last_fault_va, c.last_pkey, r.op,
                             ipv) != 0:
            return REPLAY_OUT_OF_MEMORY
        if self.max_faults and self.total_faults >= self.max_faults:
            self.records_done = first + i + 1
            return REPLAY_STOPPED
        return _GO_ON

    cdef int _run(self, const pks_record_t *recs, uint64_t n, uint64_t first,
                  const uint64_t *ipp, const uint64_t *pap) noexcept nogil:
        # The hot path, in line: an access record whose first eight bytes
        # (type, CPU, flags, CPL field; the op and size fields masked off)
        # equal those of the last access record _step ran, with a size of
        # 1..4096 (see below), that hits the TLB and that the tables allow.
        # Such a record is valid (_step validated the same bytes; op 3 is
        # sent back by the kind-3 row of perm_fast; any address is valid),
        # and its CPU's CPL, EFLAGS.AC and the implicit flag are what they
        # were after that record: only _step changes them, and after each
        # _step the key is rebuilt from the record it ran (or cleared).
        # It does what _access_m does on a hit, minus the physical address,
        # which only the kernel mapper reads: with a mapper (a captured
        # kernel) the record's own physical address must then be in the
        # cached frame (else _demand follows a remap), and while the policy
        # has windows its IP must be where window_at would change nothing.
        cdef uint64_t i, hdr, va, leaf, tmask = 0, key = PKS_REC_NO_KEY, held
        cdef const pks_record_t *r = recs
        cdef const pks_record_t *end = recs + n
        cdef pks_cpu_t *c = NULL
        cdef pks_cpu_t *hc
        cdef pks_cpu_t *cc
        cdef uint64_t v = 0, ipv
        cdef int32_t res
        cdef uint32_t cpl_before, depth
        cdef int cpu
        cdef bint faulted
        cdef pks_tlb_entry_t *tlb = NULL
        cdef pks_tlb_entry_t *t
        cdef uint32_t sm = 0, idx, p
        cdef uint64_t last = 0
        cdef int st
        # With windows (a kernel policy's), records go through window_at in
        # _step, unless the key's CPU is in a stretch of instruction
        # pointers [wlo, wlo + wspan) where window_at is a no-op (see
        # KernelMapper.window_stable): then the hot path checks the record's
        # IP is in it. Windows without IPs never open: no hot path then.
        cdef bint wmode = self.mapper is not None and self.mapper.n_windows > 0
        cdef bint hot = not wmode or ipp != NULL
        cdef uint64_t wlo = 0, wspan = 0
        # The hot path's records end at lim: ``end``, or with windows the
        # first record ahead not known to be in [wlo, wlo + wspan).
        cdef const pks_record_t *lim = end
        cdef uint64_t dlo, dspan             # (the debug build's check of the window stretch)
        # the physical addresses the hot path must check (a mapper's trace)
        cdef const uint64_t *hpa = pap if self.mapper is not None else NULL
        cdef uint64_t want
        cdef pks_mem_t *mem = &self._memory.m
        self.chunk = recs
        self.chunk_first = first
        self.chunk_ips = ipp
        self.chunk_pas = hpa
        # Memory may have been written since the last run (pks_mem_t.replay_epoch).
        mem.replay_epoch += 1
        # The loop keeps only the CPU pointer and what the key fixed in
        # registers; the tables are read at constant offsets from ``c``.
        while True:
            if r >= lim:
                if r >= end:
                    break
                # (Windows) the records scanned ahead end here: scan on, or
                # this record's IP is outside the stretch and _step runs it.
                lim = _window_run(r, recs, end, ipp, wlo, wspan, 64)
                if lim == r:
                    key = PKS_REC_NO_KEY
                    lim = end
            memcpy(&hdr, r, 8)
            if (hdr & ~PKS_REC_NOT_KEY) == key:
                va = r.addr
                t = &tlb[(va >> 12) & tmask]
                # The tag is compared with the page of va + (size - 1 mod
                # 2**16) in the slot of va: equal only if both are on the
                # cached page. Any other page is 1..16 pages on (or page 0..15
                # after a wrap), which has another slot since the hot path
                # needs a TLB of 32 or more entries. So a size of 0 (65535
                # on) or over 4096 never matches: every record that passes
                # has a valid size, like those _step validated.
                last = ((hdr >> 32) + 0xFFFF) & 0xFFFF
                if (<uint64_t *>t)[(hdr >> 16) & 1] != (((va + last) & ~<uint64_t>0xFFF) | 1):
                    # A miss: a fault the walk memo answers runs here and
                    # keeps the key (it changes no CPL, EFLAGS.AC or TLB
                    # geometry), anything else goes to _step below.
                    st = self._fault_again(c, r, sm)
                    if st == _GO_ON:
                        r += 1
                        continue
                    if st == _NOT_MINE:
                        st = self._miss(c, r, recs, first, ipp, sm)
                        if st == _GO_ON:
                            r += 1
                            continue
                    if st != _NOT_MINE:
                        return st
                elif (hpa == NULL or (want := hpa[r - recs]) == _PA_UNKNOWN
                        or ((want ^ t.leaf) & c.addr_mask) >> 12 == 0):
                    leaf = t.leaf
                    # kind << 7 | smode << 4 | leaf bits 4:1, as in _access_m
                    idx = (<uint32_t>(hdr >> 9) & 0x180) | sm | <uint32_t>((leaf >> 1) & 15)
                    p = c.perm_fast[idx]
                    if ((p | (c.deny[p >> 1] >> <uint32_t>(leaf >> PKS_PTE_PKEY_SHIFT))) & 1) == 0:
                        if PKS_EMU_DEBUG:
                            if (record_problem(r, self.ncpus, self.max_tasks, self.api) != BAD_NONE
                                    or _check(c, leaf, r.op, (r.flags & 1) != 0) != PKS_OK
                                    or sm != _smode(c, (r.flags & 1) != 0) << 4
                                    or c != self.cpus[r.cpu]
                                    or (wmode and not self.mapper.window_stable(
                                        r.cpu, ipp[r - recs], &dlo, &dspan))):
                                pks_debug_mismatch("replay hot path", hdr, leaf)
                        c.counters.fast_hits[idx >> 4] += 1
                        c.last_pkey = <int32_t>(leaf >> PKS_PTE_PKEY_SHIFT)
                        r += 1
                        continue
            held = key
            hc = c
            if r.type == REC_ACCESS:
                # _step and the control records of the last branch may write
                # memory (a walk's A/D bits, the mapper, a PTE write): walk
                # memos are compared with it again afterwards. The in-line
                # records between write none.
                mem.replay_epoch += 1
                st = self._step(r, <uint64_t>(r - recs), first, ipp, pap)
            elif (r.type == REC_WRMSR and r.addr == PKS_MSR_IA32_PKRS and r.cpu < self.ncpus
                    and _wrmsr_pkrs_plain(self.cpus[r.cpu], r.value)):
                # A kernel's WRMSR IA32_PKRS, in line: valid (the MSR number
                # fits in 32 bits), and it cannot fault. Then as below.
                _pkrs_store(self.cpus[r.cpu], r.value)
                self.kernel.msr_written(r.cpu, r.value)
                self.rec_counts[REC_WRMSR] += 1
                # These three in-line records change no CPL, EFLAGS.AC or
                # TLB geometry: the hot path's key and values stay as they
                # are (it reads the key registers' deny masks live).
                r += 1
                continue
            elif (r.type == REC_WRPKRU and r.cpu < self.ncpus
                    and _wrpkru_plain(self.cpus[r.cpu], <uint32_t>r.addr, <uint32_t>(r.addr >> 32))):
                _pkru_store(self.cpus[r.cpu], <uint32_t>r.value)
                self.rec_counts[REC_WRPKRU] += 1
                r += 1
                continue
            elif (r.type == REC_CONTEXT_SWITCH and r.addr == 0 and r.cpu < self.ncpus
                    and r.value < self.max_tasks):
                # A context switch without CR3, valid: as below.
                self.rec_counts[REC_CONTEXT_SWITCH] += 1
                res = self.kernel.switch_to(r.cpu, <int64_t>r.value)
                if res != PKS_OK:
                    i = <uint64_t>(r - recs)
                    if self._insn_fault(first + i, r.cpu, res, PKS_MSR_IA32_PKRS,
                                        ipp[i] if ipp != NULL else 0) != 0:
                        return REPLAY_OUT_OF_MEMORY
                r += 1
                continue
            elif (r.type == REC_EXCEPTION_ENTRY or r.type == REC_EXCEPTION_EXIT) and r.cpu < self.ncpus:
                # Valid: these records have no other field to check (so the path
                # below never sees one).
                cpu = r.cpu
                cc = self.cpus[cpu]
                self.rec_counts[r.type] += 1
                st = _GO_ON
                if r.type == REC_EXCEPTION_ENTRY:
                    cpl_before = cc.cpl
                    cc.cpl = 0
                    # Vector 2 is an NMI (irqentry_nmi_enter: saves in every version).
                    if self.kernel.entry(cpu, r.value == 2, (r.flags & 1) != 0 or cpl_before == 3,
                                         cpl_before, &res) != 0:
                        self.error_record = first + <uint64_t>(r - recs)
                        return REPLAY_OUT_OF_MEMORY
                    depth = self.kernel.depth_of(cpu)
                    if depth > self.max_exception_depth:
                        self.max_exception_depth = depth
                else:
                    if self.kernel.exit(cpu, &cpl_before, &res) != 0:
                        self.error_record = first + <uint64_t>(r - recs)
                        self.records_done = first + <uint64_t>(r - recs)
                        return REPLAY_EXIT_WITHOUT_ENTRY
                    cc.cpl = cpl_before
                if res != PKS_OK:
                    i = <uint64_t>(r - recs)
                    if self._insn_fault(first + i, cpu, res, PKS_MSR_IA32_PKRS,
                                        ipp[i] if ipp != NULL else 0) != 0:
                        return REPLAY_OUT_OF_MEMORY
            else:
                # A control record, in line (a call costs as much as some of them).
                mem.replay_epoch += 1
                i = <uint64_t>(r - recs)
                st = record_problem(r, self.ncpus, self.max_tasks, self.api)
                if st != BAD_NONE:
                    return self._invalid(first + i, st)
                st = _GO_ON
                cpu = r.cpu
                cc = self.cpus[cpu]
                faulted = False
                ipv = ipp[i] if ipp != NULL else 0
                self.rec_counts[r.type] += 1
                res = PKS_OK
                if r.type == REC_WRMSR:
                    res = pks_wrmsr(cc, <uint32_t>r.addr, r.value)
                    if res == PKS_OK:
                        if r.addr == PKS_MSR_IA32_PKRS:
                            # A PKRS write is the consumer's pks_write_pkrs: the
                            # running task's value and the cache follow it.
                            self.kernel.msr_written(cpu, r.value)
                    else:
                        if self._insn_fault(first + i, cpu, res, r.addr, ipv) != 0:
                            return REPLAY_OUT_OF_MEMORY
                        faulted = True
                elif r.type == REC_RDMSR:
                    res = pks_rdmsr(cc, <uint32_t>r.addr, &v)
                    if res != PKS_OK:
                        if self._insn_fault(first + i, cpu, res, r.addr, ipv) != 0:
                            return REPLAY_OUT_OF_MEMORY
                        faulted = True
                elif r.type == REC_WRPKRU:
                    res = pks_wrpkru(cc, <uint32_t>r.value, <uint32_t>r.addr, <uint32_t>(r.addr >> 32))
                    if res != PKS_OK:
                        if self._insn_fault(first + i, cpu, res, 0, ipv) != 0:
                            return REPLAY_OUT_OF_MEMORY
                        faulted = True
                elif r.type == REC_MOV_CR:
                    if r.op == 0:
                        res = pks_write_cr0(cc, r.value)
                    elif r.op == 3:
                        res = pks_write_cr3(cc, r.value)
                    else:
                        res = pks_write_cr4(cc, r.value)
                    if res != PKS_OK:
                        if self._insn_fault(first + i, cpu, res, r.value, ipv) != 0:
                            return REPLAY_OUT_OF_MEMORY
                        faulted = True
                elif r.type == REC_INVLPG:
                    pks_invlpg(cc, r.addr)
                elif r.type == REC_PTE_WRITE:
                    if pks_mem_write_u64(cc.mem, r.addr, r.value) != 0:
                        self.error_record = first + i
                        return REPLAY_OUT_OF_MEMORY
                elif r.type == REC_CONTEXT_SWITCH:
                    if r.addr != 0:
                        # __switch_to runs at CPL 0 whatever the outgoing task's CPL.
                        cpl_before = cc.cpl
                        cc.cpl = 0
                        res = pks_write_cr3(cc, r.addr)
                        cc.cpl = cpl_before
                        if self._insn_fault(first + i, cpu, res, r.addr, ipv) != 0:
                            return REPLAY_OUT_OF_MEMORY
                    res = self.kernel.switch_to(cpu, <int64_t>r.value)
                    if self._insn_fault(first + i, cpu, res, PKS_MSR_IA32_PKRS, ipv) != 0:
                        return REPLAY_OUT_OF_MEMORY
                elif r.type == REC_SET_RFLAGS:
                    cc.rflags = (r.value & PKS_RFLAGS_KNOWN) | PKS_RFLAGS_FIXED
                elif r.type == REC_TASK_FORK:
                    self.kernel.fork(cpu, <int64_t>r.value, (r.flags & 1) != 0)
                elif r.type == REC_TASK_EXEC:
                    self.kernel.exec_task(<int64_t>r.value)
                elif r.type == REC_PKS_UPDATE:
                    res = self.kernel.update_current(cpu, <int>r.value, r.op)
                    if self._insn_fault(first + i, cpu, res, PKS_MSR_IA32_PKRS, ipv) != 0:
                        return REPLAY_OUT_OF_MEMORY
                elif r.type == REC_PKS_ABANDON:
                    # V7 pks_abandon_protections: the key leaves the allowed mask
                    # for good, and the current task gets read/write on it.
                    self.kernel.mask &= ~(<uint64_t>3 << (2 * r.value)) & <uint64_t>0xFFFFFFFF
                    res = self.kernel.update_current(cpu, <int>r.value, 0)
                    if self._insn_fault(first + i, cpu, res, PKS_MSR_IA32_PKRS, ipv) != 0:
                        return REPLAY_OUT_OF_MEMORY
                # A faulting WRMSR, RDMSR, WRPKRU or MOV to CR counts toward max_faults.
                if faulted and self.max_faults and self.total_faults >= self.max_faults:
                    self.records_done = first + i + 1
                    return REPLAY_STOPPED
            if st != _GO_ON:
                return st
            if r.type == REC_ACCESS:
                held = PKS_REC_NO_KEY
                if (hot and not (r.flags & 2) and self.cpus[r.cpu].tlb_mask >= 31
                        and (not wmode or self.mapper.window_stable(r.cpu, ipp[r - recs], &wlo, &wspan))):
                    hc = self.cpus[r.cpu]
                    held = hdr & ~PKS_REC_NOT_KEY
            elif held != PKS_REC_NO_KEY:
                # A control record leaves the key's CPU and flags; it
                # may have changed the CPL or EFLAGS.AC (smode is derived
                # again below), but the key's records write a CPL of their
                # own, which the hot path does not: that CPL must still hold.
                if (held >> 48) & 0xFF != 0xFF and hc.cpl != (held >> 48) & 0xFF:
                    held = PKS_REC_NO_KEY
            # Every hot-path value is set here on both branches, so that only
            # ``held`` and ``hc`` live across the call to _step: the loop
            # above keeps the rest in registers.
            if held != PKS_REC_NO_KEY:
                c = hc
                tlb = c.tlb
                tmask = c.tlb_mask
                sm = _smode(c, ((held >> 24) & 1) != 0) << 4
            else:
                c = NULL
                tlb = NULL
                tmask = 0
                sm = 0
            key = held
            r += 1
            if wmode:
                # The hot path takes the records ahead whose IPs are in the
                # stretch where window_at changes nothing (a few at a time,
                # so that a _step every few records does not rescan far).
                lim = _window_run(r, recs, end, ipp, wlo, wspan, 16) if key != PKS_REC_NO_KEY else end
        self.records_done = first + n
        return REPLAY_DONE

    def faults_array(self):
        """The fault log as a numpy structured array (a copy)."""
        out = np.empty(self.n_faults, dtype=np.dtype(FAULT_DTYPE_FIELDS))
        cdef uint8_t[::1] view = out.view(np.uint8).reshape(-1) if self.n_faults else np.empty(0, np.uint8)
        if self.n_faults:
            memcpy(&view[0], self.faults, self.n_faults * sizeof(pks_fault_t))
        return out

    def fault_ips_array(self):
        """The instruction pointer of each logged fault (0: unknown)."""
        out = np.empty(self.n_faults, dtype=np.uint64)
        cdef uint64_t[::1] view = out
        if self.n_faults:
            memcpy(&view[0], self.fault_ips, self.n_faults * sizeof(uint64_t))
        return out

    def take_faults(self):
        """(faults, ips) logged so far, emptying the log (a caller that
        streams the log to a file takes it after each chunk). The log
        limit then counts again from zero."""
        out = (self.faults_array(), self.fault_ips_array())
        self.n_faults = 0
        return out

    @property
    def fault_count(self):
        """Faults logged and not yet taken."""
        return self.n_faults

    def record_counts(self):
        # Access records are not counted in the loop (the hot path); they are
        # what remains of the records replayed.
        counts = [self.rec_counts[i] for i in range(REC_COUNT)]
        counts[REC_ACCESS] = self.records_done - sum(counts)
        return counts

    def exception_depths(self):
        return [self.kernel.depth_of(i) for i in range(self.ncpus)]

    def current_tasks(self):
        """Task id running on each CPU (-1: still its boot task)."""
        cur = [self.kernel.current[i] for i in range(self.ncpus)]
        return [t if t < <int64_t>self.max_tasks else -1 for t in cur]

    def pkrs_caches(self):
        return [self.kernel.cache[i] for i in range(self.ncpus)]

    def task_pkrs(self, uint64_t task):
        """The saved PKRS of trace task ``task``."""
        if task >= self.max_tasks:
            raise ValueError(f"task id {task} out of range (max_tasks {self.max_tasks})")
        return self.kernel.task_pkrs[task]


def load_cpu_state(CPU cpu not None, uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer,
                   uint64_t rflags, uint64_t cpl, uint64_t pkru, uint64_t pkrs):
    """Set a CPU's registers from a saved state, checking that the hardware
    could hold them; returns None or a string saying what is wrong."""
    cdef pks_cpu_t *c = &cpu.st
    if cr4 & ~_cr4_allowed(c):
        return f"CR4 {cr4:#x} sets a reserved bit or a bit of an absent feature"
    if bool(cr4 & PKS_CR4_LA57) != (c.levels == 5):
        return f"CR4.LA57 in {cr4:#x} disagrees with the trace's {c.levels}-level paging"
    if not (cr4 & PKS_CR4_PAE) or not (cr0 & PKS_CR0_PG) or not (cr0 & PKS_CR0_PE):
        return f"CR0 {cr0:#x} / CR4 {cr4:#x}: the machine model runs in IA-32e paging (PG, PE, PAE set)"
    if cr0 >> 32:
        return f"CR0 {cr0:#x} sets bits 63:32"
    if efer & ~PKS_EFER_KNOWN or not (efer & PKS_EFER_LMA) or not (efer & PKS_EFER_LME):
        return f"EFER {efer:#x}: unknown bits, or LME/LMA clear"
    if (efer & PKS_EFER_NXE) and not (c.features & PKS_FEAT_NX):
        return f"EFER {efer:#x} sets NXE without the nx feature"
    if cr3 & ~((<uint64_t>1 << c.maxphyaddr) - 1):
        return f"CR3 {cr3:#x} sets bits above MAXPHYADDR {c.maxphyaddr}"
    if cpl > 3:
        return f"CPL {cpl}: expected 0..3"
    if pkru >> 32 or pkrs >> 32:
        return f"PKRU {pkru:#x} / PKRS {pkrs:#x} must fit in 32 bits"
    if pkrs and not (c.features & PKS_FEAT_PKS):
        return f"PKRS {pkrs:#x} is not 0 on a CPU without PKS"
    c.cr0 = cr0
    c.cr3 = cr3
    c.cr4 = cr4
    c.efer = efer
    c.rflags = (rflags & PKS_RFLAGS_KNOWN) | PKS_RFLAGS_FIXED
    c.cpl = <uint32_t>cpl
    c.pkru = <uint32_t>pkru
    c.pkrs = pkrs
    pks_flush_tlb(c, False)
    return None


def first_invalid_record(const uint8_t[::1] data not None, int ncpus, uint64_t max_tasks, str api="v10"):
    """(index, problem) of the first record in ``data`` that record_problem()
    refuses, or (-1, 0). pks_emu.trace.format words the problem."""
    if data.shape[0] % sizeof(pks_record_t):
        raise ValueError(f"record buffer of {data.shape[0]} bytes is not a multiple of 24")
    if api not in KAPI_CODES:
        raise ValueError(f"api {api!r}: expected one of {sorted(KAPI_CODES)}")
    cdef int code = KAPI_CODES[api]
    cdef uint64_t n = data.shape[0] // sizeof(pks_record_t)
    cdef uint64_t i
    cdef int64_t bad = -1
    cdef int why = BAD_NONE
    cdef const pks_record_t *recs
    if n == 0:
        return -1, BAD_NONE
    recs = <const pks_record_t *>&data[0]
    with nogil:
        for i in range(n):
            why = record_problem(&recs[i], ncpus, max_tasks, code)
            if why != BAD_NONE:
                bad = i
                break
    return bad, why
