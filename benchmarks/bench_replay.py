"""asv benchmarks of trace replay (issue 4): throughput, control records,
streaming memory, and ``track_`` pins of the faults found on fixed traces.

Traces are written once per run by ``setup_cache`` into asv's working folder,
with fixed seeds:

* ``hit``: one CPU scanning 512 pages (all in the TLB), reads and writes,
  one WRMSR of IA32_PKRS per 100 records (target >= 100 M accesses/s);
* ``miss4`` / ``miss5``: the same scan over 1 Mi pages, so nearly every
  access misses the TLB and walks 4 or 5 levels (target >= 20 M accesses/s);
* ``hit_events``: ``hit`` plus one context switch and one exception
  entry/exit pair per 1,000 records (handled in the compiled loop).

Throughput is accesses per second of the replay loop (``ReplayResult.elapsed``:
mapping the chunks and running the loop, the figure ``pks-emu replay``
reports), best of several runs.
"""
from __future__ import annotations

import os

import numpy as np

from pks_emu.constants import MSR_IA32_PKRS, PF_PK, PKR_WD_KEY, PKS_INIT_VALUE
from pks_emu.trace.convert import convert_lackey
from pks_emu.trace.format import KEEP_CPL, RECORD, RecordType
from pks_emu.trace.generators import gen_kmap_nesting, gen_multi_task, gen_pmem_stray, gen_tlb_miss_scan
from pks_emu.trace.replay import replay
from pks_emu.trace.writer import TraceWriter

from .common import (BIG_TRACE_BYTES, EVENT_RECORDS, EXAMPLES, HIT_PAGES, MISS_PAGES, PKRS_OPEN,
                     PMEM_KEY, REPEATS, REPLAY_RECORDS, SEED, mapped_machine, scan_addresses)

#: Records of the fixed traces whose faults the track_ pins count. Not
#: shrunk in quick mode: the pins are the same numbers everywhere.
PIN_RECORDS = 200_000


def _accesses(result) -> int:
    c = result.counters
    return sum(v for k, v in c.items() if k.startswith(("reads_", "writes_", "fetches_")))


def _best_rate(path: str) -> float:
    best = 0.0
    for _ in range(REPEATS):
        r = replay(path)
        best = max(best, _accesses(r) / r.elapsed)
    return best / 1e6


def _scan_records(n: int, pages: int, seed: int, first: int = 0) -> np.ndarray:
    va, kind = scan_addresses(first + n, pages, seed)
    recs = np.zeros(n, dtype=RECORD)
    recs["type"] = RecordType.ACCESS
    recs["op"] = kind[first:]
    recs["size"] = 8
    recs["cpl"] = KEEP_CPL
    recs["addr"] = va[first:]
    return recs


