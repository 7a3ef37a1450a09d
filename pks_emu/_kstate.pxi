# The kernel side of the PKS series that both the Python kernel model
# (pks_emu.kernel) and the compiled replay loop use: one copy of the state
# and of the version rules (docs/rules.md §2.6, §2.7, §2.8, §2.10).
#
# State: a per-CPU cached MSR value (pkrs_cache), the running task of each
# CPU, every task's saved PKRS (thread.saved_pkrs in V4-V7, thread.pkrs in
# V8-V10) and its stack of exception frames, each with the auxiliary PKRS
# slot beside pt_regs (extended_pt_regs in V4-V7, pt_regs_auxiliary in
# V8-V10). Frames live on the task (its kernel stack), not on the CPU, so a
# reschedule inside a handler keeps them.
#
# Rules by version (the ``api`` code is 6, 7 or 10):
# - cached write (V3+ write_pkrs / V8+ pks_write_pkrs): WRMSR only when the
#   per-CPU cache differs; nothing at all without PKS.
# - switch-in: V4-V6 pks_sched_in, V7 pkrs_write_current (ANDs the abandon
#   mask into the task's value first), V10 x86_pkrs_load.
# - exception entry: V4-V7 save only when entered from kernel mode or for
#   an NMI, V8+ on every entry (and not at all without PKS); the handler
#   runs with the default (V7: ANDed with the abandon mask).
# - exception exit: when the entry saved, thread value = aux slot (V7:
#   ANDed with the mask), then the cached write.
# - fork copies the value; exec resets it in V4-V7 (pks_init_task) and
#   keeps it in V10; a consumer's update changes the current task's value
#   (V7: then ANDs the mask) and does the cached write.

cdef extern from *:
    """
    typedef struct {
        uint64_t pkrs;      /* the aux slot: the interrupted thread value */
        uint32_t cs_cpl;    /* CPL of the interrupted context */
        uint8_t saved;      /* whether the entry filled the slot */
        uint8_t nmi;
        uint8_t user;       /* user_mode(regs) */
        uint8_t pad;
    } pks_kframe_t;
    typedef struct {
        pks_kframe_t *frames;
        uint32_t depth, cap;
    } pks_kstack_t;
    """
    ctypedef struct pks_kframe_t:
        uint64_t pkrs
        uint32_t cs_cpl
        uint8_t saved, nmi, user
    ctypedef struct pks_kstack_t:
        pks_kframe_t *frames
        uint32_t depth, cap

cdef enum:
    KAPI_V6 = 6
    KAPI_V7 = 7
    KAPI_V10 = 10

# Per-CPU counters kept by the kernel state (index into KernelState.counts).
cdef enum:
    KC_PKRS_WRITES = 0
    KC_PKRS_WRITES_AVOIDED = 1
    KC_CONTEXT_SWITCHES = 2
    KC_EXCEPTIONS = 3
    KC_NMIS = 4
    KC_COUNT = 5

KSTATE_COUNTERS = ("pkrs_writes", "pkrs_writes_avoided", "context_switches", "exceptions", "nmis")
KAPI_CODES = {"v6": KAPI_V6, "v7": KAPI_V7, "v10": KAPI_V10}


cimport cython

