"""The native trace format and the compiled replay loop.

The central check replays random traces in the compiled loop and compares
every fault with a plain Python re-execution of the same records through the
public CPU API, with the V10 context-switch/exception rules written out in
Python (tests/replay_model.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pks_emu
from pks_emu.constants import (CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP, EFER_NXE, MSR_IA32_PKRS, PAGE_KERNEL_PKEY, PKS_INIT_VALUE,
                               pkey_update_pkval)
from pks_emu.errors import TraceFormatError
from pks_emu.trace.format import (HEADER_SIZE, RECORD, RECORD_SIZE, RecordType, read_header,
                                  validate_records)
from pks_emu.trace.replay import machine_from_header, replay
from pks_emu.trace.writer import TraceWriter

from replay_model import python_replay

BASE = 0xffffc90000000000
USER = 0x0000000040000000


def small_machine(ncpus=2, compat="sdm", pages=8, read_only_every=0):
    """Kernel pages with keys 0..3 at BASE, user pages at USER (every
    ``read_only_every``-th one read-only), a 2-MiB page, PKS and PKE on."""
    m = pks_emu.Machine(ncpus=ncpus, compat=compat)
    a = m.address_space()
    for i in range(pages):
        a.map(BASE + i * 4096, 0x100000 + i * 4096, prot=PAGE_KERNEL_PKEY(i % 4))
        a.map(USER + i * 4096, 0x200000 + i * 4096, user=True, pkey=i % 4,
              writable=not (read_only_every and i % read_only_every == 0))
    a.map(BASE + 0x200000, 0x400000, size=2 << 20, pkey=2)
    for c in m.cpus:
        c.efer = c.efer | EFER_NXE           # PAGE_KERNEL has NX: bit 63 is reserved without NXE
        c.cr4 = c.cr4 | CR4_PKE | CR4_PKS
        c.wrmsr(MSR_IA32_PKRS, PKS_INIT_VALUE)
    a.activate()
    return m, a


def test_header_roundtrip(tmp_path):
    m, a = small_machine(3)
    m.cpus[1].cpl = 3
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m, max_tasks=7) as w:
        w.access(0, BASE, "read")
        w.wrmsr(1, MSR_IA32_PKRS, 0)
    h = read_header(path)
    assert (h.paging_levels, h.ncpus, h.compat, h.max_tasks, h.record_count) == (4, 3, "sdm", 7, 2)
    assert h.features == pks_emu.ALL_FEATURES
    assert h.cpu_states[1][5] == 3 and h.cpu_states[0][7] == PKS_INIT_VALUE
    assert h.cpu_states[0][1] == a.cr3
    assert h.memory_frames == len(m.memory.frame_addresses())
    m2 = machine_from_header(str(path), h)
    for pa in m.memory.frame_addresses():
        assert m2.memory.read(pa, 4096) == m.memory.read(pa, 4096)
    assert m2.cpus[1].cpl == 3 and m2.cpus[2].cr3 == a.cr3


def test_replay_finds_the_pk_fault_with_its_details(tmp_path):
    m, a = small_machine(1)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        w.access(0, BASE + 4096 + 8, "write")                  # key 1, AD in PKS_INIT_VALUE
        w.wrmsr(0, MSR_IA32_PKRS, pkey_update_pkval(PKS_INIT_VALUE, 1, 0))
        w.access(0, BASE + 4096 + 8, "write")                  # now allowed
        w.access(0, 0x0000800000000000, "read")                # non-canonical: #GP
        w.wrmsr(0, 0x1234, 0)                                  # unknown MSR: #GP
        w.access(0, USER + 3 * 4096, "read", cpl=3)            # user page key 3, PKRU 0: ok
        w.wrpkru(0, 0x55555555)
        w.access(0, USER + 3 * 4096, "write", cpl=3)           # PKRU AD3: PK
    r = replay(path)
    f = r.faults
    assert list(f["record"]) == [0, 3, 4, 7]
    assert list(f["vector"]) == [14, 13, 13, 14]
    assert f["error_code"][0] == pks_emu.PF_P | pks_emu.PF_W | pks_emu.PF_PK
    assert f["pkey"][0] == 1 and f["address"][0] == BASE + 4096 + 8
    assert f["error_code"][3] == pks_emu.PF_P | pks_emu.PF_W | pks_emu.PF_U | pks_emu.PF_PK
    assert f["pkey"][3] == 3 and f["kind"][3] == 1
    assert f["kind"][2] == 255 and f["address"][2] == 0x1234
    assert r.faults_by_pkey() == {1: 1, 3: 1}
    assert r.record_counts["access"] == 5 and r.record_counts["wrmsr"] == 2
    assert r.counters["wrmsr_pkrs"] == 1 and r.counters["wrpkru"] == 1


def test_context_switch_uses_the_per_cpu_cache(tmp_path):
    m, a = small_machine(1)
    open1 = pkey_update_pkval(PKS_INIT_VALUE, 1, 0)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m, max_tasks=4) as w:
        w.context_switch(0, 1)                 # task 1 has PKS_INIT_VALUE = cache: avoided
        w.wrmsr(0, MSR_IA32_PKRS, open1)       # task 1 opens key 1
        w.context_switch(0, 2)                 # task 2: init value, differs: WRMSR
        w.access(0, BASE + 4096, "read")       # key 1 closed for task 2: fault
        w.context_switch(0, 1)                 # back to task 1: WRMSR of open1
        w.access(0, BASE + 4096, "read")       # ok
        w.context_switch(0, 1)                 # same value: avoided
    r = replay(path)
    assert list(r.faults["record"]) == [3]
    assert r.kernel["context_switches"] == 4
    assert r.kernel["pkrs_writes"] == 2 and r.kernel["pkrs_writes_avoided"] == 2


def test_exception_saves_and_restores_pkrs_nested(tmp_path):
    m, a = small_machine(1)
    open1 = pkey_update_pkval(PKS_INIT_VALUE, 1, 0)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        w.context_switch(0, 5)
        w.wrmsr(0, MSR_IA32_PKRS, open1)
        w.exception_entry(0, 14)
        w.access(0, BASE + 4096, "read")                      # handler: default PKRS, fault
        w.wrmsr(0, MSR_IA32_PKRS, open1)                      # handler opens its own window
        w.exception_entry(0, 2)                               # nested NMI
        w.access(0, BASE + 4096, "read")                      # default again: fault
        w.exception_exit(0)
        w.access(0, BASE + 4096, "read")                      # handler's window restored: ok
        w.exception_exit(0)
        w.access(0, BASE + 4096 + 8, "write")                 # task's window restored: ok
    r = replay(path)
    assert list(r.faults["record"]) == [3, 6]
    assert r.kernel["exceptions"] == 2 and r.kernel["max_exception_depth"] == 2


def test_exception_exit_without_entry_is_bad_input(tmp_path):
    m, _ = small_machine(1)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        w.access(0, BASE, "read")
        w.exception_exit(0)
    with pytest.raises(TraceFormatError, match=r"t\.pkt: record 1: exception exit without a matching entry"):
        replay(path)


def test_pte_write_without_invlpg_is_stale_until_flushed(tmp_path):
    m, a = small_machine(1)
    ea, entry, _ = a.lookup(BASE)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        w.access(0, BASE, "read")                             # key 0: fills the TLB
        w.pte_write(ea, (entry & ~(0xF << 59)) | (1 << 59))   # key 1 (AD) in memory
        w.access(0, BASE, "read")                             # stale TLB entry: still ok
        w.invlpg(0, BASE)
        w.access(0, BASE, "read")                             # fresh walk: key 1, fault
    r = replay(path)
    assert list(r.faults["record"]) == [4] and r.faults["pkey"][0] == 1


def test_stop_on_fault_and_max_faults(tmp_path):
    m, _ = small_machine(1)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        for i in range(10):
            w.access(0, BASE + 4096, "read")                  # all fault (key 1 AD)
            w.access(0, BASE, "read")
    r = replay(path, stop_on_fault=True)
    assert len(r.faults) == 1 and r.stopped_early and r.records_replayed == 1
    r = replay(path, max_faults=3)
    assert len(r.faults) == 3 and r.records_replayed == 5
    r = replay(path)
    assert len(r.faults) == 10 and not r.stopped_early and r.records_replayed == 20


def random_trace(path, accesses, seed, *, switch_every=0, wrmsr_every=23):
    """Random accesses on two CPUs with PKRS writes (and context switches)."""
    m, _ = small_machine(2)
    rng = np.random.default_rng(seed)
    with TraceWriter(path, m, max_tasks=3) as w:
        for i in range(accesses):
            cpu = int(rng.integers(2))
            w.access(cpu, BASE + int(rng.integers(8)) * 4096, int(rng.integers(3)))
            if switch_every and i % switch_every == 0:
                w.context_switch(cpu, int(rng.integers(3)))
            if i % wrmsr_every == 0:
                w.wrmsr(cpu, MSR_IA32_PKRS, int(rng.integers(1 << 32)))


def test_chunking_does_not_change_the_result(tmp_path):
    path = tmp_path / "t.pkt"
    random_trace(path, 300, 5, switch_every=17)
    whole = replay(path)
    for chunk in (1, 7, 64):
        part = replay(path, chunk_records=chunk)
        assert np.array_equal(part.faults, whole.faults)
        assert part.counters == whole.counters and part.kernel == whole.kernel


def storm_trace(path, accesses, seed, *, events=True):
    """A fault storm on one CPU: random reads and writes over 16 kernel
    pages under keys 0..3 of which PKRS denies some, so the same pages fault
    again and again (the replay answers those from the walk memo). With
    ``events``: every few records an INVLPG and a walk of an allowed page
    (paging-structure-cache entries made between two faults of a page), a
    PTE write without INVLPG that changes a page's key (the memo must notice
    the changed word), or a new PKRS."""
    m, a = small_machine(1, pages=16)
    m.cpus[0].wrmsr(MSR_IA32_PKRS, pkey_update_pkval(0, 1, 1) | pkey_update_pkval(0, 2, 1)
                    | pkey_update_pkval(0, 3, 2))
    rng = np.random.default_rng(seed)
    with TraceWriter(path, m) as w:
        for i in range(accesses):
            w.access(0, BASE + int(rng.integers(16)) * 4096 + 8 * int(rng.integers(512)),
                     int(rng.integers(2)))
            if not events:
                continue
            e = int(rng.integers(40))
            if e == 0:
                w.invlpg(0, BASE)
                w.access(0, BASE, "read")
            elif e == 1:
                page = int(rng.integers(16))
                ea, pte, _ = a.lookup(BASE + page * 4096)
                w.pte_write(ea, (pte & ~(0xF << 59)) | (int(rng.integers(4)) << 59))
            elif e == 2:
                w.wrmsr(0, MSR_IA32_PKRS, int(rng.integers(1 << 8)))


@pytest.mark.parametrize("events", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_a_replayed_fault_storm_matches_the_full_path(tmp_path, events, seed):
    """Faults answered in the replay loop from the walk memo leave the same
    log, counters (TLB, walks, paging-structure caches) and fault sites as
    the full path (one record per chunk never takes the replay's hot path)."""
    path = tmp_path / "storm.pkt"
    storm_trace(path, 3000, seed, events=events)
    whole = replay(path, log_limit=0)
    single = replay(path, chunk_records=1, log_limit=0)
    assert whole.fault_total > 1000
    assert np.array_equal(whole.faults, single.faults)
    assert whole.counters == single.counters
    assert whole.sites.to_dict() == single.sites.to_dict()
    want_faults, _ = python_replay(str(path))
    assert [tuple(int(x) for x in f) for f in whole.faults] == want_faults


@pytest.mark.parametrize("cr4_extra", [0, CR4_SMEP, CR4_SMEP | CR4_SMAP])
def test_a_fault_storm_in_every_mode_matches_the_full_path(tmp_path, cr4_extra):
    """Repeated faults of every kind (fetches too), at CPL 0 and 3, implicit
    or not, on kernel and user pages, under SMEP and SMAP or not: the error
    codes the replay loop builds for faults it answers from the walk memo
    (W/R, U/S, I/D, PK) are those of the full path and the Python model."""
    m, a = small_machine(1, pages=8)
    c = m.cpus[0]
    c.cr4 = c.cr4 | cr4_extra
    c.wrmsr(MSR_IA32_PKRS, pkey_update_pkval(0, 1, 1) | pkey_update_pkval(0, 3, 2))
    c.wrpkru(0x000000C4)                 # key 1: WD, key 3: AD
    rng = np.random.default_rng(7)
    path = tmp_path / "modes.pkt"
    with TraceWriter(path, m) as w:
        cpl = 0
        for i in range(4000):
            if rng.integers(50) == 0:
                cpl = 3 - cpl
                w.access(0, BASE, "read", cpl=cpl)
            base = USER if rng.integers(2) else BASE
            w.access(0, base + int(rng.integers(8)) * 4096 + 8 * int(rng.integers(512)),
                     int(rng.integers(3)), implicit=bool(rng.integers(8) == 0))
    whole = replay(path, log_limit=0)
    single = replay(path, chunk_records=1, log_limit=0)
    assert whole.fault_total > 1000
    codes = {int(f["error_code"]) for f in whole.faults}
    assert {0x21, 0x23, 0x25, 0x27} <= codes       # PK faults: R and W, S and U
    assert {0x11, 0x15} <= codes                   # fetches report I/D (NXE=1)
    assert ({0x1, 0x3} <= codes) == bool(cr4_extra & CR4_SMAP)   # SMAP: kernel reads/writes of user pages
    assert np.array_equal(whole.faults, single.faults)
    assert whole.counters == single.counters
    assert whole.sites.to_dict() == single.sites.to_dict()
    want_faults, _ = python_replay(str(path))
    assert [tuple(int(x) for x in f) for f in whole.faults] == want_faults


def _miss_trace(path, n=6000, seed=5):
    """Accesses that mostly miss a 32-entry TLB: 256 kernel and 64 user pages
    (keys 0..3, every 5th kernel page read-only), holes, page-crossing and
    non-canonical accesses, every kind, CPL changes, implicit accesses."""
    m = pks_emu.Machine(ncpus=1, tlb_entries=32)
    a = m.address_space()
    for i in range(256):
        if i % 17 != 3:                                       # holes: not present
            a.map(BASE + i * 4096, 0x100000 + i * 4096, writable=i % 5 != 0, pkey=i % 4)
    for i in range(64):
        a.map(USER + i * 4096, 0x300000 + i * 4096, user=True, pkey=i % 4)
    c = m.cpus[0]
    c.efer = c.efer | EFER_NXE
    c.cr4 = c.cr4 | CR4_PKE | CR4_PKS | CR4_SMEP | CR4_SMAP
    c.wrmsr(MSR_IA32_PKRS, pkey_update_pkval(0, 1, 2) | pkey_update_pkval(0, 3, 1))  # 1 WD, 3 AD
    c.wrpkru(0x00000004)                                      # key 1: AD
    a.activate()
    rng = np.random.default_rng(seed)
    with TraceWriter(path, m) as w:
        cpl = 0
        for _ in range(n):
            if rng.integers(200) == 0:
                cpl = 3 - cpl
                w.access(0, USER, "read", cpl=cpl)
            pick = int(rng.integers(40))
            if pick == 0:
                va = 0x0000800000000000 + int(rng.integers(1 << 20)) * 8      # non-canonical
            elif pick < 8:
                va = USER + int(rng.integers(64)) * 4096 + 8 * int(rng.integers(512))
            else:
                va = BASE + int(rng.integers(256)) * 4096 + 8 * int(rng.integers(512))
            size = int(rng.choice([1, 8, 8, 8, 16, 64]))
            if rng.integers(30) == 0:
                va = (va | 0xFFF) - 3                                   # crosses into the next page
            w.access(0, va, int(rng.integers(3)), size, implicit=bool(rng.integers(10) == 0))
    return m


def test_tlb_misses_in_the_hot_path_match_one_record_at_a_time(tmp_path):
    """A trace without a kernel mapper runs its TLB misses from the hot path
    (ReplayEngine._miss) rather than _step: the same faults, error codes,
    counters and sites as one record at a time, and as the Python model."""
    path = tmp_path / "misses.pkt"
    _miss_trace(path)
    whole = replay(path, log_limit=0)
    single = replay(path, chunk_records=1, log_limit=0)
    assert whole.counters["tlb_misses"] > 0.6 * whole.record_counts["access"]
    codes = {int(f["error_code"]) for f in whole.faults}
    assert {0x0, 0x2, 0x3, 0x21, 0x23} <= codes      # not present, R/W, PK (R and W)
    assert {13, 14} == {int(v) for v in whole.faults["vector"]}
    assert np.array_equal(whole.faults, single.faults)
    assert whole.counters == single.counters
    assert whole.sites.to_dict() == single.sites.to_dict()
    want_faults, _ = python_replay(str(path))
    assert [tuple(int(x) for x in f) for f in whole.faults] == want_faults
    # max_faults stops at the same record either way
    a = replay(path, max_faults=555)
    b = replay(path, max_faults=555, chunk_records=1)
    assert a.stopped_early and a.fault_total == 555
    assert a.records_replayed == b.records_replayed and a.counters == b.counters


def test_an_invalid_size_after_hot_path_misses_is_reported_as_one_record_at_a_time(tmp_path):
    path = tmp_path / "bad.pkt"
    _miss_trace(path, n=500)
    data = bytearray(path.read_bytes())
    h = read_header(path)
    last = len(data) - RECORD_SIZE
    rec = np.frombuffer(bytes(data[last:]), dtype=RECORD)[0]
    assert int(rec["type"]) == RecordType.ACCESS
    data[last + 4:last + 6] = (0).to_bytes(2, "little")        # size 0
    path.write_bytes(bytes(data))
    assert h.record_count > 500
    errors = []
    for chunk in (1 << 16, 1):
        with pytest.raises(TraceFormatError) as e:
            replay(path, chunk_records=chunk)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "size" in errors[0]


def test_max_faults_stops_a_fault_storm_at_the_same_record(tmp_path):
    path = tmp_path / "storm.pkt"
    storm_trace(path, 2000, 3, events=False)
    whole = replay(path, max_faults=777)
    single = replay(path, max_faults=777, chunk_records=1)
    assert whole.stopped_early and whole.fault_total == 777
    assert whole.records_replayed == single.records_replayed
    assert whole.counters == single.counters


# --- differential test against the Python model -------------------------------

record_st = st.one_of(
    st.tuples(st.just("access"), st.integers(0, 1), st.sampled_from([BASE, USER, BASE + 0x200000]),
              st.integers(0, 9), st.integers(0, 2), st.sampled_from([None, 0, 3]), st.booleans(),
              st.sampled_from([1, 8, 16])),
    st.tuples(st.just("wrmsr"), st.integers(0, 1), st.sampled_from([MSR_IA32_PKRS, 0x10]),
              st.integers(0, (1 << 32) - 1) | st.just(1 << 40)),
    st.tuples(st.just("wrpkru"), st.integers(0, 1), st.integers(0, (1 << 32) - 1), st.sampled_from([0, 0, 1])),
    st.tuples(st.just("invlpg"), st.integers(0, 1), st.integers(0, 9)),
    st.tuples(st.just("pte"), st.integers(0, 9), st.integers(0, 15)),
    st.tuples(st.just("switch"), st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.just("entry"), st.integers(0, 1)),
    st.tuples(st.just("exit"), st.integers(0, 1)),
    st.tuples(st.just("cr4"), st.integers(0, 1), st.booleans()),
)


class _Depths:
    """Exception depth of the task running on each CPU (frames belong to
    tasks: a task switched in inside a handler has a stack of its own)."""

    def __init__(self, ncpus: int) -> None:
        self.current: list = [("boot", c) for c in range(ncpus)]
        self.depth: dict = {}

    def __getitem__(self, cpu: int) -> int:
        return self.depth.get(self.current[cpu], 0)

    def __setitem__(self, cpu: int, value: int) -> None:
        self.depth[self.current[cpu]] = value


def _write(w, a, rec, depth):
    kind = rec[0]
    if kind == "access":
        _, cpu, base, page, k, cpl, implicit, size = rec
        w.access(cpu, base + page * 4096 + 4090 * (size == 16), k, size, cpl=cpl, implicit=implicit)
    elif kind == "wrmsr":
        w.wrmsr(rec[1], rec[2], rec[3])
    elif kind == "wrpkru":
        w.wrpkru(rec[1], rec[2], ecx=rec[3])
    elif kind == "invlpg":
        w.invlpg(rec[1], BASE + rec[2] * 4096)
    elif kind == "pte":
        found = a.lookup(BASE + rec[1] * 4096)
        if found:
            ea, e, _ = found
            w.pte_write(ea, (e & ~(0xF << 59)) | (rec[2] << 59))
    elif kind == "switch":
        w.context_switch(rec[1], rec[2])
        depth.current[rec[1]] = rec[2]
    elif kind == "entry":
        w.exception_entry(rec[1])
        depth[rec[1]] += 1
    elif kind == "exit":
        if depth[rec[1]]:
            w.exception_exit(rec[1])
            depth[rec[1]] -= 1
    elif kind == "cr4":
        w.mov_cr(rec[1], 4, (0x20 | CR4_PKE | CR4_PKS) if rec[2] else 0x20)


@settings(max_examples=60, deadline=None)
@given(st.lists(record_st, min_size=1, max_size=60), st.sampled_from(["sdm", "qemu"]))
def test_compiled_replay_matches_python_replay(tmp_path_factory, recs, compat):
    m, a = small_machine(2, compat, pages=10, read_only_every=3)
    path = tmp_path_factory.mktemp("r") / "t.pkt"
    depth = _Depths(2)
    with TraceWriter(path, m, max_tasks=4) as w:
        for rec in recs:
            _write(w, a, rec, depth)
    got = replay(path)
    want_faults, want_kernel = python_replay(str(path))
    assert [tuple(int(x) for x in f) for f in got.faults] == want_faults
    for k, v in want_kernel.items():
        assert got.kernel[k] == v, k


# Runs of access records with the same header but the kind (the replay's
# hot path takes the second and later ones), between control records that
# change CPL, EFLAGS.AC, the keys and the TLB under it.
run_st = st.tuples(st.just("run"), st.integers(0, 1), st.sampled_from([BASE, USER]),
                   st.sampled_from([None, 0, 3]), st.booleans(), st.sampled_from([1, 8, 16]),
                   st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2)), min_size=1, max_size=12))


