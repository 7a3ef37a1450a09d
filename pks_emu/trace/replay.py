"""Replaying a native trace: build the machine from the header, load the
initial memory, then run the compiled loop over memory-mapped chunks."""
from __future__ import annotations

import io
import mmap
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._core import FAULT_DTYPE_FIELDS, REPLAY_STATUS, ReplayEngine, load_cpu_state
from ..constants import PKS_INIT_VALUE, pf_error_code_str
from ..errors import PksEmuError, TraceFormatError
from ..machine import Machine
from .format import (API_CODES, FRAME_ENTRY_SIZE, FRAME_SIZE, MAGIC, MAX_TASKS_LIMIT,
                     RECORD, RECORD_PROBLEMS, RECORD_SIZE, RecordType, TraceHeader, api_name,
                     read_header)

FAULT_DTYPE = np.dtype(FAULT_DTYPE_FIELDS)
VECTOR_NAMES = {6: "#UD", 13: "#GP", 14: "#PF"}
KIND_NAMES = {0: "read", 1: "write", 2: "fetch", 255: "insn"}

# MAP_POPULATE maps the whole chunk in one go instead of one page fault per
# 4 KiB, which otherwise costs a third of the replay time.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

#: Default chunk: 1 Mi records (24 MiB mapped at a time).
DEFAULT_CHUNK = 1 << 20
#: The JSON result's schema (docs/cli.md); 2 added sites, timeline, pages, symbols, input.
SCHEMA = "pks-emu-replay/2"


@dataclass
class ReplayResult:
    """What a replay found.

    Every fault is counted by site in ``sites`` (a ``FaultSites``: instruction
    pointer, key, error code, kind; over time; by page) and in ``fault_total``;
    ``faults`` (with ``fault_ips``) holds the per-fault log, in record order:
    every fault, unless the replay streamed the log to a file or was given a
    ``log_limit`` (then the first ones).
    """

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
    fault_ips: np.ndarray | None = None
    sites: Any = None
    fault_total: int | None = None
    symbolizer: Any = None
    #: what the input was: "native v1", "native v2", "lackey", "kernel capture"
    input_format: str = "native v1"
    #: the input's own section: lackey line counts, the kernel mapper's and
    #: the consumer windows' counters, the policy
    input_info: dict = field(default_factory=dict)

    @property
    def fault_count(self) -> int:
        """Faults found (all of them, logged or not)."""
        return int(len(self.faults) if self.fault_total is None else self.fault_total)

    def _site_counts(self, key: str, where) -> dict[int, int]:
        if self.sites is None:
            return {}
        out: dict[int, int] = {}
        for s in self.sites.sites():
            if where(s):
                k = int(s[key])
                out[k] = out.get(k, 0) + int(s["count"])
        return out

    @property
    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in self.per_cpu:
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        return total

    def faults_by_error_code(self) -> dict[int, int]:
        if self.sites is not None:
            return dict(sorted(self._site_counts("error_code", lambda s: s["vector"] == 14).items()))
        pf = self.faults[self.faults["vector"] == 14]
        codes, counts = np.unique(pf["error_code"], return_counts=True)
        return {int(c): int(n) for c, n in zip(codes, counts)}

    def faults_by_pkey(self) -> dict[int, int]:
        if self.sites is not None:
            return dict(sorted(self._site_counts(
                "pkey", lambda s: s["vector"] == 14 and s["error_code"] & 0x20).items()))
        pk = self.faults[(self.faults["vector"] == 14) & ((self.faults["error_code"] & 0x20) != 0)]
        keys, counts = np.unique(pk["pkey"], return_counts=True)
        return {int(k): int(n) for k, n in zip(keys, counts)}

    def faults_by_vector(self) -> dict[str, int]:
        if self.sites is not None:
            by = self._site_counts("vector", lambda s: True)
            return {VECTOR_NAMES.get(v, str(v)): n for v, n in sorted(by.items())}
        vecs, counts = np.unique(self.faults["vector"], return_counts=True)
        return {VECTOR_NAMES.get(int(v), str(int(v))): int(n) for v, n in zip(vecs, counts)}

    def to_dict(self, max_faults_listed: int | None = 1000) -> dict:
        """The stable JSON schema (docs/cli.md, schema version 2)."""
        listed = self.faults if max_faults_listed is None else self.faults[:max_faults_listed]
        ips = self.fault_ips
        c = self.counters
        accesses = sum(v for k, v in c.items() if k.startswith(("reads_", "writes_", "fetches_")))
        out = {
            "schema": SCHEMA,
            "input_format": self.input_format,
            "api": self.header.get("api", "v10"),
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
            "fault_count": self.fault_count,
            "faults_by_vector": self.faults_by_vector(),
            "faults_by_error_code": {f"{k:#x}": v for k, v in self.faults_by_error_code().items()},
            "faults_by_pkey": {str(k): v for k, v in self.faults_by_pkey().items()},
            "faults": [fault_to_dict(f, None if ips is None else int(ips[i]), self.symbolizer)
                       for i, f in enumerate(listed)],
            "faults_listed": int(len(listed)),
            "stale_uses": [{k: (f"{v:#x}" if k.endswith(("va", "_pa")) and v is not None else v)
                            for k, v in u.items()} for u in self.stale_uses[:1000]],
            "input": self.input_info,
        }
        if self.sites is not None:
            out.update(self.sites.to_dict(self.symbolizer, records=self.records_replayed))
        out["symbols"] = list(getattr(self.symbolizer, "files", []) or [])
        return out


