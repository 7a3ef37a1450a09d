"""``pks-emu replay TRACE``: replay a native or lackey trace, report every fault.

Exit status: 0 when the replay ran (faults or not), 2 for bad input,
3 with ``--fail-on-fault`` when at least one fault was found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from . import nonnegative_int
from ..atomic import atomic_output
from ..constants import pf_error_code_str
from ..errors import PksEmuError, TraceFormatError
from ..trace.format import is_native_trace
from ..trace.replay import KIND_NAMES, VECTOR_NAMES, ReplayResult, fault_to_dict, replay

EXIT_FAULTS_FOUND = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="native trace (.pkt), or a Valgrind lackey trace (plain, .gz, .xz)")
    p.add_argument("--policy", metavar="FILE",
                   help="address-space policy (TOML) for a lackey trace; default: all plain user pages")
    p.add_argument("--json", action="store_true", help="print the result as JSON (schema pks-emu-replay/1)")
    p.add_argument("--faults", metavar="OUT",
                   help="write every fault to OUT (.csv, .jsonl or .npy, chosen by suffix)")
    p.add_argument("--max-faults", type=int, metavar="N",
                   help="stop the replay after N faults (all N are reported)")
    p.add_argument("--stop-on-fault", action="store_true", help="stop at the first fault")
    p.add_argument("--fail-on-fault", action="store_true",
                   help=f"exit with status {EXIT_FAULTS_FOUND} when any fault was found")
    p.add_argument("--compat", choices=("sdm", "qemu"),
                   help="replay with these semantics instead of the trace's (e.g. to compare with QEMU 7.2)")
    p.add_argument("--stale-check", action="store_true",
                   help="report TLB hits on translations the page tables no longer hold "
                        "(PTE writes without INVLPG); slower")
    p.add_argument("--skip-bad", action="store_true",
                   help="lackey input: count and skip malformed lines instead of stopping")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--list", type=nonnegative_int, default=10, metavar="N",
                   help="faults listed in the summary (default 10; all are in --faults/--json)")


def _progress(quiet: bool):
    """A tqdm bar on a terminal, nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return None, None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None, None
    bar = tqdm(total=0, unit="rec", unit_scale=True, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return bar, update


def write_faults(path: str, faults: np.ndarray) -> None:
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            with atomic_output(path, "wb") as f:
                np.save(f, faults)
        elif suffix == ".csv":
            with atomic_output(path, "w") as f:
                f.write("record,cpu,vector,kind,address,error_code,error_code_bits,pkey\n")
                for x in faults:
                    vec = int(x["vector"])
                    code = int(x["error_code"])
                    f.write(f"{int(x['record'])},{int(x['cpu'])},{VECTOR_NAMES.get(vec, vec)},"
                            f"{KIND_NAMES.get(int(x['kind']), int(x['kind']))},{int(x['address']):#x},"
                            f"{code:#x},{pf_error_code_str(code) if vec == 14 else ''},"
                            f"{int(x['pkey']) if int(x['pkey']) >= 0 else ''}\n")
        elif suffix in (".jsonl", ".json"):
            with atomic_output(path, "w") as f:
                for x in faults:
                    f.write(json.dumps(fault_to_dict(x)) + "\n")
        else:
            raise PksEmuError(f"--faults {path}: unknown format {suffix!r}: expected .csv, .jsonl or .npy")
    except OSError as e:
        raise PksEmuError(f"--faults {path}: cannot write: {e.strerror or e}") from None


def summary(r: ReplayResult, listed: int) -> str:
    c = r.counters
    acc = {k: v for k, v in c.items() if k.startswith(("reads_", "writes_", "fetches_"))}
    n_acc = sum(acc.values())
    h = r.header
    lines = [f"pks-emu replay: {r.path}"]
    lines.append(f"  machine     {h['paging_levels']}-level paging, {h['ncpus']} CPU(s), "
                 f"compat {h['compat']}, features {','.join(h['features'])}")
    stop = " (stopped early)" if r.stopped_early else ""
    lines.append(f"  records     {r.records_replayed:,} of {r.records:,} replayed{stop}")
    others = ", ".join(f"{k} {v:,}" for k, v in r.record_counts.items() if v and k != "access")
    lines.append(f"  accesses    {n_acc:,}  (reads {c['reads_supervisor'] + c['reads_user']:,}, "
                 f"writes {c['writes_supervisor'] + c['writes_user']:,}, "
                 f"fetches {c['fetches_supervisor'] + c['fetches_user']:,}; "
                 f"user-mode {c['reads_user'] + c['writes_user'] + c['fetches_user']:,})")
    if others:
        lines.append(f"  events      {others}")
    rate = f"{n_acc / r.elapsed / 1e6:,.1f} M accesses/s" if r.elapsed > 0 else "-"
    lines.append(f"  time        {r.elapsed:.3f} s  ({rate})")
    lines.append(f"  TLB         {c['tlb_hits']:,} hits, {c['tlb_misses']:,} misses, {c['walks']:,} walks, "
                 f"{c['tlb_flushes']:,} flushes, {c['invlpg']:,} INVLPG")
    k = r.kernel
    if k["context_switches"] or k["exceptions"]:
        lines.append(f"  kernel      {k['context_switches']:,} context switches, {k['exceptions']:,} exceptions "
                     f"(max depth {k['max_exception_depth']}), PKRS writes {k['pkrs_writes']:,} "
                     f"done / {k['pkrs_writes_avoided']:,} avoided by the per-CPU cache")
    lines.append(f"  MSR/PKRU    {c['wrmsr_pkrs']:,} WRMSR IA32_PKRS, {c['wrpkru']:,} WRPKRU")
    if r.stale_uses or c["stale_uses"]:
        lines.append(f"  stale TLB   {c['stale_uses']:,} hits on translations the page tables no longer hold")
        for u in r.stale_uses[:listed]:
            fresh = (f"now {u['fresh_pa']:#x} key {u['fresh_pkey']}" if u["fresh_error"] is None
                     else f"now faults ({u['fresh_error']:#x})")
            lines.append(f"    cpu {u['cpu']} va {u['va']:#x}: cached {u['cached_pa']:#x} key {u['cached_pkey']}, {fresh}")
    nf = len(r.faults)
    by_vec = ", ".join(f"{k} {v:,}" for k, v in r.faults_by_vector().items())
    lines.append(f"  faults      {nf:,}" + (f"  ({by_vec})" if nf else ""))
    if nf:
        codes = r.faults_by_error_code()
        if codes:
            lines.append("    by #PF error code: " + ", ".join(
                f"{code:#x} {pf_error_code_str(code)} {n:,}" for code, n in sorted(codes.items())))
        keys = r.faults_by_pkey()
        if keys:
            lines.append("    by pkey (PK faults): " + ", ".join(f"key {k} {n:,}" for k, n in sorted(keys.items())))
        show = r.faults[:listed]
        if len(show):
            lines.append(f"    first {len(show)}:")
            lines.append(f"      {'record':>10}  cpu  {'fault':<5} {'kind':<5}  {'address':<18}  error code      pkey")
            for x in show:
                d = fault_to_dict(x)
                code = f"{d['error_code']:#x} {d.get('error_code_bits', '')}".strip()
                pkey = d.get("pkey")
                lines.append(f"      {d['record']:>10}  {d['cpu']:>3}  {d['vector']:<5} {d['kind']:<5}  "
                             f"{d['address']:<18}  {code:<14}  {'' if pkey is None else pkey}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    path = args.trace
    try:
        os.stat(path)
    except FileNotFoundError:
        raise TraceFormatError(f"{path}: no such file") from None
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if args.max_faults is not None and not 1 <= args.max_faults < 1 << 64:
        raise PksEmuError(f"--max-faults {args.max_faults}: expected a positive number below 2**64")
    tmp = None
    if not is_native_trace(path):
        # Not a native trace: read it as a lackey trace through the policy.
        from ..trace.convert import convert_lackey
        fd, tmp = tempfile.mkstemp(suffix=".pkt", prefix="pks-emu-")
        os.close(fd)
        try:
            convert_lackey(path, tmp, policy=args.policy, skip_bad=args.skip_bad)
        except BaseException:  # Ctrl-C too: never leave the temporary trace behind
            os.unlink(tmp)
            raise
        native = tmp
    else:
        if args.policy:
            raise PksEmuError(f"{path}: --policy applies to lackey traces; a native trace carries its page tables")
        native = path
    bar, update = _progress(args.quiet or args.json)
    try:
        result = replay(native, max_faults=args.max_faults, stop_on_fault=args.stop_on_fault,
                        progress=update, compat=args.compat, stale_check=args.stale_check)
    finally:
        if bar is not None:
            bar.close()
        if tmp is not None:
            os.unlink(tmp)
    result.path = path
    if args.faults:
        write_faults(args.faults, result.faults)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(summary(result, args.list))
    if args.fail_on_fault and len(result.faults):
        return EXIT_FAULTS_FOUND
    return 0
