"""``pks-emu bench``: the core's throughput on this machine against the
targets, as same-run ratios against hand-written C loops, and (with
``--instructions``) instructions per access counted by callgrind."""
from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import positive_int
from ..bench import (CASES, REPLAY_IR_CASES, STORM_CASES, TARGETS, bench_batch, bench_c, bench_case,
                     bench_lackey, bench_lackey_end_to_end, bench_replay, bench_replay_storm,
                     bench_single_access, build_calibration, instructions_case, instructions_replay,
                     make_hit_trace, make_lackey_inputs, make_storm_trace, parse_rate)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes, one run each (a smoke test)")
    p.add_argument("--repeat", type=positive_int, default=5,
                   help="runs per figure; the best is kept (default 5; 1 or more)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--only", nargs="*", choices=sorted(TARGETS), help="run only these")
    p.add_argument("--instructions", action="store_true",
                   help="also count instructions per access of the batch cases, per record of "
                        "replay_hit and replay_fault_storm, and of the C calibration loops, with "
                        "valgrind --tool=callgrind (when installed)")
    p.add_argument("--no-psc", action="store_true",
                   help="turn the paging-structure caches off (CPU.paging_structure_caches)")


def run(args: argparse.Namespace) -> int:
    repeat = 1 if args.quick else args.repeat
    n = 100_000 if args.quick else 2_000_000
    trace_n = 200_000 if args.quick else 10_000_000
    only = set(args.only or TARGETS)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pks-emu-bench-") as tmp:
        def want(name: str) -> bool:
            return name in only

        if want("access_single_ns"):
            results["access_single_ns"] = bench_single_access(20_000 if args.quick else 500_000, repeat)
        exe = build_calibration(tmp)
        ratios: dict[str, tuple[float, float]] = {}
        for case in CASES:
            if want(case):
                cn = CASES[case][4] // (8 if args.quick else 1)
                results[case] = bench_case(case, repeat, psc=not args.no_psc, n=cn)
                if exe is not None:
                    mode = CASES[case][3]
                    ratios[case] = (results[case], bench_c(exe, mode, cn, repeat))
        instr: dict[str, tuple[float, float | None]] = {}
        if args.instructions and shutil.which("valgrind"):
            for case in CASES:
                if want(case):
                    cn = CASES[case][4] // (1 if CASES[case][2] == "random" else 8)
                    instr[case] = instructions_case(case, exe, cn, psc=not args.no_psc)
            for case in REPLAY_IR_CASES:
                if want(case):
                    instr[case] = instructions_replay(case, exe, 20_000 if args.quick else 500_000)
        if want("batch_miss_4level"):
            results["batch_miss_4level"] = bench_batch(n // 2, repeat, miss=True)
        if want("batch_miss_5level"):
            results["batch_miss_5level"] = bench_batch(n // 2, repeat, miss=True, levels=5)
        if want("replay_hit"):
            path = os.path.join(tmp, "hit.pkt")
            make_hit_trace(path, trace_n)
            results["replay_hit"] = bench_replay(path, repeat)
            rexe = build_calibration(tmp, "replay_hit.c")
            if rexe is not None:
                best = 0.0
                for _ in range(repeat):
                    out = subprocess.run([rexe, path], capture_output=True, text=True, check=True).stdout
                    best = max(best, parse_rate(out, rexe))
                ratios["replay_hit"] = (results["replay_hit"], best)
            os.unlink(path)
        storm = [k for k in STORM_CASES if want(k)]
        if storm:
            sn = CASES["fault_storm"][4] // (8 if args.quick else 1)
            path = os.path.join(tmp, "storm.pkt")
            make_storm_trace(path, sn)
            c_storm = bench_c(exe, "faults", sn, repeat) if exe is not None else None
            for k in storm:
                results[k] = bench_replay_storm(path, repeat, STORM_CASES[k])
                if c_storm is not None:
                    ratios[k] = (results[k], c_storm)
            os.unlink(path)
        if want("replay_miss"):
            from ..trace.generators import gen_tlb_miss_scan
            path = os.path.join(tmp, "miss.pkt")
            gen_tlb_miss_scan(path, records=trace_n, pages=1 << 20 if not args.quick else 1 << 14)
            results["replay_miss"] = bench_replay(path, repeat)
            os.unlink(path)
        if want("lackey_import"):
            src = Path(__file__).resolve().parents[2] / "examples" / "gzip-services.lackey.xz"
            plain = os.path.join(tmp, "trace.lackey")
            if src.exists():
                with lzma.open(src) as f, open(plain, "wb") as g:
                    g.write(f.read())
                results["lackey_import"] = bench_lackey(plain, repeat)
        e2e = None
        if want("lackey_end_to_end"):
            root = Path(__file__).resolve().parents[2] / "examples"
            src = root / "gzip-services.lackey.xz"
            if src.exists():
                # 8 copies: 22 M lines, so that the start-up (the machine, the
                # policy, the threads) weighs as little as in a real trace.
                plain, xz, lines = make_lackey_inputs(str(src), tmp, 1 if args.quick else 8)
                e2e = bench_lackey_end_to_end(plain, xz, str(root / "protect-heap.toml"), lines,
                                              repeat)
                results["lackey_end_to_end"] = float(e2e["plain_mlines_per_s"])  # type: ignore[arg-type]
                os.unlink(plain)
                os.unlink(xz)
    if args.json:
        doc = {k: {"value": v, "unit": TARGETS[k][1], "target": TARGETS[k][2]}
               for k, v in results.items()}
        for k, (ours, c) in ratios.items():
            doc[k]["c_loop"] = c
            doc[k]["ratio"] = ours / c
        for k, (ours, ci) in instr.items():
            doc[k]["instructions_per_access"] = ours
            doc[k]["c_instructions_per_access"] = ci
        if e2e is not None:
            doc["lackey_end_to_end"].update(e2e)
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"pks-emu bench ({'quick' if args.quick else f'best of {repeat}'}, {os.cpu_count()} CPUs)")
    for k, v in results.items():
        what, unit, target, sense = TARGETS[k]
        if target is None:
            verdict = ""
        else:
            ok = v <= target if sense == "max" else v >= target
            verdict = f"target {'<=' if sense == 'max' else '>='} {target:g}: {'met' if ok else 'NOT met'}"
        print(f"  {what:<56} {v:10.1f} {unit:<10} {verdict}")
    if ratios:
        print("same-run ratios against benchmarks/calibration/batch_loops.c and replay_hit.c (cc -O3):")
        for k, (ours, c) in ratios.items():
            if STORM_CASES.get(k, "sites") != "sites":
                verdict = "no target: the full per-fault log"
            else:
                need = 0.5 if "fault_storm" in k else 1.0
                verdict = f"target >= {need:g}x: {'met' if ours / c >= need else 'NOT met'}"
            print(f"  {k:<28} {ours:8.1f} / {c:8.1f} M acc/s = {ours / c:5.2f}x  ({verdict})")
    if e2e is not None:
        dc, over = e2e["xz_dc_seconds"], e2e["xz_over_xz_dc"]
        ratio = (f"{e2e['xz_seconds']:.3f} s, xz -dc alone {dc:.3f} s: {over:.2f}x pair by pair "
                 f"(target <= 1.1x: {'met' if over <= 1.1 else 'NOT met'})"
                 if dc and over is not None else "no xz tool")
        how = "threaded reading" if e2e["threads"] else "one thread (no CPU to spare)"
        print(f"lackey end to end, {e2e['lines']:,} lines, {e2e['faults']:,} faults, {how}, medians:")
        print(f"  plain {e2e['plain_seconds']:.3f} s = {e2e['plain_mlines_per_s']:.1f} M lines/s; "
              f"xz {e2e['xz_mlines_per_s']:.1f} M lines/s, {ratio}")
    if instr:
        print("instructions per access, per record for replay_* (valgrind --tool=callgrind, "
              "measured call only):")
        for k, (ours, ci) in instr.items():
            cs = f"{ci:7.1f}" if ci is not None else "    n/a"
            print(f"  {k:<28} pks_emu {ours:7.1f}   C loop {cs}")
    return 0