def fault_to_dict(f, ip: int | None = None, symbolizer=None) -> dict:
    vector = int(f["vector"])
    d: dict[str, object] = {"record": int(f["record"]), "cpu": int(f["cpu"]), "vector": VECTOR_NAMES.get(vector, vector),
         "kind": KIND_NAMES.get(int(f["kind"]), int(f["kind"])), "address": f"{int(f['address']):#x}",
         "error_code": int(f["error_code"])}
    if vector == 14:
        d["error_code_bits"] = pf_error_code_str(int(f["error_code"]))
        d["pkey"] = int(f["pkey"]) if int(f["pkey"]) >= 0 else None
    if ip:
        d["ip"] = f"{ip:#x}"
        if symbolizer is not None:
            d["symbol"] = symbolizer.lookup(ip)[0]
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


def replay(source, *, policy=None, max_faults: int | None = None, stop_on_fault: bool = False,
           chunk_records: int = DEFAULT_CHUNK,
           progress: Callable[[int, int | None], None] | None = None,
           machine: Machine | None = None, compat: str | None = None,
           api: str | None = None, stale_check: bool = False, symbols=(),
           kallsyms: str | os.PathLike | None = None, faults_out=None,
           log_limit: int = 0, skip_bad: bool = False,
           threads: bool | None = None) -> ReplayResult:
    """Replay a trace: a native trace (format v1 or v2), a Valgrind lackey
    trace (plain, gzip, xz, bzip2), or a kernel captured under QEMU (v2).
    ``source`` is a path, ``"-"`` for standard input (v2 or lackey), or a
    binary stream.

    ``policy``: for a lackey trace, an address-space policy (TOML path or
    ``Policy``); for a kernel capture, a kernel policy (TOML path or
    ``KernelPolicy``; docs/kernel-policies.md). Lackey input is parsed,
    mapped and replayed chunk by chunk, with no temporary file.

    ``chunk_records``: records per call of the compiled loop, in any trace
    format (the loop's hot path never spans two calls: 1 runs every record
    through the full path, which the tests compare the hot path with).
    ``max_faults``/``stop_on_fault`` stop the replay after that many faults.
    ``progress(done, total)`` is called after each chunk (``total`` None on
    a stream of unknown length). Pass ``machine`` to replay a v1 trace on a
    machine you built (it must match the header), ``compat`` ("sdm",
    "qemu") or ``api`` ("v6", "v7", "v10") to replay under other semantics
    than the header's. ``stale_check`` compares every TLB hit with a fresh
    walk (several times slower). ``symbols``: ``FILE[@BASE]`` specs (ELF or
    kallsyms) naming fault sites; a kernel capture's ``kallsyms`` (default
    ``TRACE.kallsyms``) names them too. ``faults_out``: a path or a
    ``FaultLogStream`` the per-fault log is streamed to (every fault; the
    result keeps the first 1000); else ``log_limit`` (0: all) bounds the
    log kept in memory. Every fault is counted by site either way.
    ``threads``: read ahead on extra threads (decompress and scan a lackey
    trace, decode a v2 trace's chunks) while the replay runs; None (default)
    does when a CPU is free (:func:`_spare_cpu`). A capture replayed as it
    runs passes False: QEMU keeps the CPUs busy.
    """
    if chunk_records < 1:
        raise ValueError(f"chunk_records {chunk_records} must be positive")
    if compat is not None and compat not in ("sdm", "qemu"):
        raise ValueError(f"compat {compat!r}: expected 'sdm' or 'qemu'")
    _check_api(api)
    run = _Run(max_faults=1 if stop_on_fault else (max_faults or 0), progress=progress,
               stale_check=stale_check, faults_out=faults_out, log_limit=log_limit,
               threads=threads)
    try:
        name, kind, stream = _open_source(source)
        try:
            if kind == "v1":
                if policy is not None:
                    raise PksEmuError(f"{name}: --policy applies to lackey traces and kernel captures; "
                                      "a native trace carries its page tables")
                result = _replay_v1(run, name, chunk_records, machine, compat, api)
            elif kind == "v2":
                result = _replay_v2(run, name, stream, policy, compat, api, kallsyms, chunk_records)
            else:
                result = _replay_lackey(run, name, stream, policy, compat, api, skip_bad)
        finally:
            if stream is not None and not hasattr(source, "read") and name != "<stdin>":
                stream.close()
        run.finish(result)
    except BaseException:
        run.abort()
        raise
    sym = _symbolizer(symbols, result)
    result.symbolizer = sym
    return result


