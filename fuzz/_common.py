"""Shared by the fuzz targets: a scratch directory, the documented exception
types, and the atheris entry point.

A target's ``check(data)`` must either return or raise one of ``ALLOWED``
(the errors pks_emu documents for bad input); anything else — another
exception type, a crash of the compiled core (SIGSEGV, abort), a hang past
``-timeout`` — is a finding and makes atheris exit non-zero.
"""
from __future__ import annotations

import os
import sys
import tempfile

#: documented errors for malformed input: TraceFormatError (a PksEmuError and
#: a ValueError) names the file and record/line; PksEmuError for bad
#: configuration. Plain ValueError/TypeError/OSError are *not* allowed: a
#: reader that lets one escape has a hole.
from pks_emu.errors import PksEmuError, TraceFormatError  # noqa: E402

ALLOWED: tuple[type[BaseException], ...] = (TraceFormatError, PksEmuError)

_SCRATCH = tempfile.mkdtemp(prefix="pks-emu-fuzz-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


def scratch(name: str) -> str:
    return os.path.join(_SCRATCH, name)


def write(name: str, data: bytes) -> str:
    path = scratch(name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def main(check, argv=None) -> None:
    """Run ``check`` under atheris (libFuzzer flags in ``argv``), or, with
    ``--replay FILE...``, once per file (for reproducing a finding)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "--replay":
        for path in argv[2:]:
            with open(path, "rb") as f:
                check(f.read())
            print(f"{path}: ok")
        return
    import atheris

    def one(data: bytes) -> None:
        try:
            check(data)
        except ALLOWED:
            pass

    atheris.Setup(argv, one)
    atheris.Fuzz()
