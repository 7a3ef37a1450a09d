"""What the emulated kernel raises to its Python caller.

``KernelOops`` is the report the kernel prints when a fault on a kernel
address is not handled (V4-V7 ``show_extended_regs_oops``, V10 ``pks_show_regs``
add the PKRS line). The emulated kernel also kills the task, as ``die()`` does
for an oops in process context.
"""
from __future__ import annotations

from ..constants import PF_PK, PF_U, PF_W, pf_error_code_str
from ..errors import PksEmuError


class KernelOops(PksEmuError):
    """An unhandled fault on a kernel address: the oops report.

    Attributes: ``address`` (CR2), ``error_code``, ``pkey`` (read from the
    leaf entry by the page-table walk, None if there is none), ``owner`` (the
    key's owner: allocator name in V6, consumer name in V7/V10), ``pkrs`` (the
    interrupted context's saved PKRS, as the kernel prints it), ``msr`` (the
    MSR while the handler ran), ``cpu``, ``task`` (its name) and ``pid``.
    """

    def __init__(self, *, address: int, error_code: int, pkey: int | None, owner: str | None,
                 pkrs: int | None, msr: int | None, cpu: int, task: str, pid: int,
                 api: str) -> None:
        self.address = address
        self.error_code = error_code
        self.pkey = pkey
        self.owner = owner
        self.pkrs = pkrs
        self.msr = msr
        self.cpu = cpu
        self.task = task
        self.pid = pid
        self.api = api
        super().__init__(self.report())

    def report(self) -> str:
        """The oops as the kernel log would show it (one string, several lines)."""
        mode = "user" if self.error_code & PF_U else "supervisor"
        rw = "write" if self.error_code & PF_W else "read"
        why = "protection keys violation" if self.error_code & PF_PK else (
            "permissions violation" if self.error_code & 1 else "not-present page")
        lines = [
            f"BUG: unable to handle page fault for address: {self.address:016x}",
            f"#PF: {mode} {rw} access in kernel mode",
            f"#PF: error_code(0x{self.error_code:04x}) - {why} [{pf_error_code_str(self.error_code)}]",
            f"Oops: {self.error_code:04x} [#1] SMP",
            f"CPU: {self.cpu} PID: {self.pid} Comm: {self.task} (PKS {self.api})",
        ]
        if self.pkrs is not None:
            lines.append(f"PKRS: 0x{self.pkrs:08x}")
        if self.pkey is not None:
            owner = repr(self.owner) if self.owner is not None else "(no owner)"
            lines.append(f"pkey: {self.pkey} owner: {owner}")
        return "\n".join(lines)

    def __reduce__(self):
        return (_rebuild_oops, (self.__dict__.copy(),))


def _rebuild_oops(state):
    return KernelOops(**{k: state[k] for k in ("address", "error_code", "pkey", "owner", "pkrs",
                                               "msr", "cpu", "task", "pid", "api")})


class SegmentationFault(PksEmuError):
    """A user-mode access faulted: the kernel would send SIGSEGV to ``task``."""

    def __init__(self, task: str, address: int, error_code: int) -> None:
        self.task = task
        self.address = address
        self.error_code = error_code
        super().__init__(f"SIGSEGV to {task}: user access at {address:#x}, error code "
                         f"{error_code:#x} ({pf_error_code_str(error_code)})")


class PksApiError(PksEmuError, AttributeError):
    """A function or name that the selected API version does not have."""


class KernelStateError(PksEmuError, RuntimeError):
    """The emulated kernel was asked for something its state does not allow
    (a task not running, an exception exit out of order, a dead task...)."""


class FaultLoopError(KernelStateError):
    """A fault callback claimed to handle a fault but did not relax the
    interrupted context, so the retried access faulted again; on real
    hardware the CPU would loop on the faulting instruction forever."""
