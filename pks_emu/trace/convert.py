"""Valgrind lackey trace -> native trace, through an address-space policy."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..atomic import check_not_input
from ..errors import TraceFormatError
from ..lackey import iter_lackey, line_of_record
from .policy import Policy, build_machine, load_policy
from .writer import TraceWriter


#: the largest access of a native record (docs/trace-format.md)
MAX_ACCESS_SIZE = 4096


def touched_pages(path: str, *, skip_bad: bool = False, chunk_records: int = 1 << 20) -> tuple[np.ndarray, dict]:
    """Sorted unique page numbers a lackey trace touches (both pages of an
    access that crosses a page boundary), and the parse statistics."""
    pages = np.empty(0, dtype=np.uint64)
    stats: dict[str, Any] = {"lines": 0, "records": 0, "skipped_lines": 0, "bad_lines": 0,
                             "bad_examples": []}
    for chunk in iter_lackey(path, chunk_records=chunk_records, skip_bad=skip_bad):
        if len(chunk) and int(chunk.size.max()) > MAX_ACCESS_SIZE:
            # Lackey's format allows sizes up to 65535; a native record holds 1..4096.
            k = int(np.argmax(chunk.size > MAX_ACCESS_SIZE))
            index = chunk.start + k
            line, text = line_of_record(path, index, skip_bad=skip_bad)
            raise TraceFormatError(
                f"{path}:{line}: access size {int(chunk.size[k])} in {text!r} (record {index}): "
                f"expected 1..{MAX_ACCESS_SIZE} (the largest access a native trace records)")
        first = chunk.va >> np.uint64(12)
        last = (chunk.va + chunk.size.astype(np.uint64) - np.uint64(1)) >> np.uint64(12)
        pages = np.union1d(pages, np.union1d(np.unique(first), np.unique(last)))
        stats["records"] += len(chunk)
        stats["lines"] += chunk.lines
        stats["skipped_lines"] += chunk.skipped_lines
        stats["bad_lines"] += chunk.bad_lines
        if len(stats["bad_examples"]) < 20:
            stats["bad_examples"] += chunk.bad_examples[:20 - len(stats["bad_examples"])]
    return pages.astype(np.uint64), stats


def convert_lackey(src: str | os.PathLike, dst: str | os.PathLike, *,
                   policy: Policy | str | os.PathLike | None = None, skip_bad: bool = False,
                   chunk_records: int = 1 << 20) -> dict:
    """Convert a lackey trace (plain, .gz or .xz) into a native trace at ``dst``.

    Two passes over the input: the first finds the pages to map, the second
    writes the records; memory stays bounded by ``chunk_records``. Returns
    statistics (lines, records, pages mapped, bad lines skipped...).
    """
    src = os.fspath(src)
    policy_path = None if isinstance(policy, Policy) or policy is None else os.fspath(policy)
    # `convert X X` must not destroy its input: refused before anything is read or written.
    check_not_input(dst, (src, policy_path))
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    pages, stats = touched_pages(src, skip_bad=skip_bad, chunk_records=chunk_records)
    if stats["records"] == 0:
        # A trace of nothing would replay as "0 of 0 records": almost surely the wrong file.
        what = ("empty file" if stats["lines"] == 0 else
                f"no records in {stats['lines']:,} lines ({stats['skipped_lines']:,} valgrind "
                f"messages, {stats['bad_lines']:,} malformed)")
        raise TraceFormatError(f"{src}: {what}: expected a lackey trace (lines 'I  ADDR,SIZE' or "
                               "' L|S|M ADDR,SIZE') or a native pks_emu trace")
    machine, map_stats = build_machine(policy, pages)
    stats.update(map_stats)
    stats["policy"] = policy.source
    with TraceWriter(dst, machine, inputs=(src, policy_path)) as w:
        for chunk in iter_lackey(src, chunk_records=chunk_records, skip_bad=skip_bad):
            w.accesses(0, chunk.va, chunk.kind, chunk.size)
        stats["records_written"] = w.count
    return stats
