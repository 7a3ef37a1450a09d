"""Writing native traces from Python (used by the generators, the lackey
converter and the tests)."""
from __future__ import annotations

import os

import numpy as np

from ..atomic import atomic_output
from ..constants import PKS_INIT_VALUE
from ..errors import PksEmuError
from .format import (CPU_STATE, FLAG_FROM_USER, FLAG_IMPLICIT, FRAME_SIZE, KEEP_CPL, MAX_TASKS_LIMIT, RECORD,
                     TraceHeader, RecordType, layout)

_KINDS = {"read": 0, "write": 1, "fetch": 2, "r": 0, "w": 1, "x": 2}


def _int(name: str, v, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    """An integer field of a record: Python or numpy integer in lo..hi (a float
    would be truncated, a negative value wrap, a large one not fit the file)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__} ({v!r})")
    v = int(v)
    if not lo <= v <= hi:
        raise ValueError(f"{name} {v:#x} out of range: expected {lo:#x}..{hi:#x}")
    return v


def _kind(kind) -> int:
    if isinstance(kind, str):
        try:
            return _KINDS[kind]
        except KeyError:
            raise ValueError(f"access kind {kind!r}: expected 'read', 'write' or 'fetch'") from None
    k = int(kind)
    if not 0 <= k <= 2:
        raise ValueError(f"access kind {kind!r}: expected 0, 1 or 2")
    return k


class TraceWriter:
    """Write a trace whose initial state is ``machine``'s state now.

    The machine's CPU registers and every allocated frame of its physical
    memory (page tables and data) are stored in the file when the writer is
    created; records are then appended in order. Use as a context manager,
    or call ``close()``, which writes the record count into the header.

    Records are buffered and written in blocks; ``accesses()`` appends a whole
    numpy batch at once.

    The file is written atomically (:mod:`pks_emu.atomic`): it appears at
    ``path`` only when ``close()`` succeeds; an exception inside the ``with``
    block, or ``abort()``, removes what was written. ``inputs`` are files the
    output must not be (``convert X X``), refused before anything is written.
    Write errors raise :class:`~pks_emu.atomic.OutputError` naming ``path``.
    """

    def __init__(self, path: str | os.PathLike, machine, *, max_tasks: int = 65536,
                 pkrs_init: int = PKS_INIT_VALUE, buffer_records: int = 1 << 16,
                 inputs=()) -> None:
        self._closed = True
        self.path = os.fspath(path)
        if getattr(machine, "memory", None) is None or getattr(machine, "cpus", None) is None:
            raise TypeError(f"TraceWriter needs a pks_emu.Machine, got {type(machine).__name__}")
        max_tasks = _int("max_tasks", max_tasks, 1, MAX_TASKS_LIMIT)
        pkrs_init = _int("pkrs_init", pkrs_init, 0, 0xFFFFFFFF)
        if not 1 <= max_tasks <= MAX_TASKS_LIMIT:
            raise ValueError(f"max_tasks {max_tasks}: expected 1..{MAX_TASKS_LIMIT}")
        frames = machine.memory.frame_addresses()
        self.header = TraceHeader(
            paging_levels=machine.paging_levels, ncpus=machine.ncpus, compat=machine.compat,
            maxphyaddr=machine.maxphyaddr, features=frozenset(machine.features),
            max_tasks=max_tasks, tlb_entries=machine.cpus[0].tlb_entries, pkrs_init=pkrs_init)
        cpu_off, mem_off, rec_off = layout(machine.ncpus, len(frames))
        self.header.cpu_state_offset, self.header.memory_offset = cpu_off, mem_off
        self.header.records_offset, self.header.memory_frames = rec_off, len(frames)
        self._ncpus = machine.ncpus
        self._out = atomic_output(self.path, "wb", inputs=inputs)
        self._f = self._out.__enter__()
        self._closed = False
        try:
            self._f.write(self.header.pack())
            for c in machine.cpus:
                self._f.write(CPU_STATE.pack(c.cr0, c.cr3, c.cr4, c.efer, c.rflags, c.cpl, c.pkru, c.pkrs))
            for pa in frames:
                self._f.write(int(pa).to_bytes(8, "little"))
                self._f.write(machine.memory.read(pa, FRAME_SIZE))
            self._f.write(b"\0" * (rec_off - self._f.tell()))
        except BaseException as e:
            self.abort(e)
            raise
        self._buf = np.zeros(buffer_records, dtype=RECORD)
        self._n = 0
        self.count = 0

    # --- low level -------------------------------------------------------------
    def _cpu(self, cpu: int) -> int:
        cpu = _int("cpu", cpu, 0, 255)
        if not 0 <= cpu < self._ncpus:
            raise ValueError(f"CPU {cpu} out of range: the machine has {self._ncpus}")
        return cpu

    def _put(self, type_: int, cpu: int = 0, op: int = 0, flags: int = 0, size: int = 0,
             cpl: int = KEEP_CPL, addr: int = 0, value: int = 0) -> None:
        if self._closed:
            raise PksEmuError(f"{self.path}: the trace writer is closed")
        cpu = self._cpu(cpu)
        addr, value = _int("address", addr), _int("value", value)
        if self._n == len(self._buf):
            self._flush()
        self._buf[self._n] = (type_, cpu, op, flags, size, cpl, 0, addr, value)
        self._n += 1
        self.count += 1

    def _flush(self) -> None:
        if self._n:
            self._f.write(self._buf[:self._n].tobytes())
            self._n = 0

    # --- records -----------------------------------------------------------------
    def access(self, cpu: int, va: int, kind, size: int = 8, *, cpl: int | None = None,
               implicit: bool = False) -> None:
        """A data access or fetch; ``cpl`` sets the CPU's CPL first (None keeps it)."""
        size = _int("access size", size, 1, 4096)
        if cpl is not None:
            cpl = _int("CPL", cpl, 0, 3)
        if not 1 <= size <= 4096:
            raise ValueError(f"access size {size}: expected 1..4096")
        if cpl is not None and not 0 <= cpl <= 3:
            raise ValueError(f"CPL {cpl}: expected 0..3")
        self._put(RecordType.ACCESS, cpu, _kind(kind), FLAG_IMPLICIT if implicit else 0, size,
                  KEEP_CPL if cpl is None else cpl, va, 0)

    def accesses(self, cpu, va, kind, size=8, cpl=None, implicit=False) -> None:
        """Append many accesses at once (numpy arrays or scalars, broadcast)."""
        if self._closed:
            raise PksEmuError(f"{self.path}: the trace writer is closed")
        arr = np.asarray(va)
        if arr.dtype.kind not in "ui" and not (arr.dtype == object and all(
                isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in arr.ravel())):
            raise TypeError(f"va must be integers, got dtype {arr.dtype} (floats would be truncated)")
        if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
            raise ValueError(f"va {int(arr.min())}: expected 0..2**64-1")
        va = np.asarray(va, dtype=np.uint64)
        if va.ndim != 1:
            raise ValueError(f"va must be one-dimensional, got shape {va.shape}")
        n = len(va)
        recs = np.zeros(n, dtype=RECORD)
        recs["type"] = RecordType.ACCESS
        recs["cpu"] = cpu
        kind_arr = np.asarray(_kind(kind) if isinstance(kind, str) else kind)
        if kind_arr.size and (kind_arr.max() > 2):
            raise ValueError("access kinds must be 0 (read), 1 (write) or 2 (fetch)")
        recs["op"] = kind_arr
        recs["flags"] = np.where(np.asarray(implicit), FLAG_IMPLICIT, 0)
        size_arr = np.asarray(size)
        if size_arr.dtype.kind not in "ui":
            raise TypeError(f"access sizes must be integers, got dtype {size_arr.dtype}")
        if size_arr.size and (size_arr.min() < 1 or size_arr.max() > 4096):
            raise ValueError("access sizes must be 1..4096")
        recs["size"] = size_arr
        recs["cpl"] = KEEP_CPL if cpl is None else cpl
        recs["addr"] = va
        if np.any(recs["cpu"] >= self._ncpus):
            raise ValueError(f"CPU out of range: the machine has {self._ncpus}")
        self._flush()
        self._f.write(recs.tobytes())
        self.count += n

    def extend(self, recs: np.ndarray) -> None:
        """Append records given as an array of the ``RECORD`` dtype (validated)."""
        if self._closed:
            raise PksEmuError(f"{self.path}: the trace writer is closed")
        recs = np.ascontiguousarray(recs, dtype=RECORD)
        from .format import validate_records
        validate_records(self.path, recs, self.count, self.header)
        self._flush()
        self._f.write(recs.tobytes())
        self.count += len(recs)

    def wrmsr(self, cpu: int, msr: int, value: int) -> None:
        self._put(RecordType.WRMSR, cpu, addr=_int("MSR number", msr, 0, 0xFFFFFFFF), value=value)

    def rdmsr(self, cpu: int, msr: int) -> None:
        self._put(RecordType.RDMSR, cpu, addr=_int("MSR number", msr, 0, 0xFFFFFFFF))

    def wrpkru(self, cpu: int, value: int, ecx: int = 0, edx: int = 0) -> None:
        value, ecx, edx = _int("value", value), _int("ecx", ecx), _int("edx", edx)
        self._put(RecordType.WRPKRU, cpu, addr=(ecx & 0xFFFFFFFF) | (edx & 0xFFFFFFFF) << 32,
                  value=value & 0xFFFFFFFF)

    def mov_cr(self, cpu: int, cr: int, value: int) -> None:
        cr = _int("CR number", cr, 0, 15)
        if cr not in (0, 3, 4):
            raise ValueError(f"MOV to CR{cr}: only CR0, CR3 and CR4 are modelled")
        self._put(RecordType.MOV_CR, cpu, op=cr, value=value)

    def invlpg(self, cpu: int, va: int) -> None:
        self._put(RecordType.INVLPG, cpu, addr=va)

    def pte_write(self, pa: int, value: int, cpu: int = 0) -> None:
        """A store of a paging-structure entry at physical address ``pa`` (no TLB flush)."""
        pa = _int("PTE address", pa, 0, (1 << 52) - 8)
        if pa % 8:
            raise ValueError(f"PTE address {pa:#x} is not 8-byte aligned")
        self._put(RecordType.PTE_WRITE, cpu, addr=pa, value=value)

    def context_switch(self, cpu: int, task: int, cr3: int = 0) -> None:
        """Switch ``cpu`` to ``task`` (and to ``cr3`` unless 0), as __switch_to does."""
        task = _int("task id", task, 0, self.header.max_tasks - 1)
        self._put(RecordType.CONTEXT_SWITCH, cpu, addr=cr3, value=task)

    def exception_entry(self, cpu: int, vector: int = 14, *, from_user: bool = False) -> None:
        vector = _int("vector", vector, 0, 255)
        self._put(RecordType.EXCEPTION_ENTRY, cpu, flags=FLAG_FROM_USER if from_user else 0,
                  value=vector)

    def exception_exit(self, cpu: int) -> None:
        self._put(RecordType.EXCEPTION_EXIT, cpu)

    def set_rflags(self, cpu: int, value: int) -> None:
        self._put(RecordType.SET_RFLAGS, cpu, value=value)

    # --- end ---------------------------------------------------------------------
    def close(self) -> None:
        """Write the record count into the header and put the file in place."""
        if self._closed:
            return
        try:
            self._flush()
            self.header.record_count = self.count
            self._f.seek(0)
            self._f.write(self.header.pack())
        except BaseException as e:
            self.abort(e)
            raise
        self._closed = True
        self._out.__exit__(None, None, None)

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the output: the temporary file is removed, nothing appears at ``path``."""
        if self._closed:
            return
        self._closed = True
        e = exc if exc is not None else RuntimeError("trace writer aborted")
        self._out.__exit__(type(e), e, e.__traceback__)

    def __del__(self) -> None:
        # A writer dropped without close() is incomplete: never leave it behind.
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()

