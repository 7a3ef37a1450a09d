"""Exception entry and exit: save the interrupted PKRS, run with the default,
restore (docs/rules.md §2.8).

"The current thread value must be saved, the CPU MSR value set to the default
value during the exception, and the saved thread value restored upon
completion" (V10 21/44). The value lives in a slot beside ``pt_regs`` —
``struct extended_pt_regs.thread_pkrs`` in V4-V7, ``struct
pt_regs_auxiliary.pkrs`` in V8-V10 — and "each nested exception gets another
copy of this auxiliary space allowing for any number of levels" (V10 17/44).

Which entries save:

* V4-V7: ``irqentry_enter`` from kernel mode only (entry from user mode returns
  early); ``irqentry_exit`` restores only when returning to kernel mode; NMI
  entry/exit always.
* V8-V10: every ``irqentry_enter`` path, user mode included, and NMI.

What the handler runs with (V10 code, docs/rules.md §2.8, notes 1-2): the MSR holds the
default, but ``current->thread.pkrs`` still holds the *interrupted* value, so
a ``pks_set_*`` inside the handler recomputes from it; on exit both are
overwritten from the aux slot (examples/kernel_v10_handler_recompute.py).
"""
from __future__ import annotations

from contextlib import contextmanager

from .errors import KernelStateError
from ._part import KernelPart

#: vectors with a name (others print as numbers)
VECTOR_NAMES = {2: "NMI", 14: "#PF", 32: "IRQ", 0xEC: "LOCAL_TIMER", 0xFB: "CALL_FUNCTION"}


class PtRegsAuxiliary:
    """The hidden slot beside ``pt_regs`` holding the interrupted PKRS: a
    view of frame ``index`` of task ``slot`` in the kernel state.

    ``pkrs`` is None when the entry path did not save (V4-V7 entry from user
    mode, or no PKS in V10). ``thread_pkrs`` is the V4-V7 name.
    """

    __slots__ = ("_kstate", "_slot", "_index")

    def __init__(self, kstate, slot: int, index: int) -> None:
        self._kstate = kstate
        self._slot = slot
        self._index = index

    @property
    def pkrs(self) -> int | None:
        return self._kstate.frame(self._slot, self._index)[0]

    @pkrs.setter
    def pkrs(self, value: int | None) -> None:
        self._kstate.set_frame_pkrs(self._slot, self._index, value)

    @property
    def thread_pkrs(self) -> int | None:
        return self.pkrs

    @thread_pkrs.setter
    def thread_pkrs(self, value: int) -> None:
        self.pkrs = value

    @property
    def saved(self) -> bool:
        return self.pkrs is not None

    def __repr__(self) -> str:
        return "<aux unsaved>" if self.pkrs is None else f"<aux pkrs={self.pkrs:#010x}>"


class PtRegs:
    """An exception frame: what the CPU pushed, plus the aux slot.

    ``cs_cpl`` is the privilege level of the interrupted context;
    ``user_mode(regs)`` is ``cs_cpl == 3``. ``depth`` is 1 for the outermost
    frame of the task.
    """

    __slots__ = ("vector", "error_code", "address", "cs_cpl", "nmi", "cpu", "task", "depth",
                 "aux", "msr_on_entry")

    def __init__(self, vector: int, error_code: int, address: int, cs_cpl: int, nmi: bool,
                 cpu: int, task, depth: int) -> None:
        self.vector = vector
        self.error_code = error_code
        self.address = address
        self.cs_cpl = cs_cpl
        self.nmi = nmi
        self.cpu = cpu
        self.task = task
        self.depth = depth
        self.aux: PtRegsAuxiliary
        #: the MSR as the interrupted context left it (for reports)
        self.msr_on_entry: int | None = None

    @property
    def user_mode(self) -> bool:
        return self.cs_cpl == 3

    @property
    def ept(self) -> PtRegsAuxiliary:
        """V4-V7 ``extended_pt_regs(regs)``: the same slot."""
        return self.aux

    def __repr__(self) -> str:
        name = VECTOR_NAMES.get(self.vector, str(self.vector))
        return (f"<pt_regs {name} depth={self.depth} cpu={self.cpu} "
                f"{'user' if self.user_mode else 'kernel'} {self.aux!r}>")


