"""Valgrind lackey trace -> native trace, through an address-space policy."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..lackey import iter_lackey
from .policy import Policy, build_machine, load_policy
from .writer import TraceWriter


def touched_pages(path: str, *, skip_bad: bool = False, chunk_records: int = 1 << 20) -> tuple[np.ndarray, dict]:
    """Sorted unique page numbers a lackey trace touches (both pages of an
    access that crosses a page boundary), and the parse statistics."""
    pages = np.empty(0, dtype=np.uint64)
    stats: dict[str, Any] = {"lines": 0, "records": 0, "skipped_lines": 0, "bad_lines": 0,
                             "bad_examples": []}
    for chunk in iter_lackey(path, chunk_records=chunk_records, skip_bad=skip_bad):
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
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    pages, stats = touched_pages(src, skip_bad=skip_bad, chunk_records=chunk_records)
    machine, map_stats = build_machine(policy, pages)
    stats.update(map_stats)
    stats["policy"] = policy.source
    with TraceWriter(dst, machine) as w:
        for chunk in iter_lackey(src, chunk_records=chunk_records, skip_bad=skip_bad):
            w.accesses(0, chunk.va, chunk.kind, chunk.size)
        stats["records_written"] = w.count
    return stats
