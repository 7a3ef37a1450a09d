"""Trace format version 2: chunked, compact, streamable (docs/trace-format.md, "Version 2").

A v2 stream is, little-endian throughout::

    header (128 bytes, magic PKSEMUTR, version 2, CRC-32C)
    [PKSS block: the initial state of each CPU]
    [PKSM blocks: the initial physical memory, frame by frame]
    PKSC blocks: chunks of records, each decodable on its own
    PKSE block: end marker with the totals

Every block is ``tag[4], u32 length, u32 CRC-32C of the payload, u32 0`` then
its payload (CRC-32C, Castagnoli), so a reader on a pipe needs no seek. The record codec (tag
bytes, varint deltas of addresses and IPs per CPU, physical addresses
relative to the virtual ones) is compiled: ``pks_emu/_tracev2.pyx``.

Records in memory are those of v1 (``RECORD``) plus two parallel uint64
arrays: ``ip`` (0 = unknown) and ``pa`` (``PA_NONE`` = unknown, or None for
a trace without physical addresses).
"""
from __future__ import annotations

import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from .._tracev2 import MAX_CHUNK_RECORDS, PA_NONE, Codec, crc32c
from ..atomic import is_special
from ..errors import PksEmuError, TraceFormatError
from .format import (COMPAT_CODES, CPU_STATE, CPU_STATE_SIZE, FEATURE_CODES, FRAME_SIZE, KEEP_CPL,
                     MAGIC, MAX_TASKS_LIMIT, RECORD, RecordType, TraceHeader, read_header,
                     validate_records)

__all__ = ["VERSION", "HEADER_SIZE", "PA_NONE", "TF_KERNEL_CAPTURE", "TF_HAS_PA", "FLAG_AC",
           "CODECS", "TraceHeaderV2", "V2Writer", "V2Reader", "open_trace_v2", "is_v2_magic",
           "convert_v1_to_v2", "lackey_to_v2", "MAX_CHUNK_RECORDS", "DEFAULT_CHUNK_RECORDS"]

VERSION = 2
HEADER_SIZE = 128
#: trace_flags bit 0: no memory image; a kernel policy builds the page tables at replay
TF_KERNEL_CAPTURE = 0x1
#: trace_flags bit 1: records carry guest-physical addresses
TF_HAS_PA = 0x2
TF_KNOWN = TF_KERNEL_CAPTURE | TF_HAS_PA
#: access flag bit 1: EFLAGS.AC was 1 (stac ... clac)
FLAG_AC = 0x2
APIS = (0, 6, 7, 10)

#: magic, version, header_size, record_size, reserved, paging_levels, ncpus, compat,
#: maxphyaddr, features, max_tasks, tlb_entries, pkrs_init, api, reserved, trace_flags,
#: cpu_states (0 or 1); then u32 CRC-32C of these 48 bytes at offset 48
HEADER2 = struct.Struct("<8sHHHHBBBBIIIIHHII")
assert HEADER2.size == 48
BLOCK = struct.Struct("<4sIII")       # tag, payload length, CRC-32C of the payload, reserved
CHUNK = struct.Struct("<QIIIBBH")     # first_index, nrec, raw_len, main_len, codec, flags, reserved
END = struct.Struct("<QQQ")           # records, chunks, memory frames
TAG_STATES, TAG_MEMORY, TAG_CHUNK, TAG_END = b"PKSS", b"PKSM", b"PKSC", b"PKSE"
TAGS = {TAG_STATES: "CPU states", TAG_MEMORY: "memory", TAG_CHUNK: "chunk", TAG_END: "end marker"}
CHUNK_HAS_PA = 0x1
#: the largest block payload a reader accepts (bounded memory whatever the input)
MAX_BLOCK = 64 << 20
FRAME_ENTRY = 8 + FRAME_SIZE
FRAMES_PER_BLOCK = 256
DEFAULT_CHUNK_RECORDS = 32768

#: codec id by name; readers accept all of them
CODECS = {"none": 0, "zstd": 1, "lz4": 2}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}
DEFAULT_CODEC = "lz4"