@settings(max_examples=60, deadline=None)
@given(st.lists(run_st | record_st, min_size=1, max_size=30), st.sampled_from(["sdm", "qemu"]))
def test_hot_path_matches_the_full_path(tmp_path_factory, recs, compat):
    # One record per chunk runs every record through the full path.
    m, a = small_machine(2, compat, pages=10, read_only_every=3)
    path = tmp_path_factory.mktemp("r") / "t.pkt"
    depth = _Depths(2)
    with TraceWriter(path, m, max_tasks=4) as w:
        for rec in recs:
            if rec[0] == "run":
                _, cpu, base, cpl, implicit, size, steps = rec
                for page, k in steps:
                    _write(w, a, ("access", cpu, base, page, k, cpl, implicit, size), depth)
            else:
                _write(w, a, rec, depth)
    whole = replay(path)
    single = replay(path, chunk_records=1)
    assert np.array_equal(whole.faults, single.faults)
    assert whole.counters == single.counters and whole.kernel == single.kernel
    assert whole.sites.to_dict() == single.sites.to_dict()
    want_faults, _ = python_replay(str(path))
    assert [tuple(int(x) for x in f) for f in whole.faults] == want_faults


# --- bad input ---------------------------------------------------------------

def _good_trace(tmp_path, n=3):
    m, _ = small_machine(1)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        for _ in range(n):
            w.access(0, BASE, "read")
    return path


