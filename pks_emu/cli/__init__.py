"""The ``pks-emu`` command line.

Each subcommand is one module of this package (``pks_emu.cli.replay`` for
``pks-emu replay``...) providing ``add_arguments(parser)`` and
``run(args) -> int``; the work itself is done by the domain modules they call.
This file only wires them.
Exit status: 0 when the command ran, 2 for bad input (a one-line error on
stderr naming the file and record), other codes as each command documents.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import PksEmuError

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


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="pks-emu",
        description="Emulate x86 protection keys (PKS and PKU): replay traces of memory accesses "
                    "and events, generate kernel-style workloads, run the PKS series' self-tests.",
        epilog="Exit status: 0 ran, 2 bad input, 3 faults found with replay --fail-on-fault. "
               "Run 'pks-emu COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"pks-emu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            mod = importlib.import_module(module)
        except ImportError:
            # A subcommand whose module is not built into this copy.
            p.set_defaults(_run=None, _module=module)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args._run is None:
        print(f"pks-emu {args.command}: not available in this build ({args._module} missing)",
              file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except PksEmuError as e:
        print(f"pks-emu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into head
        return 0


if __name__ == "__main__":
    sys.exit(main())
