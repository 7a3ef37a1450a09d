"""``pks-emu info TRACE``: header, record counts, address ranges of a native trace."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import stat as _stat
import sys

import numpy as np

from ..atomic import atomic_output
from ..errors import TraceFormatError
from ..trace.format import (RECORD, RECORD_SIZE, RecordType, is_native_trace, read_header,
                            validate_records)
from ..trace.replay import machine_from_header


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="native trace, or a Valgrind lackey trace (plain, .gz, .xz)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write the description to OUT (atomically) instead of stdout")


def check_input(path: str) -> None:
    """Refuse what cannot be a trace before reading it: missing, a folder, empty."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if _stat.S_ISDIR(st.st_mode):
        raise TraceFormatError(f"{path}: is a directory; expected a trace file")
    if _stat.S_ISREG(st.st_mode) and st.st_size == 0:
        # /proc files say 0 bytes and have content: read one byte to be sure.
        try:
            with open(path, "rb") as f:
                empty = not f.read(1)
        except OSError as e:
            raise TraceFormatError(f"{path}: cannot read: {e.strerror or e}") from None
        if empty:
            raise TraceFormatError(f"{path}: empty file: expected a native pks_emu trace or a lackey trace")


def describe(path: str, chunk_records: int = 1 << 20) -> dict:
    """Header and statistics of a native trace; validates every record."""
    if not is_native_trace(path):
        raise TraceFormatError(f"{path}: not a native pks_emu trace (use `pks-emu convert` for lackey traces)")
    h = read_header(path)
    # The initial registers and memory image pass the checks replay applies.
    machine_from_header(path, h)
    counts = np.zeros(RecordType.COUNT, dtype=np.int64)
    kinds = np.zeros(3, dtype=np.int64)
    per_cpu = np.zeros(h.ncpus, dtype=np.int64)
    lo = hi = None
    tasks: set[int] = set()
    # Chunks are read into arrays of their own (not views of a memory map):
    # an error while validating a chunk then leaves nothing exported to close.
    with open(path, "rb") as f:
        for start in range(0, h.record_count, chunk_records):
            n = min(chunk_records, h.record_count - start)
            f.seek(h.records_offset + start * RECORD_SIZE)
            recs = np.fromfile(f, dtype=RECORD, count=n)
            if len(recs) < n:
                raise TraceFormatError(f"{path}: truncated at record {start + len(recs)} "
                                       f"(the file shrank while being read)")
            validate_records(path, recs, start, h)
            counts += np.bincount(recs["type"], minlength=RecordType.COUNT)
            acc = recs[recs["type"] == RecordType.ACCESS]
            kinds += np.bincount(acc["op"], minlength=3)[:3]
            per_cpu += np.bincount(recs["cpu"], minlength=h.ncpus)
            if len(acc):
                a, b = int(acc["addr"].min()), int(acc["addr"].max())
                lo = a if lo is None else min(lo, a)
                hi = b if hi is None else max(hi, b)
            cs = recs[recs["type"] == RecordType.CONTEXT_SWITCH]
            tasks.update(np.unique(cs["value"]).tolist())
            del recs, acc, cs
    return {
        "trace": path, "version": h.version, "api": h.api, "paging_levels": h.paging_levels, "ncpus": h.ncpus,
        "compat": h.compat, "features": sorted(h.features), "maxphyaddr": h.maxphyaddr,
        "tlb_entries": h.tlb_entries, "pkrs_init": f"{h.pkrs_init:#x}",
        "memory_frames": h.memory_frames, "records": h.record_count,
        "record_counts": {name: int(c) for name, c in zip(RecordType.NAMES, counts)},
        "access_kinds": {"read": int(kinds[0]), "write": int(kinds[1]), "fetch": int(kinds[2])},
        "records_per_cpu": [int(x) for x in per_cpu],
        "address_range": None if lo is None else [f"{lo:#x}", f"{hi:#x}"],
        "tasks": len(tasks),
        "initial_cpus": [dict(zip(("cr0", "cr3", "cr4", "efer", "rflags", "cpl", "pkru", "pkrs"),
                                  (hex(v) for v in s))) for s in h.cpu_states],
    }


