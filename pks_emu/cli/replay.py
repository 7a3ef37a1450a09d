"""``pks-emu replay TRACE``: replay a native or lackey trace, report every fault.

Exit status: 0 when the replay ran (faults or not), 2 for bad input,
3 with ``--fail-on-fault`` when at least one fault was found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import nonnegative_int
from ..constants import pf_error_code_str
from ..errors import PksEmuError, TraceFormatError
from ..trace.replay import ReplayResult, replay

EXIT_FAULTS_FOUND = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="native trace (v1 or v2), a Valgrind lackey trace (plain, .gz, .xz, "
                                 ".bz2), a kernel captured by 'pks-emu capture', or - for standard input")
    p.add_argument("--policy", metavar="FILE",
                   help="address-space policy (TOML) for a lackey trace, or kernel policy for a "
                        "kernel capture; default: all plain user pages / no keys")
    p.add_argument("--symbols", action="append", default=[], metavar="FILE[@BASE]",
                   help="name fault sites function+offset from an ELF file (loaded at BASE) or a "
                        "kallsyms-format file; repeatable")
    p.add_argument("--kallsyms", metavar="FILE",
                   help="kernel capture: the guest's /proc/kallsyms (default TRACE.kallsyms)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (schema pks-emu-replay/2)")
    p.add_argument("--faults", metavar="OUT",
                   help="write every fault to OUT (.csv, .jsonl or .npy, chosen by suffix), "
                        "streamed as the replay goes")
    p.add_argument("--report", metavar="HTML", help="also write the HTML report of the result")
    p.add_argument("--max-faults", type=int, metavar="N",
                   help="stop the replay after N faults (all N are reported)")
    p.add_argument("--stop-on-fault", action="store_true", help="stop at the first fault")
    p.add_argument("--fail-on-fault", action="store_true",
                   help=f"exit with status {EXIT_FAULTS_FOUND} when any fault was found")
    p.add_argument("--compat", choices=("sdm", "qemu"),
                   help="replay with these semantics instead of the trace's (e.g. to compare with QEMU 7.2)")
    p.add_argument("--api", choices=("v6", "v7", "v10"),
                   help="series version of the kernel's context-switch and exception rules "
                        "(default: the trace header's; traces without one: v10)")
    p.add_argument("--stale-check", action="store_true",
                   help="report TLB hits on translations the page tables no longer hold "
                        "(PTE writes without INVLPG); slower")
    p.add_argument("--skip-bad", action="store_true",
                   help="lackey input: count and skip malformed lines instead of stopping")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--list", type=nonnegative_int, default=10, metavar="N",
                   help="fault sites listed in the summary (default 10; all are in --json)")


def _progress(quiet: bool):
    """A tqdm display of records and records/s on a terminal, nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return None, None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None, None
    bar = tqdm(total=None, unit="rec", unit_scale=True, file=sys.stderr, leave=False)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
    return bar, update


def summary(r: ReplayResult, listed: int, doc: dict | None = None) -> str:
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
    nf = r.fault_count
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
        doc = doc if doc is not None else r.to_dict()
        sites = doc.get("sites", [])[:listed]
        if sites:
            lines.append(f"    top {len(sites)} of {doc.get('sites_total', len(sites)):,} fault sites "
                         "(instruction, key, error code, kind):")
            lines.append(f"      {'count':>9}  {'site':<40} {'fault':<5} {'kind':<5} pkey  error code     "
                         f"{'records':<21} sample address")
            for st in sites:
                where = st["symbol"] or st["ip"]
                if st.get("source"):
                    where += f" ({st['source']})"
                if st["symbol"]:
                    where += f" [{st['ip']}]"
                code = f"{st['error_code']:#x} {st.get('error_code_bits') or ''}".strip()
                pkey = "" if st["pkey"] is None else st["pkey"]
                span = f"{st['first_record']:,}..{st['last_record']:,}"
                sample = st["sample_addresses"][0] if st["sample_addresses"] else ""
                lines.append(f"      {st['count']:>9,}  {where:<40} {st['vector']:<5} {st['kind']:<5} "
                             f"{pkey!s:>4}  {code:<14} {span:<21} {sample}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    path = args.trace
    if path != "-":
        try:
            os.stat(path)
        except FileNotFoundError:
            raise TraceFormatError(f"{path}: no such file") from None
        except OSError as e:
            raise TraceFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if args.max_faults is not None and not 1 <= args.max_faults < 1 << 64:
        raise PksEmuError(f"--max-faults {args.max_faults}: expected a positive number below 2**64")
    if args.faults and path != "-" and os.path.exists(args.faults) and os.path.samefile(args.faults, path):
        raise PksEmuError(f"--faults {args.faults}: that is the trace being replayed; give another name")
    bar, update = _progress(args.quiet or args.json)
    try:
        result = replay(path, policy=args.policy, max_faults=args.max_faults,
                        stop_on_fault=args.stop_on_fault, progress=update, compat=args.compat,
                        api=args.api, stale_check=args.stale_check, symbols=args.symbols,
                        kallsyms=args.kallsyms, faults_out=args.faults, skip_bad=args.skip_bad,
                        log_limit=1000)
    finally:
        if bar is not None:
            bar.close()
    doc = result.to_dict()
    if args.report:
        from ..report import render_report
        render_report(doc, args.report)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(summary(result, args.list, doc))
    if args.fail_on_fault and result.fault_count:
        return EXIT_FAULTS_FOUND
    return 0