class _Run:
    """What every input format's replay shares: the engine's options, the
    streamed fault log, progress."""

    def __init__(self, *, max_faults: int, progress, stale_check: bool, faults_out,
                 log_limit: int, threads: bool | None = None) -> None:
        self.max_faults = max_faults
        self.threads = threads
        self.progress = progress
        self.stale_check = stale_check
        self.stream = None
        if faults_out is not None:
            from .faultlog import FaultLogStream
            self.stream = faults_out if isinstance(faults_out, FaultLogStream) else FaultLogStream(faults_out)
        self.log_limit = log_limit
        self.kept: list = []
        self.kept_ips: list = []
        self.kept_n = 0

    def engine(self, m: Machine, header, api: str, **kw) -> ReplayEngine:
        for cpu in m.cpus:
            cpu.reset_counters()
            cpu.stale_check = self.stale_check
        return ReplayEngine(m, max_tasks=header.max_tasks, pkrs_init=header.pkrs_init,
                            max_faults=self.max_faults, api=api,
                            log_limit=0 if self.stream is not None else self.log_limit, **kw)

    def _drain(self, engine: ReplayEngine) -> None:
        """Stream the faults the engine logged since the last call; keep the first 1000."""
        assert self.stream is not None
        faults, ips = engine.take_faults()
        self.stream.write(faults, ips)
        room = max(0, 1000 - self.kept_n)
        if room and len(faults):
            self.kept.append(faults[:room])
            self.kept_ips.append(ips[:room])
            self.kept_n += len(self.kept[-1])

    def after_chunk(self, engine: ReplayEngine, done: int, total: int | None) -> None:
        if self.stream is not None and engine.fault_count:
            self._drain(engine)
        if self.progress is not None:
            self.progress(done, total)

    def faults(self, engine: ReplayEngine) -> tuple[np.ndarray, np.ndarray]:
        if self.stream is None:
            return engine.faults_array(), engine.fault_ips_array()
        self._drain(engine)
        return (np.concatenate(self.kept) if self.kept else np.empty(0, FAULT_DTYPE),
                np.concatenate(self.kept_ips) if self.kept_ips else np.empty(0, np.uint64))

    def finish(self, result: ReplayResult) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def abort(self) -> None:
        if self.stream is not None:
            self.stream.abort()
            self.stream = None