def _poke(path, index, field, value):
    h = read_header(path)
    data = bytearray(path.read_bytes())
    recs = np.frombuffer(data, dtype=RECORD, count=h.record_count, offset=h.records_offset).copy()
    recs[index][field] = value
    data[h.records_offset:] = recs.tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("field,value,message", [
    ("type", 42, "record 1: unknown record type 42"),
    ("cpu", 3, "record 1: CPU 3 out of range (the trace has 1)"),
    ("op", 7, "record 1: access kind 7"),
    ("size", 0, "record 1: access size 0"),
    ("size", 5000, "record 1: access size 5000"),
    ("cpl", 9, "record 1: CPL 9"),
])
def test_bad_records_name_file_and_index(tmp_path, field, value, message):
    path = _good_trace(tmp_path)
    _poke(path, 1, field, value)
    with pytest.raises(TraceFormatError, match=str(path.name) + ": " + message.replace("(", r"\(").replace(")", r"\)")):
        replay(path)


@pytest.mark.parametrize("size", [0, 4097, 65535])
def test_bad_size_after_a_hot_record(tmp_path, size):
    """Record 1 has the hot path's key (record 0's type, CPU, flags, CPL) and
    its page in the TLB, mid-page: the size alone must send it back to the
    checks."""
    m, _ = small_machine(1)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        for _ in range(3):
            w.access(0, BASE + 0x800, "read")
    _poke(path, 1, "size", size)
    with pytest.raises(TraceFormatError, match=f"record 1: access size {size}: expected 1..4096"):
        replay(path)