def _write_hit_events(path: str, records: int) -> None:
    """The hit scan with one context switch (tasks 0 and 1 alternating) and
    one exception entry/exit pair per 1,000 records. Every task and every
    handler runs with PMEM_KEY open (pkrs_init), so nothing faults."""
    m, _ = mapped_machine(4, HIT_PAGES)
    recs = _scan_records(records, HIT_PAGES, SEED)
    idx = np.arange(99, records, 100)
    recs["type"][idx] = RecordType.WRMSR
    recs["addr"][idx] = MSR_IA32_PKRS
    recs["value"][idx] = PKRS_OPEN
    cs = np.arange(0, records, 1000)
    recs[cs] = np.zeros(1, dtype=RECORD)
    recs["type"][cs] = RecordType.CONTEXT_SWITCH
    recs["cpl"][cs] = KEEP_CPL
    recs["value"][cs] = (cs // 1000) % 2
    entry = np.arange(500, records - 1, 1000)
    for i, t in ((entry, RecordType.EXCEPTION_ENTRY), (entry + 1, RecordType.EXCEPTION_EXIT)):
        recs[i] = np.zeros(1, dtype=RECORD)
        recs["type"][i] = t
        recs["cpl"][i] = KEEP_CPL
        recs["value"][i] = 0x20 if t == RecordType.EXCEPTION_ENTRY else 0
    with TraceWriter(path, m, max_tasks=2, pkrs_init=PKRS_OPEN) as w:
        w.extend(recs)


class ReplayThroughput:
    params = [["hit", "miss4", "miss5", "hit_events"]]
    param_names = ["trace"]
    timeout = 600

    def setup_cache(self):
        paths = {name: os.path.abspath(f"replay-{name}.pkt")
                 for name in ("hit", "miss4", "miss5", "hit_events")}
        gen_tlb_miss_scan(paths["hit"], records=REPLAY_RECORDS, seed=SEED, pages=HIT_PAGES,
                          wrmsr_every=100)
        gen_tlb_miss_scan(paths["miss4"], records=REPLAY_RECORDS, seed=SEED, pages=MISS_PAGES,
                          wrmsr_every=100)
        gen_tlb_miss_scan(paths["miss5"], records=REPLAY_RECORDS, seed=SEED, pages=MISS_PAGES,
                          paging_levels=5, wrmsr_every=100)
        _write_hit_events(paths["hit_events"], REPLAY_RECORDS)
        return paths

    def time_replay(self, paths, trace):
        replay(paths[trace])

    def track_maccess_per_s(self, paths, trace):
        return _best_rate(paths[trace])

    track_maccess_per_s.unit = "M accesses/s"

    def track_walks_per_access(self, paths, trace):
        # Pins the workloads: ~0 for the hit traces, ~1 for the miss traces.
        r = replay(paths[trace])
        return r.counters["walks"] / _accesses(r)

    track_walks_per_access.unit = "walks/access"

    def track_faults(self, paths, trace):
        # Pins the answer: none of these traces faults.
        return len(replay(paths[trace]).faults)

    track_faults.unit = "faults"


def _control_records(kind: str, n: int) -> np.ndarray:
    recs = np.zeros(n, dtype=RECORD)
    recs["cpl"] = KEEP_CPL
    closed = PKRS_OPEN | PKR_WD_KEY(PMEM_KEY)
    if kind == "wrmsr":
        recs["type"] = RecordType.WRMSR
        recs["addr"] = MSR_IA32_PKRS
        recs["value"] = np.where(np.arange(n) % 2 == 0, PKRS_OPEN, closed)
    elif kind == "wrpkru":
        recs["type"] = RecordType.WRPKRU
        recs["value"] = np.where(np.arange(n) % 2 == 0, PKS_INIT_VALUE, 0)
    elif kind in ("switch_same_pkrs", "switch_different_pkrs"):
        # Tasks 0 and 1 alternate. With different PKRS values every switch
        # writes the MSR; with the same, the per-CPU cache skips it (V8+).
        recs["type"] = RecordType.CONTEXT_SWITCH
        recs["value"] = np.arange(n) % 2
        if kind == "switch_different_pkrs":
            recs["value"][2:] = 1 - np.arange(n - 2) % 2
            recs["type"][1] = RecordType.WRMSR     # task 0 opens the key
            recs["addr"][1] = MSR_IA32_PKRS
            recs["value"][1] = PKRS_OPEN
    elif kind == "exception_pairs":
        # Task 0 runs with a PKRS other than the default: each entry loads
        # the default, each exit restores the task's value.
        recs["type"][2:] = np.where(np.arange(n - 2) % 2 == 0, RecordType.EXCEPTION_ENTRY,
                                    RecordType.EXCEPTION_EXIT)
        recs["type"][0] = RecordType.CONTEXT_SWITCH
        recs["type"][1] = RecordType.WRMSR
        recs["addr"][1] = MSR_IA32_PKRS
        recs["value"][1] = PKRS_OPEN
        if n % 2:
            recs["type"][-1] = RecordType.ACCESS     # keep the pairs balanced
            recs["size"][-1] = 8
            recs["addr"][-1] = 0xffffc90000000000
    else:
        raise ValueError(kind)
    return recs


class ReplayControlRecords:
    """Control records replayed in the compiled loop, one kind per trace."""

    params = [["wrmsr", "wrpkru", "switch_same_pkrs", "switch_different_pkrs", "exception_pairs"]]
    param_names = ["records"]
    timeout = 300

    def setup_cache(self):
        paths = {}
        for kind in self.params[0]:
            m, _ = mapped_machine(4, HIT_PAGES)
            paths[kind] = os.path.abspath(f"control-{kind}.pkt")
            with TraceWriter(paths[kind], m, max_tasks=2) as w:
                w.extend(_control_records(kind, EVENT_RECORDS))
        return paths

    def time_replay(self, paths, kind):
        replay(paths[kind])

    def track_mrecords_per_s(self, paths, kind):
        best = 0.0
        for _ in range(REPEATS):
            r = replay(paths[kind])
            best = max(best, r.records / r.elapsed)
        return best / 1e6

    track_mrecords_per_s.unit = "M records/s"

    def track_pkrs_writes_per_record(self, paths, kind):
        # Pins the rules: every WRMSR record writes the MSR; a context
        # switch writes it only when the incoming task's PKRS differs from
        # the per-CPU cache (V8+), an exception entry and exit each write it
        # when the task's value is not the default; WRPKRU never does.
        r = replay(paths[kind])
        return r.counters["wrmsr_pkrs"] / r.records

    track_pkrs_writes_per_record.unit = "WRMSR/record"


class ReplayFaultPins:
    """The faults found on fixed traces: a speed-up that changes an answer shows here."""

    timeout = 300

    def setup_cache(self):
        out = {}
        for name, gen in (("pmem_stray", gen_pmem_stray), ("kmap_nesting", gen_kmap_nesting),
                          ("multi_task", gen_multi_task)):
            path = os.path.abspath(f"pin-{name}.pkt")
            out[name] = (path, gen(path, records=PIN_RECORDS, seed=SEED))
        path = os.path.abspath("pin-lackey-example.pkt")
        convert_lackey(os.path.join(EXAMPLES, "gzip-services.lackey.xz"), path,
                       policy=os.path.join(EXAMPLES, "protect-heap.toml"))
        out["lackey_example"] = (path, {})
        return out

    @staticmethod
    def _pk_faults(path: str) -> int:
        f = replay(path).faults
        return int(np.count_nonzero((f["vector"] == 14) & ((f["error_code"] & PF_PK) != 0)))

    def track_pmem_stray_pk_faults(self, traces):
        # Every stray write outside a WRMSR window faults with PK.
        return self._pk_faults(traces["pmem_stray"][0])

    track_pmem_stray_pk_faults.unit = "faults"

    def track_kmap_nesting_faults(self, traces):
        return len(replay(traces["kmap_nesting"][0]).faults)

    track_kmap_nesting_faults.unit = "faults"

    def track_multi_task_faults(self, traces):
        return len(replay(traces["multi_task"][0]).faults)

    track_multi_task_faults.unit = "faults"

    def track_multi_task_pkrs_writes_avoided(self, traces):
        return replay(traces["multi_task"][0]).kernel["pkrs_writes_avoided"]

    track_multi_task_pkrs_writes_avoided.unit = "WRMSRs"

    def track_lackey_example_pk_faults(self, traces):
        # examples/gzip-services.lackey.xz with examples/protect-heap.toml:
        # every store to the heap (key 3, write-disabled in PKRU) faults.
        return self._pk_faults(traces["lackey_example"][0])

    track_lackey_example_pk_faults.unit = "faults"


class ReplayStreaming:
    """Peak memory of replaying a big trace: records are read through
    memory-mapped chunks of 1 Mi records (24 MiB), so the peak must not grow
    with the trace. ``peakmem_reference`` is the same process doing nothing
    (imports only), to subtract."""

    timeout = 900

    def setup_cache(self):
        path = os.path.abspath("streaming-big.pkt")
        m, _ = mapped_machine(4, HIT_PAGES)
        block = min(1 << 20, max(BIG_TRACE_BYTES // RECORD.itemsize, 1))
        recs = _scan_records(block, HIT_PAGES, SEED)
        idx = np.arange(99, block, 100)
        recs["type"][idx] = RecordType.WRMSR
        recs["addr"][idx] = MSR_IA32_PKRS
        recs["value"][idx] = PKRS_OPEN
        with TraceWriter(path, m) as w:
            while (w.count + block) * RECORD.itemsize <= BIG_TRACE_BYTES:
                w.extend(recs)
        return path

    def peakmem_replay(self, path):
        replay(path)

    def peakmem_reference(self, path):
        pass

    def track_trace_mb(self, path):
        return os.path.getsize(path) / 2**20

    track_trace_mb.unit = "MiB"


class ReplayFaultStorm:
    """A fault storm replayed (issue 11): ``pks_emu.bench.CASES["fault_storm"]``
    (64 pages, page i under key i % 16, 13 of the 16 keys access-disabled, so
    about 13/16 of the accesses fault) as a native trace, with every fault
    counted by site and the first 1000 kept (``sites``, what ``pks-emu
    replay`` does), every fault kept in memory (``memory``), or every fault
    streamed to a fault-log file (``file``). The C reference is
    ``benchmarks/calibration/batch_loops.c faults`` (``pks-emu bench``)."""
    params = ["sites", "memory", "file"]
    param_names = ["log"]
    timeout = 600

    def setup_cache(self):
        from pks_emu.bench import make_storm_trace
        path = os.path.abspath("storm.pkt")
        make_storm_trace(path, REPLAY_RECORDS // 2)
        return path

    def track_maccess_per_s(self, path, log):
        from pks_emu.bench import bench_replay_storm
        return bench_replay_storm(path, REPEATS, log)
    track_maccess_per_s.unit = "M accesses/s"

    def track_faults(self, path, log):
        # The same seeded trace: the same count whatever the log mode.
        return replay(path, log_limit=1000).fault_total
    track_faults.unit = "faults"


#: A kernel image's symbols for ReplayKernelWindows: a PMEM driver's
#: accessors and their copy routine, other code, and the entry text.
_KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81001000 T pmem_do_write
ffffffff81001100 T pmem_do_read
ffffffff81001200 T memcpy_flushcache
ffffffff81001300 T other_func
ffffffff81c00000 T __entry_text_start
ffffffff81c01000 T __entry_text_end
ffffffff81e00000 T _etext
"""
_WINDOW_POLICY = """
[kernel]
pkrs = { 4 = "no-access" }
[[region]]
phys_start = 0x40000000
phys_end = 0x44000000
pkey = 4
[[window]]
name = "pmem"
functions = ["pmem_do_write", "pmem_do_read"]
callees = ["memcpy_flushcache"]
pkey = 4
rights = "read-write"
"""


class ReplayKernelWindows:
    """A kernel capture replayed under a policy with a window (a PMEM range
    under a key that the driver's accessors open): runs of 64 records of
    other kernel code touching ordinary memory, and every 16th run the
    accessor and its callee copying to PMEM, the window opening and closing
    around them. Records whose IP stays where the window cannot change take
    the replay's hot path (``KernelMapper.window_stable``)."""
    timeout = 600

    def setup_cache(self):
        from pks_emu.trace import v2
        d = os.path.abspath("kwin")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "k.pkt2")
        syms = path + ".kallsyms"
        with open(syms, "w") as f:
            f.write(_KALLSYMS)
        policy = os.path.join(d, "pmem.toml")
        with open(policy, "w") as f:
            f.write(_WINDOW_POLICY)
        rng = np.random.default_rng(SEED)
        n = REPLAY_RECORDS // 2
        run = np.arange(n) // 64
        accessor = run % 16 == 15
        other, write, copy = 0xffffffff81001300, 0xffffffff81001000, 0xffffffff81001200
        ip = np.where(accessor, np.where(np.arange(n) % 64 < 8, write, copy), other).astype(np.uint64)
        ip += (rng.integers(0, 32, n) * 4).astype(np.uint64)
        off = (rng.integers(0, 64, n) * 4096 + rng.integers(0, 512, n) * 8).astype(np.uint64)
        pa = np.where(accessor, 0x40000000 + off, 0x1000000 + off).astype(np.uint64)
        recs = np.zeros(n, RECORD)
        recs["type"] = RecordType.ACCESS
        recs["op"] = rng.integers(0, 2, n)
        recs["size"] = 8
        recs["cpl"] = 0
        recs["addr"] = 0xff11000000000000 + pa
        hdr = v2.TraceHeaderV2(paging_levels=5, ncpus=1, maxphyaddr=40, api=10,
                               features=frozenset({"la57", "nx", "smep", "smap", "pku", "pks", "1g"}),
                               trace_flags=v2.TF_KERNEL_CAPTURE | v2.TF_HAS_PA)
        with v2.V2Writer(path, hdr) as w:
            w.write(recs, ip, pa)
        return path, policy

    def track_maccess_per_s(self, paths):
        path, policy = paths
        replay(path, policy=policy)
        best = 0.0
        for _ in range(REPEATS):
            r = replay(path, policy=policy)
            best = max(best, r.record_counts["access"] / r.elapsed / 1e6)
        return best
    track_maccess_per_s.unit = "M accesses/s"

    def track_window_opens(self, paths):
        path, policy = paths
        return replay(path, policy=policy).input_info["mapper"]["window_opens"]
    track_window_opens.unit = "opens"

    def track_faults(self, paths):
        # Every PMEM access is inside the window: none faults.
        path, policy = paths
        return replay(path, policy=policy).fault_total
    track_faults.unit = "faults"
