"""Replaying a native trace: build the machine from the header, load the
initial memory, then run the compiled loop over memory-mapped chunks."""
from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .._core import FAULT_DTYPE_FIELDS, REPLAY_STATUS, ReplayEngine, load_cpu_state
from ..constants import pf_error_code_str
from ..errors import TraceFormatError
from ..machine import Machine
from .format import (FRAME_ENTRY_SIZE, FRAME_SIZE, MAX_TASKS_LIMIT, RECORD, RECORD_SIZE,
                     RecordType, TraceHeader, read_header, validate_records)

FAULT_DTYPE = np.dtype(FAULT_DTYPE_FIELDS)
VECTOR_NAMES = {6: "#UD", 13: "#GP", 14: "#PF"}
KIND_NAMES = {0: "read", 1: "write", 2: "fetch", 255: "insn"}

# MAP_POPULATE maps the whole chunk in one go instead of one page fault per
# 4 KiB, which otherwise costs a third of the replay time.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

#: Default chunk: 1 Mi records (24 MiB mapped at a time).
DEFAULT_CHUNK = 1 << 20


@dataclass
class ReplayResult:
    """What a replay found. ``faults`` holds every fault, in record order."""

    path: str
    records: int
    records_replayed: int
    stopped_early: bool
    elapsed: float
    faults: np.ndarray
    per_cpu: list[dict[str, int]]
    record_counts: dict[str, int]
    kernel: dict[str, int]
    header: dict = field(default_factory=dict)
    #: with ``stale_check``: TLB hits that the page tables no longer agreed
    #: with (the newest 4096 per CPU; ``counters["stale_uses"]`` counts all)
    stale_uses: list[dict] = field(default_factory=list)

    @property
    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in self.per_cpu:
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        return total

    def faults_by_error_code(self) -> dict[int, int]:
        pf = self.faults[self.faults["vector"] == 14]
        codes, counts = np.unique(pf["error_code"], return_counts=True)
        return {int(c): int(n) for c, n in zip(codes, counts)}

    def faults_by_pkey(self) -> dict[int, int]:
        pk = self.faults[(self.faults["vector"] == 14) & ((self.faults["error_code"] & 0x20) != 0)]
        keys, counts = np.unique(pk["pkey"], return_counts=True)
        return {int(k): int(n) for k, n in zip(keys, counts)}

    def faults_by_vector(self) -> dict[str, int]:
        vecs, counts = np.unique(self.faults["vector"], return_counts=True)
        return {VECTOR_NAMES.get(int(v), str(int(v))): int(n) for v, n in zip(vecs, counts)}

    def to_dict(self, max_faults_listed: int | None = 1000) -> dict:
        """The stable JSON schema (docs/cli.md, schema version 1)."""
        listed = self.faults if max_faults_listed is None else self.faults[:max_faults_listed]
        c = self.counters
        accesses = sum(v for k, v in c.items() if k.startswith(("reads_", "writes_", "fetches_")))
        return {
            "schema": "pks-emu-replay/1",
            "trace": self.path,
            "header": self.header,
            "records": self.records,
            "records_replayed": self.records_replayed,
            "stopped_early": self.stopped_early,
            "elapsed_seconds": self.elapsed,
            "accesses": accesses,
            "accesses_per_second": accesses / self.elapsed if self.elapsed > 0 else None,
            "record_counts": self.record_counts,
            "counters": c,
            "per_cpu": self.per_cpu,
            "kernel": self.kernel,
            "fault_count": int(len(self.faults)),
            "faults_by_vector": self.faults_by_vector(),
            "faults_by_error_code": {f"{k:#x}": v for k, v in self.faults_by_error_code().items()},
            "faults_by_pkey": {str(k): v for k, v in self.faults_by_pkey().items()},
            "faults": [fault_to_dict(f) for f in listed],
            "faults_listed": int(len(listed)),
            "stale_uses": [{k: (f"{v:#x}" if k.endswith(("va", "_pa")) and v is not None else v)
                            for k, v in u.items()} for u in self.stale_uses[:1000]],
        }