@dataclass
class TraceHeaderV2(TraceHeader):
    """The v1 header fields (the v1-only offsets and counts are unused) plus
    ``api`` (the header code 0 = unspecified/V10, 6, 7, 10; a writer also takes
    the names "v6", "v7", "v10") and ``trace_flags``."""

    api: int = 0  # type: ignore[assignment]  # v1's TraceHeader holds the name; v2 the code
    trace_flags: int = 0
    version: int = VERSION
    cpu_states: list[tuple[int, ...]] = field(default_factory=list)

    def pack_v2(self) -> bytes:
        feats = sum(FEATURE_CODES[f] for f in self.features)
        raw = HEADER2.pack(MAGIC, VERSION, HEADER_SIZE, RECORD.itemsize, 0, self.paging_levels,
                           self.ncpus, COMPAT_CODES[self.compat], self.maxphyaddr, feats,
                           self.max_tasks, self.tlb_entries, self.pkrs_init, _api_code(self.api), 0,
                           self.trace_flags, 1 if self.cpu_states else 0)
        return (raw + struct.pack("<I", crc32c(raw))).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def from_header(cls, h: TraceHeader, **kw: Any) -> TraceHeaderV2:
        """A v2 header with the machine of ``h`` (a v1 header keeps its api)."""
        kw.setdefault("api", _api_code(getattr(h, "api", 0) or 0))
        return cls(paging_levels=h.paging_levels, ncpus=h.ncpus, compat=h.compat,
                   maxphyaddr=h.maxphyaddr, features=h.features, max_tasks=h.max_tasks,
                   tlb_entries=h.tlb_entries, pkrs_init=h.pkrs_init,
                   cpu_states=list(h.cpu_states), **kw)

    @classmethod
    def from_machine(cls, machine, *, max_tasks: int = 65536, pkrs_init: int | None = None,
                     **kw: Any) -> TraceHeaderV2:
        from ..constants import PKS_INIT_VALUE
        states: list[tuple[int, ...]] = [(c.cr0, c.cr3, c.cr4, c.efer, c.rflags, c.cpl, c.pkru, c.pkrs)
                                         for c in machine.cpus]
        return cls(paging_levels=machine.paging_levels, ncpus=machine.ncpus,
                   compat=machine.compat, maxphyaddr=machine.maxphyaddr,
                   features=frozenset(machine.features), max_tasks=max_tasks,
                   tlb_entries=machine.cpus[0].tlb_entries,
                   pkrs_init=PKS_INIT_VALUE if pkrs_init is None else pkrs_init,
                   cpu_states=[tuple(s) for s in states], **kw)


def _api_code(api) -> int:
    """Header api code of a code (0, 6, 7, 10) or a name ("v6", "v7", "v10")."""
    if isinstance(api, str):
        codes = {"v6": 6, "v7": 7, "v10": 10}
        if api in codes:
            return codes[api]
    elif api in APIS:
        return int(api)
    raise ValueError(f"api {api!r}: expected one of {APIS} or 'v6', 'v7', 'v10'")


def is_v2_magic(first_bytes: bytes) -> bool:
    """True if ``first_bytes`` (at least 10) start a v2 stream."""
    return (len(first_bytes) >= 10 and first_bytes[:8] == MAGIC
            and first_bytes[8:10] == VERSION.to_bytes(2, "little"))


def _looks_like_ours(raw: bytes) -> bool:
    """A damaged magic: a few bytes of PKSEMUTR flipped, or the rest of the header intact."""
    if len(raw) >= 8 and sum(a != b for a, b in zip(raw[:8], MAGIC)) <= 3:
        return True
    return len(raw) >= 14 and raw[8:14] == struct.pack("<HHH", VERSION, HEADER_SIZE, RECORD.itemsize)


# --- writing ------------------------------------------------------------------------------


