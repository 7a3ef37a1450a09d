"""The ``pks-emu`` command line.

Each subcommand is one module of this package (``pks_emu.cli.replay`` for
``pks-emu replay``...) providing ``add_arguments(parser)`` and
``run(args) -> int``; the work itself is done by the domain modules they call.
This file only wires them.
Exit status (docs/cli.md): 0 when the command ran, 2 for bad input or an
I/O error (one line on stderr naming the file, record or value and what was
expected; never a traceback), 3 for ``replay --fail-on-fault`` with faults,
130 when interrupted (Ctrl-C; 143 for SIGTERM; outputs are written
atomically, so an interrupt leaves no file that looks complete). A closed stdout pipe (``| head``) ends
the command quietly.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys

from ..errors import PksEmuError

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143      # 128 + SIGTERM


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that atomic outputs clean up."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer (1 or more)")
    return v


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer 0 or more") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer 0 or more")
    return v


def one_line(text: str) -> str:
    """Error text on one line (TOML and numpy messages may span several)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def os_error_text(e: OSError) -> str:
    """``PATH: reason`` for an OSError, with the path(s) it carries."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is not None and e.filename2 is not None:
        return f"{os.fsdecode(e.filename)} -> {os.fsdecode(e.filename2)}: {reason}"
    if e.filename is not None:
        return f"{os.fsdecode(e.filename)}: {reason}"
    return reason


class _StdoutGuard:
    """sys.stdout during a command: a write error other than a closed pipe
    (a full disk: ``> /dev/full``) becomes an error naming standard output."""

    def __init__(self, stream) -> None:
        self._s = stream

    def _fail(self, e: OSError):
        if e.errno == errno.EPIPE:
            return e
        return PksEmuError(f"<stdout>: cannot write: {e.strerror or e}")

    def write(self, text):
        try:
            return self._s.write(text)
        except OSError as e:
            raise self._fail(e) from None

    def flush(self):
        try:
            return self._s.flush()
        except OSError as e:
            raise self._fail(e) from None

    def __getattr__(self, name):
        return getattr(self._s, name)


def _quiet_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass

#: name -> (module, one-line help)
COMMANDS = {
    "replay": ("pks_emu.cli.replay", "replay a trace and report every fault"),
    "info": ("pks_emu.cli.info", "describe a trace file: header, record counts, address ranges"),
    "gen": ("pks_emu.cli.gen", "generate a reproducible kernel-style workload trace"),
    "convert": ("pks_emu.cli.convert", "convert a Valgrind lackey trace to the native format"),
    "capture": ("pks_emu.capture.cli", "boot a Linux kernel under QEMU and record its memory accesses"),
    "report": ("pks_emu.report", "turn a replay's JSON result into a self-contained HTML report"),
    "bench": ("pks_emu.cli.bench", "measure the core's throughput on this machine"),
    "selftest": ("pks_emu.cli.selftest", "run the PKS series' test suite on the emulated kernel"),
    "sweep": ("pks_emu.cli.sweep", "replay traces x policies x compat x api on Dask, one table row each"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (docs/cli.md: exit 2, one line on stderr)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only that subcommand's
    module is imported (the others get their name and help), since the
    modules' imports (subprocess, hashlib, html...) are most of the start-up
    time of a short command."""
    from .. import __version__
    parser = _Parser(
        prog="pks-emu",
        description="Emulate x86 protection keys (PKS and PKU): replay traces of memory accesses "
                    "and events, generate kernel-style workloads, run the PKS series' self-tests.",
        epilog="Exit status: 0 ran, 2 bad input or I/O error (one line on stderr), 3 faults found "
               "with replay --fail-on-fault, 130 interrupted. "
               "Run 'pks-emu COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"pks-emu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if command is not None and name != command:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError:
            # A subcommand whose module is not built into this copy.
            p.set_defaults(_run=None, _module=module)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it starts with one (no top-level option before it)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args._run is None:
        print(f"pks-emu {args.command}: not available in this build ({args._module} missing)",
              file=sys.stderr)
        return 2
    prog = f"pks-emu {args.command}"
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread (embedded use)
        pass
    real_stdout = sys.stdout
    sys.stdout = _StdoutGuard(real_stdout)  # type: ignore[assignment]
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()
        return rc
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output was left that looks complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print(f"{prog}: terminated (SIGTERM); no output was left that looks complete", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:  # e.g. piped into head: quiet, as cat and grep are
        _quiet_stdout()
        return EXIT_OK
    except PksEmuError as e:
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        if e.errno == errno.EPIPE:
            _quiet_stdout()
            return EXIT_OK
        print(f"{prog}: error: {one_line(os_error_text(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OverflowError, MemoryError) as e:
        # Domain checks raise ValueError for values out of range (a CPU
        # count, a page count...); their text names the value.
        what = "out of memory" if isinstance(e, MemoryError) else ""
        print(f"{prog}: error: {one_line(str(e) or what or type(e).__name__)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        sys.stdout = real_stdout
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