def describe_lackey(path: str) -> dict:
    """Statistics of a Valgrind lackey trace (plain, .gz, .xz): lines, records
    by kind, address range, pages touched."""
    from ..lackey import iter_lackey
    kinds = np.zeros(3, dtype=np.int64)
    lo = hi = None
    pages = np.empty(0, dtype=np.uint64)
    lines = skipped = records = 0
    compression = "none"
    for chunk in iter_lackey(path):
        compression = chunk.compression
        lines += chunk.lines
        skipped += chunk.skipped_lines
        records += len(chunk)
        kinds += np.bincount(chunk.kind, minlength=3)[:3]
        if len(chunk):
            a, b = int(chunk.va.min()), int(chunk.va.max())
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
            pages = np.union1d(pages, np.unique(chunk.va >> np.uint64(12)))
    if lines == 0:
        raise TraceFormatError(f"{path}: empty input: expected a native pks_emu trace or a lackey trace")
    return {"trace": path, "format": "lackey", "compression": compression, "lines": lines,
            "skipped_lines": skipped, "records": records,
            "access_kinds": {"read": int(kinds[0]), "write": int(kinds[1]), "fetch": int(kinds[2])},
            "address_range": None if lo is None else [f"{lo:#x}", f"{hi:#x}"],
            "pages": int(len(pages))}


def run(args: argparse.Namespace) -> int:
    check_input(args.trace)
    if args.output is None:
        return _run(args)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = _run(args)
    with atomic_output(args.output, "w", inputs=(args.trace,)) as f:
        f.write(buf.getvalue())
    return rc


def _run(args: argparse.Namespace) -> int:
    if not is_native_trace(args.trace):
        d = describe_lackey(args.trace)
        if args.json:
            json.dump(d, sys.stdout, indent=1)
            sys.stdout.write("\n")
            return 0
        k = d["access_kinds"]
        print(f"pks-emu info: {d['trace']} (Valgrind lackey, compression {d['compression']})")
        print(f"  lines        {d['lines']:,} ({d['skipped_lines']:,} valgrind lines skipped)")
        print(f"  records      {d['records']:,}: read {k['read']:,}, write {k['write']:,}, fetch {k['fetch']:,}"
              " (an M line is a read and a write)")
        if d["address_range"]:
            print(f"  addresses    {d['address_range'][0]} .. {d['address_range'][1]}, {d['pages']:,} pages")
        print("  replay it with a policy: pks-emu replay TRACE --policy FILE (docs/trace-format.md)")
        return 0
    d = describe(args.trace)
    if args.json:
        json.dump(d, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"pks-emu info: {d['trace']}")
    print(f"  format       version {d['version']}, {d['records']:,} records, {d['memory_frames']:,} memory frames")
    print(f"  machine      {d['paging_levels']}-level paging, {d['ncpus']} CPU(s), compat {d['compat']}, "
          f"MAXPHYADDR {d['maxphyaddr']}, TLB {d['tlb_entries']} entries")
    print(f"  features     {', '.join(d['features'])}")
    print("  records      " + ", ".join(f"{k} {v:,}" for k, v in d["record_counts"].items() if v))
    k = d["access_kinds"]
    print(f"  accesses     read {k['read']:,}, write {k['write']:,}, fetch {k['fetch']:,}")
    if d["address_range"]:
        print(f"  addresses    {d['address_range'][0]} .. {d['address_range'][1]}")
    print(f"  per CPU      {', '.join(f'{i}: {n:,}' for i, n in enumerate(d['records_per_cpu']))}")
    if d["tasks"]:
        print(f"  tasks        {d['tasks']}")
    for i, s in enumerate(d["initial_cpus"]):
        print(f"  CPU {i} init   " + " ".join(f"{k}={v}" for k, v in s.items()))
    return 0