class V2Writer:
    """Write a v2 trace to ``dest``: a path (written to a temporary file in the
    same folder, renamed on ``close()``; removed if the ``with`` block raises),
    ``-`` (standard output), a binary file object or a file descriptor.

    ``header`` gives the machine (:class:`TraceHeaderV2`, or a v1
    :class:`TraceHeader`: api 0, no trace flags), its ``cpu_states`` the
    initial registers (optional). Call :meth:`write_memory` for the initial
    frames, then :meth:`write` for records, then :meth:`close` (the end
    marker). Records are buffered and encoded ``chunk_records`` at a time.
    """

    def __init__(self, dest, header: TraceHeader, *, codec: str = DEFAULT_CODEC,
                 chunk_records: int = DEFAULT_CHUNK_RECORDS, level: int | None = None,
                 validate: bool = True) -> None:
        if not isinstance(header, TraceHeaderV2):
            header = TraceHeaderV2.from_header(header)
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r}: expected one of {', '.join(CODECS)}")
        if not 1 <= chunk_records <= MAX_CHUNK_RECORDS:
            raise ValueError(f"chunk_records {chunk_records}: expected 1..{MAX_CHUNK_RECORDS}")
        _api_code(header.api)     # raises ValueError for an unknown api
        if header.trace_flags & ~TF_KNOWN:
            raise ValueError(f"trace_flags {header.trace_flags:#x}: unknown bits")
        if header.cpu_states and len(header.cpu_states) != header.ncpus:
            raise ValueError(f"{len(header.cpu_states)} CPU states for {header.ncpus} CPUs")
        if not 1 <= header.max_tasks <= MAX_TASKS_LIMIT:
            raise ValueError(f"max_tasks {header.max_tasks}: expected 1..{MAX_TASKS_LIMIT}")
        self.header = header
        self.codec = codec
        self._codec_id = CODECS[codec]
        self._compress = _compressor(codec, level)
        self.chunk_records = chunk_records
        self.validate = validate
        self.has_pa = bool(header.trace_flags & TF_HAS_PA)
        self._enc = Codec(header.ncpus)
        self._tmp: str | None = None
        self._final: str | None = None
        self._own = False
        self._f: BinaryIO
        if isinstance(dest, (str, os.PathLike)) and os.fspath(dest) != "-" and is_special(os.fspath(dest)):
            # A device or FIFO (/dev/null, a pipe) cannot be renamed onto: write it directly.
            self.name = os.fspath(dest)
            try:
                self._f = open(self.name, "wb")
            except OSError as e:
                raise PksEmuError(f"{self.name}: cannot write: {e.strerror or e}") from None
            self._own = True
        elif isinstance(dest, (str, os.PathLike)) and os.fspath(dest) != "-":
            self.name = os.fspath(dest)
            d = os.path.dirname(os.path.abspath(self.name))
            fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pkt2", dir=d)
            self._f = os.fdopen(fd, "wb")
            self._final = self.name
            self._own = True
        elif isinstance(dest, (str, os.PathLike)):
            self.name = "<stdout>"
            self._f = sys.stdout.buffer
        elif isinstance(dest, int):
            self.name = f"<fd {dest}>"
            self._f = os.fdopen(dest, "wb", closefd=False)
            self._own = True
        else:
            self.name = getattr(dest, "name", "<stream>")
            self._f = dest
        self._closed = False
        self._records_started = False
        self.count = 0
        self.chunks = 0
        self.frames = 0
        self.bytes_written = 0
        self._recs = np.zeros(chunk_records, dtype=RECORD)
        self._ip = np.zeros(chunk_records, dtype=np.uint64)
        self._pa = np.full(chunk_records, PA_NONE, dtype=np.uint64) if self.has_pa else None
        self._n = 0
        self._out(header.pack_v2())
        if header.cpu_states:
            self._block(TAG_STATES, b"".join(CPU_STATE.pack(*s) for s in header.cpu_states))

    # low level
    def _out(self, b) -> None:
        try:
            self._f.write(b)
        except OSError as e:
            raise PksEmuError(f"{self.name}: cannot write: {e.strerror or e}") from None
        self.bytes_written += len(b)

    def _block(self, tag: bytes, *parts) -> None:
        crc = 0
        n = 0
        for p in parts:
            crc = crc32c(p, crc)
            n += len(p)
        self._out(BLOCK.pack(tag, n, crc, 0))
        for p in parts:
            self._out(p)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.name}: the trace writer is closed")

    # API
    def write_memory(self, pa: int, data) -> None:
        """Initial physical memory: ``data`` (a multiple of 4096 bytes) at frames ``pa``, ``pa + 4096``..."""
        self._check_open()
        if self._records_started:
            raise ValueError(f"{self.name}: memory must be written before the first record")
        data = memoryview(data).cast("B")
        if pa % FRAME_SIZE or len(data) % FRAME_SIZE or pa + len(data) > 1 << 52:
            raise ValueError(f"memory at {pa:#x}, {len(data)} bytes: expected whole 4-KiB frames below 2**52")
        nf = len(data) // FRAME_SIZE
        for i in range(0, nf, FRAMES_PER_BLOCK):
            parts = []
            for j in range(i, min(nf, i + FRAMES_PER_BLOCK)):
                parts.append((pa + j * FRAME_SIZE).to_bytes(8, "little"))
                parts.append(data[j * FRAME_SIZE:(j + 1) * FRAME_SIZE])
            self._block(TAG_MEMORY, *parts)
        self.frames += nf

    def write_machine_memory(self, memory) -> None:
        """Every allocated frame of a ``pks_emu`` physical memory."""
        for pa in memory.frame_addresses():
            self.write_memory(int(pa), memory.read(int(pa), FRAME_SIZE))

    def write(self, records: np.ndarray, ip=None, pa=None) -> None:
        """Append records (RECORD array) with their ``ip`` (None: all 0) and ``pa``."""
        self._check_open()
        records = np.ascontiguousarray(records, dtype=RECORD)
        n = len(records)
        ip = np.zeros(n, np.uint64) if ip is None else np.ascontiguousarray(ip, dtype=np.uint64)
        if ip.shape != (n,):
            raise ValueError(f"ip has shape {ip.shape} for {n} records")
        if pa is not None:
            if not self.has_pa:
                raise ValueError(f"{self.name}: pa given but the header's trace_flags lack HAS_PA")
            pa = np.ascontiguousarray(pa, dtype=np.uint64)
            if pa.shape != (n,):
                raise ValueError(f"pa has shape {pa.shape} for {n} records")
        if self.validate:
            validate_records(self.name, records, self.count + self._n, self.header)
        self._records_started = True
        pos = 0
        cap = self.chunk_records
        while pos < n:
            if self._n == 0 and n - pos >= cap:
                self._encode(records[pos:pos + cap], ip[pos:pos + cap],
                             None if not self.has_pa else
                             (pa[pos:pos + cap] if pa is not None else np.full(cap, PA_NONE, np.uint64)))
                pos += cap
                continue
            k = min(cap - self._n, n - pos)
            self._recs[self._n:self._n + k] = records[pos:pos + k]
            self._ip[self._n:self._n + k] = ip[pos:pos + k]
            if self._pa is not None:
                self._pa[self._n:self._n + k] = PA_NONE if pa is None else pa[pos:pos + k]
            self._n += k
            pos += k
            if self._n == cap:
                self.flush()

    def flush(self) -> None:
        """End the current chunk (nothing if it is empty)."""
        self._check_open()
        if self._n:
            n = self._n
            self._n = 0
            self._encode(self._recs[:n], self._ip[:n], None if self._pa is None else self._pa[:n])

    def _encode(self, recs, ip, pa) -> None:
        try:
            raw, main_len = self._enc.encode(recs.view(np.uint8), ip, pa)
        except ValueError as e:
            if len(e.args) == 2:
                raise ValueError(f"{self.name}: record {self.count + e.args[1]}: {e.args[0]}") from None
            raise
        n = len(recs)
        data = raw if self._compress is None else self._compress(raw)
        codec = self._codec_id
        if self._compress is not None and len(data) >= len(raw):
            data, codec = raw, 0        # the codec did not pay for this chunk
        head = CHUNK.pack(self.count, n, len(raw), main_len, codec,
                          CHUNK_HAS_PA if pa is not None else 0, 0)
        self._block(TAG_CHUNK, head, data)
        self.count += n
        self.chunks += 1

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._block(TAG_END, END.pack(self.count, self.chunks, self.frames))
        self._closed = True
        try:
            self._f.flush()
            if self._own:
                self._f.close()
        except OSError as e:
            self.abort()
            raise PksEmuError(f"{self.name}: cannot write: {e.strerror or e}") from None
        if self._tmp is not None:
            assert self._final is not None
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)     # mkstemp made it 0600
            os.replace(self._tmp, self._final)
            self._tmp = None

    def abort(self) -> None:
        """Drop a path destination's temporary file (nothing is renamed)."""
        self._closed = True
        if self._own:
            try:
                self._f.close()
            except OSError:
                pass        # the write error that brought us here is the one reported
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None

    def __enter__(self) -> V2Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _compressor(codec: str, level: int | None):
    if codec == "none":
        return None
    if codec == "zstd":
        import zstandard
        c = zstandard.ZstdCompressor(level=1 if level is None else level)
        return c.compress
    import lz4.block  # type: ignore[import-untyped]
    lvl = 0 if level is None else level

    def lz4c(raw):
        return lz4.block.compress(raw, store_size=False, mode="high_compression" if lvl > 0 else "default",
                                  compression=lvl)
    return lz4c


