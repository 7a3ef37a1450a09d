"""Exceptions: the CPU's faults and the errors of bad input.

CPU exceptions carry what the hardware would deliver (vector, error code,
faulting address). They are plain Python so that users can catch them without
importing the compiled core.
"""
from __future__ import annotations

from .constants import VEC_GP, VEC_PF, VEC_UD, pf_error_code_str


class CPUException(Exception):
    """An exception the emulated CPU raised (base of #PF, #GP, #UD)."""

    vector: int = -1
    mnemonic: str = "#?"


class PageFault(CPUException):
    """#PF (vector 14): ``error_code`` as pushed by the CPU, ``address`` as CR2 would hold."""

    vector = VEC_PF
    mnemonic = "#PF"

    def __init__(self, address: int, error_code: int, *, pkey: int | None = None,
                 cpu: int | None = None, rip: int | None = None) -> None:
        self.address = address
        self.error_code = error_code
        #: key of the leaf entry when the walk reached one (None for P=0/RSVD faults)
        self.pkey = pkey
        self.cpu = cpu
        #: guest RIP when the fault came from an instruction emulator
        self.rip = rip
        super().__init__(address, error_code)

    def __str__(self) -> str:
        s = f"#PF at {self.address:#x}, error code {self.error_code:#x} ({pf_error_code_str(self.error_code)})"
        if self.pkey is not None and self.error_code & 0x20:
            s += f", pkey {self.pkey}"
        if self.rip is not None:
            s += f", rip {self.rip:#x}"
        return s

    def __reduce__(self):  # keep pickling (multiprocessing) faithful
        return (_rebuild_pf, (self.address, self.error_code, self.pkey, self.cpu, self.rip))


def _rebuild_pf(address, error_code, pkey, cpu, rip):
    return PageFault(address, error_code, pkey=pkey, cpu=cpu, rip=rip)


class GeneralProtectionFault(CPUException):
    """#GP (vector 13), with the reason the emulator found."""

    vector = VEC_GP
    mnemonic = "#GP"

    def __init__(self, reason: str, error_code: int = 0) -> None:
        self.reason = reason
        self.error_code = error_code
        super().__init__(reason, error_code)

    def __str__(self) -> str:
        return f"#GP({self.error_code}): {self.reason}"


class InvalidOpcode(CPUException):
    """#UD (vector 6), with the reason."""

    vector = VEC_UD
    mnemonic = "#UD"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __str__(self) -> str:
        return f"#UD: {self.reason}"


class PksEmuError(Exception):
    """Base of pks_emu's own errors (bad input, bad configuration)."""


class TraceFormatError(PksEmuError, ValueError):
    """A trace or policy file is malformed; the message names the file and the record or line."""


class MachineBusyError(PksEmuError, RuntimeError):
    """The machine is inside a GIL-free batch call on another thread."""