def _open_source(source):
    """(name, kind, stream): kind "v1" (a file, memory-mapped later), "v2"
    or "lackey" (a stream positioned at the start)."""
    opened = False
    if hasattr(source, "read"):
        stream = source if hasattr(source, "peek") else io.BufferedReader(source)
        name = str(getattr(source, "name", "<stream>"))
    else:
        name = os.fspath(source)
        if name == "-":
            stream = sys.stdin.buffer
            name = "<stdin>"
        else:
            if os.path.isdir(name):
                raise TraceFormatError(f"{name}: is a directory, not a trace")
            try:
                stream = open(name, "rb")
            except OSError as e:
                raise TraceFormatError(f"{name}: cannot read: {e.strerror or e}") from None
            opened = True
    try:
        kind = _kind_of(name, stream, from_stream=not opened)
    except BaseException:
        if opened:
            stream.close()
        raise
    if kind == "v1":
        stream.close()
        return name, kind, None
    return name, kind, stream


def _kind_of(name: str, stream, from_stream: bool) -> str:
    from ..lackey import looks_like_lackey
    from .v2 import is_v2_magic
    try:
        head = stream.peek(16)[:16]
    except OSError as e:
        raise TraceFormatError(f"{name}: cannot read: {e.strerror or e}") from None
    if not head:
        what = "empty input" if name.startswith("<") else "empty file"
        raise TraceFormatError(f"{name}: {what}: expected a pks_emu trace or a lackey trace")
    if head[:8] == MAGIC:
        if is_v2_magic(head):
            return "v2"
        if from_stream:
            raise TraceFormatError(f"{name}: a version-1 native trace cannot be read from a stream "
                                   "(it is memory-mapped): give its path, or convert it to v2")
        return "v1"
    if head[:6] == MAGIC[:6]:
        raise TraceFormatError(f"{name}: damaged pks_emu trace: magic {head[:8]!r}, expected {MAGIC!r}")
    if not looks_like_lackey(head):
        raise TraceFormatError(f"{name}: not a pks_emu trace (magic {head[:8]!r}, expected {MAGIC!r}) "
                               "and not a lackey trace (text, gzip, xz or bzip2)")
    return "lackey"


def _replay_v1(run: _Run, path: str, chunk_records: int, machine, compat, api) -> ReplayResult:
    header = read_header(path)
    header.api = api or header.api
    if machine is not None and (machine.ncpus, machine.paging_levels) != (header.ncpus, header.paging_levels):
        raise ValueError(f"{path}: the trace needs {header.ncpus} CPU(s) and {header.paging_levels}-level "
                         f"paging; the machine given has {machine.ncpus} and {machine.paging_levels}-level")
    m = machine if machine is not None else machine_from_header(path, header, compat)
    engine = run.engine(m, header, header.api)
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
            run.after_chunk(engine, min(done, total) if status != REPLAY_STATUS["stopped"]
                            else engine.records_done, total)
            if status == REPLAY_STATUS["stopped"]:
                break
    return _result(path, engine, m, header, total, status, time.perf_counter() - start, run)