def _decompressor(codec: int):
    if codec == 1:
        import zstandard
        d = zstandard.ZstdDecompressor()

        def zd(data, raw_len):
            return d.decompress(data, max_output_size=raw_len)
        return zd
    if codec == 2:
        import lz4.block  # type: ignore[import-untyped]

        def ld(data, raw_len):
            return lz4.block.decompress(data, uncompressed_size=raw_len)
        return ld
    return None


# --- reading ------------------------------------------------------------------------------


class V2Reader:
    """A v2 stream being read front to back (works on a pipe).

    ``header`` and ``cpu_states`` are read on opening; then :meth:`memory`
    (optional) yields the initial frames, and :meth:`chunks` the records.
    Every defect raises :class:`TraceFormatError` naming the stream, the
    block or chunk, and the record where one is concerned.
    """

    def __init__(self, f: BinaryIO, name: str, *, own: bool = False) -> None:
        self._f = f
        self.name = name
        self._own = own
        self._offset = 0
        self._pending: tuple[bytes, bytes, int] | None = None
        self._phase = 0          # 0 memory not yet read, 1 memory read, 2 chunks started
        self._done = False
        self.records = 0
        self.chunk_count = 0
        self.frames = 0
        self.totals: tuple[int, int, int] | None = None
        try:
            self.header = self._read_header()
            self.cpu_states: list[tuple[int, ...]] = []
            if self._has_states:
                blk = self._next_block()
                if blk is None or blk[0] != TAG_STATES:
                    raise TraceFormatError(f"{name}: the header announces CPU states, "
                                           f"but no CPU-state block follows it")
                payload = blk[1]
                if len(payload) != self.header.ncpus * CPU_STATE_SIZE:
                    raise TraceFormatError(
                        f"{name}: CPU-state block of {len(payload)} bytes: expected "
                        f"{self.header.ncpus} x {CPU_STATE_SIZE}")
                self.cpu_states = [CPU_STATE.unpack_from(payload, i * CPU_STATE_SIZE)
                                   for i in range(self.header.ncpus)]
                self.header.cpu_states = self.cpu_states
        except BaseException:
            self.close()
            raise
        self._codec = Codec(self.header.ncpus)

    # low level
    def _read(self, n: int) -> bytes:
        parts = []
        got = 0
        while got < n:
            try:
                b = self._f.read(n - got)
            except OSError as e:
                raise TraceFormatError(f"{self.name}: cannot read: {e.strerror or e}") from None
            if not b:
                break
            parts.append(b)
            got += len(b)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._offset += len(data)
        return data

    def _read_header(self) -> TraceHeaderV2:
        name = self.name
        raw = self._read(HEADER_SIZE)
        if 0 < len(raw) < 8 and MAGIC.startswith(raw):
            raise TraceFormatError(f"{name}: truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
        if len(raw) < 8 or raw[:8] != MAGIC:
            if _looks_like_ours(raw):
                raise TraceFormatError(f"{name}: damaged pks_emu trace: magic {raw[:8]!r}, expected {MAGIC!r}")
            raise TraceFormatError(f"{name}: not a pks_emu trace (magic {raw[:8]!r}, expected {MAGIC!r})")
        if len(raw) < HEADER_SIZE:
            raise TraceFormatError(f"{name}: truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
        (_, version, header_size, record_size, _, levels, ncpus, compat, maxphy, feats, max_tasks,
         tlb_entries, pkrs_init, api, _, trace_flags, has_states) = HEADER2.unpack_from(raw)
        if version != VERSION:
            raise TraceFormatError(f"{name}: trace format version {version}: this reader reads version "
                                   f"{VERSION} (version 1 is read by pks_emu.trace.format)")
        (crc,) = struct.unpack_from("<I", raw, 48)
        if crc != crc32c(raw[:48]):
            raise TraceFormatError(f"{name}: damaged pks_emu trace: header checksum mismatch")
        if any(raw[52:]):
            raise TraceFormatError(f"{name}: damaged pks_emu trace: reserved header bytes 52..127 are not zero")
        if header_size != HEADER_SIZE or record_size != RECORD.itemsize:
            raise TraceFormatError(f"{name}: unsupported layout (header {header_size} bytes, "
                                   f"record {record_size} bytes; expected {HEADER_SIZE}, {RECORD.itemsize})")
        if levels not in (4, 5):
            raise TraceFormatError(f"{name}: header paging depth {levels}: expected 4 or 5")
        if not 1 <= ncpus <= 255:
            raise TraceFormatError(f"{name}: header CPU count {ncpus}: expected 1..255")
        compat_name = {v: k for k, v in COMPAT_CODES.items()}.get(compat)
        if compat_name is None:
            raise TraceFormatError(f"{name}: header compat code {compat}: expected 0 (sdm) or 1 (qemu)")
        if feats & ~sum(FEATURE_CODES.values()):
            raise TraceFormatError(f"{name}: header feature bits {feats:#x} include unknown features")
        if tlb_entries < 1 or tlb_entries > 1 << 24 or tlb_entries & (tlb_entries - 1):
            raise TraceFormatError(f"{name}: header TLB size {tlb_entries}: expected a power of two in 1..2**24")
        if not 1 <= max_tasks <= MAX_TASKS_LIMIT:
            raise TraceFormatError(f"{name}: header max_tasks {max_tasks}: expected 1..{MAX_TASKS_LIMIT}")
        if not 36 <= maxphy <= 52:
            raise TraceFormatError(f"{name}: header MAXPHYADDR {maxphy}: expected 36..52")
        if api not in APIS:
            raise TraceFormatError(f"{name}: header api {api}: expected one of {APIS}")
        if trace_flags & ~TF_KNOWN:
            raise TraceFormatError(f"{name}: header trace_flags {trace_flags:#x} include unknown bits")
        if has_states > 1:
            raise TraceFormatError(f"{name}: header cpu_states {has_states}: expected 0 or 1")
        self._has_states = bool(has_states)
        return TraceHeaderV2(paging_levels=levels, ncpus=ncpus, compat=compat_name, maxphyaddr=maxphy,
                             features=frozenset(n for n, b in FEATURE_CODES.items() if feats & b),
                             max_tasks=max_tasks, tlb_entries=tlb_entries, pkrs_init=pkrs_init,
                             api=api, trace_flags=trace_flags)

    def _what_next(self) -> str:
        return f"chunk {self.chunk_count} (record {self.records})"

    def _next_block(self) -> tuple[bytes, bytes, int] | None:
        """(tag, payload, offset) of the next block, or None at the end of the stream."""
        if self._pending is not None:
            b, self._pending = self._pending, None
            return b
        off = self._offset
        head = self._read(BLOCK.size)
        if not head:
            return None
        if len(head) < BLOCK.size:
            raise TraceFormatError(
                f"{self.name}: truncated at offset {off}: {len(head)} of the {BLOCK.size} bytes of a block "
                f"header (the next block would be {self._what_next()} or the end marker); "
                f"no end marker")
        tag, length, crc, reserved = BLOCK.unpack(head)
        what = TAGS.get(tag)
        if what is None:
            raise TraceFormatError(f"{self.name}: offset {off}: unknown block tag {tag!r} where "
                                   f"{self._what_next()} or the end marker was expected "
                                   "(damaged pks_emu trace)")
        if length > MAX_BLOCK + CHUNK.size or reserved:
            raise TraceFormatError(f"{self.name}: offset {off}: {what} block of {length} bytes "
                                   f"(reserved {reserved}): damaged pks_emu trace")
        payload = self._read(length)
        if len(payload) < length:
            label = self._what_next() if tag == TAG_CHUNK else f"{what} block"
            raise TraceFormatError(
                f"{self.name}: truncated inside {label} at offset {off}: {len(payload)} of "
                f"{length} payload bytes; no end marker")
        if crc32c(payload) != crc:
            label = self._what_next() if tag == TAG_CHUNK else f"{what} block"
            raise TraceFormatError(f"{self.name}: {label} at offset {off}: checksum mismatch "
                                   "(damaged pks_emu trace)")
        return tag, payload, off

    # API
    def memory(self) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(pa, 4096-byte frame)`` of the memory image; before :meth:`chunks`."""
        if self._phase != 0:
            raise TraceFormatError(f"{self.name}: memory() must be read once, before chunks()")
        self._phase = 1
        while True:
            blk = self._next_block()
            if blk is None:
                raise TraceFormatError(f"{self.name}: truncated after the memory image "
                                       f"({self.frames} frames): no chunk and no end marker")
            tag, payload, off = blk
            if tag != TAG_MEMORY:
                self._pending = blk
                return
            if not payload or len(payload) % FRAME_ENTRY:
                raise TraceFormatError(f"{self.name}: memory block at offset {off}: {len(payload)} bytes, "
                                       f"expected a multiple of {FRAME_ENTRY}")
            mv = memoryview(payload)
            for i in range(0, len(payload), FRAME_ENTRY):
                pa = int.from_bytes(mv[i:i + 8], "little")
                if pa % FRAME_SIZE or pa >= 1 << 52:
                    raise TraceFormatError(f"{self.name}: memory block at offset {off}: frame address "
                                           f"{pa:#x}: expected 4-KiB aligned and below 2**52")
                self.frames += 1
                yield pa, mv[i + 8:i + FRAME_ENTRY]

    def raw_chunks(self) -> Iterator[tuple[int, int, int, int, int, Any]]:
        """Yield ``(chunk_index, first_index, nrec, flags, main_len, raw)`` undecoded
        (decompressed) chunks, checking order and the end marker."""
        if self._phase == 0:
            for _ in self.memory():
                pass
        if self._phase == 2:
            raise TraceFormatError(f"{self.name}: chunks() can be read only once")
        self._phase = 2
        while True:
            blk = self._next_block()
            if blk is None:
                raise TraceFormatError(
                    f"{self.name}: truncated: the stream ends after {self.chunk_count} complete chunks "
                    f"({self.records} records) without its end marker")
            tag, payload, off = blk
            if tag == TAG_END:
                if len(payload) != END.size:
                    raise TraceFormatError(f"{self.name}: end marker of {len(payload)} bytes, expected {END.size}")
                self.totals = END.unpack(payload)
                if self.totals != (self.records, self.chunk_count, self.frames):
                    raise TraceFormatError(
                        f"{self.name}: end marker says {self.totals[0]} records in {self.totals[1]} chunks "
                        f"and {self.totals[2]} frames; the stream holds {self.records} records in "
                        f"{self.chunk_count} chunks and {self.frames} frames")
                if self._read(1):
                    raise TraceFormatError(f"{self.name}: trailing bytes after the end marker")
                self._done = True
                return
            if tag == TAG_MEMORY and self.chunk_count == 0:
                # the rest of a memory image nobody read (memory() not exhausted)
                self._pending = blk
                self._phase = 0
                for _ in self.memory():
                    pass
                self._phase = 2
                continue
            k = self.chunk_count
            where = f"{self.name}: chunk {k} (record {self.records}, offset {off})"
            if tag != TAG_CHUNK:
                raise TraceFormatError(f"{where}: a {TAGS[tag]} block where a chunk or the end marker "
                                       "was expected")
            if len(payload) < CHUNK.size:
                raise TraceFormatError(f"{where}: {len(payload)} bytes, shorter than a chunk header")
            first, nrec, raw_len, main_len, codec, flags, res = CHUNK.unpack_from(payload)
            if first != self.records:
                raise TraceFormatError(f"{where}: first record index {first}, expected {self.records}")
            if not 1 <= nrec <= MAX_CHUNK_RECORDS:
                raise TraceFormatError(f"{where}: {nrec} records, expected 1..{MAX_CHUNK_RECORDS}")
            if raw_len > MAX_BLOCK or main_len > raw_len or flags & ~CHUNK_HAS_PA or res:
                raise TraceFormatError(f"{where}: inconsistent chunk header (raw {raw_len} bytes, "
                                       f"main {main_len}, flags {flags:#x})")
            if bool(flags & CHUNK_HAS_PA) != bool(self.header.trace_flags & TF_HAS_PA):
                raise TraceFormatError(f"{where}: chunk pa flag disagrees with the header's HAS_PA")
            if not (flags & CHUNK_HAS_PA) and main_len != raw_len:
                raise TraceFormatError(f"{where}: {raw_len - main_len} bytes of pa stream in a chunk without pa")
            data = memoryview(payload)[CHUNK.size:]
            if codec == 0:
                raw = data
                if len(raw) != raw_len:
                    raise TraceFormatError(f"{where}: {len(raw)} bytes of records, header says {raw_len}")
            else:
                dec = _decompressor(codec)
                if dec is None:
                    raise TraceFormatError(f"{where}: unknown codec {codec} (expected 0 none, 1 zstd, 2 lz4)")
                try:
                    raw = dec(data, raw_len)
                except Exception as e:  # the codec libraries raise their own types
                    raise TraceFormatError(f"{where}: corrupt {_CODEC_NAMES[codec]} data: {e}") from None
                if len(raw) != raw_len:
                    raise TraceFormatError(f"{where}: {_CODEC_NAMES[codec]} data gives {len(raw)} bytes, "
                                           f"expected {raw_len}")
            self.chunk_count += 1
            self.records += nrec
            yield k, first, nrec, flags, main_len, raw

    def chunks(self, *, reuse: bool = False, validate: bool = True, prefetch: int = 0
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
        """Yield ``(first_index, records, ip, pa_or_None)`` per chunk.

        ``reuse=True`` decodes every chunk into the same arrays (valid until
        the next chunk). ``validate`` checks the records' fields as v1 does.
        ``prefetch=N`` (N >= 1) reads, checks and decodes up to N chunks ahead
        on a background thread (reading, CRC, decompression and decoding all
        run without the GIL), so that a consumer whose own loop releases the
        GIL (the replay) overlaps with decoding on a second core; the arrays
        of a chunk are then valid until the next iteration, whatever ``reuse``.
        After the last chunk the end marker is checked; a stream without one
        raises :class:`TraceFormatError` after its complete chunks.
        """
        if prefetch:
            return self._chunks_prefetch(int(prefetch), validate)
        return self._chunks(reuse, validate)

    def _decode_into(self, codec: Codec, k: int, first: int, nrec: int, main_len: int, raw,
                     bufs, validate: bool):
        has_pa = bufs[2] is not None
        recs, ip = bufs[0][:nrec], bufs[1][:nrec]
        pa = bufs[2][:nrec] if has_pa else None
        bad = codec.decode(raw, main_len, nrec, has_pa, recs.view(np.uint8), ip, pa)
        if bad is not None:
            code, rec, msg = bad
            raise TraceFormatError(f"{self.name}: chunk {k} (records {first}..{first + nrec - 1}): "
                                   f"record {first + rec}: {msg} (damaged pks_emu trace)")
        if validate:
            validate_records(self.name, recs, first, self.header)
        return first, recs, ip, pa

    def _new_bufs(self, nrec: int):
        has_pa = bool(self.header.trace_flags & TF_HAS_PA)
        return (np.empty(nrec, RECORD), np.empty(nrec, np.uint64),
                np.empty(nrec, np.uint64) if has_pa else None)

    def _chunks(self, reuse: bool, validate: bool):
        bufs = None
        for k, first, nrec, flags, main_len, raw in self.raw_chunks():
            if not reuse:
                b = self._new_bufs(nrec)
            else:
                if bufs is None or len(bufs[0]) < nrec:
                    bufs = self._new_bufs(max(nrec, DEFAULT_CHUNK_RECORDS))
                b = bufs
            yield self._decode_into(self._codec, k, first, nrec, main_len, raw, b, validate)

    def _chunks_prefetch(self, depth: int, validate: bool):
        import queue
        import threading
        free: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue(maxsize=depth)
        for _ in range(depth + 2):
            free.put(None)            # a slot; arrays are made on first use
        stop = threading.Event()
        codec = Codec(self.header.ncpus)
        end = object()

        def work() -> None:
            try:
                for k, first, nrec, flags, main_len, raw in self.raw_chunks():
                    while True:
                        try:
                            b = free.get(timeout=0.1)
                            break
                        except queue.Empty:
                            if stop.is_set():
                                return
                    if b is None or len(b[0]) < nrec:
                        b = self._new_bufs(max(nrec, DEFAULT_CHUNK_RECORDS))
                    item = (self._decode_into(codec, k, first, nrec, main_len, raw, b, validate), b)
                    while not stop.is_set():
                        try:
                            done.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
                done.put((end, None))
            except BaseException as e:    # handed to the consumer, raised in order
                while not stop.is_set():
                    try:
                        done.put((e, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass

        t = threading.Thread(target=work, name="pks-emu-v2-prefetch", daemon=True)
        t.start()
        prev = None
        try:
            while True:
                item, b = done.get()
                if prev is not None:
                    free.put(prev)
                    prev = None
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                prev = b
                yield item
        finally:
            stop.set()
            t.join()

    def close(self) -> None:
        if self._own:
            self._f.close()

    def __enter__(self) -> V2Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_trace_v2(src) -> V2Reader:
    """Open a v2 stream: a path, ``-`` (standard input) or a binary file object (a pipe too)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if path == "-":
            return V2Reader(sys.stdin.buffer, "<stdin>")
        try:
            f = open(path, "rb")
        except OSError as e:
            raise TraceFormatError(f"{path}: cannot read: {e.strerror or e}") from None
        return V2Reader(f, path, own=True)
    if isinstance(src, int):
        return V2Reader(os.fdopen(src, "rb", closefd=False), f"<fd {src}>", own=True)
    return V2Reader(src, getattr(src, "name", "<stream>"))


# --- converters ---------------------------------------------------------------------------


def convert_v1_to_v2(src: str | os.PathLike, dst, *, codec: str = DEFAULT_CODEC,
                     chunk_records: int = DEFAULT_CHUNK_RECORDS) -> dict:
    """Rewrite a v1 trace as v2 (ip 0 = unknown, no pa). Bounded memory."""
    src = os.fspath(src)
    h = read_header(src)
    header = TraceHeaderV2.from_header(h)
    step = max(chunk_records, 1 << 18)
    with V2Writer(dst, header, codec=codec, chunk_records=chunk_records, validate=False) as w:
        with open(src, "rb") as f:
            f.seek(h.memory_offset)
            for _ in range(h.memory_frames):
                entry = f.read(FRAME_ENTRY)
                if len(entry) < FRAME_ENTRY:
                    raise TraceFormatError(f"{src}: truncated memory image")
                w.write_memory(int.from_bytes(entry[:8], "little"), entry[8:])
        if h.record_count:
            mm = np.memmap(src, dtype=RECORD, mode="r", offset=h.records_offset, shape=(h.record_count,))
            zeros = np.zeros(step, np.uint64)
            for pos in range(0, h.record_count, step):
                recs = np.asarray(mm[pos:pos + step])
                validate_records(src, recs, pos, h)
                w.write(recs, zeros[:len(recs)])
            del mm
    stats = {"records": w.count, "chunks": w.chunks, "frames": w.frames, "bytes": w.bytes_written}
    return stats


def lackey_to_v2(src: str | os.PathLike, dst, *, policy=None, skip_bad: bool = False,
                 codec: str = DEFAULT_CODEC, chunk_records: int = DEFAULT_CHUNK_RECORDS,
                 parse_records: int = 1 << 20) -> dict:
    """Convert a lackey trace file (plain, .gz, .xz, .bz2) to v2 through a policy.

    Two passes, as ``convert_lackey``: the touched pages first (to build the
    page tables), then the records with their IPs; memory stays bounded by
    ``parse_records`` whatever the input length.
    """
    from ..lackey import iter_lackey
    from .convert import touched_pages
    from .policy import Policy, build_machine, load_policy
    src = os.fspath(src)
    if src == "-":
        raise ValueError("lackey_to_v2 reads its input twice (pages, then records): give a file, "
                         "not standard input")
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    pages, stats = touched_pages(src, skip_bad=skip_bad, chunk_records=parse_records)
    machine, map_stats = build_machine(policy, pages)
    stats.update(map_stats)
    stats["policy"] = policy.source
    header = TraceHeaderV2.from_machine(machine)
    recs = np.zeros(parse_records, dtype=RECORD)
    recs["type"] = RecordType.ACCESS
    recs["cpl"] = KEEP_CPL
    with V2Writer(dst, header, codec=codec, chunk_records=chunk_records, validate=False) as w:
        w.write_machine_memory(machine.memory)
        for chunk in iter_lackey(src, chunk_records=parse_records, skip_bad=skip_bad):
            n = len(chunk)
            if n and (chunk.size.min() < 1 or chunk.size.max() > 4096):
                raise ValueError("access sizes must be 1..4096")
            r = recs[:n]
            r["op"] = chunk.kind
            r["size"] = chunk.size
            r["addr"] = chunk.va
            w.write(r, chunk.ip)
    stats["records_written"] = w.count
    stats["chunks"] = w.chunks
    stats["bytes"] = w.bytes_written
    return stats