class EntryMixin(KernelPart):
    """``irqentry_enter/exit``, ``irqentry_nmi_enter/exit`` (part of Kernel)."""

    def irqentry_enter(self, cpu=None, *, vector: int = 32, error_code: int = 0,
                       address: int = 0) -> PtRegs:
        """An exception or interrupt arrives on ``cpu``; returns its ``PtRegs``.

        The CPU switches to CPL 0; the aux slot is filled per version.
        """
        return self._enter(cpu, vector, error_code, address, nmi=False)

    def irqentry_nmi_enter(self, cpu=None) -> PtRegs:
        """An NMI: saves in every version (V4-V7 ``irqentry_nmi_enter`` included)."""
        return self._enter(cpu, 2, 0, 0, nmi=True)

    def irqentry_exit(self, regs: PtRegs) -> None:
        """Return from ``regs`` (must be the innermost frame of a running task)."""
        self._exit(regs, nmi=False)

    def irqentry_nmi_exit(self, regs: PtRegs) -> None:
        self._exit(regs, nmi=True)

    @contextmanager
    def exception(self, cpu=None, *, vector: int = 32, nmi: bool = False):
        """``with kernel.exception(cpu) as regs:`` runs a handler body between
        entry and exit (an oops inside unwinds without the exit)."""
        regs = self.irqentry_nmi_enter(cpu) if nmi else self.irqentry_enter(cpu, vector=vector)
        try:
            with self.on_cpu(regs.cpu):
                yield regs
        finally:
            task = regs.task
            if (task.state == "running" and task.frames and task.frames[-1] is regs
                    and self.percpu[task.cpu].current is task):
                self._exit(regs, nmi=nmi)

    # --- the version-specific save and restore -------------------------------------------
    def _enter(self, cpu, vector: int, error_code: int, address: int, nmi: bool) -> PtRegs:
        idx = self._cpu_index(cpu)
        pc = self.percpu[idx]
        task = pc.current
        c = pc.cpu
        regs = PtRegs(vector, error_code, address, c.cpl, nmi, idx, task, len(task.frames) + 1)
        regs.msr_on_entry = pc.pkrs_cache
        regs.aux = PtRegsAuxiliary(self.kstate, task.pid, len(task.frames))
        c.cpl = 0
        task.frames.append(regs)
        self.kstate.py_push_frame(idx, nmi, regs.user_mode, regs.cs_cpl)
        self._pks_save_pt_regs(idx, regs)
        return regs

    def _pks_save_pt_regs(self, idx: int, regs: PtRegs) -> None:
        # Which entries save, and what the handler runs with, per version:
        # KernelState.save_frame (V4-V7 pkrs_save_set_irq / pkrs_save_irq from
        # kernel mode and for NMIs; V10 pks_save_pt_regs on every entry).
        self.kstate.py_save_frame(idx)

    def _exit(self, regs: PtRegs, nmi: bool) -> None:
        self._check_frame(regs)
        if regs.nmi != nmi:
            what = "an NMI" if regs.nmi else "an exception"
            raise KernelStateError(f"{regs!r} was entered as {what}; leave it with the "
                                   "matching exit")
        task = regs.task
        idx = task.cpu
        # V10 restores at the start of irqentry_exit; V4-V7 only when the entry
        # saved (kernel mode, or NMI): both are "if the slot was filled"
        # (KernelState.exit; V7 ANDs the allowed mask, pkrs_write_current).
        self.kstate.py_exit(idx)
        task.frames.pop()
        self.percpu[idx].cpu.cpl = regs.cs_cpl

    def _check_frame(self, regs: PtRegs) -> None:
        if not isinstance(regs, PtRegs):
            raise TypeError(f"expected the PtRegs of an exception, got {type(regs).__name__}")
        task = regs.task
        self._check_current(task)
        if not task.frames or task.frames[-1] is not regs:
            where = "not on the task's stack" if regs not in task.frames else (
                f"depth {regs.depth} of {len(task.frames)}: leave the inner ones first")
            raise KernelStateError(f"{regs!r} is not the innermost exception frame ({where})")
