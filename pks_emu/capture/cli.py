"""``pks-emu capture``: record a booting Linux kernel's memory accesses under QEMU.

Wired into ``pks_emu.cli`` by ``add_arguments(parser)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import PksEmuError

DESCRIPTION = """\
Boot a Linux kernel under QEMU TCG with pks_emu's plugin and record every guest
data access (virtual and physical address, size, load/store, instruction pointer,
vCPU) as a trace v2 stream. Default guest: Debian's cloud kernel and a busybox
initramfs that runs a short workload, saves /proc/kallsyms and powers off.
Needs: apt-get install -y qemu-system-x86 linux-image-cloud-amd64 busybox-static
(and a C compiler). Give more QEMU arguments after '--'."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="TRACE",
                     help="write the trace v2 here ('-': standard output, e.g. into "
                          "'pks-emu replay -')")
    out.add_argument("--count-only", action="store_true",
                     help="load the counting plugin instead: count loads/stores by kernel/user "
                          "instruction address, write no trace (the speed baseline)")
    p.add_argument("--kernel", metavar="VMLINUZ",
                   help="kernel image (default: the newest /boot/vmlinuz-*-cloud-amd64)")
    p.add_argument("--initrd", metavar="FILE",
                   help="your own initramfs instead of the built-in busybox guest")
    p.add_argument("--append", metavar="CMDLINE",
                   help="added to the kernel command line 'console=ttyS0 nokaslr panic=-1 quiet' "
                        "(e.g. 'memmap=64M!1G')")
    p.add_argument("--workload", metavar="SCRIPT",
                   help="shell script the guest runs (busybox sh; default: a short file and "
                        "process workload)")
    p.add_argument("--module", action="append", default=[], metavar="NAME|FILE.ko",
                   help="kernel module to load with insmod before the workload (repeat, in load "
                        "order; a name is looked up under /lib/modules/RELEASE of the kernel)")
    p.add_argument("-m", "--memory", default="512M", help="guest memory, QEMU -m syntax "
                   "(default 512M)")
    p.add_argument("--smp", type=int, default=1, help="guest vCPUs (default 1)")
    p.add_argument("--fetches", action="store_true", help="record instruction fetches too")
    p.add_argument("--coalesce", action="store_true",
                   help="merge runs: an access continuing the previous one of the same kind by the "
                        "same instruction in the same page extends its record (rep movs/stos)")
    p.add_argument("--no-pa", action="store_true",
                   help="do not look up physical addresses (records carry none)")
    p.add_argument("--start", choices=("boot", "kernel", "user"), default="boot",
                   help="start recording at the first instruction (boot, default), at the "
                        "first kernel-half instruction (kernel) or when user space starts (user)")
    p.add_argument("--limit", type=int, metavar="N", help="stop recording after N records")
    p.add_argument("--kallsyms", metavar="FILE",
                   help="save the guest's /proc/kallsyms here (default TRACE.kallsyms)")
    p.add_argument("--no-kallsyms", action="store_true",
                   help="the built-in guest does not dump /proc/kallsyms (the dump costs about "
                        "as many kernel accesses as the boot)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop QEMU after this long and fail")
    p.add_argument("--json", action="store_true", help="print what the capture did as JSON")
    p.add_argument("--policy", metavar="FILE",
                   help="replay the capture as it runs (through a pipe, no trace file) against "
                        "this kernel policy and print the replay's result (with --json: the "
                        "'pks-emu replay --json' document plus a 'capture' section); names in the "
                        "policy need --kallsyms FILE from an earlier capture of the same kernel "
                        "(nokaslr: the same addresses)")
    p.add_argument("--report", metavar="HTML", help="with --policy: also write the HTML report")
    p.add_argument("--speed", action="store_true",
                   help="measure instead of capturing: boot the guest with the counting plugin, "
                        "then captured and piped into the replay (against --policy, if given; "
                        "--coalesce is implied), --repeat times in turn, and print wall and CPU "
                        "times, accesses per second of each stage, peak memory and the ratio")
    p.add_argument("--nice", type=_nice_pair, default=None, metavar="W[,R]",
                   help="with --policy or --speed: add W to the nice value of the plugin's "
                        "writer thread and R to the replay's (0..19; one number: both; default "
                        "5,19), so that QEMU's vCPU thread, the boot's critical path, keeps "
                        "its core and the writer keeps up with it; 0 leaves all equal")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="with --speed: rounds of the two boots (default 1; the ratio is of the "
                        "median wall times)")
    p.add_argument("qemu_args", nargs="*", metavar="-- QEMU_ARG",
                   help="more qemu-system-x86_64 arguments, verbatim, after '--'")