def _run_chunk(run: _Run, name: str, engine: ReplayEngine, header, recs, first: int, ip, pa) -> int:
    status = engine.run(recs.view(np.uint8).reshape(-1), first, ip, pa)
    bad = None
    if status == REPLAY_STATUS["invalid"]:
        k = engine.error_record - first
        bad = recs[k:k + 1].copy()
    _raise_for_status(name, status, engine, bad, header)
    return status


def _replay_v2(run: _Run, name: str, stream, policy, compat, api, kallsyms,
               chunk_records: int = DEFAULT_CHUNK) -> ReplayResult:
    from .v2 import TF_KERNEL_CAPTURE, V2Reader
    reader = V2Reader(stream, name)
    h = reader.header
    api_v = api or api_name(h.api)
    h.api = API_CODES[api_v]
    info: dict = {}
    mapper = None
    if h.trace_flags & TF_KERNEL_CAPTURE:
        from .kernel import kernel_machine_for
        m, mapper, info = kernel_machine_for(name, h, policy, kallsyms, compat)
        fmt = "kernel capture"
    else:
        if policy is not None:
            raise PksEmuError(f"{name}: --policy applies to lackey traces and kernel captures; "
                              "a native trace carries its page tables")
        m = Machine(paging_levels=h.paging_levels, ncpus=h.ncpus, features=h.features,
                    compat=compat or h.compat, maxphyaddr=h.maxphyaddr, tlb_entries=h.tlb_entries)
        for i, state in enumerate(reader.cpu_states):
            problem = load_cpu_state(m.cpus[i], *state)
            if problem:
                raise TraceFormatError(f"{name}: initial state of CPU {i}: {problem}")
        for frame_pa, frame in reader.memory():
            m.memory.write(frame_pa, frame)
        fmt = "native v2"
    engine = run.engine(m, h, api_v, mapper=mapper)
    status = REPLAY_STATUS["done"]
    start = time.perf_counter()
    done = 0
    # With a CPU to spare, chunks are decoded on a second thread ahead of the
    # replay (a stored boot: 3.5 s -> 2.5 s); in a capture pipeline QEMU
    # keeps both CPUs busy and the load average turns it off.
    threads = run.threads if run.threads is not None else _spare_cpu()
    prefetch = 2 if threads else 0
    stopped = False
    for first, recs, ip, pa in reader.chunks(reuse=True, validate=False, prefetch=prefetch):
        # The file's chunks, in pieces of at most chunk_records (as a v1 trace's).
        for off in range(0, len(recs), chunk_records):
            k = min(chunk_records, len(recs) - off)
            status = _run_chunk(run, name, engine, h, recs[off:off + k], first + off,
                                None if ip is None else ip[off:off + k],
                                None if pa is None else pa[off:off + k])
            stopped = status == REPLAY_STATUS["stopped"]
            done = first + off + k if not stopped else engine.records_done
            run.after_chunk(engine, done, None)
            if stopped:
                break
        if stopped:
            break
    if mapper is not None:
        from .kernel import mapper_info
        info.update(mapper_info(mapper, info))
    result = _result(name, engine, m, h, done, status, time.perf_counter() - start, run)
    result.records = reader.records if status != REPLAY_STATUS["stopped"] else done
    result.input_format = fmt
    result.input_info = info
    return result


#: Lackey input decompressed and scanned in threads ahead of the replay:
#: True, False, or None to decide for each replay (:func:`_lackey_threads`).
LACKEY_THREADS: bool | None = None


def _lackey_threads() -> bool:
    """Threads pay only with a CPU to spare (:func:`_spare_cpu`)."""
    if LACKEY_THREADS is not None:
        return LACKEY_THREADS
    return _spare_cpu()


