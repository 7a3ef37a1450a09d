"""Accesses by tasks, and the page-fault path for PK faults on kernel addresses.

``do_kern_addr_fault`` per version (docs/rules.md §2.9):

* V4-V6: ``WARN_ON_ONCE(!PKS && PF_PK)``; the test module's
  ``pks_test_callback(regs)`` hook (placement in V6 unconfirmed; put where V7
  has it, first in the PF_PK block).
* V7: the test hook, then ``handle_abandoned_pks_value`` (AND the saved value
  with the allowed mask; retry if that changed it), then the per-key
  callbacks ``cb(address, write)`` found by walking ``init_mm`` (12/18).
* V8-V10: ``pks_handle_key_fault(regs, error_code, address)``: walk ``init_mm``
  for the leaf's key ("PKS faults do not provide the key that faulted",
  16/44) and call ``pks_key_callbacks[key](regs, address, write)``.

A callback that returns True must have relaxed the interrupted context (the
aux slot), or the retried access faults again. Nothing handled it: oops
(``KernelOops``), and the task is killed.
"""
from __future__ import annotations

from ..constants import PF_PK, PF_U, PF_W
from ..errors import PageFault
from .api import update_pkey_val
from .errors import FaultLoopError, KernelOops, SegmentationFault
from ._part import KernelPart

#: retries of one access before the emulator calls it a fault loop
MAX_FAULT_RETRIES = 8