# Final: the replay loop calls its operations directly (no vtable), and the
# C compiler may inline the small ones.
@cython.final
cdef class KernelState:
    """The PKS state of an emulated kernel, shared by the Python model and
    the replay loop (see the comment at the top of _kstate.pxi).

    ``api`` is "v6", "v7" or "v10"; ``init_value`` the default PKRS
    (INIT_PKRS_VALUE / pkrs_init_value / PKS_INIT_VALUE); ``pks_active``
    whether cpu_feature_enabled(X86_FEATURE_PKS) holds; ``force_cpl0``
    makes every kernel WRMSR run at CPL 0 whatever the CPU's current CPL
    (the replay's choice: the trace does not say when the kernel runs).
    Tasks are slots 0..n-1; ``ensure_tasks`` grows the table.
    """
    cdef pks_cpu_t **cpus
    cdef list _cpu_objs
    cdef int n_cpus
    cdef int kapi
    cdef uint64_t init_val
    cdef uint64_t mask
    cdef bint active
    cdef bint force_cpl0
    cdef uint64_t *cache
    cdef int64_t *current
    cdef uint64_t *counts
    cdef uint64_t *task_pkrs
    cdef pks_kstack_t *stacks
    cdef uint64_t n_tasks

    def __cinit__(self):
        self.cpus = NULL
        self.cache = NULL
        self.current = NULL
        self.counts = NULL
        self.task_pkrs = NULL
        self.stacks = NULL
        self.n_tasks = 0

    def __init__(self, machine, str api="v10", *, uint64_t init_value=PKS_INIT_VALUE,
                 bint pks_active=True, uint64_t ntasks=0, uint64_t task_value=PKS_INIT_VALUE,
                 bint force_cpl0=False):
        cdef int i
        cdef CPU cpu
        if api not in KAPI_CODES:
            raise ValueError(f"api {api!r}: expected one of {sorted(KAPI_CODES)}")
        cpus = list(machine.cpus)
        self.n_cpus = len(cpus)
        if self.n_cpus < 1:
            raise ValueError("the kernel state needs at least one CPU")
        self._cpu_objs = cpus
        self.kapi = KAPI_CODES[api]
        self.init_val = init_value
        self.mask = 0xFFFFFFFF
        self.active = pks_active
        self.force_cpl0 = force_cpl0
        self.cpus = <pks_cpu_t **>calloc(self.n_cpus, sizeof(pks_cpu_t *))
        self.cache = <uint64_t *>calloc(self.n_cpus, sizeof(uint64_t))
        self.current = <int64_t *>malloc(self.n_cpus * sizeof(int64_t))
        self.counts = <uint64_t *>calloc(self.n_cpus * KC_COUNT, sizeof(uint64_t))
        if self.cpus == NULL or self.cache == NULL or self.current == NULL or self.counts == NULL:
            raise MemoryError("cannot allocate the kernel state")
        for i in range(self.n_cpus):
            cpu = cpus[i]
            self.cpus[i] = &cpu.st
            self.current[i] = -1
        if ntasks:
            self.ensure_tasks(ntasks, task_value)

    def __dealloc__(self):
        cdef uint64_t t
        if self.stacks != NULL:
            for t in range(self.n_tasks):
                free(self.stacks[t].frames)
        free(self.stacks)
        free(self.task_pkrs)
        free(self.cpus)
        free(self.cache)
        free(self.current)
        free(self.counts)

    def ensure_tasks(self, uint64_t n, uint64_t value):
        """Grow the task table to at least ``n`` slots; new slots hold ``value``."""
        cdef uint64_t t, cap
        cdef uint64_t *p
        cdef pks_kstack_t *s
        if n <= self.n_tasks:
            return
        cap = n if n > 2 * self.n_tasks else 2 * self.n_tasks
        p = <uint64_t *>realloc(self.task_pkrs, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError(f"cannot allocate {cap} task slots")
        self.task_pkrs = p
        s = <pks_kstack_t *>realloc(self.stacks, cap * sizeof(pks_kstack_t))
        if s == NULL:
            raise MemoryError(f"cannot allocate {cap} task slots")
        self.stacks = s
        for t in range(self.n_tasks, cap):
            self.task_pkrs[t] = value
            self.stacks[t].frames = NULL
            self.stacks[t].depth = 0
            self.stacks[t].cap = 0
        self.n_tasks = cap

    # --- the operations (GIL-free; the replay loop calls them directly) ------
    cdef inline int32_t write_pkrs(self, int cpu, uint64_t value) noexcept nogil:
        """The cached MSR write; PKS_OK or the WRMSR's exception. The
        cache test is in line in its callers (most writes are avoided)."""
        if not self.active:
            return PKS_OK
        cdef pks_cpu_t *c
        if self.cache[cpu] == value:
            self.counts[cpu * KC_COUNT + KC_PKRS_WRITES_AVOIDED] += 1
            return PKS_OK
        c = self.cpus[cpu]
        if (self.force_cpl0 or c.cpl == 0) and _wrmsr_pkrs_plain_at0(c, value):
            # The WRMSR runs at CPL 0, cannot fault and does nothing else.
            self.cache[cpu] = value
            _pkrs_store(c, value)
            self.counts[cpu * KC_COUNT + KC_PKRS_WRITES] += 1
            return PKS_OK
        return self._write_msr(cpu, value)

    cdef int32_t _write_msr(self, int cpu, uint64_t value) noexcept nogil:
        cdef pks_cpu_t *c = self.cpus[cpu]
        cdef uint32_t cpl
        cdef int32_t r
        self.cache[cpu] = value
        if self.force_cpl0:
            cpl = c.cpl
            c.cpl = 0
            r = pks_wrmsr(c, PKS_MSR_IA32_PKRS, value)
            c.cpl = cpl
        else:
            r = pks_wrmsr(c, PKS_MSR_IA32_PKRS, value)
        if r == PKS_OK:
            self.counts[cpu * KC_COUNT + KC_PKRS_WRITES] += 1
        return r

    cdef inline uint64_t new_task_value(self) noexcept nogil:
        # V7 pks_init_task(): the default ANDed with the allowed mask.
        if self.kapi == KAPI_V7:
            return self.init_val & self.mask
        return self.init_val

    cdef inline int32_t switch_to(self, int cpu, int64_t task) noexcept nogil:
        """__switch_to: ``task`` becomes current, then sched_in."""
        self.current[cpu] = task
        self.counts[cpu * KC_COUNT + KC_CONTEXT_SWITCHES] += 1
        return self.sched_in(cpu, task)

    cdef inline int32_t sched_in(self, int cpu, int64_t task) noexcept nogil:
        """The switch-in hook: the task's value (V7: ANDed with the mask
        first) through the cached write."""
        if self.kapi == KAPI_V7:
            self.task_pkrs[task] &= self.mask
        return self.write_pkrs(cpu, self.task_pkrs[task])

    cdef int32_t consumer_write(self, int cpu, uint64_t value) noexcept nogil:
        """The consumer sets the current task's whole value (as the V8+
        pks_write_pkrs after a recompute): thread value, then cached write."""
        cdef int64_t t = self.current[cpu]
        if t >= 0:
            self.task_pkrs[t] = value
        return self.write_pkrs(cpu, value)

    cdef int32_t update_current(self, int cpu, int pkey, uint64_t prot) noexcept nogil:
        """pks_mk_* (V4-V7) / pks_update_protection (V8+) on the current task."""
        cdef int64_t t = self.current[cpu]
        cdef uint64_t shift = 2 * <uint64_t>pkey
        cdef uint64_t v = self.task_pkrs[t] if t >= 0 else self.cache[cpu]
        v = ((v & ~(<uint64_t>3 << shift)) | ((prot & 3) << shift)) & <uint64_t>0xFFFFFFFF
        if self.kapi == KAPI_V7:
            v &= self.mask
        return self.consumer_write(cpu, v)

    cdef int32_t msr_written(self, int cpu, uint64_t value) noexcept nogil:
        """A raw WRMSR IA32_PKRS by kernel code succeeded: the cache and the
        running task's value follow it (what pks_write_pkrs leaves behind)."""
        cdef int64_t t = self.current[cpu]
        self.cache[cpu] = value
        if t >= 0:
            self.task_pkrs[t] = value
        return PKS_OK

    cdef inline int push_frame(self, int cpu, bint nmi, bint user, uint32_t cs_cpl) noexcept nogil:
        """Exception entry, first half: a frame on the current task's stack,
        its slot not filled yet. 0, or -1 (no task, out of memory)."""
        cdef int64_t t = self.current[cpu]
        cdef pks_kstack_t *s
        cdef pks_kframe_t *f
        cdef pks_kframe_t *grown
        cdef uint32_t cap
        if t < 0:
            return -1
        s = &self.stacks[t]
        if s.depth == s.cap:
            cap = s.cap * 2 if s.cap else 8
            grown = <pks_kframe_t *>realloc(s.frames, cap * sizeof(pks_kframe_t))
            if grown == NULL:
                return -1
            s.frames = grown
            s.cap = cap
        f = &s.frames[s.depth]
        s.depth += 1
        f.cs_cpl = cs_cpl
        f.nmi = nmi
        f.user = user
        f.saved = 0
        f.pkrs = 0
        self.counts[cpu * KC_COUNT + (KC_NMIS if nmi else KC_EXCEPTIONS)] += 1
        return 0

    cdef inline int32_t save_frame(self, int cpu) noexcept nogil:
        """Exception entry, second half, on the innermost frame: fill the
        slot if this version saves on this entry, then run the handler with
        the default. PKS_OK or the WRMSR's exception."""
        cdef int64_t t = self.current[cpu]
        cdef pks_kframe_t *f
        if t < 0 or self.stacks[t].depth == 0:
            return PKS_OK
        f = &self.stacks[t].frames[self.stacks[t].depth - 1]
        if not (f.nmi or self.kapi == KAPI_V10 or not f.user):
            return PKS_OK   # V4-V7 irqentry_enter from user mode returns early
        if self.kapi == KAPI_V10 and not self.active:
            return PKS_OK   # pks_save_pt_regs: nothing without PKS
        f.pkrs = self.task_pkrs[t]
        f.saved = 1
        if self.kapi == KAPI_V7:
            return self.write_pkrs(cpu, self.init_val & self.mask)   # pkrs_save_irq
        return self.write_pkrs(cpu, self.init_val)

    cdef inline int entry(self, int cpu, bint nmi, bint user, uint32_t cs_cpl, int32_t *r) noexcept nogil:
        """Exception entry on ``cpu``: push_frame, then save_frame. 0, or -1."""
        r[0] = PKS_OK
        if self.push_frame(cpu, nmi, user, cs_cpl) != 0:
            return -1
        r[0] = self.save_frame(cpu)
        return 0

    cdef inline int exit(self, int cpu, uint32_t *cs_cpl, int32_t *r) noexcept nogil:
        """Exception exit of the innermost frame of the current task: the
        slot's value back into the thread and the MSR. 0, or -1 when the
        task has no frame."""
        cdef int64_t t = self.current[cpu]
        cdef pks_kstack_t *s
        cdef pks_kframe_t *f
        r[0] = PKS_OK
        if t < 0:
            return -1
        s = &self.stacks[t]
        if s.depth == 0:
            return -1
        s.depth -= 1
        f = &s.frames[s.depth]
        cs_cpl[0] = f.cs_cpl
        if f.saved:
            self.task_pkrs[t] = f.pkrs
            if self.kapi == KAPI_V7:
                self.task_pkrs[t] &= self.mask   # pkrs_write_current
            r[0] = self.write_pkrs(cpu, self.task_pkrs[t])
        return 0

    cdef void fork(self, int cpu, int64_t child, bint fresh) noexcept nogil:
        """copy_thread: the child gets the current task's value, or with
        ``fresh`` the new-task value (a kthread forked from kthreadd)."""
        cdef int64_t t = self.current[cpu]
        if fresh or t < 0:
            self.task_pkrs[child] = self.new_task_value()
        else:
            self.task_pkrs[child] = self.task_pkrs[t]
        self.stacks[child].depth = 0

    cdef void exec_task(self, int64_t task) noexcept nogil:
        # V4-V7 flush_thread -> pks_init_task; V10 has no such hook.
        if self.kapi != KAPI_V10:
            self.task_pkrs[task] = self.new_task_value()

    cdef inline uint32_t depth_of(self, int cpu) noexcept nogil:
        cdef int64_t t = self.current[cpu]
        return self.stacks[t].depth if t >= 0 else 0

    # --- the Python view ---------------------------------------------------------
    cdef int _cpu(self, int cpu) except -1:
        if not 0 <= cpu < self.n_cpus:
            raise ValueError(f"cpu {cpu} out of range: the kernel state has CPUs 0..{self.n_cpus - 1}")
        return cpu

    cdef int64_t _task(self, int64_t task) except -2:
        if not 0 <= task < <int64_t>self.n_tasks:
            raise ValueError(f"task slot {task} out of range (0..{self.n_tasks - 1})")
        return task

    cdef int _raise_msr(self, int cpu, int32_t r) except -1:
        if r != PKS_OK:
            _raise(r, f"WRMSR IA32_PKRS on CPU {cpu}")
        return 0

    @property
    def api(self):
        return {KAPI_V6: "v6", KAPI_V7: "v7", KAPI_V10: "v10"}[self.kapi]

    @property
    def ncpus(self):
        return self.n_cpus

    @property
    def ntasks(self):
        return self.n_tasks

    @property
    def init_value(self):
        return self.init_val

    @init_value.setter
    def init_value(self, uint64_t v):
        self.init_val = v

    @property
    def allowed_mask(self):
        """V7 pkrs_pkey_allowed_mask."""
        return self.mask

    @allowed_mask.setter
    def allowed_mask(self, uint64_t v):
        self.mask = v & 0xFFFFFFFF

    @property
    def pks_active(self):
        return self.active

    @pks_active.setter
    def pks_active(self, bint v):
        self.active = v

    def get_cache(self, int cpu):
        return self.cache[self._cpu(cpu)]

    def set_cache(self, int cpu, uint64_t value):
        self.cache[self._cpu(cpu)] = value

    def get_current(self, int cpu):
        return self.current[self._cpu(cpu)]

    def get_task_pkrs(self, int64_t task):
        return self.task_pkrs[self._task(task)]

    def set_task_pkrs(self, int64_t task, uint64_t value):
        self.task_pkrs[self._task(task)] = value

    def counter(self, int cpu, str name):
        return self.counts[self._cpu(cpu) * KC_COUNT + KSTATE_COUNTERS.index(name)]

    def set_counter(self, int cpu, str name, uint64_t value):
        self.counts[self._cpu(cpu) * KC_COUNT + KSTATE_COUNTERS.index(name)] = value

    def counters(self, int cpu):
        c = self._cpu(cpu)
        return {name: self.counts[c * KC_COUNT + i] for i, name in enumerate(KSTATE_COUNTERS)}

    def total(self, str name):
        cdef int i, k = KSTATE_COUNTERS.index(name)
        return sum(self.counts[i * KC_COUNT + k] for i in range(self.n_cpus))

    def py_write_pkrs(self, int cpu, uint64_t value):
        """The cached write; raises the WRMSR's exception."""
        self._raise_msr(cpu, self.write_pkrs(self._cpu(cpu), value))

    def py_switch_to(self, int cpu, int64_t task):
        self._raise_msr(cpu, self.switch_to(self._cpu(cpu), self._task(task)))

    def py_set_current(self, int cpu, int64_t task):
        """The first half of switch_to: ``task`` is current (counted as a switch)."""
        self.current[self._cpu(cpu)] = self._task(task)
        self.counts[cpu * KC_COUNT + KC_CONTEXT_SWITCHES] += 1

    def py_sched_in(self, int cpu, int64_t task):
        self._raise_msr(cpu, self.sched_in(self._cpu(cpu), self._task(task)))

    def py_update_current(self, int cpu, int pkey, uint64_t prot):
        if not 0 <= pkey < 16:
            raise ValueError(f"pkey {pkey} out of range: expected 0..15")
        self._raise_msr(cpu, self.update_current(self._cpu(cpu), pkey, prot))

    def py_consumer_write(self, int cpu, uint64_t value):
        self._raise_msr(cpu, self.consumer_write(self._cpu(cpu), value))

    def py_entry(self, int cpu, bint nmi, bint user, uint32_t cs_cpl):
        """Exception entry (push_frame + save_frame); returns the new depth."""
        self.py_push_frame(cpu, nmi, user, cs_cpl)
        self.py_save_frame(cpu)
        return self.depth_of(cpu)

    def py_push_frame(self, int cpu, bint nmi, bint user, uint32_t cs_cpl):
        self._cpu(cpu)
        if self.current[cpu] < 0:
            raise ValueError(f"CPU {cpu} runs no task")
        if self.push_frame(cpu, nmi, user, cs_cpl) != 0:
            raise MemoryError("cannot grow the exception stack")
        return self.depth_of(cpu)

    def py_save_frame(self, int cpu):
        self._raise_msr(cpu, self.save_frame(self._cpu(cpu)))

    def py_exit(self, int cpu):
        """Exception exit; returns the interrupted CPL."""
        cdef int32_t r = PKS_OK
        cdef uint32_t cs_cpl = 0
        self._cpu(cpu)
        if self.exit(cpu, &cs_cpl, &r) != 0:
            raise ValueError(f"exception exit on CPU {cpu} without a matching entry")
        self._raise_msr(cpu, r)
        return cs_cpl

    def py_fork(self, int cpu, int64_t child, bint fresh=False):
        self.fork(self._cpu(cpu), self._task(child), fresh)

    def py_new_task_value(self):
        """The value a new task starts with (V7: ANDed with the allowed mask)."""
        return self.new_task_value()

    def py_exec(self, int64_t task):
        self.exec_task(self._task(task))

    def py_msr_written(self, int cpu, uint64_t value):
        self.msr_written(self._cpu(cpu), value)

    def task_depth(self, int64_t task):
        return self.stacks[self._task(task)].depth

    def clear_frames(self, int64_t task):
        self.stacks[self._task(task)].depth = 0

    cdef pks_kframe_t *_frame(self, int64_t task, uint32_t index) except NULL:
        self._task(task)
        if index >= self.stacks[task].depth:
            raise ValueError(f"task slot {task} has {self.stacks[task].depth} frames, not {index + 1}")
        return &self.stacks[task].frames[index]

    def frame(self, int64_t task, uint32_t index):
        """(pkrs or None, cs_cpl, nmi, user) of frame ``index`` (0 = outermost)."""
        cdef pks_kframe_t *f = self._frame(task, index)
        return (f.pkrs if f.saved else None, f.cs_cpl, bool(f.nmi), bool(f.user))

    def set_frame_pkrs(self, int64_t task, uint32_t index, value):
        """Write the aux slot of a frame (pks_update_exception, the V7 fault
        path's handle_abandoned_pks_value); the slot counts as saved, or as
        not filled with ``None``."""
        cdef pks_kframe_t *f = self._frame(task, index)
        if value is None:
            f.saved = 0
            f.pkrs = 0
        else:
            f.pkrs = value
            f.saved = 1
