# The compiled trace-replay loop (included by _core.pyx).
#
# Records are the 24-byte records of docs/trace-format.md, validated by
# pks_emu.trace.format.validate_records before they reach this loop, which
# then trusts record types, CPU indices, kinds, sizes, CR numbers and task
# ids. Everything the loop meets that the emulated machine would report —
# #PF, #GP, #UD — is appended to the fault log; nothing is dropped.
#
# Context switches and exception entry/exit follow the V10 kernel
# (pks-spec.md §3.6-3.8): every task has a saved PKRS (thread.pkrs), a
# context switch loads the incoming task's value through the per-CPU
# pkrs_cache (WRMSR only when it differs), exception entry saves thread.pkrs
# in an auxiliary slot and loads the default, exit restores it.

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
    typedef struct { uint64_t pkrs; uint32_t cpl; uint32_t pad; } pks_aux_t;
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
    ctypedef struct pks_aux_t:
        uint64_t pkrs
        uint32_t cpl

from libc.stdlib cimport realloc

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
    REC_COUNT = 11

# Status of a run() call.
cdef enum:
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


cdef class ReplayEngine:
    """Replays validated record chunks on a machine's CPUs (see pks_emu.trace.replay)."""
    cdef pks_cpu_t **cpus
    cdef list _cpu_objs
    cdef PhysicalMemory _memory
    cdef int ncpus
    cdef uint64_t max_tasks
    cdef uint64_t *task_pkrs
    cdef int64_t *current_task
    cdef uint64_t *pkrs_cache
    cdef pks_aux_t **aux
    cdef uint32_t *aux_depth
    cdef uint32_t *aux_cap
    cdef pks_fault_t *faults
    cdef uint64_t n_faults, cap_faults
    cdef readonly uint64_t max_faults
    cdef uint32_t pkrs_init
    cdef uint64_t rec_counts[REC_COUNT]
    cdef readonly uint64_t context_switches, pkrs_writes, pkrs_writes_avoided
    cdef readonly uint64_t exceptions, max_exception_depth, records_done
    cdef readonly uint64_t error_record

    def __cinit__(self):
        self.cpus = NULL
        self.task_pkrs = NULL
        self.current_task = NULL
        self.pkrs_cache = NULL
        self.aux = NULL
        self.aux_depth = NULL
        self.aux_cap = NULL
        self.faults = NULL

    def __init__(self, machine, uint64_t max_tasks=65536, uint32_t pkrs_init=0x55555554,
                 uint64_t max_faults=0):
        cdef int i
        cdef CPU cpu
        cpus = list(machine.cpus)
        self.ncpus = len(cpus)
        self._cpu_objs = cpus
        self._memory = machine.memory
        self.max_tasks = max_tasks
        self.pkrs_init = pkrs_init
        self.max_faults = max_faults
        self.cpus = <pks_cpu_t **>calloc(self.ncpus, sizeof(pks_cpu_t *))
        self.task_pkrs = <uint64_t *>malloc(max(max_tasks, 1) * sizeof(uint64_t))
        self.current_task = <int64_t *>malloc(self.ncpus * sizeof(int64_t))
        self.pkrs_cache = <uint64_t *>calloc(self.ncpus, sizeof(uint64_t))
        self.aux = <pks_aux_t **>calloc(self.ncpus, sizeof(pks_aux_t *))
        self.aux_depth = <uint32_t *>calloc(self.ncpus, sizeof(uint32_t))
        self.aux_cap = <uint32_t *>calloc(self.ncpus, sizeof(uint32_t))
        self.cap_faults = 1024
        self.faults = <pks_fault_t *>malloc(self.cap_faults * sizeof(pks_fault_t))
        if (self.cpus == NULL or self.task_pkrs == NULL or self.current_task == NULL
                or self.pkrs_cache == NULL or self.aux == NULL or self.aux_depth == NULL
                or self.aux_cap == NULL or self.faults == NULL):
            raise MemoryError("cannot allocate the replay state")
        for i in range(self.ncpus):
            cpu = cpus[i]
            self.cpus[i] = &cpu.st
            self.current_task[i] = -1
            # The cache starts as the MSR value the trace's initial state holds.
            self.pkrs_cache[i] = cpu.st.pkrs
        for i in range(max_tasks):
            # A task the trace never set up starts with the init task's value
            # (INIT_THREAD .pkrs = PKS_INIT_VALUE; fork copies it).
            self.task_pkrs[i] = pkrs_init
        memset(self.rec_counts, 0, sizeof(self.rec_counts))

    def __dealloc__(self):
        cdef int i
        if self.aux != NULL:
            for i in range(self.ncpus):
                free(self.aux[i])
        free(self.aux)
        free(self.aux_depth)
        free(self.aux_cap)
        free(self.cpus)
        free(self.task_pkrs)
        free(self.current_task)
        free(self.pkrs_cache)
        free(self.faults)

    cdef inline int _log_fault(self, uint64_t index, int cpu, uint8_t vector, int32_t code,
                               uint64_t address, int pkey, uint8_t kind) noexcept nogil:
        cdef pks_fault_t *grown
        if self.n_faults == self.cap_faults:
            grown = <pks_fault_t *>realloc(self.faults, 2 * self.cap_faults * sizeof(pks_fault_t))
            if grown == NULL:
                return -1
            self.faults = grown
            self.cap_faults *= 2
        self.faults[self.n_faults].record = index
        self.faults[self.n_faults].address = address
        self.faults[self.n_faults].error_code = code
        self.faults[self.n_faults].cpu = <uint8_t>cpu
        self.faults[self.n_faults].vector = vector
        self.faults[self.n_faults].pkey = <signed char>pkey
        self.faults[self.n_faults].kind = kind
        self.n_faults += 1
        return 0

    cdef inline int _insn_fault(self, uint64_t index, int cpu, int32_t r, uint64_t addr) noexcept nogil:
        return self._log_fault(index, cpu, 6 if r == PKS_UD else 13, 0, addr, -1, 255)

    cdef inline void _write_pkrs_cached(self, int cpu, uint64_t value) noexcept nogil:
        # pks_write_pkrs (V8-V10): WRMSR only when the per-CPU cache differs.
        # The kernel runs at CPL 0 here whatever the interrupted CPL was.
        cdef pks_cpu_t *c = self.cpus[cpu]
        cdef uint32_t cpl
        if not (c.features & PKS_FEAT_PKS):
            return                      # cpu_feature_enabled(X86_FEATURE_PKS) is false
        if self.pkrs_cache[cpu] == value:
            self.pkrs_writes_avoided += 1
            return
        self.pkrs_cache[cpu] = value
        cpl = c.cpl
        c.cpl = 0
        pks_wrmsr(c, PKS_MSR_IA32_PKRS, value)
        c.cpl = cpl
        self.pkrs_writes += 1

    cdef inline int _invalid(self, uint64_t index) noexcept nogil:
        self.error_record = index
        self.records_done = index
        return REPLAY_INVALID

    cdef int _push_aux(self, int cpu, uint64_t pkrs, uint32_t cpl) noexcept nogil:
        cdef pks_aux_t *grown
        cdef uint32_t cap
        if self.aux_depth[cpu] == self.aux_cap[cpu]:
            cap = self.aux_cap[cpu] * 2 if self.aux_cap[cpu] else 16
            grown = <pks_aux_t *>realloc(self.aux[cpu], cap * sizeof(pks_aux_t))
            if grown == NULL:
                return -1
            self.aux[cpu] = grown
            self.aux_cap[cpu] = cap
        self.aux[cpu][self.aux_depth[cpu]].pkrs = pkrs
        self.aux[cpu][self.aux_depth[cpu]].cpl = cpl
        self.aux_depth[cpu] += 1
        if self.aux_depth[cpu] > self.max_exception_depth:
            self.max_exception_depth = self.aux_depth[cpu]
        return 0

    def run(self, const uint8_t[::1] data not None, uint64_t first_index):
        """Replay the records in ``data`` (a multiple of 24 bytes, already
        validated). Returns a status code (REPLAY_*)."""
        if data.shape[0] % sizeof(pks_record_t):
            raise ValueError(f"record buffer of {data.shape[0]} bytes is not a multiple of 24")
        cdef uint64_t n = data.shape[0] // sizeof(pks_record_t)
        if n == 0:
            return REPLAY_DONE
        cdef const pks_record_t *recs = <const pks_record_t *>&data[0]
        cdef int status = REPLAY_DONE
        _check_writable(&self._memory.m)     # one GIL-free loop per machine at a time
        self._memory.m.busy += 1
        try:
            with nogil:
                status = self._run(recs, n, first_index)
        finally:
            self._memory.m.busy -= 1
        return status

    cdef int _run(self, const pks_record_t *recs, uint64_t n, uint64_t first) noexcept nogil:
        cdef uint64_t i, pa = 0, v = 0, task
        cdef const pks_record_t *r
        cdef pks_cpu_t *c
        cdef int32_t res
        cdef int cpu
        cdef uint32_t cpl_before
        cdef pks_aux_t saved
        for i in range(n):
            r = &recs[i]
            cpu = r.cpu
            # Each record is checked before it is used, in the same pass that
            # executes it (a separate validation pass cost a fifth of the
            # time); the first bad record stops the replay with its index.
            if r.type == REC_ACCESS:
                if ((cpu >= self.ncpus) | (r.op > 2) | (<uint32_t>r.size - 1 > 4095)
                        | ((r.cpl > 3) & (r.cpl != 0xFF))):
                    return self._invalid(first + i)
                c = self.cpus[cpu]
                if r.cpl != 0xFF:
                    c.cpl = r.cpl
                res = _access(c, r.addr, r.op, r.size, (r.flags & 1) != 0, &pa)
                if res == PKS_OK:
                    continue
                if res == PKS_GP:
                    if self._log_fault(first + i, cpu, 13, 0, r.addr, -1, r.op) != 0:
                        return REPLAY_OUT_OF_MEMORY
                elif self._log_fault(first + i, cpu, 14, res, c.last_fault_va, c.last_pkey, r.op) != 0:
                    return REPLAY_OUT_OF_MEMORY
                if self.max_faults and self.n_faults >= self.max_faults:
                    self.records_done = first + i + 1
                    return REPLAY_STOPPED
                continue
            if r.type >= REC_COUNT or cpu >= self.ncpus:
                return self._invalid(first + i)
            c = self.cpus[cpu]
            self.rec_counts[r.type] += 1
            if r.type == REC_WRMSR:
                if r.addr >> 32:
                    return self._invalid(first + i)
                res = pks_wrmsr(c, <uint32_t>r.addr, r.value)
                if res == PKS_OK:
                    if r.addr == PKS_MSR_IA32_PKRS:
                        # A PKRS write is the consumer API's pks_write_pkrs: the
                        # running task's thread.pkrs and the cache follow it.
                        self.pkrs_cache[cpu] = r.value
                        if self.current_task[cpu] >= 0:
                            self.task_pkrs[self.current_task[cpu]] = r.value
                    continue
                if self._insn_fault(first + i, cpu, res, r.addr) != 0:
                    return REPLAY_OUT_OF_MEMORY
            elif r.type == REC_RDMSR:
                if r.addr >> 32:
                    return self._invalid(first + i)
                res = pks_rdmsr(c, <uint32_t>r.addr, &v)
                if res == PKS_OK:
                    continue
                if self._insn_fault(first + i, cpu, res, r.addr) != 0:
                    return REPLAY_OUT_OF_MEMORY
            elif r.type == REC_WRPKRU:
                res = pks_wrpkru(c, <uint32_t>r.value, <uint32_t>r.addr, <uint32_t>(r.addr >> 32))
                if res == PKS_OK:
                    continue
                if self._insn_fault(first + i, cpu, res, 0) != 0:
                    return REPLAY_OUT_OF_MEMORY
            elif r.type == REC_MOV_CR:
                if r.op != 0 and r.op != 3 and r.op != 4:
                    return self._invalid(first + i)
                if r.op == 0:
                    res = pks_write_cr0(c, r.value)
                elif r.op == 3:
                    res = pks_write_cr3(c, r.value)
                else:
                    res = pks_write_cr4(c, r.value)
                if res == PKS_OK:
                    continue
                if self._insn_fault(first + i, cpu, res, r.value) != 0:
                    return REPLAY_OUT_OF_MEMORY
            elif r.type == REC_INVLPG:
                pks_invlpg(c, r.addr)
                continue
            elif r.type == REC_PTE_WRITE:
                if (r.addr & 7) or r.addr >= (<uint64_t>1 << 52):
                    return self._invalid(first + i)
                if pks_mem_write_u64(c.mem, r.addr, r.value) != 0:
                    self.error_record = first + i
                    return REPLAY_OUT_OF_MEMORY
                continue
            elif r.type == REC_CONTEXT_SWITCH:
                if r.value >= self.max_tasks:
                    return self._invalid(first + i)
                self.context_switches += 1
                if r.addr != 0:
                    # __switch_to runs at CPL 0 whatever the outgoing task's CPL.
                    cpl_before = c.cpl
                    c.cpl = 0
                    res = pks_write_cr3(c, r.addr)
                    c.cpl = cpl_before
                    if res != PKS_OK:
                        if self._insn_fault(first + i, cpu, res, r.addr) != 0:
                            return REPLAY_OUT_OF_MEMORY
                task = r.value
                self.current_task[cpu] = <int64_t>task
                # x86_pkrs_load (V10 13/44): load next->thread.pkrs via the cache.
                self._write_pkrs_cached(cpu, self.task_pkrs[task])
                continue
            elif r.type == REC_EXCEPTION_ENTRY:
                self.exceptions += 1
                # pks_save_pt_regs (V10 21/44): aux->pkrs = current->thread.pkrs,
                # then the handler runs with the default value.
                v = self.task_pkrs[self.current_task[cpu]] if self.current_task[cpu] >= 0 else c.pkrs
                if self._push_aux(cpu, v, c.cpl) != 0:
                    self.error_record = first + i
                    return REPLAY_OUT_OF_MEMORY
                c.cpl = 0
                self._write_pkrs_cached(cpu, self.pkrs_init)
                continue
            elif r.type == REC_EXCEPTION_EXIT:
                if self.aux_depth[cpu] == 0:
                    self.error_record = first + i
                    self.records_done = first + i
                    return REPLAY_EXIT_WITHOUT_ENTRY
                self.aux_depth[cpu] -= 1
                saved = self.aux[cpu][self.aux_depth[cpu]]
                # pks_restore_pt_regs: thread.pkrs = aux->pkrs; write it.
                if self.current_task[cpu] >= 0:
                    self.task_pkrs[self.current_task[cpu]] = saved.pkrs
                self._write_pkrs_cached(cpu, saved.pkrs)
                c.cpl = saved.cpl
                continue
            elif r.type == REC_SET_RFLAGS:
                c.rflags = (r.value & 0x3F7FD5) | 0x2
                continue
            # Only faulting records reach this point.
            if self.max_faults and self.n_faults >= self.max_faults:
                self.records_done = first + i + 1
                return REPLAY_STOPPED
        self.records_done = first + n
        return REPLAY_DONE

    def faults_array(self):
        """The fault log as a numpy structured array (a copy)."""
        out = np.empty(self.n_faults, dtype=np.dtype(FAULT_DTYPE_FIELDS))
        cdef uint8_t[::1] view = out.view(np.uint8).reshape(-1) if self.n_faults else np.empty(0, np.uint8)
        if self.n_faults:
            memcpy(&view[0], self.faults, self.n_faults * sizeof(pks_fault_t))
        return out

    @property
    def fault_count(self):
        return self.n_faults

    def record_counts(self):
        # Access records are not counted in the loop (the hot path); they are
        # what remains of the records replayed.
        counts = [self.rec_counts[i] for i in range(REC_COUNT)]
        counts[REC_ACCESS] = self.records_done - sum(counts)
        return counts

    def exception_depths(self):
        return [self.aux_depth[i] for i in range(self.ncpus)]

    def current_tasks(self):
        return [self.current_task[i] for i in range(self.ncpus)]

    def pkrs_caches(self):
        return [self.pkrs_cache[i] for i in range(self.ncpus)]


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
    c.rflags = (rflags & 0x3F7FD5) | 0x2
    c.cpl = <uint32_t>cpl
    c.pkru = <uint32_t>pkru
    c.pkrs = pkrs
    pks_flush_tlb(c, False)
    return None