class FaultMixin(KernelPart):
    """``kernel.access`` and the #PF handler (part of Kernel)."""

    def access(self, who, va: int, kind, size: int = 8) -> int:
        """An access by ``who`` (a running Task, or a CPU index whose current
        task does it) through the CPU core with that task's PKRS in force.

        Returns the physical address. A page fault takes the kernel's path:
        a handled PK fault is retried; an unhandled fault on a kernel address
        raises ``KernelOops`` (the task is killed); a fault in user mode
        raises ``SegmentationFault``.
        """
        if isinstance(who, int) or hasattr(who, "rdmsr"):
            idx = self._cpu_index(who)
            task = self.percpu[idx].current
        else:
            task = who
            self._check_current(task)
            idx = task.cpu
        cpu = self.percpu[idx].cpu
        for _ in range(MAX_FAULT_RETRIES):
            try:
                return cpu.access(va, kind, size)
            except PageFault as pf:
                self._exc_page_fault(idx, pf)
        raise FaultLoopError(f"access to {va:#x} by {task.name!r} still faults after "
                             f"{MAX_FAULT_RETRIES} handled faults: a fault callback returned "
                             f"True without relaxing the saved PKRS")

    # --- exc_page_fault -------------------------------------------------------------------
    def _exc_page_fault(self, idx: int, pf: PageFault) -> None:
        regs = self.irqentry_enter(idx, vector=14, error_code=pf.error_code, address=pf.address)
        pc = self.percpu[idx]
        if pf.error_code & PF_PK:
            pc.counters["pk_faults"] += 1
        with self.on_cpu(idx):
            if regs.user_mode:
                handled = False
            else:
                handled = self.do_kern_addr_fault(regs, pf.error_code, pf.address)
        if handled:
            self.irqentry_exit(regs)
            return
        task = regs.task
        if regs.user_mode or pf.error_code & PF_U:
            # do_user_addr_fault -> bad_area -> SIGSEGV (no PKS involvement)
            self.irqentry_exit(regs)
            err = SegmentationFault(task.name, pf.address, pf.error_code)
            self.log("info", str(err))
            raise err
        raise self._oops(regs, pf.error_code, pf.address)

    def do_kern_addr_fault(self, regs, error_code: int, address: int) -> bool:
        """The PF_PK part of ``do_kern_addr_fault``; True = handled, retry."""
        if not error_code & PF_PK:
            return False
        if not self.pks_active:
            self.warn_once("do_kern_addr_fault",
                           "WARN_ON_ONCE(!cpu_feature_enabled(X86_FEATURE_PKS) && PF_PK)")
        v = self.version
        if v.test_callback_hook and self.pks_test_callback is not None:
            if self.pks_test_callback(regs):
                return True
        if v.abandon and self.handle_abandoned_pks_value(regs):
            return True
        if v.name == "v7":
            return self._handle_pks_key_fault_v7(regs, error_code, address)
        if v.name == "v10":
            return self.pks_handle_key_fault(regs, error_code, address)
        return False

    def handle_abandoned_pks_value(self, regs) -> bool:
        """V7: AND the saved value with the allowed mask; retry if it changed."""
        old = regs.aux.pkrs
        if old is None:
            return False
        regs.aux.pkrs = old & self.pkrs_pkey_allowed_mask
        return regs.aux.pkrs != old

    def _handle_pks_key_fault_v7(self, regs, error_code: int, address: int) -> bool:
        key = self.walk_init_mm_key(address)
        # V7 12/18 checks `key > PKS_KEY_NR_CONSUMERS` (should be >=): a key
        # equal to NR_CONSUMERS reads past the table in C; here it has no callback.
        if key is None or key >= self.static_keys.PKS_KEY_NR_CONSUMERS:
            return False
        cb = self.pks_key_callbacks.get(key)
        return bool(cb(address, bool(error_code & PF_W))) if cb else False

    def pks_handle_key_fault(self, regs, error_code: int, address: int) -> bool:
        """V10 16/44: find the key in ``init_mm``, call its callback."""
        if not self.pks_active:
            return False
        key = self.walk_init_mm_key(address)
        if key is None:
            return False
        return self.pks_call_fault_callback(regs, address, bool(error_code & PF_W), key)

    def pks_call_fault_callback(self, regs, address: int, write: bool, key: int) -> bool:
        if key >= self.static_keys.PKS_KEY_MAX:
            return False
        cb = self.pks_key_callbacks.get(key)
        return bool(cb(regs, address, write)) if cb else False

    def set_fault_callback(self, key: int, callback) -> None:
        """Fill the slot of the static ``pks_key_callbacks[]`` table (V7, V10).

        V10 signature ``callback(regs, address, write) -> bool``; V7
        ``callback(address, write) -> bool``. None empties the slot.
        """
        if self.version.name == "v6":
            from .errors import PksApiError
            raise PksApiError("V4-V6 have no per-key fault callbacks; the test module uses "
                              "the pks_test_callback hook (kernel.pks_test_callback)")
        limit = self.static_keys.nr_keys
        if isinstance(key, bool) or not isinstance(key, int) or not 0 < key < limit:
            raise ValueError(f"fault callback key {key!r} out of range: expected 1.."
                             f"{limit - 1} for this configuration")
        if callback is None:
            self.pks_key_callbacks.pop(key, None)
        elif not callable(callback):
            raise TypeError(f"fault callback for key {key} must be callable")
        else:
            self.pks_key_callbacks[key] = callback

    # --- oops -------------------------------------------------------------------------------
    def _oops(self, regs, error_code: int, address: int) -> KernelOops:
        task = regs.task
        idx = regs.cpu
        pkey = self.walk_init_mm_key(address) if error_code & PF_PK else None
        # V4-V7 show_extended_regs_oops() prints "PKRS: 0x%x" only when the
        # error code has PF_PK; V10 22/44 pks_show_regs() prints it in every
        # __show_regs (lore 20220419170649.1022246-23).
        shown = bool(error_code & PF_PK) or self.version.name == "v10"
        oops = KernelOops(address=address, error_code=error_code, pkey=pkey,
                          owner=self.key_owner(pkey) if pkey is not None else None,
                          pkrs=regs.aux.pkrs if shown else None, msr=self.percpu[idx].pkrs_cache,
                          cpu=idx, task=task.name, pid=task.pid, api=self.version.name)
        self.percpu[idx].counters["oopses"] += 1
        for line in oops.report().splitlines():
            self.log("emerg", line)
        self.oopses.append(oops)
        # die() in process context: the task never returns from the fault.
        task.oops = oops
        task.frames.clear()
        self.exit_task(task)
        return oops

    def key_owner(self, pkey: int) -> str | None:
        """Who owns ``pkey``: the allocator's name (V4-V6) or the consumer (V7+)."""
        if self.version.dynamic_keys:
            return self.key_allocator.owner(pkey)
        return self.static_keys.owner(pkey)


def relax(pkrs: int, pkey: int) -> int:
    """``pkey_update_pkval(pkrs, pkey, 0)``: what a test callback does to the
    saved value so the retried access succeeds."""
    return update_pkey_val(pkrs, pkey, 0)