def test_sizes_on_the_hot_path(tmp_path):
    """Sizes vary from record to record (as in lackey traces) on one key:
    in-page ones up to 4096 run hot, a crossing one is checked on both pages,
    and the results are those of one record at a time."""
    m, _ = small_machine(1, pages=2)
    path = tmp_path / "t.pkt"
    accesses = [(BASE, 4096), (BASE + 8, 1), (BASE + 0x800, 2048), (BASE + 0xFF8, 8),
                (BASE + 4096 + 0xFFC, 8), (BASE + 0x10, 4), (BASE + 0xFFF, 2), (BASE + 4096, 4096)]
    with TraceWriter(path, m) as w:
        for va, size in accesses * 3:
            w.access(0, va, "read", size)
    whole = replay(path)
    one = replay(path, chunk_records=1)
    # page 1 has key 1, access-disabled: the crossing access and the two on page 1
    assert whole.fault_count == one.fault_count == 9
    assert [tuple(f) for f in whole.faults] == [tuple(f) for f in one.faults]
    assert [int(f[0]) % 8 for f in whole.faults] == [4, 6, 7] * 3
    assert whole.per_cpu == one.per_cpu


def test_bad_context_switch_task(tmp_path):
    m, _ = small_machine(1)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m, max_tasks=2) as w:
        w.access(0, BASE, "read")
    h = read_header(path)
    data = bytearray(path.read_bytes())
    rec = np.zeros(1, dtype=RECORD)
    rec["type"] = RecordType.CONTEXT_SWITCH
    rec["value"] = 5
    data[h.records_offset:h.records_offset + RECORD_SIZE] = rec.tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="record 0: task id 5 out of range"):
        replay(path)