def fault_to_dict(f) -> dict:
    vector = int(f["vector"])
    d: dict[str, object] = {"record": int(f["record"]), "cpu": int(f["cpu"]), "vector": VECTOR_NAMES.get(vector, vector),
         "kind": KIND_NAMES.get(int(f["kind"]), int(f["kind"])), "address": f"{int(f['address']):#x}",
         "error_code": int(f["error_code"])}
    if vector == 14:
        d["error_code_bits"] = pf_error_code_str(int(f["error_code"]))
        d["pkey"] = int(f["pkey"]) if int(f["pkey"]) >= 0 else None
    return d


def machine_from_header(path: str, header, compat: str | None = None) -> Machine:
    """The machine a trace runs on, with its initial registers and memory
    (``compat`` overrides the header's semantics: "sdm" or "qemu")."""
    m = Machine(paging_levels=header.paging_levels, ncpus=header.ncpus, features=header.features,
                compat=compat or header.compat, maxphyaddr=header.maxphyaddr, tlb_entries=header.tlb_entries)
    for i, state in enumerate(header.cpu_states):
        problem = load_cpu_state(m.cpus[i], *state)
        if problem:
            raise TraceFormatError(f"{path}: initial state of CPU {i}: {problem}")
    with open(path, "rb") as f:
        f.seek(header.memory_offset)
        for i in range(header.memory_frames):
            entry = f.read(FRAME_ENTRY_SIZE)
            if len(entry) < FRAME_ENTRY_SIZE:
                raise TraceFormatError(f"{path}: memory image truncated at frame {i}")
            pa = int.from_bytes(entry[:8], "little")
            if pa % FRAME_SIZE or pa >= 1 << 52:
                raise TraceFormatError(
                    f"{path}: memory image frame {i} at {pa:#x}: expected a 4-KiB aligned address below 2**52")
            m.memory.write(pa, entry[8:])
    return m


def replay(path: str | os.PathLike, *, max_faults: int | None = None, stop_on_fault: bool = False,
           chunk_records: int = DEFAULT_CHUNK,
           progress: Callable[[int, int], None] | None = None,
           machine: Machine | None = None, compat: str | None = None,
           stale_check: bool = False) -> ReplayResult:
    """Replay the native trace at ``path``.

    ``max_faults``/``stop_on_fault`` stop the replay after that many faults
    (every fault up to then is kept). ``progress(done, total)`` is called
    after each chunk. Records are read through a memory map one chunk at a
    time, so memory stays bounded whatever the trace size. Pass ``machine``
    to replay on a machine you built (it must match the header), or
    ``compat`` to replay under other semantics than the header's.
    ``stale_check`` compares every TLB hit with a fresh walk and reports the
    hits that used a translation the page tables no longer hold (a PTE write
    without INVLPG); it slows the replay down several times.
    """
    path = os.fspath(path)
    header = read_header(path)
    if machine is not None and (machine.ncpus, machine.paging_levels) != (header.ncpus, header.paging_levels):
        raise ValueError(f"{path}: the trace needs {header.ncpus} CPU(s) and {header.paging_levels}-level "
                         f"paging; the machine given has {machine.ncpus} and {machine.paging_levels}-level")
    if chunk_records < 1:
        raise ValueError(f"chunk_records {chunk_records} must be positive")
    if compat is not None and compat not in ("sdm", "qemu"):
        raise ValueError(f"compat {compat!r}: expected 'sdm' or 'qemu'")
    m = machine if machine is not None else machine_from_header(path, header, compat)
    limit = 1 if stop_on_fault else (max_faults or 0)
    engine = ReplayEngine(m, max_tasks=header.max_tasks, pkrs_init=header.pkrs_init,
                          max_faults=limit)
    for cpu in m.cpus:
        cpu.reset_counters()
        cpu.stale_check = stale_check
    total = header.record_count
    status = REPLAY_STATUS["done"]
    start = time.perf_counter()
    gran = mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        done = 0
        while done < total:
            n = min(chunk_records, total - done)
            offset = header.records_offset + done * RECORD_SIZE
            base = offset - offset % gran
            length = offset - base + n * RECORD_SIZE
            mm = mmap.mmap(f.fileno(), length, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=base)
            bad = None
            try:
                with memoryview(mm) as whole, whole[offset - base:] as view:
                    status = engine.run(view, done)
                    if status == REPLAY_STATUS["invalid"]:
                        k = engine.error_record - done
                        bad = np.frombuffer(view, dtype=RECORD, count=n)[k:k + 1].copy()
            finally:
                mm.close()
            _raise_for_status(path, status, engine, bad, header)
            done += n
            if progress is not None:
                progress(min(done, total) if status != REPLAY_STATUS["stopped"] else engine.records_done, total)
            if status == REPLAY_STATUS["stopped"]:
                break
    return _result(path, engine, m, header, total, status, time.perf_counter() - start)


