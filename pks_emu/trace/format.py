"""The native trace format, version 1 (specified in docs/trace-format.md).

A file is, little-endian throughout:

1. a 128-byte header (``HEADER``),
2. the initial state of each CPU (``CPU_STATE``, 64 bytes each),
3. the initial physical memory: ``memory_frames`` pairs of (u64 physical
   address, 4096 bytes of frame content) — page tables and any data,
4. the records, ``record_count`` fixed-size 24-byte records (``RECORD``),
   starting at ``records_offset`` (a multiple of 8), read by numpy as a
   structured dtype and memory-mappable.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._core import first_invalid_record
from ..constants import PKS_INIT_VALUE
from ..errors import TraceFormatError

MAGIC = b"PKSEMUTR"
VERSION = 1
HEADER_SIZE = 128
RECORD_SIZE = 24
CPU_STATE_SIZE = 64
FRAME_SIZE = 4096
FRAME_ENTRY_SIZE = 8 + FRAME_SIZE

#: magic, version, header_size, record_size, reserved, paging_levels, ncpus,
#: compat, maxphyaddr, features, record_count, records_offset, memory_offset,
#: memory_frames, cpu_state_offset, max_tasks, tlb_entries, pkrs_init, api
#: (api: the series version of the kernel's context-switch and exception
#: rules, 6, 7 or 10; 0 in traces written before the field existed = 10)
HEADER = struct.Struct("<8sHHHHBBBBIQQQQQIIIB")
assert HEADER.size <= HEADER_SIZE

#: cr0, cr3, cr4, efer, rflags, cpl, pkru, pkrs
CPU_STATE = struct.Struct("<8Q")
assert CPU_STATE.size == CPU_STATE_SIZE

RECORD = np.dtype([
    ("type", "u1"),     # RecordType
    ("cpu", "u1"),      # CPU index
    ("op", "u1"),       # access kind (0 read, 1 write, 2 fetch) or CR number
    ("flags", "u1"),    # bit 0: implicit supervisor access / exception from user mode
    ("size", "<u2"),    # access size in bytes (1..4096)
    ("cpl", "u1"),      # CPL of the access, or 0xFF to keep the CPU's current CPL
    ("pad", "u1"),
    ("addr", "<u8"),    # virtual address, MSR number, physical address of a PTE
    ("value", "<u8"),   # value written, task id, vector
])
assert RECORD.itemsize == RECORD_SIZE

KEEP_CPL = 0xFF
#: The replay keeps a saved PKRS per task id: 8 bytes each.
MAX_TASKS_LIMIT = 1 << 22
FLAG_IMPLICIT = 0x1
FLAG_FROM_USER = 0x1


class RecordType:
    """Record kinds. Fields used: see docs/trace-format.md."""

    ACCESS = 0          # cpu, op=kind, size, cpl, flags.implicit, addr=va
    WRMSR = 1           # cpu, addr=msr, value
    RDMSR = 2           # cpu, addr=msr
    WRPKRU = 3          # cpu, value=eax, addr=ecx | edx << 32
    MOV_CR = 4          # cpu, op=0/3/4, value
    INVLPG = 5          # cpu, addr=va
    PTE_WRITE = 6       # addr=physical address (8-aligned), value=new entry
    CONTEXT_SWITCH = 7  # cpu, value=task id, addr=new CR3 or 0 to keep CR3
    EXCEPTION_ENTRY = 8  # cpu, value=vector, flags.from_user
    EXCEPTION_EXIT = 9  # cpu
    SET_RFLAGS = 10     # cpu, value
    TASK_FORK = 11      # cpu (the parent runs there), value=child task id, flags bit 0: fresh value
    TASK_EXEC = 12      # cpu, value=task id
    PKS_UPDATE = 13     # cpu, value=pkey, op=protection bits (0 rw, 1 AD, 2 WD)
    PKS_ABANDON = 14    # cpu, value=pkey (V7 only)

    NAMES = ("access", "wrmsr", "rdmsr", "wrpkru", "mov_cr", "invlpg", "pte_write",
             "context_switch", "exception_entry", "exception_exit", "set_rflags",
             "task_fork", "task_exec", "pks_update", "pks_abandon")
    COUNT = len(NAMES)


COMPAT_CODES = {"sdm": 0, "qemu": 1}
#: header api byte <-> series version (0: written before the field, read as V10)
API_CODES = {"v6": 6, "v7": 7, "v10": 10}


def api_name(api: str | int) -> str:
    """"v6", "v7" or "v10" for a version name or a header api code (0 = v10)."""
    if isinstance(api, str) and api in API_CODES:
        return api
    if api == 0:
        return "v10"
    for name, code in API_CODES.items():
        if api == code:
            return name
    raise ValueError(f"api {api!r}: expected 'v6', 'v7', 'v10' or a header code 0, 6, 7, 10")
FEATURE_CODES = {"pku": 1, "pks": 2, "smep": 4, "smap": 8, "nx": 16, "1g": 32, "la57": 64}


@dataclass
class TraceHeader:
    paging_levels: int = 4
    ncpus: int = 1
    compat: str = "sdm"
    maxphyaddr: int = 52
    features: frozenset[str] = frozenset(FEATURE_CODES)
    record_count: int = 0
    records_offset: int = 0
    memory_offset: int = 0
    memory_frames: int = 0
    cpu_state_offset: int = HEADER_SIZE
    max_tasks: int = 65536
    tlb_entries: int = 1024
    pkrs_init: int = PKS_INIT_VALUE
    #: series version of the kernel rules: "v6", "v7" or "v10" (v2 headers: the code 0, 6, 7, 10)
    api: Any = "v10"
    version: int = VERSION
    cpu_states: list[tuple[int, ...]] = field(default_factory=list)

    def pack(self) -> bytes:
        feats = sum(FEATURE_CODES[f] for f in self.features)
        raw = HEADER.pack(MAGIC, self.version, HEADER_SIZE, RECORD_SIZE, 0, self.paging_levels,
                          self.ncpus, COMPAT_CODES[self.compat], self.maxphyaddr, feats,
                          self.record_count, self.records_offset, self.memory_offset,
                          self.memory_frames, self.cpu_state_offset, self.max_tasks,
                          self.tlb_entries, self.pkrs_init, API_CODES[self.api])
        return raw.ljust(HEADER_SIZE, b"\0")


def layout(ncpus: int, memory_frames: int) -> tuple[int, int, int]:
    """Offsets (cpu_state, memory, records) of a file with these section sizes."""
    cpu_off = HEADER_SIZE
    mem_off = cpu_off + ncpus * CPU_STATE_SIZE
    rec_off = mem_off + memory_frames * FRAME_ENTRY_SIZE
    rec_off = (rec_off + 7) & ~7
    return cpu_off, mem_off, rec_off


def read_header(path: str | os.PathLike) -> TraceHeader:
    """Read and validate the header and CPU states of a native trace."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
            if len(raw) < 8 or raw[:8] != MAGIC:
                raise TraceFormatError(
                    f"{path}: not a pks_emu trace (magic {raw[:8]!r}, expected {MAGIC!r})")
            if len(raw) < HEADER_SIZE:
                raise TraceFormatError(f"{path}: truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
            (_, version, header_size, record_size, _, levels, ncpus, compat, maxphy, feats, count,
             rec_off, mem_off, frames, cpu_off, max_tasks, tlb_entries, pkrs_init,
             api_code) = HEADER.unpack_from(raw)
            if version > VERSION:
                raise TraceFormatError(
                    f"{path}: trace format version {version} is newer than this pks_emu reads "
                    f"(version {VERSION}); upgrade pks_emu")
            if version < 1 or header_size != HEADER_SIZE or record_size != RECORD_SIZE:
                raise TraceFormatError(
                    f"{path}: unsupported layout (version {version}, header {header_size} bytes, "
                    f"record {record_size} bytes; expected 1, {HEADER_SIZE}, {RECORD_SIZE})")
            if not 1 <= ncpus <= 255:
                raise TraceFormatError(f"{path}: header CPU count {ncpus}: expected 1..255")
            if cpu_off < HEADER_SIZE or cpu_off + ncpus * CPU_STATE_SIZE > size:
                raise TraceFormatError(
                    f"{path}: header CPU-state offset {cpu_off:#x} lies outside the file ({size} bytes)")
            f.seek(cpu_off)
            states = []
            for i in range(ncpus):
                buf = f.read(CPU_STATE_SIZE)
                if len(buf) < CPU_STATE_SIZE:
                    raise TraceFormatError(f"{path}: truncated initial state of CPU {i}")
                states.append(CPU_STATE.unpack(buf))
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if levels not in (4, 5):
        raise TraceFormatError(f"{path}: header paging depth {levels}: expected 4 or 5")
    if levels == 5 and not feats & FEATURE_CODES["la57"]:
        raise TraceFormatError(f"{path}: header: 5-level paging without the la57 feature "
                               "(CR4.LA57 needs CPUID la57): expected 4 levels or la57 in features")
    if not 1 <= ncpus <= 255:
        raise TraceFormatError(f"{path}: header CPU count {ncpus}: expected 1..255")
    compat_name = {v: k for k, v in COMPAT_CODES.items()}.get(compat)
    if compat_name is None:
        raise TraceFormatError(f"{path}: header compat code {compat}: expected 0 (sdm) or 1 (qemu)")
    api_name = "v10" if api_code == 0 else {v: k for k, v in API_CODES.items()}.get(api_code)
    if api_name is None:
        raise TraceFormatError(f"{path}: header api {api_code}: expected 6, 7 or 10 (0 = unspecified, read as 10)")
    if feats & ~sum(FEATURE_CODES.values()):
        raise TraceFormatError(f"{path}: header feature bits {feats:#x} include unknown features")
    if tlb_entries < 1 or tlb_entries > 1 << 24 or tlb_entries & (tlb_entries - 1):
        raise TraceFormatError(f"{path}: header TLB size {tlb_entries}: expected a power of two in 1..2**24")
    if not 1 <= max_tasks <= MAX_TASKS_LIMIT:
        raise TraceFormatError(f"{path}: header max_tasks {max_tasks}: expected 1..{MAX_TASKS_LIMIT}")
    if not 36 <= maxphy <= 52:
        raise TraceFormatError(f"{path}: header MAXPHYADDR {maxphy}: expected 36..52")
    if (rec_off % 8 or rec_off < mem_off + frames * FRAME_ENTRY_SIZE
            or mem_off < cpu_off + ncpus * CPU_STATE_SIZE):
        raise TraceFormatError(f"{path}: header section offsets are inconsistent")
    if mem_off + frames * FRAME_ENTRY_SIZE > size:
        whole = max(0, size - mem_off) // FRAME_ENTRY_SIZE
        raise TraceFormatError(
            f"{path}: truncated inside the memory image: header promises {frames} frames, "
            f"the file ends in frame {whole} ({size} bytes)")
    if rec_off > size:
        raise TraceFormatError(f"{path}: truncated before the records ({size} bytes, records "
                               f"start at {rec_off})")
    expected = rec_off + count * RECORD_SIZE
    if size < expected:
        have = max(0, size - rec_off) // RECORD_SIZE
        raise TraceFormatError(
            f"{path}: truncated: header promises {count} records, file holds {have} "
            f"(record {have} is incomplete or missing; {size} bytes, expected {expected})")
    if size > expected:
        raise TraceFormatError(
            f"{path}: {size - expected} trailing bytes after the last record "
            f"(header says {count} records)")
    return TraceHeader(paging_levels=levels, ncpus=ncpus, compat=compat_name, maxphyaddr=maxphy,
                       features=frozenset(n for n, b in FEATURE_CODES.items() if feats & b),
                       record_count=count, records_offset=rec_off, memory_offset=mem_off,
                       memory_frames=frames, cpu_state_offset=cpu_off, max_tasks=max_tasks,
                       tlb_entries=tlb_entries, pkrs_init=pkrs_init, api=api_name, version=version,
                       cpu_states=states)


def is_native_trace(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == MAGIC
    except OSError:
        return False


#: What is wrong with a record, indexed by the problem code of the compiled
#: validity table (record_problem in _replay.pxi); ``r`` is the record, ``h``
#: the header. Adding a record type: its checks there, its message here.
RECORD_PROBLEMS: tuple[Callable[[Any, TraceHeader], str], ...] = (
    lambda r, h: "valid record",
    lambda r, h: f"unknown record type {r['type']}: expected 0..{RecordType.COUNT - 1}",
    lambda r, h: f"CPU {r['cpu']} out of range (the trace has {h.ncpus})",
    lambda r, h: f"access kind {r['op']}: expected 0 (read), 1 (write) or 2 (fetch)",
    lambda r, h: f"access size {r['size']}: expected 1..4096",
    lambda r, h: f"CPL {r['cpl']}: expected 0..3 or 255 (keep)",
    lambda r, h: f"MOV to CR{r['op']}: expected CR0, CR3 or CR4",
    lambda r, h: f"task id {r['value']} out of range (header max_tasks {h.max_tasks})",
    lambda r, h: f"PTE address {int(r['addr']):#x}: expected 8-byte aligned and below 2**52",
    lambda r, h: f"MSR number {int(r['addr']):#x} does not fit in 32 bits",
    lambda r, h: f"pkey {int(r['value'])}: expected 0..15",
    lambda r, h: f"protection bits {r['op']}: expected 0 (read/write), 1 (AD), 2 (WD) or 3",
    lambda r, h: f"pks_abandon_protections exists only in the V7 API (this replay runs {api_name(h.api)})",
)


def record_problem_message(recs: np.ndarray, index: int, header: TraceHeader) -> str | None:
    """Why record ``index`` of ``recs`` must not be replayed, or None."""
    one = np.ascontiguousarray(recs[index:index + 1])
    bad, why = first_invalid_record(one.view(np.uint8).reshape(-1).data, header.ncpus,
                                    header.max_tasks, api_name(header.api))
    return None if bad < 0 else RECORD_PROBLEMS[why](one[0], header)


def validate_records(path: str, recs: np.ndarray, first_index: int, header: TraceHeader) -> None:
    """Check a chunk of records against the validity table (the one the
    replay loop applies). Raises TraceFormatError naming the file, the record
    index and the field."""
    if len(recs) == 0:
        return
    recs = np.ascontiguousarray(recs)
    bad, why = first_invalid_record(recs.view(np.uint8).reshape(-1).data, header.ncpus,
                                    header.max_tasks, api_name(header.api))
    if bad >= 0:
        raise TraceFormatError(
            f"{path}: record {first_index + bad}: {RECORD_PROBLEMS[why](recs[bad], header)}")