def test_wrong_magic_newer_version_truncated_trailing(tmp_path):
    path = _good_trace(tmp_path)
    good = path.read_bytes()
    path.write_bytes(b"NOTATRACE" + good[9:])
    with pytest.raises(TraceFormatError, match="not a pks_emu trace"):
        replay(path)
    path.write_bytes(good[:8] + (99).to_bytes(2, "little") + good[10:])
    with pytest.raises(TraceFormatError, match="version 99 is newer"):
        replay(path)
    path.write_bytes(good[:-5])
    with pytest.raises(TraceFormatError, match="truncated: header promises 3 records, file holds 2"):
        replay(path)
    path.write_bytes(good + b"xyz")
    with pytest.raises(TraceFormatError, match="3 trailing bytes"):
        replay(path)
    path.write_bytes(good[:HEADER_SIZE - 10])
    with pytest.raises(TraceFormatError, match="truncated header"):
        replay(path)


def test_validate_records_names_first_bad_index():
    h = read_header.__globals__["TraceHeader"](ncpus=2)
    recs = np.zeros(5, dtype=RECORD)
    recs["size"] = 8
    recs["cpu"][3] = 2
    with pytest.raises(TraceFormatError, match="x.pkt: record 13: CPU 2 out of range"):
        validate_records("x.pkt", recs, 10, h)


