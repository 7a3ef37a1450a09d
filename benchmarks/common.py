"""Shared fixtures of the asv suite: sizes, seeds, machines and rate helpers.

Sizes shrink when ``PKS_EMU_BENCH_QUICK=1`` (set by ``tests/test_benchmarks.py``,
which runs every benchmark once so that a broken one fails CI); asv runs use
the full sizes. Seeds are fixed: the same commit builds the same data.
Fixtures may be appended to, never changed, or results stop being comparable
across commits (numpy's rule for its ``benchmarks/common.py``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from pks_emu.constants import PKS_INIT_VALUE, pkey_update_pkval
from pks_emu.machine import kernel_machine
from pks_emu.trace.generators import PMEM_BASE, PMEM_KEY

QUICK = os.environ.get("PKS_EMU_BENCH_QUICK", "") not in ("", "0")

SEED = 1804169117

#: Accesses per batch call (TLB hits) and per miss batch.
BATCH_N = 10_000 if QUICK else 10_000_000
MISS_N = 8_192 if QUICK else 4_000_000
#: Pages the hit benchmarks spread over: half the default 1024-entry TLB.
HIT_PAGES = 512
#: Pages of the miss benchmarks: far more than TLB entries, so a scan misses on every access.
MISS_PAGES = 4_096 if QUICK else 1 << 20
#: Records of the replay throughput traces.
REPLAY_RECORDS = 20_000 if QUICK else 10_000_000
#: Records of the control-record traces (WRMSR, WRPKRU, context switches, exceptions).
EVENT_RECORDS = 2_000 if QUICK else 1_000_000
#: Size of the streaming trace for peakmem (issue 4: a 2 GB trace).
BIG_TRACE_BYTES = (2 << 20) if QUICK else int(os.environ.get("PKS_EMU_BENCH_BIG_MB", "2048")) << 20
#: Calls per invocation of the time_ benchmarks of single calls: asv_runner
#: >= 0.3 times every invocation of a benchmark that has a setup on its own
#: (asv#966), so a sub-microsecond call alone would measure the clock reads.
LOOP = 1000
#: Calls per timing of the single-call track_ benchmarks.
SINGLE_CALLS = 1_000 if QUICK else 200_000
#: Repeats of the track_ throughput measurements; the best is reported.
REPEATS = 1 if QUICK else 5

#: PKRS value that opens PMEM_KEY and keeps the Linux default for the others.
PKRS_OPEN = pkey_update_pkval(PKS_INIT_VALUE, PMEM_KEY, 0)

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(BENCH_DIR), "examples")


def mapped_machine(levels: int, pages: int, compat: str = "sdm"):
    """A one-CPU machine set up as the PKS series' boot leaves it (CR4.PKS,
    PKE, SMEP, SMAP, PGE; CR0.WP; EFER.NXE), with ``pages`` 4-KiB supervisor
    pages under PMEM_KEY at PMEM_BASE and PKRS opening that key: every access
    runs the full rights and key check and is allowed."""
    m, aspace = kernel_machine(1, levels, compat=compat, pkrs=PKRS_OPEN)
    aspace.map_range(PMEM_BASE, 0x100000000, pages * 4096, pkey=PMEM_KEY, nx=True)
    return m, m.cpus[0]


def scan_addresses(n: int, pages: int, seed: int = SEED,
                   order: str = "sequential") -> tuple[np.ndarray, np.ndarray]:
    """``n`` 8-byte accesses at seeded offsets, half reads and half writes,
    visiting ``pages`` pages one after the other and wrapping around: in page
    order, or in one fixed random permutation of the pages (each page still
    comes back only after all the others, so with more pages than TLB entries
    every access misses either way)."""
    rng = np.random.default_rng(seed)
    page = np.arange(n, dtype=np.uint64) % np.uint64(pages)
    if order == "random":
        page = rng.permutation(pages).astype(np.uint64)[page]
    elif order != "sequential":
        raise ValueError(f"order {order!r}: expected 'sequential' or 'random'")
    va = np.uint64(PMEM_BASE) + page * np.uint64(4096) + rng.integers(0, 512, n).astype(np.uint64) * np.uint64(8)
    kind = rng.integers(0, 2, n).astype(np.uint8)
    return va, kind


def best_seconds(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (other sessions share
    this machine, so the minimum is the figure least disturbed by them)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ns_per_call(stmt: Callable[[], object], calls: int = SINGLE_CALLS, repeats: int = REPEATS) -> float:
    """Best time of one call of ``stmt`` in ns, over ``repeats`` loops of ``calls`` calls."""
    import timeit
    return min(timeit.repeat(stmt, number=calls, repeat=max(repeats, 1))) / calls * 1e9
