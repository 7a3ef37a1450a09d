"""Tasks, the per-CPU ``pkrs_cache`` and the context switch.

* ``thread_struct`` holds the task's PKRS: ``saved_pkrs`` in V4-V7, ``pkrs`` in
  V9/V10 (docs/rules.md §2.7). Both names work on ``Thread``; ``Thread.field`` says
  which one the selected version uses.
* ``write_pkrs`` (V4-V7) / ``pks_write_pkrs`` (V8-V10) skip the WRMSR when the
  per-CPU cache already holds the value (docs/rules.md §2.6): "PKRS is only temporarily
  changed during specific code paths" (V5 comment), so most switches are free.
* ``__switch_to`` loads the next task's value: V4-V6 ``pks_sched_in``, V7
  ``pkrs_write_current`` (ANDs the allowed mask), V10 ``x86_pkrs_load``.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

from .._core import KSTATE_COUNTERS
from ..constants import MSR_IA32_PKRS
from .errors import KernelStateError
from ._part import KernelPart

if TYPE_CHECKING:
    from ..machine import Machine
    from .entry import PtRegs

RUNNING, RUNNABLE, DEAD = "running", "runnable", "dead"


class Thread:
    """The PKS part of ``struct thread_struct``: the task's slot in the
    kernel state (``pks_emu._core.KernelState``), which the compiled replay
    uses too."""

    __slots__ = ("_kstate", "_slot", "field")

    def __init__(self, kstate, slot: int, pkrs: int, field: str) -> None:
        self._kstate = kstate
        self._slot = slot
        kstate.ensure_tasks(slot + 1, 0)
        kstate.set_task_pkrs(slot, pkrs)
        #: the field's name in the selected version ('saved_pkrs' or 'pkrs')
        self.field = field

    @property
    def pkrs(self) -> int:
        return self._kstate.get_task_pkrs(self._slot)

    @pkrs.setter
    def pkrs(self, value: int) -> None:
        self._kstate.set_task_pkrs(self._slot, value)

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
    survive a reschedule inside a handler (docs/rules.md §2.8, note 4) or a migration.
    """

    _pids = itertools.count(0)

    def __init__(self, name: str, pid: int, cpu: int, pkrs: int, field: str, *,
                 user: bool = False, kstate=None) -> None:
        self.name = name
        self.pid = pid
        self.cpu = cpu
        if kstate is None:
            raise TypeError("a Task lives in a kernel: create it with Kernel.create_task or fork")
        self.thread = Thread(kstate, pid, pkrs, field)
        self.state = RUNNABLE
        #: whether the task has a user address space (a process, not a kthread)
        self.user = user
        #: CPL the task runs at when it is on a CPU (3 while in user mode)
        self.cpl = 3 if user else 0
        self.frames: FrameStack = FrameStack(kstate, pid)
        #: open debugfs files (closed when the task exits)
        self.files: list = []
        self.oops = None

    @property
    def current_frame(self) -> PtRegs | None:
        return self.frames[-1] if self.frames else None

    def __repr__(self) -> str:
        return (f"<Task {self.pid} {self.name!r} cpu={self.cpu} {self.state} "
                f"{self.thread.field}={self.thread.pkrs:#010x} depth={len(self.frames)}>")


class FrameStack(list):
    """A task's exception frames (innermost last); emptying it empties the
    task's frames in the kernel state too (an oops or exit unwinds them)."""

    def __init__(self, kstate, slot: int) -> None:
        super().__init__()
        self._kstate = kstate
        self._slot = slot

    def clear(self) -> None:
        super().clear()
        self._kstate.clear_frames(self._slot)