def first_invalid_record(const uint8_t[::1] data not None, int ncpus, uint64_t max_tasks):
    """Index of the first record in ``data`` that the replay loop must not
    see (unknown type, CPU out of range, bad kind/size/CPL/CR/task/PTE
    address/MSR number), or -1. pks_emu.trace.format explains the reason."""
    if data.shape[0] % sizeof(pks_record_t):
        raise ValueError(f"record buffer of {data.shape[0]} bytes is not a multiple of 24")
    cdef uint64_t n = data.shape[0] // sizeof(pks_record_t)
    cdef uint64_t i
    cdef int64_t bad = -1
    cdef const pks_record_t *recs
    cdef const pks_record_t *r
    if n == 0:
        return -1
    recs = <const pks_record_t *>&data[0]
    with nogil:
        for i in range(n):
            r = &recs[i]
            if r.type >= REC_COUNT or r.cpu >= ncpus:
                bad = i
            elif r.type == REC_ACCESS:
                if r.op > 2 or r.size == 0 or r.size > 4096 or (r.cpl > 3 and r.cpl != 0xFF):
                    bad = i
            elif r.type == REC_MOV_CR:
                if r.op != 0 and r.op != 3 and r.op != 4:
                    bad = i
            elif r.type == REC_CONTEXT_SWITCH:
                if r.value >= max_tasks:
                    bad = i
            elif r.type == REC_PTE_WRITE:
                if (r.addr & 7) or r.addr >= (<uint64_t>1 << 52):
                    bad = i
            elif r.type == REC_WRMSR or r.type == REC_RDMSR:
                if r.addr >> 32:
                    bad = i
            if bad >= 0:
                break
    return bad