def test_writer_rejects_bad_arguments(tmp_path):
    m, _ = small_machine(1)
    with TraceWriter(tmp_path / "t.pkt", m) as w:
        with pytest.raises(ValueError, match="CPU 1 out of range"):
            w.access(1, BASE, "read")
        with pytest.raises(ValueError, match="access size 0"):
            w.access(0, BASE, "read", 0)
        with pytest.raises(ValueError, match="MOV to CR2"):
            w.mov_cr(0, 2, 0)
        with pytest.raises(ValueError, match="not 8-byte aligned"):
            w.pte_write(0x1003, 0)


def test_cpu_access_batch_method_matches_translate():
    m, _ = small_machine(1)
    cpu = m.cpus[0]
    va = np.array([BASE, BASE + 4096, BASE + 8 * 4096, 0x0000800000000000, USER], dtype=np.uint64)
    kind = np.array([0, 1, 0, 0, 1], dtype=np.uint8)
    pa, err = cpu.access_batch(va, kind, 8)
    m2, _ = small_machine(1)
    for i in range(len(va)):
        t = m2.cpus[0].translate(int(va[i]), int(kind[i]), 8)
        if t.ok:
            assert err[i] == -1 and pa[i] == t.pa
        else:
            assert err[i] == (-2 if t.vector == 13 else t.error_code) and pa[i] == 0


def test_replay_records_in_memory_matches_the_file_and_keeps_state(tmp_path):
    from pks_emu.trace.replay import replay_records
    path = tmp_path / "t.pkt"
    random_trace(path, 400, 11, wrmsr_every=13)
    from_file = replay(path)
    h = read_header(path)
    recs = np.fromfile(path, dtype=RECORD, count=h.record_count, offset=h.records_offset)
    m2 = machine_from_header(str(path), h)
    whole = replay_records(m2, recs)
    assert np.array_equal(whole.faults, from_file.faults) and whole.counters == from_file.counters
    # In two chunks on one machine: the registers carry over, the fault
    # records are numbered per call.
    m3 = machine_from_header(str(path), h)
    half = len(recs) // 2
    first = replay_records(m3, recs[:half])
    second = replay_records(m3, recs[half:])
    assert len(first.faults) and len(second.faults)
    joined = np.concatenate([first.faults["record"], second.faults["record"] + half])
    assert np.array_equal(joined, from_file.faults["record"])
    bad = recs[:3].copy()
    bad["cpu"][1] = 9
    with pytest.raises(TraceFormatError, match="<records>: record 1: CPU 9 out of range"):
        replay_records(m3, bad)
