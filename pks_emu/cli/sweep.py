"""``pks-emu sweep TRACE... [--policy P...] [--compat ...] [--api ...]``: replay
every combination on Dask (docs/sweeps.md) and write one table row per combination.

Exit status: 0 when the sweep ran (rows that failed say why in ``error``),
2 for bad arguments, 130 when interrupted (the rows done so far are written,
the others marked ``cancelled``).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import PksEmuError

EXIT_INTERRUPTED = 130
#: Columns of the summary printed on stdout.
SUMMARY_COLUMNS = ("trace", "policy", "compat", "api", "status", "fault_count", "page_faults",
                   "tlb_misses", "elapsed_seconds", "error")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="+", metavar="TRACE",
                   help="native traces (.pkt) or Valgrind lackey traces (plain, .gz, .xz)")
    p.add_argument("--policy", nargs="+", metavar="P", default=None,
                   help="address-space policies (TOML) for the lackey traces; 'default' is the "
                        "default policy (all plain user pages), which is also what no --policy means")
    p.add_argument("--compat", nargs="+", choices=("sdm", "qemu", "trace"), default=None,
                   help="semantics to replay with; 'trace' keeps each trace's own (the default)")
    p.add_argument("--api", nargs="+", choices=("v6", "v7", "v10"), default=None,
                   help="kernel API versions of the PKS series (default: the trace's)")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="use this Dask scheduler's workers (they must see the traces at the same "
                        "paths); default: a local cluster of worker processes")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of the local cluster (default: one per CPU)")
    p.add_argument("-o", "--output", metavar="TABLE",
                   help="write the table to TABLE: .csv, .parquet or .json (chosen by suffix)")
    p.add_argument("--results-dir", metavar="DIR",
                   help="keep each combination's JSON result in DIR (NNNN-trace-policy-compat-api.json)")
    p.add_argument("--top-sites", type=int, default=5, metavar="N",
                   help="fault sites kept per row in the top_sites column (default 5)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")


def _check(args: argparse.Namespace) -> None:
    """Bad arguments fail before any cluster starts."""
    from ..sweep import table_format
    if args.output:
        table_format(args.output)
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise PksEmuError(f"-o {args.output}: no such directory {folder}")
    if args.workers is not None:
        if args.workers < 1:
            raise PksEmuError(f"--workers {args.workers}: expected 1 or more")
        if args.scheduler:
            raise PksEmuError("--workers sizes the local cluster; with --scheduler the cluster has its own workers")
    if args.top_sites < 0:
        raise PksEmuError(f"--top-sites {args.top_sites}: expected 0 or more")
    if args.results_dir and os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        raise PksEmuError(f"--results-dir {args.results_dir}: not a directory")
    if not args.scheduler:
        # A remote cluster's workers may see files this machine does not.
        for path in args.traces:
            if not os.path.isfile(path):
                raise PksEmuError(f"{path}: no such file")
        for path in args.policy or ():
            if path != "default" and not os.path.isfile(path):
                raise PksEmuError(f"--policy {path}: no such file")


def _summary(table) -> str:
    import pandas as pd  # type: ignore[import-untyped,import-not-found]
    cols = [c for c in SUMMARY_COLUMNS if c in table.columns]
    view = table[cols].astype(object)
    view = view.where(view.notna(), None)
    for c in ("trace", "policy"):
        view[c] = ["-" if p is None else os.path.basename(p) for p in view[c]]
    view = view.fillna("-")
    done = int((table["status"] == "done").sum())
    failed = int((table["status"] == "failed").sum())
    with pd.option_context("display.max_rows", 200, "display.width", 200,
                           "display.max_colwidth", 60):
        text = view.to_string(index=False, float_format=lambda x: f"{x:.3f}")
    return f"{text}\n{len(table)} combinations: {done} done, {failed} failed"


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..sweep import CANCELLED, SweepInterrupted, _need_dist, sweep, write_table
    distributed, _ = _need_dist()
    policies = [None if p == "default" else p for p in (args.policy or [None])]
    compat = [None if c == "trace" else c for c in (args.compat or [None])]
    api = args.api or [None]
    client = None
    try:
        if args.scheduler:
            try:
                client = distributed.Client(args.scheduler, timeout="10s")
            except (OSError, TimeoutError) as e:
                raise PksEmuError(f"--scheduler {args.scheduler}: cannot connect: {e}") from None
        try:
            table = sweep(args.traces, policies, compat, api, client=client, n_workers=args.workers,
                          results_dir=args.results_dir, progress=not args.quiet,
                          top_sites=args.top_sites)
        except SweepInterrupted as e:
            table = e.table
            done = int((table["status"] != CANCELLED).sum())
            where = ""
            if args.output:
                write_table(table, args.output)
                where = f"; partial table in {args.output} (status 'cancelled' for the rest)"
            print(f"pks-emu sweep: interrupted: {done} of {len(table)} combinations finished{where}",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except ValueError as e:
            raise PksEmuError(str(e)) from None
    except KeyboardInterrupt:  # while the cluster started or closed
        print("pks-emu sweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if client is not None:
            client.close()
    if args.output:
        write_table(table, args.output)
    if not args.quiet:
        print(_summary(table))
    return 0