def _raise_for_status(path: str, status: int, engine: ReplayEngine, bad, header) -> None:
    """Turn a stop of the compiled loop on bad input into its error."""
    if bad is not None:
        # The loop stopped at a bad record; say what is wrong with it.
        validate_records(path, bad, engine.error_record, header)
    if status == REPLAY_STATUS["exit_without_entry"]:
        raise TraceFormatError(
            f"{path}: record {engine.error_record}: exception exit without a matching entry")
    if status == REPLAY_STATUS["out_of_memory"]:
        raise MemoryError(f"{path}: out of memory at record {engine.error_record}")


def _result(path: str, engine: ReplayEngine, m: Machine, header, total: int, status: int,
            elapsed: float) -> ReplayResult:
    replayed = engine.records_done if status == REPLAY_STATUS["stopped"] else total
    counts = dict(zip(RecordType.NAMES, engine.record_counts()))
    kernel = {"context_switches": engine.context_switches, "pkrs_writes": engine.pkrs_writes,
              "pkrs_writes_avoided": engine.pkrs_writes_avoided, "exceptions": engine.exceptions,
              "max_exception_depth": engine.max_exception_depth}
    hdr = {"version": header.version, "paging_levels": header.paging_levels, "ncpus": header.ncpus,
           "compat": m.compat, "features": sorted(header.features),
           "maxphyaddr": header.maxphyaddr, "memory_frames": header.memory_frames}
    return ReplayResult(path=path, records=total, records_replayed=int(replayed),
                        stopped_early=status == REPLAY_STATUS["stopped"], elapsed=elapsed,
                        faults=engine.faults_array(), per_cpu=[c.counters() for c in m.cpus],
                        stale_uses=[dict(u, cpu=c.index) for c in m.cpus for u in c.stale_uses],
                        record_counts=counts, kernel=kernel, header=hdr)


def replay_records(machine: Machine, records: np.ndarray, *, max_faults: int | None = None,
                   stop_on_fault: bool = False, max_tasks: int = 65536,
                   pkrs_init: int = 0x55555554, stale_check: bool = False) -> ReplayResult:
    """Replay records held in memory (an array of the ``RECORD`` dtype) on
    ``machine`` as it is now — for simulators that produce records as they
    go. The machine keeps its state afterwards, so chunks can follow one
    another; each call starts with fresh task and exception bookkeeping and
    resets the CPUs' counters."""
    if not isinstance(machine, Machine):
        raise TypeError(f"replay_records needs a pks_emu.Machine, got {type(machine).__name__}")
    recs = np.ascontiguousarray(records, dtype=RECORD)
    if recs.ndim != 1:
        raise ValueError(f"records must be one-dimensional, got shape {recs.shape}")
    if not 1 <= max_tasks <= MAX_TASKS_LIMIT:
        raise ValueError(f"max_tasks {max_tasks}: expected 1..{MAX_TASKS_LIMIT}")
    header = TraceHeader(paging_levels=machine.paging_levels, ncpus=machine.ncpus,
                         compat=machine.compat, maxphyaddr=machine.maxphyaddr,
                         features=frozenset(machine.features), record_count=len(recs),
                         max_tasks=max_tasks, pkrs_init=pkrs_init,
                         tlb_entries=machine.cpus[0].tlb_entries)
    engine = ReplayEngine(machine, max_tasks=max_tasks, pkrs_init=pkrs_init,
                          max_faults=1 if stop_on_fault else (max_faults or 0))
    for cpu in machine.cpus:
        cpu.reset_counters()
        cpu.stale_check = stale_check
    start = time.perf_counter()
    status = engine.run(recs.view(np.uint8).data, 0) if len(recs) else REPLAY_STATUS["done"]
    bad = recs[engine.error_record:engine.error_record + 1] if status == REPLAY_STATUS["invalid"] else None
    _raise_for_status("<records>", status, engine, bad, header)
    return _result("<records>", engine, machine, header, len(recs), status,
                   time.perf_counter() - start)
