"""``pks-emu bench``: the core's throughput on this machine against the targets."""
from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import tempfile
from pathlib import Path

from . import positive_int
from ..bench import (TARGETS, bench_batch, bench_lackey, bench_replay, bench_single_access,
                     make_hit_trace)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes, one run each (a smoke test)")
    p.add_argument("--repeat", type=positive_int, default=5,
                   help="runs per figure; the best is kept (default 5; 1 or more)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--only", nargs="*", choices=sorted(TARGETS), help="run only these")


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
        if want("batch_hit"):
            results["batch_hit"] = bench_batch(n, repeat, miss=False)
        if want("batch_miss_4level"):
            results["batch_miss_4level"] = bench_batch(n // 2, repeat, miss=True)
        if want("batch_miss_5level"):
            results["batch_miss_5level"] = bench_batch(n // 2, repeat, miss=True, levels=5)
        if want("replay_hit"):
            path = os.path.join(tmp, "hit.pkt")
            make_hit_trace(path, trace_n)
            results["replay_hit"] = bench_replay(path, repeat)
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
    if args.json:
        json.dump({k: {"value": v, "unit": TARGETS[k][1], "target": TARGETS[k][2]}
                   for k, v in results.items()}, sys.stdout, indent=1)
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
        print(f"  {what:<48} {v:10.1f} {unit:<10} {verdict}")
    return 0
