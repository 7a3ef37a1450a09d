"""``pks-emu bench``: measure the core's throughput on this machine against
the project's targets (docs/benchmarks.md). Each figure is the best of
``--repeat`` runs; nothing here asserts anything."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .constants import MSR_IA32_PKRS, PKS_INIT_VALUE, pkey_update_pkval


def _best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def _kernel_cpu(levels: int = 4):
    from .machine import kernel_machine
    from .trace.generators import PMEM_BASE, PMEM_KEY
    m, aspace = kernel_machine(1, levels, pkrs=pkey_update_pkval(PKS_INIT_VALUE, PMEM_KEY, 0))
    return m, aspace, PMEM_BASE, PMEM_KEY


def bench_single_access(n: int, repeat: int) -> float:
    """ns per cpu.access() call on a TLB hit."""
    m, a, base, key = _kernel_cpu()
    a.map(base, 0x100000, pkey=key)
    cpu = m.cpus[0]
    access = cpu.access
    access(base, "read")

    def once() -> float:
        t = time.perf_counter()
        for _ in range(n):
            access(base, "read")
        return (time.perf_counter() - t) / n * 1e9
    return _best(once, repeat)


def bench_batch(n: int, repeat: int, *, miss: bool, levels: int = 4) -> float:
    """M accesses/s through access_batch: hits on 64 pages, or one access per
    page over a large mapping (every access misses the TLB and walks)."""
    from ._core import access_batch
    m, a, base, key = _kernel_cpu(levels)
    rng = np.random.default_rng(1)
    pages = n if miss else 64
    a.map_range(base, 1 << 32, pages * 4096, pkey=key)
    if miss:
        va = base + np.arange(n, dtype=np.uint64) * np.uint64(4096) + (rng.integers(0, 512, n) * 8).astype(np.uint64)
    else:
        va = base + (rng.integers(0, pages * 512, n) * 8).astype(np.uint64)
    kind = rng.integers(0, 2, n).astype(np.uint8)
    cpu = m.cpus[0]
    out = (np.empty(n, np.uint64), np.empty(n, np.int32))     # reused, as a simulator would
    access_batch(cpu, va, kind, 8, out=out)

    def once() -> float:
        cpu.flush_tlb()
        if not miss:
            access_batch(cpu, va[:4096], kind[:4096], 8)    # warm the TLB
        t = time.perf_counter()
        access_batch(cpu, va, kind, 8, out=out)
        return n / (time.perf_counter() - t) / 1e6
    return -_best(lambda: -once(), repeat)


def bench_replay(path: str, repeat: int) -> float:
    """M accesses/s replaying a native trace file (in the page cache)."""
    from .trace.replay import replay
    replay(path)

    def once() -> float:
        r = replay(path)
        return r.record_counts["access"] / r.elapsed / 1e6
    return -_best(lambda: -once(), repeat)


def make_hit_trace(path: str, accesses: int) -> None:
    """Accesses on 256 pages that fit the TLB, one WRMSR every 100 accesses."""
    from .trace.format import KEEP_CPL, RECORD, RecordType
    from .trace.writer import TraceWriter
    m, a, base, key = _kernel_cpu()
    a.map_range(base, 1 << 32, 256 * 4096, pkey=key)
    rng = np.random.default_rng(2)
    on = pkey_update_pkval(PKS_INIT_VALUE, key, 0)
    with TraceWriter(path, m) as w:
        done = 0
        while done < accesses:
            n = min(1 << 20, accesses - done)
            groups = (n + 99) // 100
            recs = np.zeros(groups * 101, dtype=RECORD)
            recs["type"] = RecordType.ACCESS
            recs["size"] = 8
            recs["cpl"] = KEEP_CPL
            recs["op"] = rng.integers(0, 2, len(recs))
            recs["addr"] = base + (rng.integers(0, 256 * 512, len(recs)) * 8).astype(np.uint64)
            wr = np.arange(0, len(recs), 101)
            recs["type"][wr] = RecordType.WRMSR
            recs["addr"][wr] = MSR_IA32_PKRS
            recs["value"][wr] = on
            w.extend(recs)
            done += groups * 100


def bench_lackey(path: str, repeat: int) -> float:
    """M lines/s parsing an uncompressed lackey file."""
    from .lackey import parse_lackey

    def once() -> float:
        t = time.perf_counter()
        tr = parse_lackey(path)
        return tr.lines / (time.perf_counter() - t) / 1e6
    return -_best(lambda: -once(), repeat)


TARGETS = {
    "access_single_ns": ("cpu.access() on a TLB hit", "ns/call", 300, "max"),
    "batch_hit": ("access_batch, TLB hits (out= arrays reused)", "M acc/s", 100, "min"),
    "batch_miss_4level": ("access_batch, every access a 4-level walk", "M acc/s", 20, "min"),
    "batch_miss_5level": ("access_batch, every access a 5-level walk", "M acc/s", None, "min"),
    "replay_hit": ("replay, TLB-resident, 1 WRMSR per 100 accesses", "M acc/s", 100, "min"),
    "replay_miss": ("replay, tlb-miss-scan (4-level walks)", "M acc/s", 20, "min"),
    "lackey_import": ("lackey import, uncompressed", "M lines/s", 5, "min"),
}
