"""Tasks, the per-CPU ``pkrs_cache`` and the context switch.

* ``thread_struct`` holds the task's PKRS: ``saved_pkrs`` in V4-V7, ``pkrs`` in
  V9/V10 (spec §3.7). Both names work on ``Thread``; ``Thread.field`` says
  which one the selected version uses.
* ``write_pkrs`` (V4-V7) / ``pks_write_pkrs`` (V8-V10) skip the WRMSR when the
  per-CPU cache already holds the value (spec §3.6): "PKRS is only temporarily
  changed during specific code paths" (V5 comment), so most switches are free.
* ``__switch_to`` loads the next task's value: V4-V6 ``pks_sched_in``, V7
  ``pkrs_write_current`` (ANDs the allowed mask), V10 ``x86_pkrs_load``.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..constants import MSR_IA32_PKRS
from .errors import KernelStateError
from ._part import KernelPart

if TYPE_CHECKING:
    from ..machine import Machine
    from .entry import PtRegs

RUNNING, RUNNABLE, DEAD = "running", "runnable", "dead"


class Thread:
    """The PKS part of ``struct thread_struct``."""

    __slots__ = ("pkrs", "field")

    def __init__(self, pkrs: int, field: str) -> None:
        self.pkrs = pkrs
        #: the field's name in the selected version ('saved_pkrs' or 'pkrs')
        self.field = field

    @property
    def saved_pkrs(self) -> int:
        """V4-V7 name of the same value."""
        return self.pkrs

    @saved_pkrs.setter
    def saved_pkrs(self, value: int) -> None:
        self.pkrs = value

    def __repr__(self) -> str:
        return f"<thread {self.field}={self.pkrs:#010x}>"


class Task:
    """A task: its thread state, CPU, privilege level and exception frames.

    ``frames`` are the pt_regs (with their aux slot) on the task's kernel
    stack, innermost last: they belong to the task, not to the CPU, so they
    survive a reschedule inside a handler (spec §3.8 note 4) or a migration.
    """

    _pids = itertools.count(0)

    def __init__(self, name: str, pid: int, cpu: int, pkrs: int, field: str, *,
                 user: bool = False) -> None:
        self.name = name
        self.pid = pid
        self.cpu = cpu
        self.thread = Thread(pkrs, field)
        self.state = RUNNABLE
        #: whether the task has a user address space (a process, not a kthread)
        self.user = user
        #: CPL the task runs at when it is on a CPU (3 while in user mode)
        self.cpl = 3 if user else 0
        self.frames: list[PtRegs] = []
        #: open debugfs files (closed when the task exits)
        self.files: list = []
        self.oops = None

    @property
    def current_frame(self) -> PtRegs | None:
        return self.frames[-1] if self.frames else None

    def __repr__(self) -> str:
        return (f"<Task {self.pid} {self.name!r} cpu={self.cpu} {self.state} "
                f"{self.thread.field}={self.thread.pkrs:#010x} depth={len(self.frames)}>")


class PerCpu:
    """Per-CPU kernel state: ``pkrs_cache``, ``current``, the idle task, counters."""

    __slots__ = ("index", "cpu", "pkrs_cache", "current", "idle", "counters")

    COUNTERS = ("pkrs_writes", "pkrs_writes_avoided", "context_switches", "exceptions",
                "nmis", "pk_faults", "oopses")

    def __init__(self, index: int, cpu) -> None:
        self.index = index
        self.cpu = cpu
        #: the per-CPU cache starts at 0 (spec §3.6), hence the V8+ boot WRMSR
        self.pkrs_cache = 0
        self.current: Task | None = None
        self.idle: Task | None = None
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    @property
    def msr(self) -> int:
        """IA32_PKRS: RDMSR when the CPU is in the kernel (as kernel code reads
        it); read without the CPL check when it is in user mode (an observer)."""
        if self.cpu.cpl == 0:
            return self.cpu.rdmsr(MSR_IA32_PKRS)
        return self.cpu.pkrs

    def __repr__(self) -> str:
        cur = self.current.name if self.current else None
        return f"<cpu {self.index} current={cur!r} pkrs_cache={self.pkrs_cache:#010x}>"


class SchedMixin(KernelPart):
    """Task creation, fork/exec/exit, ``switch_to`` and migration (part of Kernel)."""

    machine: Machine
    percpu: list[PerCpu]
    tasks: dict[int, Task]

    # --- the cached MSR write --------------------------------------------------
    def write_pkrs(self, new_pkrs: int, cpu: int | None = None) -> None:
        """V4-V7 ``write_pkrs`` / V8-V10 ``pks_write_pkrs`` on ``cpu`` (default this CPU).

        WRMSR only if the per-CPU cache differs (V3+). V4-V7 check the feature
        inside; V10 leaves that to callers, which all check it: same effect.
        """
        pc = self.percpu[self._cpu_index(cpu)]
        if not self.pks_active:
            return
        if pc.pkrs_cache != new_pkrs:
            pc.pkrs_cache = new_pkrs
            pc.cpu.wrmsr(MSR_IA32_PKRS, new_pkrs)
            pc.counters["pkrs_writes"] += 1
        else:
            pc.counters["pkrs_writes_avoided"] += 1

    # --- task lifetime -----------------------------------------------------------
    def _new_task(self, name: str, cpu: int, pkrs: int, user: bool) -> Task:
        if not isinstance(name, str) or not name:
            raise ValueError(f"task name {name!r} must be a non-empty str")
        t = Task(name, next(self._pid_counter), cpu, pkrs, self.version.thread_field, user=user)
        self.tasks[t.pid] = t
        return t

    def create_task(self, name: str, cpu: int = 0, *, user: bool = False) -> Task:
        """A new task on ``cpu`` (not yet running: ``schedule`` it).

        Kernel threads are forked from kthreadd, which runs with the new-task
        value: V4-V6 ``INIT_PKRS_VALUE``, V7 ``pks_init_task()``
        (``pkrs_init_value & allowed_mask``), V10 ``PKS_INIT_VALUE``.
        ``user=True`` makes a process that runs at CPL 3.
        """
        return self._new_task(name, self._cpu_index(cpu), self.pks_new_task_value(), user)

    def fork(self, parent: Task, name: str | None = None, cpu: int | None = None) -> Task:
        """Copy ``parent``: the thread's PKRS value is copied with the task
        struct (all versions); open files are shared."""
        self._check_alive(parent)
        child = self._new_task(name or parent.name, parent.cpu if cpu is None else
                               self._cpu_index(cpu), parent.thread.pkrs, parent.user)
        child.cpl = 3 if parent.user else 0
        for f in parent.files:
            f.get()
            child.files.append(f)
        return child

    def exec(self, task: Task) -> None:
        """execve(): V4-V7 ``flush_thread`` -> ``pks_init_task`` resets the thread
        value (V7 with the allowed mask); V10 has no such hook, the value stays.

        Only the thread field changes: the MSR follows at the next switch-in, as
        in the kernel (the task is on its way back to user mode anyway).
        """
        self._check_alive(task)
        if self.version.exec_resets:
            task.thread.pkrs = self.pks_new_task_value()

    def exit_task(self, task: Task) -> None:
        """do_exit(): close the task's files and switch its CPU to the idle task."""
        if task.state == DEAD:
            return
        if task.state == RUNNING:
            self.percpu[task.cpu].cpu.cpl = 0  # do_exit runs in the kernel
        with self.on_cpu(task.cpu):
            for f in list(task.files):
                f.put(task)
        task.files.clear()
        task.frames.clear()
        if task.state == RUNNING:
            pc = self.percpu[task.cpu]
            idle = pc.idle
            assert idle is not None
            self._switch_to(pc, task, idle)
        task.state = DEAD

    # --- scheduling ------------------------------------------------------------------
    def schedule(self, cpu: int, task: Task) -> Task | None:
        """Make ``task`` current on ``cpu`` (``__switch_to(prev, next)``); return prev.

        The task must be runnable and placed on ``cpu`` (use ``migrate`` to move it).
        """
        idx = self._cpu_index(cpu)
        self._check_alive(task)
        pc = self.percpu[idx]
        if task.state == RUNNING:
            if task.cpu == idx:
                return task
            raise KernelStateError(f"task {task.name!r} (pid {task.pid}) is running on CPU "
                                   f"{task.cpu}; migrate() it to CPU {idx} first")
        if task.cpu != idx:
            raise KernelStateError(f"task {task.name!r} (pid {task.pid}) belongs to CPU "
                                   f"{task.cpu}, not {idx}; migrate() it first")
        prev = pc.current
        self._switch_to(pc, prev, task)
        return prev

    switch_to = schedule

    def _switch_to(self, pc: PerCpu, prev: Task | None, next_: Task) -> None:
        cpu = pc.cpu
        if prev is not None:
            prev.cpl = cpu.cpl
            if prev.state == RUNNING:
                prev.state = RUNNABLE
        # __switch_to runs in kernel mode.
        cpu.cpl = 0
        pc.current = next_
        next_.state = RUNNING
        next_.cpu = pc.index
        pc.counters["context_switches"] += 1
        self.pks_sched_in(next_, pc.index)
        cpu.cpl = next_.cpl

    def migrate(self, task: Task, cpu: int) -> None:
        """Move ``task`` to ``cpu`` and run it there. Its old CPU switches to
        its idle task; the new CPU writes the MSR only if its cache differs."""
        self._check_alive(task)
        dst = self._cpu_index(cpu)
        if task.state == RUNNING:
            if task.cpu == dst:
                return
            src = self.percpu[task.cpu]
            assert src.idle is not None
            self._switch_to(src, task, src.idle)
        task.cpu = dst
        self._switch_to(self.percpu[dst], self.percpu[dst].current, task)

    # --- the current task -------------------------------------------------------------
    def current(self, cpu: int | None = None) -> Task:
        """``current`` on ``cpu`` (default: this CPU)."""
        pc = self.percpu[self._cpu_index(cpu)]
        assert pc.current is not None
        return pc.current

    @property
    def this_cpu(self) -> int:
        """The CPU the emulated kernel code runs on (``smp_processor_id()``) when
        a function is called without ``cpu=``; change it with ``on_cpu``."""
        return self._this_cpu

    @contextmanager
    def on_cpu(self, where):
        """Run the enclosed kernel calls on a CPU (an index, or a task's CPU)."""
        if isinstance(where, Task):
            self._check_current(where)
            idx = where.cpu
        else:
            idx = self._cpu_index(where)
        old = self._this_cpu
        self._this_cpu = idx
        try:
            yield self.percpu[idx]
        finally:
            self._this_cpu = old

    @contextmanager
    def syscall(self, task: Task):
        """A system call by ``task``: CPL 0 on its CPU for the duration, with
        no exception entry (spec §3.8 note 5: syscalls run with ``thread.pkrs``)."""
        self._check_current(task)
        cpu = self.percpu[task.cpu].cpu
        old_cpl = cpu.cpl
        cpu.cpl = 0
        try:
            with self.on_cpu(task.cpu):
                yield task
        finally:
            if task.state == RUNNING:
                cpu.cpl = old_cpl

    # --- checks ----------------------------------------------------------------------
    def _cpu_index(self, cpu) -> int:
        if cpu is None:
            return self._this_cpu
        if isinstance(cpu, Task):
            return cpu.cpu
        idx = getattr(cpu, "index", cpu)
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(self.percpu):
            raise ValueError(f"cpu {cpu!r} out of range: this machine has CPUs "
                             f"0..{len(self.percpu) - 1}")
        return idx

    def _check_alive(self, task: Task) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"expected a Task, got {type(task).__name__}")
        if task.state == DEAD:
            raise KernelStateError(f"task {task.name!r} (pid {task.pid}) is dead"
                                   + (" (killed by an oops)" if task.oops else ""))

    def _check_current(self, task: Task) -> None:
        self._check_alive(task)
        if task.state != RUNNING or self.percpu[task.cpu].current is not task:
            raise KernelStateError(f"task {task.name!r} (pid {task.pid}) is not running: "
                                   f"schedule({task.cpu}, task) first")
