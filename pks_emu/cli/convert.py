"""``pks-emu convert INPUT OUTPUT``: a Valgrind lackey trace (through a
policy) or a version-1 native trace to the native format, version 2 by
default (``.pkt`` output or ``--format v1``: version 1)."""
from __future__ import annotations

import argparse
import json
import sys

from ..atomic import check_not_input
from ..errors import PksEmuError
from ..trace.convert import convert_lackey
from ..trace.format import is_native_trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="lackey trace (plain, .gz, .xz, .bz2; detected from content) "
                                 "or a version-1 native trace")
    p.add_argument("output", help="native trace to write (.pkt2: version 2, .pkt: version 1)")
    p.add_argument("--format", choices=("v1", "v2"),
                   help="trace format version to write (default: v1 for a .pkt output, else v2)")
    p.add_argument("--codec", choices=("none", "zstd", "lz4"),
                   help="v2: general-purpose codec over each chunk (default: see docs/trace-format.md)")
    p.add_argument("--policy", metavar="FILE", help="lackey input: address-space policy (TOML); "
                                                    "default: plain user pages")
    p.add_argument("--skip-bad", action="store_true", help="lackey input: count and skip malformed lines")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("v1" if args.output.lower().endswith(".pkt") else "v2")
    check_not_input(args.output, (args.input, args.policy))
    native = is_native_trace(args.input)
    if native:
        if fmt == "v1":
            raise PksEmuError(f"{args.input}: is a native pks_emu trace (version 1) already: "
                              "convert it to v2 (a .pkt2 output), or replay it as it is")
        if args.policy:
            raise PksEmuError(f"{args.input}: --policy applies to lackey traces; "
                              "a native trace carries its page tables")
        from ..trace.v2 import convert_v1_to_v2
        kw = {"codec": args.codec} if args.codec else {}
        stats = convert_v1_to_v2(args.input, args.output, **kw)
    elif fmt == "v2":
        from ..trace.v2 import lackey_to_v2
        kw = {"codec": args.codec} if args.codec else {}
        stats = lackey_to_v2(args.input, args.output, policy=args.policy, skip_bad=args.skip_bad, **kw)
    else:
        if args.codec:
            raise PksEmuError("--codec applies to version-2 output")
        stats = convert_lackey(args.input, args.output, policy=args.policy, skip_bad=args.skip_bad)
    stats = dict(stats, format=fmt, output=args.output)
    if "bad_examples" in stats:
        stats["bad_examples"] = [list(x) for x in stats["bad_examples"]]
    if args.json:
        json.dump(stats, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    print(f"pks-emu convert: {args.input} -> {args.output} (format {fmt})")
    if "lines" in stats:
        print(f"  lines {stats['lines']:,} ({stats['skipped_lines']:,} valgrind lines skipped, "
              f"{stats['bad_lines']:,} malformed skipped)")
    written = stats.get("records_written", stats.get("records", 0))
    line = f"  records {written:,}"
    if "pages_mapped" in stats:
        line += (f"; pages mapped {stats['pages_mapped']:,}, left unmapped {stats['pages_unmapped']:,}; "
                 f"policy {stats['policy']}")
    print(line)
    if "bytes" in stats and written:
        print(f"  {stats['bytes']:,} bytes, {stats['bytes'] / written:.2f} bytes per record")
    for line_no, text in stats.get("bad_examples", [])[:5]:
        print(f"  malformed line {line_no}: {text!r}")
    return 0
