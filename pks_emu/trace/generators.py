"""``pks-emu gen NAME``: reproducible kernel-style workload traces.

Every generator takes a seed and produces the same file for the same
arguments. The workloads follow the uses the PKS series was written for
(docs/rules.md §2.6, §2.7, §2.8, §2.12):

* ``pmem-stray``: the PMEM consumer. Accesses to persistent memory happen in
  windows opened and closed with WRMSR (``pks_set_readwrite``/``noaccess``);
  stray writes outside a window must fault with PK.
* ``kmap-nesting``: ``kmap_local_page``-style windows with interrupts
  arriving inside them; the handler runs with the default PKRS, may open its
  own (nested) window, and the interrupted window is restored on exit.
* ``multi-task``: several tasks on several CPUs, each with its own rights in
  its saved PKRS, context switches and migrations; a task touching another
  task's key faults; the per-CPU cache saves WRMSRs.
* ``tlb-miss-scan``: accesses spread over a large address space so that
  nearly every access misses the TLB and walks four (or five) levels.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

from collections.abc import Callable

from ..constants import MSR_IA32_PKRS, PAGE_KERNEL_PKEY, PKS_INIT_VALUE, pkey_update_pkval
from ..machine import kernel_machine
from ..paging import AddressSpace
from .format import KEEP_CPL, RECORD, RecordType
from .writer import TraceWriter

KERNEL_DATA = 0xffff888000000000        # direct map: ordinary kernel data, key 0
PMEM_BASE = 0xffffc90000000000          # vmalloc area: protected mappings
PMEM_KEY = 1                            # PKS_KEY_PGMAP_PROTECTION with the test key off (V10)


class _RowBuffer:
    """Record tuples collected and handed to the writer in blocks."""

    def __init__(self, writer: TraceWriter) -> None:
        self.writer = writer
        self.rows: list[tuple] = []

    def add(self, row: tuple) -> None:
        self.rows.append(row)
        if len(self.rows) >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.extend(np.array(self.rows, dtype=RECORD))
            self.rows.clear()

    def __len__(self) -> int:
        """Records written or buffered so far."""
        return self.writer.count + len(self.rows)


def _map_kernel_pages(aspace: AddressSpace, pages: int) -> None:
    """``pages`` PMEM pages (key PMEM_KEY) and as many ordinary kernel data pages (key 0)."""
    for i in range(pages):
        aspace.map(PMEM_BASE + i * 4096, 0x40000000 + i * 4096, prot=PAGE_KERNEL_PKEY(PMEM_KEY))
        aspace.map(KERNEL_DATA + i * 4096, 0x10000000 + i * 4096, prot=PAGE_KERNEL_PKEY(0))


#: argument -> (lowest, highest) for the integer arguments of the generators
_INT_RANGES = {"records": (1, 1 << 40), "seed": (0, (1 << 64) - 1), "cpus": (1, 255),
               "tasks": (1, 1 << 16), "slice_accesses": (1, 1 << 30), "paging_levels": (4, 5),
               "wrmsr_every": (0, 1 << 30)}
#: pages: tlb-miss-scan maps them with map_range (page tables of 2**24 pages: 128 MiB);
#: pmem-stray maps PMEM and data pages one by one
_PAGE_RANGES = {"gen_tlb_miss_scan": (1, 1 << 24), "gen_pmem_stray": (1, 1 << 16)}
_RATES = ("stray_rate", "irq_rate", "nmi_rate", "foreign_rate")


def _checked(gen: Callable[..., dict]) -> Callable[..., dict]:
    """Refuse out-of-range or mistyped arguments with a ValueError/TypeError
    naming the argument, before any output file is created."""
    sig = inspect.signature(gen)

    @functools.wraps(gen)
    def wrapper(path, **kw):
        bound = sig.bind(path, **kw)
        bound.apply_defaults()
        for name, v in bound.arguments.items():
            if name == "path":
                continue
            if name in _INT_RANGES or name == "pages":
                lo, hi = _PAGE_RANGES[gen.__name__] if name == "pages" else _INT_RANGES[name]
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise TypeError(f"{name} = {v!r}: expected an integer {lo}..{hi}")
                if not lo <= int(v) <= hi:
                    raise ValueError(f"{name} = {v}: expected {lo}..{hi}")
            elif name in _RATES:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    raise ValueError(f"{name} = {v!r}: expected a probability 0..1")
            elif name == "random" and not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"random = {v!r}: expected True or False")
        return gen(*bound.args, **bound.kwargs)
    return wrapper


def _acc(cpu: int, va: int, kind: int, size: int = 8) -> tuple:
    return (RecordType.ACCESS, cpu, kind, 0, size, 0, 0, va, 0)


def _wrmsr(cpu: int, value: int) -> tuple:
    return (RecordType.WRMSR, cpu, 0, 0, 0, KEEP_CPL, 0, MSR_IA32_PKRS, value)


@_checked
def gen_pmem_stray(path: str, *, records: int = 1_000_000, seed: int = 0, cpus: int = 2,
                   pages: int = 64, stray_rate: float = 0.01) -> dict:
    """PMEM windows opened/closed with WRMSR, plus stray writes outside them."""
    rng = np.random.default_rng(seed)
    m, aspace = kernel_machine(cpus)
    _map_kernel_pages(aspace, pages)
    open_ = pkey_update_pkval(PKS_INIT_VALUE, PMEM_KEY, 0)
    strays = 0
    with TraceWriter(path, m) as w:
        rows = _RowBuffer(w)
        while len(rows) < records:
            cpu = int(rng.integers(cpus))
            # Ordinary kernel work between windows.
            for _ in range(int(rng.integers(4, 32))):
                rows.add(_acc(cpu, KERNEL_DATA + int(rng.integers(pages * 512)) * 8, int(rng.integers(2))))
            if rng.random() < stray_rate:
                # A stray write: the bug PKS is meant to catch.
                rows.add(_acc(cpu, PMEM_BASE + int(rng.integers(pages * 512)) * 8, 1))
                strays += 1
            rows.add(_wrmsr(cpu, open_))                       # pks_set_readwrite(PMEM_KEY)
            page = int(rng.integers(pages))
            for _ in range(int(rng.integers(4, 32))):
                rows.add(_acc(cpu, PMEM_BASE + page * 4096 + int(rng.integers(512)) * 8,
                                 int(rng.integers(2))))
            rows.add(_wrmsr(cpu, PKS_INIT_VALUE))              # pks_set_noaccess(PMEM_KEY)
        rows.flush()
        count = w.count
    return {"records": count, "stray_writes": strays}


@_checked
def gen_kmap_nesting(path: str, *, records: int = 1_000_000, seed: int = 0, cpus: int = 2,
                     irq_rate: float = 0.2, nmi_rate: float = 0.05) -> dict:
    """kmap_local windows interrupted by exceptions (and NMIs inside those)."""
    rng = np.random.default_rng(seed)
    m, aspace = kernel_machine(cpus)
    _map_kernel_pages(aspace, 16)
    open_ = pkey_update_pkval(PKS_INIT_VALUE, PMEM_KEY, 0)
    expected_faults = 0
    with TraceWriter(path, m) as w:
        rows = _RowBuffer(w)
        for cpu in range(cpus):
            rows.add((RecordType.CONTEXT_SWITCH, cpu, 0, 0, 0, KEEP_CPL, 0, 0, cpu + 1))
        while len(rows) < records:
            cpu = int(rng.integers(cpus))
            page = PMEM_BASE + int(rng.integers(16)) * 4096
            rows.add(_wrmsr(cpu, open_))                      # kmap_local_page
            rows.add(_acc(cpu, page, 1))
            if rng.random() < irq_rate:
                rows.add((RecordType.EXCEPTION_ENTRY, cpu, 0, 0, 0, KEEP_CPL, 0, 0, 0x20))
                rows.add(_acc(cpu, KERNEL_DATA + int(rng.integers(16 * 512)) * 8, 0))
                if rng.random() < 0.5:
                    # The handler touches PMEM without its own mapping: it
                    # runs with the default PKRS, so this faults.
                    rows.add(_acc(cpu, page + 8, 0))
                    expected_faults += 1
                else:
                    rows.add(_wrmsr(cpu, open_))              # nested kmap_local_page
                    rows.add(_acc(cpu, page + 16, 1))
                    if rng.random() < nmi_rate / 0.5:
                        rows.add((RecordType.EXCEPTION_ENTRY, cpu, 0, 0, 0, KEEP_CPL, 0, 0, 2))
                        rows.add(_acc(cpu, KERNEL_DATA, 0))
                        rows.add((RecordType.EXCEPTION_EXIT, cpu, 0, 0, 0, KEEP_CPL, 0, 0, 0))
                    rows.add(_acc(cpu, page + 24, 0))
                    rows.add(_wrmsr(cpu, PKS_INIT_VALUE))     # kunmap_local
                rows.add((RecordType.EXCEPTION_EXIT, cpu, 0, 0, 0, KEEP_CPL, 0, 0, 0))
            # Back in the interrupted window: the restored PKRS opens the page.
            for _ in range(int(rng.integers(1, 8))):
                rows.add(_acc(cpu, page + int(rng.integers(512)) * 8, int(rng.integers(2))))
            rows.add(_wrmsr(cpu, PKS_INIT_VALUE))             # kunmap_local
        rows.flush()
        count = w.count
    return {"records": count, "expected_faults": expected_faults}


@_checked
def gen_multi_task(path: str, *, records: int = 1_000_000, seed: int = 0, cpus: int = 4,
                   tasks: int = 8, slice_accesses: int = 200, foreign_rate: float = 0.001) -> dict:
    """Tasks with their own key rights, switched and migrated across CPUs."""
    rng = np.random.default_rng(seed)
    m, aspace = kernel_machine(cpus)
    for t in range(tasks):
        key = 1 + t % 15
        for i in range(4):
            aspace.map(PMEM_BASE + (t * 4 + i) * 4096, 0x40000000 + (t * 4 + i) * 4096,
                       prot=PAGE_KERNEL_PKEY(key))
    opened = [False] * tasks
    foreign = 0
    with TraceWriter(path, m, max_tasks=tasks) as w:
        rows = _RowBuffer(w)
        while len(rows) < records:
            cpu = int(rng.integers(cpus))
            t = int(rng.integers(tasks))
            rows.add((RecordType.CONTEXT_SWITCH, cpu, 0, 0, 0, KEEP_CPL, 0, 0, t))
            if not opened[t]:
                # The task's first run: pks_set_readwrite(its key); its
                # thread.pkrs keeps the right from then on.
                rows.add(_wrmsr(cpu, pkey_update_pkval(PKS_INIT_VALUE, 1 + t % 15, 0)))
                opened[t] = True
            base = PMEM_BASE + t * 4 * 4096
            for _ in range(slice_accesses):
                if rng.random() < foreign_rate:
                    other = (t + 1 + int(rng.integers(tasks - 1))) % tasks if tasks > 1 else t
                    if (1 + other % 15) != (1 + t % 15):
                        foreign += 1
                    rows.add(_acc(cpu, PMEM_BASE + other * 4 * 4096 + int(rng.integers(2048)) * 8, 0))
                else:
                    rows.add(_acc(cpu, base + int(rng.integers(2048)) * 8, int(rng.integers(2))))
        rows.flush()
        count = w.count
    return {"records": count, "foreign_accesses": foreign}


@_checked
def gen_tlb_miss_scan(path: str, *, records: int = 1_000_000, seed: int = 0, pages: int = 1 << 20,
                      paging_levels: int = 4, wrmsr_every: int = 100, random: bool = False) -> dict:
    """A scan over ``pages`` 4-KiB pages, one access per page, wrapping
    around: with more pages than TLB entries nearly every access misses the
    TLB and walks all levels. ``random`` visits the pages in random order
    instead, which also defeats the data caches holding the page tables."""
    rng = np.random.default_rng(seed)
    m, aspace = kernel_machine(1, paging_levels)
    base = PMEM_BASE
    aspace.map_range(base, 0x100000000, pages * 4096, pkey=PMEM_KEY, nx=True)
    open_ = pkey_update_pkval(PKS_INIT_VALUE, PMEM_KEY, 0)
    for cpu in m.cpus:
        cpu.wrmsr(MSR_IA32_PKRS, open_)
    with TraceWriter(path, m) as w:
        done = 0
        block = 1 << 20
        while done < records:
            n = min(block, records - done)
            recs = np.zeros(n, dtype=RECORD)
            recs["type"] = RecordType.ACCESS
            recs["size"] = 8
            recs["cpl"] = KEEP_CPL
            recs["op"] = rng.integers(0, 2, n)
            if random:
                page_idx = rng.integers(0, pages, n).astype(np.uint64)
            else:
                page_idx = (np.arange(done, done + n, dtype=np.uint64) % np.uint64(pages))
            recs["addr"] = np.uint64(base) + page_idx * np.uint64(4096) \
                + rng.integers(0, 512, n).astype(np.uint64) * np.uint64(8)
            if wrmsr_every:
                idx = np.arange(wrmsr_every - 1, n, wrmsr_every)
                recs["type"][idx] = RecordType.WRMSR
                recs["addr"][idx] = MSR_IA32_PKRS
                recs["value"][idx] = open_
            w.extend(recs)
            done += n
        count = w.count
    return {"records": count, "pages": pages}


GENERATORS: dict[str, Callable[..., dict]] = {
    "pmem-stray": gen_pmem_stray,
    "kmap-nesting": gen_kmap_nesting,
    "multi-task": gen_multi_task,
    "tlb-miss-scan": gen_tlb_miss_scan,
}