def _spare_cpu() -> bool:
    """Whether a reading thread would have a CPU of its own: not with one CPU,
    nor with the others busy, where the stages only take turns and the
    hand-offs cost 10-20 %. Busy means both the 1-minute load average within
    half a CPU of the CPU count and, right now, a runnable task for every
    other CPU: the average lags a minute behind (after a build or a test run
    it stays high while the CPUs are idle again), and replaying without
    threads on an idle machine costs far more (an xz trace: 1.6x) than with
    them on a busy one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return False
    try:
        if os.getloadavg()[0] < cpus - 0.5:
            return True
    except OSError:  # pragma: no cover - no load average
        return True
    others = _runnable_now()
    return others is not None and others < cpus - 1


def _runnable_now() -> int | None:
    """Tasks runnable at this moment besides the caller (the first number of
    the fourth field of /proc/loadavg counts the reading thread itself); the
    least of three readings, so that a task waking for a moment does not
    count. None where /proc/loadavg cannot be read or parsed."""
    least = None
    for _ in range(3):
        try:
            with open("/proc/loadavg", "rb") as f:
                field = f.read().split()[3]
            n = int(field.split(b"/")[0]) - 1
        except (OSError, IndexError, ValueError):
            return None
        least = n if least is None else min(least, n)
    return least


def _replay_lackey(run: _Run, name: str, stream, policy, compat, api, skip_bad) -> ReplayResult:
    from ..lackey import iter_records
    from .policy import Policy, load_policy, policy_machine
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    m, mapper = policy_machine(policy, compat=compat or "sdm")
    header = TraceHeader(paging_levels=m.paging_levels, ncpus=1, compat=m.compat,
                         maxphyaddr=m.maxphyaddr, features=frozenset(m.features),
                         api=api or "v10")
    engine = run.engine(m, header, header.api)
    status = REPLAY_STATUS["done"]
    stats: dict[str, Any] = {"lines": 0, "skipped_lines": 0, "bad_lines": 0, "bad_examples": []}
    start = time.perf_counter()
    done = 0
    threads = run.threads if run.threads is not None else _lackey_threads()
    chunks = iter_records(stream, skip_bad=skip_bad, threads=threads, reuse=True)
    try:
        for chunk in chunks:
            n = len(chunk)
            stats["lines"] += chunk.lines
            stats["skipped_lines"] += chunk.skipped_lines
            stats["bad_lines"] += chunk.bad_lines
            if len(stats["bad_examples"]) < 20:
                stats["bad_examples"] += chunk.bad_examples[:20 - len(stats["bad_examples"])]
            if not n:
                continue
            if chunk.big >= 0:
                i = chunk.big
                where = f"{name}: record {done + i}"
                if os.path.isfile(name):
                    from .convert import line_of_record
                    line, text = line_of_record(name, done + i, skip_bad=skip_bad)
                    where = f"{name}:{line}: {text!r} (record {done + i})"
                raise TraceFormatError(f"{where}: access size {int(chunk.records['size'][i])}: "
                                       "expected 1..4096 (the largest access a native trace records)")
            mapper.map_new_pages(chunk.pages)
            status = _run_chunk(run, name, engine, header, chunk.records, done, chunk.ip, None)
            done = done + n if status != REPLAY_STATUS["stopped"] else engine.records_done
            run.after_chunk(engine, done, None)
            if status == REPLAY_STATUS["stopped"]:
                break
    finally:
        # Stops the reading threads before the caller closes the stream.
        chunks.close()  # type: ignore[attr-defined]
    if done == 0 and status != REPLAY_STATUS["stopped"]:
        raise TraceFormatError(f"{name}: no records in {stats['lines']} lines: expected lackey "
                               "'I  ADDR,SIZE' or ' L|S|M ADDR,SIZE' lines")
    result = _result(name, engine, m, header, done, status, time.perf_counter() - start, run)
    result.input_format = "lackey"
    stats["bad_examples"] = [list(x) for x in stats["bad_examples"]]
    result.input_info = dict(stats, policy=policy.source, **mapper.stats)
    return result


def _symbolizer(specs, result: ReplayResult):
    files = list(specs or ())
    extra = result.input_info.get("kallsyms")
    if not files and not extra:
        return None
    from ..symbols import Symbolizer
    sym = Symbolizer(files)
    if extra:
        sym.add_kallsyms(extra)
    return sym


def _check_api(api: str | None) -> str | None:
    if api is None:
        return None
    if api not in API_CODES:
        raise ValueError(f"api {api!r}: expected one of {sorted(API_CODES)}")
    return api


def _raise_for_status(path: str, status: int, engine: ReplayEngine, bad, header) -> None:
    """Turn a stop of the compiled loop on bad input into its error."""
    if bad is not None:
        # The loop stopped at a bad record; say what is wrong with it.
        raise TraceFormatError(f"{path}: record {engine.error_record}: "
                               f"{RECORD_PROBLEMS[engine.error_problem](bad[0], header)}")
    if status == REPLAY_STATUS["exit_without_entry"]:
        raise TraceFormatError(
            f"{path}: record {engine.error_record}: exception exit without a matching entry")
    if status == REPLAY_STATUS["out_of_memory"]:
        raise MemoryError(f"{path}: out of memory at record {engine.error_record}")


def _result(path: str, engine: ReplayEngine, m: Machine, header, total: int, status: int,
            elapsed: float, run: _Run | None = None) -> ReplayResult:
    replayed = engine.records_done if status == REPLAY_STATUS["stopped"] else total
    counts = dict(zip(RecordType.NAMES, engine.record_counts()))
    kernel = {"context_switches": engine.context_switches, "pkrs_writes": engine.pkrs_writes,
              "pkrs_writes_avoided": engine.pkrs_writes_avoided, "exceptions": engine.exceptions,
              "nmis": engine.nmis,
              "max_exception_depth": engine.max_exception_depth}
    hdr = {"version": header.version, "api": api_name(header.api), "paging_levels": header.paging_levels,
           "ncpus": header.ncpus,
           "compat": m.compat, "features": sorted(header.features),
           "maxphyaddr": header.maxphyaddr, "memory_frames": header.memory_frames}
    if run is not None:
        faults, ips = run.faults(engine)
    else:
        faults, ips = engine.faults_array(), engine.fault_ips_array()
    return ReplayResult(path=path, records=total, records_replayed=int(replayed),
                        stopped_early=status == REPLAY_STATUS["stopped"], elapsed=elapsed,
                        faults=faults, per_cpu=[c.counters() for c in m.cpus],
                        stale_uses=[dict(u, cpu=c.index) for c in m.cpus for u in c.stale_uses],
                        record_counts=counts, kernel=kernel, header=hdr, fault_ips=ips,
                        sites=engine.sites, fault_total=int(engine.total_faults))


def replay_records(machine: Machine, records: np.ndarray, *, max_faults: int | None = None,
                   stop_on_fault: bool = False, max_tasks: int = 65536,
                   pkrs_init: int = PKS_INIT_VALUE, stale_check: bool = False,
                   api: str = "v10") -> ReplayResult:
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
                         tlb_entries=machine.cpus[0].tlb_entries, api=_check_api(api) or "v10")
    engine = ReplayEngine(machine, max_tasks=max_tasks, pkrs_init=pkrs_init,
                          max_faults=1 if stop_on_fault else (max_faults or 0), api=header.api)
    for cpu in machine.cpus:
        cpu.reset_counters()
        cpu.stale_check = stale_check
    start = time.perf_counter()
    status = engine.run(recs.view(np.uint8).data, 0) if len(recs) else REPLAY_STATUS["done"]
    bad = recs[engine.error_record:engine.error_record + 1] if status == REPLAY_STATUS["invalid"] else None
    _raise_for_status("<records>", status, engine, bad, header)
    return _result("<records>", engine, machine, header, len(recs), status,
                   time.perf_counter() - start)