def _nice_pair(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        vals = [int(x) for x in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or not all(0 <= v <= 19 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or W,R with each 0..19")
    return (vals[0], vals[-1])


def _nice(args: argparse.Namespace) -> tuple[int, int]:
    from .speed import DEFAULT_NICE
    return DEFAULT_NICE if args.nice is None else args.nice


def _modules(names: list[str], kernel: str | None) -> list[Path]:
    from .guest import find_modules
    from .qemu import find_default_kernel, kernel_release
    paths: list[str] = []
    lookup: list[str] = []
    for n in names:
        (paths if n.endswith(".ko") and os.path.exists(n) else lookup).append(n)
    if not lookup:
        return [Path(n) for n in names]
    release = kernel_release(kernel or find_default_kernel())
    if release is None:
        raise PksEmuError(f"cannot tell the release of kernel {kernel}: give modules as "
                          "FILE.ko paths")
    found = dict(zip(lookup, find_modules(lookup, release)))
    return [Path(n) if n not in found else found[n] for n in names]


def _capture_and_replay(args: argparse.Namespace, qemu_args: list[str]) -> int:
    """``--policy``: the capture streamed straight into the replay, in one run."""
    import os

    from . import capture_pipe
    from ..symbols import Symbolizer
    from .session import TRACE_LEVELS
    from .speed import lower_thread_priority
    from ..trace.kernel import check_kernel_policy
    from ..trace.replay import replay
    if args.output or args.count_only:
        raise PksEmuError("--policy replays the capture as it runs: leave out -o and --count-only "
                          "(or capture to a file and run 'pks-emu replay FILE --policy P')")
    known = args.kallsyms if args.kallsyms and os.path.isfile(args.kallsyms) else None
    # A bad policy fails here, not after QEMU has started booting.
    check_kernel_policy(args.policy, known, TRACE_LEVELS)
    reader, job = capture_pipe(kernel=args.kernel, initrd=args.initrd, append=args.append,
                               workload=args.workload, memory=args.memory, smp=args.smp,
                               fetches=args.fetches, extra_qemu_args=qemu_args,
                               kallsyms_out=args.kallsyms, timeout=args.timeout,
                               start=args.start, limit=args.limit,
                               modules=_modules(args.module, args.kernel), pa=not args.no_pa,
                               save_kallsyms=not args.no_kallsyms, coalesce=args.coalesce,
                               writer_nice=_nice(args)[0])
    lower_thread_priority(_nice(args)[1])   # this thread only: QEMU's keeps its value
    try:
        result = replay(reader, policy=args.policy, kallsyms=known, threads=False)
    except BaseException:
        reader.close()
        job.cancel()    # the replay failed: stop the boot that feeds it
        raise
    finally:
        reader.close()
    info = job.wait()
    if result.symbolizer is None and info.kallsyms:
        result.symbolizer = Symbolizer([])
        result.symbolizer.add_kallsyms(str(info.kallsyms))
    result.path = "<capture>"
    doc = result.to_dict()
    doc["capture"] = info.to_dict()
    if args.report:
        from ..report import render_report
        render_report(doc, args.report)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        from ..cli.replay import summary
        print(summary(result, 10, doc))
        print(f"capture: QEMU ran {info.wall_time:.1f} s, {info.accesses:,} data accesses")
    return 0


def _speed(args: argparse.Namespace, qemu_args: list[str]) -> int:
    from .speed import format_speed, measure_speed
    if args.output or args.count_only or args.report or args.limit is not None:
        raise PksEmuError("--speed runs its own boots: leave out -o, --count-only, --report "
                          "and --limit")
    if args.repeat < 1:
        raise PksEmuError(f"--repeat {args.repeat}: expected at least 1")
    known = args.kallsyms if args.kallsyms and os.path.isfile(args.kallsyms) else None
    if args.policy:
        from ..trace.kernel import check_kernel_policy
        from .session import TRACE_LEVELS
        check_kernel_policy(args.policy, known, TRACE_LEVELS)
    writer_nice, replay_nice = _nice(args)
    doc = measure_speed(policy=args.policy, kallsyms=known, repeat=args.repeat,
                        writer_nice=writer_nice, replay_nice=replay_nice,
                        progress=lambda m: print(f"pks-emu capture --speed: {m}", file=sys.stderr),
                        kernel=args.kernel, initrd=args.initrd, append=args.append,
                        workload=args.workload, memory=args.memory, smp=args.smp,
                        fetches=args.fetches, extra_qemu_args=qemu_args, timeout=args.timeout,
                        start=args.start, modules=_modules(args.module, args.kernel),
                        pa=not args.no_pa, save_kallsyms=not args.no_kallsyms)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(format_speed(doc))
    return 0


def run(args: argparse.Namespace) -> int:
    from . import capture
    if args.speed:
        qemu_args = list(args.qemu_args)
        return _speed(args, qemu_args[1:] if qemu_args[:1] == ["--"] else qemu_args)
    if args.policy:
        qemu_args = list(args.qemu_args)
        return _capture_and_replay(args, qemu_args[1:] if qemu_args[:1] == ["--"] else qemu_args)
    if not args.count_only and not args.output:
        raise PksEmuError("give -o TRACE (or '-o -' for standard output), or --count-only")
    to_stdout = args.output == "-"
    if to_stdout and sys.stdout.isatty():
        raise PksEmuError("refusing to write a binary trace to a terminal: redirect it or give "
                          "-o FILE")
    if to_stdout and args.json:
        raise PksEmuError("--json and '-o -' both want standard output: give -o FILE")
    qemu_args = list(args.qemu_args)
    if qemu_args[:1] == ["--"]:
        qemu_args = qemu_args[1:]
    if to_stdout:
        sys.stdout.flush()
        out = sys.stdout.fileno()
    else:
        out = args.output
    info = capture(out, kernel=args.kernel, initrd=args.initrd, append=args.append,
                   workload=args.workload, memory=args.memory, smp=args.smp,
                   fetches=args.fetches, extra_qemu_args=qemu_args,
                   kallsyms_out=args.kallsyms, timeout=args.timeout,
                   count_only=args.count_only, start=args.start, limit=args.limit,
                   modules=_modules(args.module, args.kernel), pa=not args.no_pa,
                   save_kallsyms=not args.no_kallsyms, coalesce=args.coalesce)
    if args.json:
        json.dump(info.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    report = sys.stderr if to_stdout else sys.stdout
    c = info.counts
    print(f"capture: QEMU ran {info.wall_time:.1f} s, {info.accesses:,} data accesses "
          f"({info.accesses / max(info.wall_time, 1e-9) / 1e6:.1f} M/s)", file=report)
    print(f"  kernel IP: {c.get('kernel_loads', 0):,} loads, {c.get('kernel_stores', 0):,} stores "
          f"({c.get('kernel_user_accesses', 0):,} to user addresses, flagged AC)", file=report)
    print(f"  user IP:   {c.get('user_loads', 0):,} loads, {c.get('user_stores', 0):,} stores",
          file=report)
    if c.get("kernel_fetches") or c.get("user_fetches"):
        print(f"  fetches:   {c.get('kernel_fetches', 0):,} kernel, {c.get('user_fetches', 0):,} "
              "user", file=report)
    if "records" in c:
        line = f"  trace: {c['records']:,} records"
        if info.trace is not None:
            line += f" in {info.trace} ({info.trace_bytes:,} bytes"
            if c["records"]:
                line += f", {info.trace_bytes / c['records']:.2f} bytes/record"
            line += ")"
        if c.get("merged"):
            line += f"; {c['merged']:,} accesses merged into runs"
        if c.get("limit_reached"):
            line += f"; limit reached, {c.get('records_dropped', 0):,} not recorded"
        print(line, file=report)
    if info.kallsyms:
        print(f"  kallsyms: {info.kallsyms}", file=report)
    if info.workload_status not in (None, 0):
        print(f"  warning: the workload script exited with status {info.workload_status}",
              file=report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pks_emu.capture.cli``: the subcommand on its own."""
    p = argparse.ArgumentParser(prog="pks-emu capture")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except PksEmuError as e:
        print(f"pks-emu capture: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