class PerCpuCounters(MutableMapping):
    """The counters of one CPU: the kernel state keeps the PKRS ones (so the
    replay counts alike), Python the others."""

    def __init__(self, kstate, cpu: int, names: tuple[str, ...]) -> None:
        self._kstate = kstate
        self._cpu = cpu
        self._py = {n: 0 for n in names if n not in KSTATE_COUNTERS}
        self._names = names

    def __getitem__(self, name: str) -> int:
        if name in KSTATE_COUNTERS:
            return self._kstate.counter(self._cpu, name)
        return self._py[name]

    def __setitem__(self, name: str, value: int) -> None:
        if name in KSTATE_COUNTERS:
            self._kstate.set_counter(self._cpu, name, value)
        elif name in self._py:
            self._py[name] = value
        else:
            raise KeyError(f"unknown counter {name!r}; counters are {self._names}")

    def __delitem__(self, name: str) -> None:
        raise TypeError("counters cannot be removed")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return repr(dict(self))


class PerCpu:
    """Per-CPU kernel state: ``pkrs_cache``, ``current``, the idle task, counters."""

    __slots__ = ("index", "cpu", "current", "idle", "counters", "_kstate")

    COUNTERS = ("pkrs_writes", "pkrs_writes_avoided", "context_switches", "exceptions",
                "nmis", "pk_faults", "oopses")

    def __init__(self, index: int, cpu, kstate) -> None:
        self.index = index
        self.cpu = cpu
        self._kstate = kstate
        #: the per-CPU cache starts at 0 (V10 12/44), hence the V8+ boot WRMSR
        kstate.set_cache(index, 0)
        self.current: Task | None = None
        self.idle: Task | None = None
        self.counters = PerCpuCounters(kstate, index, self.COUNTERS)

    @property
    def pkrs_cache(self) -> int:
        return self._kstate.get_cache(self.index)

    @pkrs_cache.setter
    def pkrs_cache(self, value: int) -> None:
        self._kstate.set_cache(self.index, value)

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

    # --- state held by the compiled kernel state --------------------------------
    @property
    def pks_active(self) -> bool:
        """``cpu_feature_enabled(X86_FEATURE_PKS)``: the CPU has it and the config enables it."""
        return self.kstate.pks_active

    @pks_active.setter
    def pks_active(self, value: bool) -> None:
        self.kstate.pks_active = value

    @property
    def pkrs_init_value(self) -> int:
        """The default value: V4-V6 ``INIT_PKRS_VALUE``, V7 ``pkrs_init_value``, V10 ``PKS_INIT_VALUE``."""
        return self.kstate.init_value

    @pkrs_init_value.setter
    def pkrs_init_value(self, value: int) -> None:
        self.kstate.init_value = value

    @property
    def pkrs_pkey_allowed_mask(self) -> int:
        """V7 ``pkrs_pkey_allowed_mask`` (keys given up by ``pks_abandon_protections``)."""
        return self.kstate.allowed_mask

    @pkrs_pkey_allowed_mask.setter
    def pkrs_pkey_allowed_mask(self, value: int) -> None:
        self.kstate.allowed_mask = value

    # --- the cached MSR write --------------------------------------------------
    def write_pkrs(self, new_pkrs: int, cpu: int | None = None) -> None:
        """V4-V7 ``write_pkrs`` / V8-V10 ``pks_write_pkrs`` on ``cpu`` (default this CPU).

        WRMSR only if the per-CPU cache differs (V3+). V4-V7 check the feature
        inside; V10 leaves that to callers, which all check it: same effect.
        """
        self.kstate.py_write_pkrs(self._cpu_index(cpu), new_pkrs)

    # --- task lifetime -----------------------------------------------------------
    def _new_task(self, name: str, cpu: int, pkrs: int, user: bool) -> Task:
        if not isinstance(name, str) or not name:
            raise ValueError(f"task name {name!r} must be a non-empty str")
        t = Task(name, next(self._pid_counter), cpu, pkrs, self.version.thread_field, user=user,
                 kstate=self.kstate)
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
        self.kstate.py_exec(task.pid)

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
        self.kstate.py_set_current(pc.index, next_.pid)
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
        no exception entry (docs/rules.md §2.8, note 5: syscalls run with ``thread.pkrs``)."""
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
