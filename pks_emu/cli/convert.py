"""``pks-emu convert LACKEY OUT``: a Valgrind lackey trace to the native format."""
from __future__ import annotations

import argparse
import json
import sys

from ..trace.convert import convert_lackey


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lackey", help="lackey trace: plain, .gz or .xz (detected from content)")
    p.add_argument("output", help="native trace to write")
    p.add_argument("--policy", metavar="FILE", help="address-space policy (TOML); default: plain user pages")
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed lines")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def run(args: argparse.Namespace) -> int:
    stats = convert_lackey(args.lackey, args.output, policy=args.policy, skip_bad=args.skip_bad)
    if args.json:
        stats = dict(stats, bad_examples=[list(x) for x in stats["bad_examples"]])
        json.dump(stats, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"pks-emu convert: {args.lackey} -> {args.output}")
    print(f"  lines {stats['lines']:,} ({stats['skipped_lines']:,} valgrind lines skipped, "
          f"{stats['bad_lines']:,} malformed skipped)")
    print(f"  records {stats['records_written']:,}; pages mapped {stats['pages_mapped']:,}, "
          f"left unmapped {stats['pages_unmapped']:,}; policy {stats['policy']}")
    for line, text in stats["bad_examples"][:5]:
        print(f"  malformed line {line}: {text!r}")
    return 0
