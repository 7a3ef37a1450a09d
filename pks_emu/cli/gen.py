"""``pks-emu gen NAME -o OUT``: write a reproducible kernel-style workload trace."""
from __future__ import annotations

import argparse
import os

from ..errors import PksEmuError
from ..trace.generators import _INT_RANGES, _PAGE_RANGES, GENERATORS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(GENERATORS), help="workload")
    p.add_argument("-o", "--output", required=True, help="native trace to write")
    p.add_argument("--records", type=int, default=1_000_000, help="approximate record count (default 1,000,000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    p.add_argument("--cpus", type=int, help="CPU count (not for tlb-miss-scan)")
    p.add_argument("--pages", type=int, help="pages to scan (tlb-miss-scan; default 1,048,576)")
    p.add_argument("--levels", type=int, choices=(4, 5), default=None,
                   help="paging depth (tlb-miss-scan; default 4)")
    p.add_argument("--random", action="store_true", help="tlb-miss-scan: visit pages in random order")


def run(args: argparse.Namespace) -> int:
    lo, hi = _INT_RANGES["records"]
    if not lo <= args.records <= hi:
        raise PksEmuError(f"--records {args.records}: expected {lo}..{hi}")
    lo, hi = _INT_RANGES["seed"]
    if not lo <= args.seed <= hi:
        raise PksEmuError(f"--seed {args.seed}: expected {lo}..{hi}")
    if args.pages is not None and args.name in ("tlb-miss-scan", "pmem-stray"):
        lo, hi = _PAGE_RANGES["gen_" + args.name.replace("-", "_")]
        if not lo <= args.pages <= hi:
            raise PksEmuError(f"--pages {args.pages}: expected {lo}..{hi} for {args.name}")
    kw: dict = {"records": args.records, "seed": args.seed}
    if args.name == "tlb-miss-scan":
        if args.cpus is not None:
            raise PksEmuError("--cpus does not apply to tlb-miss-scan (one CPU)")
        if args.pages is not None:
            kw["pages"] = args.pages
        kw["paging_levels"] = 4 if args.levels is None else args.levels
        kw["random"] = args.random
    else:
        if args.random:
            raise PksEmuError("--random applies to tlb-miss-scan only")
        if args.levels is not None:
            raise PksEmuError(f"--levels applies to tlb-miss-scan only ({args.name} uses 4-level paging)")
        if args.pages is not None and args.name != "pmem-stray":
            raise PksEmuError(f"--pages does not apply to {args.name}")
        if args.pages is not None:
            kw["pages"] = args.pages
        if args.cpus is not None:
            if not 1 <= args.cpus <= 255:
                raise PksEmuError(f"--cpus {args.cpus}: expected 1..255")
            kw["cpus"] = args.cpus
    out = os.fspath(args.output)
    stats = GENERATORS[args.name](out, **kw)
    print(f"pks-emu gen {args.name}: {out}: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()))
    return 0
