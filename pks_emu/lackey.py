"""Import Valgrind lackey memory traces (``valgrind --tool=lackey --trace-mem=yes``).

Lackey prints one line per access (``lackey/lk_main.c``, valgrind 3.19)::

    I  0401ab70,3        instruction fetch    -> kind 2 (FETCH)
     L 04a1ade0,8        load                 -> kind 0 (READ)
     S 1fff000778,8      store                -> kind 1 (WRITE)
     M 04033e06,1        modify               -> two records: READ, then WRITE

The kinds are those of :class:`pks_emu.AccessKind`. Rules of this reader:

- ``ADDR`` is 1 to 16 hex digits, either case. Lackey zero-pads to at least
  8, but a shorter address is unambiguous, so it is accepted; more than 16
  digits cannot be a 64-bit address and is malformed.
- ``SIZE`` is decimal, 1..65535. Lackey never prints 0 (its largest size is
  ``MAX_DSIZE`` = 512), so size 0 means a damaged line and is malformed, as
  is anything after the size but the line end.
- Lines starting with ``==`` (valgrind's ``==PID==`` messages, which share the
  log with the trace), ``SB ADDR`` superblock lines (``--trace-superblocks``)
  and empty lines are skipped and counted in ``skipped_lines``.
- LF or CRLF line ends; a missing final newline is fine.
- Any other line is malformed: :class:`~pks_emu.errors.TraceFormatError`
  naming the file, the 1-based line number, the text and what was expected
  (also in its ``path``, ``line_number`` and ``text`` attributes);
  with ``skip_bad=True`` it is counted in ``bad_lines`` instead, and the first
  20 are kept in ``bad_examples``. A line longer than 64 KiB cannot be a
  record: it is skipped if it starts with ``==``, else it is malformed.
- Input may be plain, gzip, xz or bzip2, detected from the first bytes (not
  the file name). xz is decoded as ``xz -dc`` does (``pks_emu/_xz.pyx``:
  liblzma straight into the block, concatenated streams and padding, and
  data after the last stream is an error). Damaged compressed data raises ``TraceFormatError`` naming
  the file. A missing file raises the ``FileNotFoundError`` of ``open()``,
  which names the path (any ``OSError`` of the file system passes through).

The per-line work is the compiled, GIL-free scanner in ``_lackey.pyx``; this
module reads the file in 4 MiB blocks and carries the partial last line of
each block over to the next. :func:`iter_lackey` therefore holds one block,
one chunk's arrays (19 bytes a record) and the decompressor's own state (an
``xz -9`` stream needs its 64 MiB dictionary), whatever the file's size.

The replay reads with :func:`iter_records`: native records (32 bytes a
record with the instruction pointer) and the pages first touched, found by
the scanner. Its threaded form adds at most 32 MiB of decompressed data
ahead (16 blocks of 2 MiB: a deep enough queue for the decompressing thread
to catch up after the scan and the replay had both cores) and two more
chunks (one queued, one being filled), so it too is bounded whatever the
file's size.
"""
from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import os
import queue
import re
import threading
import zlib
from collections.abc import Generator, Iterator
from typing import cast

import numpy as np

from . import _xz
from ._lackey import ST_BAD, ST_DONE, ST_FULL, ST_NOMEM, PageSet, scan_block_ip, scan_block_records
from .errors import TraceFormatError

__all__ = ["LackeyTrace", "iter_lackey", "line_of_record", "parse_lackey", "MAX_BAD_EXAMPLES"]

#: how many malformed lines ``bad_examples`` keeps (per parse)
MAX_BAD_EXAMPLES = 20

# 4 MiB: a block is read (or copied from the decompressing thread) and then
# scanned while most of it is still in the CPU's cache; 16-MiB blocks made
# the replay of a 315-MB trace 5-10 % slower, plain or xz.
_BLOCK = 4 << 20
_PIECE = 2 << 20
_SCAN_PIECES = True
_MAX_LINE = 64 << 10
_TEXT_MAX = 80
_EXPECTED = "expected 'I  ADDR,SIZE' or ' L|S|M ADDR,SIZE'"

# Index: the scanner's WHY_* codes; 8 is the reader's own "line too long".
_WHY = {
    1: "unknown record type",
    2: "ADDR must be 1 to 16 hex digits",
    3: "ADDR must be hex digits followed by ','",
    4: "SIZE must be a decimal number",
    5: "SIZE must be 1..65535",
    6: "nothing may follow SIZE",
    7: "a superblock line is 'SB ADDR'",
    8: f"line longer than {_MAX_LINE} bytes",
}

# Magic numbers: gzip (RFC 1952: ID1 ID2, CM=8 deflate), xz (the stream header
# magic), bzip2 ("BZh", the block size digit, then the magic of a block or of
# the end of the stream), long enough that no text line can be mistaken.
_MAGIC = re.compile(rb"(\x1f\x8b\x08)|(\xfd7zXZ\x00)|(BZh[1-9](?:1AY&SY|\x17rE8P\x90))")
_COMPRESSION = ("gzip", "xz", "bzip2")


class LackeyTrace:
    """Accesses read from a lackey trace, as numpy arrays in trace order.

    ``va`` (uint64), ``size`` (uint16), ``kind`` (uint8: 0 read, 1 write,
    2 fetch) and ``ip`` (uint64: the address of the latest ``I`` line, an
    ``I`` record's own address, 0 before the first) have one entry per
    record; an ``M`` line is two records. The
    counters cover the lines this object was read from: ``lines`` in all,
    ``skipped_lines`` (valgrind messages, ``SB`` and empty lines) and
    ``bad_lines`` (malformed, counted with ``skip_bad=True``);
    ``bad_examples`` holds ``(line_number, text)`` of the first malformed
    lines. For a chunk of :func:`iter_lackey`, ``start`` is the index of its
    first record in the whole trace and ``first_line`` the number of lines
    before it, and the counters are the chunk's own, so that they add up.
    """

    __slots__ = ("va", "size", "kind", "ip", "lines", "skipped_lines", "bad_lines", "bad_examples",
                 "path", "compression", "start", "first_line")

    def __init__(self, va: np.ndarray, size: np.ndarray, kind: np.ndarray, *, lines: int = 0,
                 skipped_lines: int = 0, bad_lines: int = 0,
                 bad_examples: list[tuple[int, str]] | None = None, path: str = "",
                 compression: str = "none", start: int = 0, first_line: int = 0,
                 ip: np.ndarray | None = None) -> None:
        self.va = va
        #: instruction pointer of each record (zeros when not given)
        self.ip = np.zeros(len(va), dtype=np.uint64) if ip is None else ip
        self.size = size
        self.kind = kind
        self.lines = lines
        self.skipped_lines = skipped_lines
        self.bad_lines = bad_lines
        self.bad_examples = [] if bad_examples is None else bad_examples
        self.path = path
        #: "none", "gzip", "xz" or "bzip2", as detected from the content
        self.compression = compression
        self.start = start
        self.first_line = first_line

    def __len__(self) -> int:
        return int(self.va.shape[0])

    @property
    def record_lines(self) -> int:
        """Lines that held a record (``I``, ``L``, ``S`` or ``M``)."""
        return self.lines - self.skipped_lines - self.bad_lines

    def __repr__(self) -> str:
        return (f"LackeyTrace({self.path!r}, records={len(self)}, lines={self.lines}, "
                f"skipped_lines={self.skipped_lines}, bad_lines={self.bad_lines})")


def parse_lackey(path: str | os.PathLike[str], *, skip_bad: bool = False) -> LackeyTrace:
    """Read a whole lackey trace (plain, gzip, xz or bzip2) into one :class:`LackeyTrace`.

    Raises :class:`~pks_emu.errors.TraceFormatError` for the first malformed
    line (unless ``skip_bad``) or damaged compressed data, and
    ``FileNotFoundError`` if ``path`` does not exist.
    """
    traces = list(_read(path, chunk_records=None, skip_bad=skip_bad))
    return traces[0]


def iter_lackey(path: str | os.PathLike[str], *, chunk_records: int = 1 << 20,
                skip_bad: bool = False) -> Iterator[LackeyTrace]:
    """Read a lackey trace in pieces of at most ``chunk_records`` records.

    Memory stays bounded by the chunk and block sizes, whatever the size of
    the file. Concatenating the chunks' arrays gives :func:`parse_lackey`'s
    arrays and the chunks' counters add up to its counters. A chunk may hold
    one record less than ``chunk_records`` (an ``M`` line's two records stay
    together); a last chunk with no records is yielded only to carry the
    counts of lines read after the previous chunk.
    """
    if (isinstance(chunk_records, bool) or not isinstance(chunk_records, int)
            or not 2 <= chunk_records <= 1 << 40):
        raise ValueError(f"chunk_records = {chunk_records!r}: expected an int from 2 "
                         "(an M line is two records) to 2**40")
    return _read(path, chunk_records=chunk_records, skip_bad=skip_bad)


def line_of_record(path: str | os.PathLike[str], index: int, *,
                   skip_bad: bool = False) -> tuple[int, str]:
    """The 1-based line number and text of record ``index`` (0-based; an ``M``
    line holds two records). For error messages: reads the file again."""
    fspath = os.fspath(path)
    raw, stream, _ = _open(fspath)
    seen = 0
    with raw, stream:
        for lineno, line in enumerate(stream, 1):
            body = line.rstrip(b"\r\n")
            if body.startswith(b"I ") or body.startswith((b" L", b" S")):
                seen += 1
            elif body.startswith(b" M"):
                seen += 2
            else:
                continue
            if seen > index:
                return lineno, _text(body)
    return 0, ""


# --- reading ------------------------------------------------------------------

def looks_like_lackey(head: bytes) -> bool:
    """Whether the first bytes of an input can start a lackey trace: text
    (no control bytes but tab, CR, LF), or a gzip, xz or bzip2 stream."""
    if _MAGIC.match(head[:10]):
        return True
    return not any(b < 9 or 13 < b < 32 or b == 127 for b in head if b != 10 and b != 13)


#: the native trace magic (pks_emu.trace.format.MAGIC) and the prefix that
#: marks a native trace whose magic is damaged
_NATIVE_MAGIC = b"PKSEMUTR"
_NATIVE_PREFIX = b"PKSEMU"


def _check_not_native(fspath: str, head: bytes) -> None:
    """A native trace (or a damaged one) is not a lackey trace: say so, not 'bad record'."""
    if head[:8] == _NATIVE_MAGIC:
        raise TraceFormatError(f"{fspath}: is a native pks_emu trace, not a lackey trace")
    if head[:6] == _NATIVE_PREFIX:
        raise TraceFormatError(
            f"{fspath}: damaged pks_emu trace: magic {head[:8]!r}, expected {_NATIVE_MAGIC!r}")


def _with_path(e: OSError, fspath: str) -> OSError:
    """``e`` with the file name set (a read error of an open file carries none)."""
    if e.filename is None:
        return type(e)(e.errno, e.strerror or str(e), fspath) if e.errno else OSError(
            errno.EIO, str(e) or "read error", fspath)
    return e


def _open(fspath) -> tuple[io.BufferedIOBase, io.BufferedIOBase, str]:
    """Open ``fspath`` (or take an open buffered binary stream, such as
    standard input); return (file, stream to read, compression)."""
    raw = fspath if hasattr(fspath, "peek") else open(fspath, "rb")
    if hasattr(fspath, "peek"):
        fspath = str(getattr(fspath, "name", "<stream>"))
        fspath = "<stdin>" if fspath in ("<stdin>", "0") else fspath
    try:
        try:
            head = raw.peek(64)[:64]
        except OSError as e:
            raise _with_path(e, fspath) from None
        m = _MAGIC.match(head[:10])
        if m is None:
            _check_not_native(fspath, head)
        if m is not None:
            name = _COMPRESSION[m.lastindex - 1]  # type: ignore[operator]
            stream: io.BufferedIOBase
            if name == "gzip":
                stream = gzip.GzipFile(fileobj=raw, mode="rb")
            elif name == "xz":
                # XzStream has the readinto/tell/close/with of the others
                stream = (cast(io.BufferedIOBase, _xz.XzStream(raw)) if _xz.available()
                          else lzma.LZMAFile(raw, mode="rb"))
            else:
                stream = bz2.BZ2File(raw, mode="rb")
            return raw, stream, name
    except BaseException:
        raw.close()
        raise
    return raw, raw, "none"


def _text(raw: bytes) -> str:
    s = raw.decode("utf-8", "backslashreplace")
    return s if len(s) <= _TEXT_MAX else s[:_TEXT_MAX - 3] + "..."


class _Reader:
    """Fills a reusable buffer from the stream; turns decompression errors into TraceFormatError."""

    def __init__(self, fspath: str, stream: io.BufferedIOBase, compression: str) -> None:
        self.fspath = fspath
        self.stream = stream
        self.compression = compression
        self.decompressed = 0

    def readinto(self, mv: memoryview) -> int:
        if self.compression == "none":
            try:
                return self.stream.readinto(mv)
            except OSError as e:
                raise _with_path(e, self.fspath) from None
        try:
            # 2-MiB pieces: the decompressor's output stays in the CPU's
            # caches through the copies (16 MiB at once costs a fifth more),
            # and the threaded reader hands over few enough blocks (each a
            # trip through a queue and the GIL) that a 315-MB xz trace
            # replays in 0.42-0.47 s rather than 0.57-0.62 s (256 KiB).
            n = self.stream.readinto(mv[:_PIECE])
        except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
            # The stream's own position counts the bytes decompressed before
            # the error, including those of this (failed) call.
            try:
                done = max(self.decompressed, int(self.stream.tell()))
            except (OSError, ValueError, AttributeError):
                done = self.decompressed
            if (isinstance(e, gzip.BadGzipFile) and str(e).startswith("Not a gzipped file")
                    and done > 0):
                # A complete gzip member, then bytes that are not another member.
                raise TraceFormatError(
                    f"{self.fspath}: trailing garbage after the gzip data (after {done} "
                    f"decompressed bytes): expected the end of the file or another gzip member") from e
            what = "truncated" if isinstance(e, EOFError) else "corrupt"
            raise TraceFormatError(
                f"{self.fspath}: {what} {self.compression} data after {done} "
                f"decompressed bytes: {e}") from e
        self.decompressed += n
        return n

    def close(self) -> None:
        pass


class _Prefetch:
    """Reads a :class:`_Reader` ahead in a thread, a bounded queue of blocks
    between them: the decompressors (zlib, lzma, bz2) release the GIL, so
    decompression runs on one core while the scan and the replay use another.
    Errors (with the decompressed byte count of the reader) are raised by
    :meth:`readinto` in the order the data would have come."""

    def __init__(self, reader: _Reader, block: int = _PIECE, depth: int = 16) -> None:
        self.reader = reader
        self.block = block
        self.q: queue.Queue = queue.Queue(depth)
        # Blocks the consumer has copied out, for the worker to fill again.
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.held: bytearray | None = None
        self.stop = threading.Event()
        self.cur = memoryview(b"")
        self.done = False
        self.thread = threading.Thread(target=self._work, name="pks-emu decompress", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        # A timeout, so that close() is noticed while the queue is full.
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    buf = self.free.get_nowait()
                except queue.Empty:
                    buf = bytearray(self.block)
                n = self.reader.readinto(memoryview(buf))
                if not n:
                    self._put(None)
                    return
                if not self._put((buf, n)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def readinto(self, mv: memoryview) -> int:
        while not len(self.cur):
            if self.held is not None:
                self.free.put(self.held)
                self.held = None
            if self.done:
                return 0
            item = self.q.get()
            if item is None:
                self.done = True
                return 0
            if isinstance(item, BaseException):
                self.done = True
                raise item
            self.held, got = item
            self.cur = memoryview(self.held)[:got]
        n = min(len(mv), len(self.cur))
        mv[:n] = self.cur[:n]
        self.cur = self.cur[n:]
        return n

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class RecordChunk:
    """A chunk of :func:`iter_records`: native access records ready to
    replay, the ``ip`` of each, and ``pages``, the page numbers (va >> 12,
    sorted) that these records touch for the first time in the trace.
    ``big`` is the index of the first record larger than 4096 bytes, or -1.
    The counters are those of :class:`LackeyTrace` chunks."""

    __slots__ = ("records", "ip", "pages", "big", "lines", "skipped_lines", "bad_lines",
                 "bad_examples", "start", "first_line")

    def __init__(self, records, ip, pages, big, lines, skipped_lines, bad_lines, bad_examples,
                 start, first_line) -> None:
        self.records = records
        self.ip = ip
        self.pages = pages
        self.big = big
        self.lines = lines
        self.skipped_lines = skipped_lines
        self.bad_lines = bad_lines
        self.bad_examples = bad_examples
        self.start = start
        self.first_line = first_line

    def __len__(self) -> int:
        return int(self.records.shape[0])


def iter_records(path, *, chunk_records: int = 1 << 16, skip_bad: bool = False,
                 threads: bool = True, reuse: bool = False) -> Iterator[RecordChunk]:
    """The replay's reader: :func:`iter_lackey` scanning straight into
    native records (pks_emu.trace.format.RECORD) and finding the pages
    first touched on the way. With ``threads``, compressed input is
    decompressed in one thread and the lines are scanned in another, each
    a bounded queue ahead of the consumer, so that decompression, scanning
    and the replay overlap; the chunks, counters and errors are those of
    the plain reading (with two CPUs, xz and bzip2 input is scanned in the
    consumer's thread instead: see :func:`_scan_thread`). ``reuse``: the
    chunks' arrays are recycled, so each chunk is valid only until the next
    one is asked for (fresh arrays cost the kernel a page fault and a page
    clearing every 4 KiB)."""
    if (isinstance(chunk_records, bool) or not isinstance(chunk_records, int)
            or not 2 <= chunk_records <= 1 << 40):
        raise ValueError(f"chunk_records = {chunk_records!r}: expected an int from 2 "
                         "(an M line is two records) to 2**40")
    scan = threads and _scan_thread(path)
    # Threaded: one chunk with the consumer, _AHEAD in the queue, one being filled.
    ring = (_AHEAD + 2 if scan else 1) if reuse else 0
    gen = _read(path, chunk_records=chunk_records, skip_bad=skip_bad, records=True,
                prefetch=threads, ring=ring)
    return _ahead(gen) if scan else gen


def _scan_thread(path) -> bool:
    """Whether the lines are scanned in a thread of their own. Not for xz or
    bzip2 input on two CPUs: their decoders are the slowest stage and need a
    CPU to themselves, and three busy threads on two CPUs cost the decoder
    8-9 % more CPU time than two (the xz path: 1.18x ``xz -dc`` with the scan
    thread, 1.07x without, medians of 15 interleaved runs; bzip2 5 % faster
    without). gzip's decoder is about as fast as the scan, and the three
    stages balance (2.5 % faster with it). Detected from the first bytes, as
    :func:`_open` does; anything unreadable here is left to :func:`_read`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    if cpus >= 3:
        return True
    try:
        if hasattr(path, "peek"):
            head = path.peek(10)[:10]
        else:
            with open(path, "rb") as f:
                head = f.read(10)
    except (OSError, TypeError, ValueError):
        return True
    m = _MAGIC.match(head)
    return m is None or _COMPRESSION[m.lastindex - 1] == "gzip"  # type: ignore[operator]


_AHEAD = 1


def _ahead(gen: Generator, depth: int = _AHEAD) -> Iterator:
    """``gen`` run in a thread, at most ``depth`` items ahead of the consumer
    (each item is a chunk's arrays: this bounds the memory)."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in gen:
                if not put((0, item)):
                    break
            else:
                put((1, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((2, e))
        finally:
            gen.close()

    t = threading.Thread(target=work, name="pks-emu lackey scan", daemon=True)
    t.start()
    try:
        while True:
            what, item = q.get()
            if what == 0:
                yield item
            elif what == 1:
                return
            else:
                raise item
    finally:
        stop.set()
        t.join()


def _read(path: str | os.PathLike[str], *, chunk_records: int | None, skip_bad: bool,
          block_size: int = _BLOCK, max_line: int = _MAX_LINE, records: bool = False,
          prefetch: bool = False, ring: int = 0) -> Generator:
    """The reader behind the entry points.

    ``chunk_records=None``: one trace, the arrays growing geometrically.
    ``records``: :class:`RecordChunk` items instead of :class:`LackeyTrace`
    (``chunk_records`` required); ``prefetch``: decompress in a thread;
    ``ring``: records mode, cycle through that many sets of arrays (0: new
    arrays for each chunk).
    ``block_size``/``max_line`` are parameters only so that the tests can put
    block boundaries everywhere.
    """
    if hasattr(path, "peek"):        # an open stream (standard input)
        fspath = getattr(path, "name", "<stream>")
        fspath = "<stdin>" if fspath in ("<stdin>", 0) else str(fspath)
        raw, stream, compression = _open(path)
    else:
        fspath = os.fspath(path)
        raw, stream, compression = _open(fspath)
    with raw, stream:
        reader = _Reader(fspath, stream, compression)
        if prefetch and compression != "none":
            reader = _Prefetch(reader)  # type: ignore[assignment]
            if _SCAN_PIECES:
                # Scanned as each piece arrives: after the decoder's last piece
                # the scan has 2 MiB left to do, not up to 4.
                block_size = min(block_size, _PIECE)
        try:
            yield from _blocks(reader, path, raw, fspath, compression, chunk_records, skip_bad,
                               block_size, max_line, records, ring)
        finally:
            reader.close()


def _blocks(reader, path, raw, fspath: str, compression: str, chunk_records: int | None,
            skip_bad: bool, block_size: int, max_line: int, records: bool,
            ring: int = 0) -> Iterator:
    grow = chunk_records is None
    if grow:
        # A guess from the file size (about 14 bytes a line) saves most
        # regrowths; the untouched tail of an overestimate costs no memory.
        cap = (max(1024, os.fstat(raw.fileno()).st_size // 12)
               if compression == "none" and not hasattr(path, "peek") else 1 << 16)
    else:
        assert chunk_records is not None
        cap = chunk_records
    if records:
        from .trace.format import KEEP_CPL, RECORD, RecordType
        assert not grow
        pages = PageSet()
        rings = [(np.empty(cap, dtype=RECORD), np.empty(cap, dtype=np.uint64))
                 for _ in range(max(ring, 1))]
        rec, ip = rings[0]
        used = 1
        # The arrays of the other mode, empty: chunk() and the scan call name them.
        va = np.empty(0, dtype=np.uint64)
        size = np.empty(0, dtype=np.uint16)
        kind = np.empty(0, dtype=np.uint8)
        big = -1
    else:
        va = np.empty(cap, dtype=np.uint64)
        size = np.empty(cap, dtype=np.uint16)
        kind = np.empty(cap, dtype=np.uint8)
        ip = np.empty(cap, dtype=np.uint64)
    last_ip = 0        # address of the latest I line, carried across blocks
    n = 0
    start = 0          # records of the chunks already yielded
    first_line = 0     # lines of the chunks already yielded
    lines = skipped = bad = 0   # this chunk's counters
    examples: list[tuple[int, str]] = []
    n_examples = 0     # over the whole file

    # One byte past the data is kept free for a missing final newline.
    buf = bytearray(block_size + max_line + 1)
    mv = memoryview(buf)
    have = 0
    eof = False
    discarding = False   # inside an over-long line, dropping up to its newline
    target = block_size

    def bad_line(text: bytes, why: int) -> None:
        nonlocal n_examples
        lineno = first_line + lines
        if not skip_bad:
            err = TraceFormatError(f"{fspath}:{lineno}: bad record {_text(text)!r}: "
                                   f"{_EXPECTED} ({_WHY[why]})")
            err.path = fspath  # type: ignore[attr-defined]
            err.line_number = lineno  # type: ignore[attr-defined]
            err.text = text  # type: ignore[attr-defined]
            raise err
        if n_examples < MAX_BAD_EXAMPLES:
            examples.append((lineno, _text(text)))
            n_examples += 1

    def chunk():
        if records:
            return RecordChunk(rec[:n], ip[:n], pages.take(), big, lines, skipped, bad,
                               examples, start, first_line)
        for a in (va, size, kind, ip):
            a.resize(n, refcheck=False)
        return LackeyTrace(va, size, kind, lines=lines, skipped_lines=skipped, bad_lines=bad,
                           bad_examples=examples, path=fspath, compression=compression,
                           start=start, first_line=first_line, ip=ip)

    while True:
        while not eof and have < target:
            got = reader.readinto(mv[have:len(buf) - 1])
            if not got:
                eof = True
            else:
                have += got
        target = block_size
        if discarding:
            nl = buf.find(b"\n", 0, have)
            if nl < 0:
                have = 0
                if eof:
                    break
                continue
            rest = have - (nl + 1)
            buf[0:rest] = buf[nl + 1:have]
            have = rest
            discarding = False
            continue
        if eof:
            if have and buf[have - 1] != 0x0A:
                buf[have] = 0x0A
                have += 1
            limit = have
        else:
            limit = buf.rfind(b"\n", 0, have) + 1
        pos = 0
        while True:
            if records:
                status, pos, n0, dl, ds, db, bs, be, why, last_ip, b = scan_block_records(
                    buf, pos, limit, rec.view(np.uint8), ip, n,
                    not skip_bad or n_examples < MAX_BAD_EXAMPLES, last_ip,
                    RecordType.ACCESS, KEEP_CPL, pages)
                if big < 0 <= b:
                    big = b
                n = n0
            else:
                status, pos, n, dl, ds, db, bs, be, why, last_ip = scan_block_ip(
                    buf, pos, limit, va, size, kind, ip, n,
                    not skip_bad or n_examples < MAX_BAD_EXAMPLES, last_ip)
            lines += dl
            skipped += ds
            bad += db
            if status == ST_DONE:
                break
            if status == ST_BAD:
                text = bytes(buf[bs:be])
                bad_line(text[:-1] if text.endswith(b"\r") else text, why)
            elif status == ST_FULL:
                if grow:
                    cap = max(2 * cap, 1024)
                    for a in (va, size, kind, ip):
                        a.resize(cap, refcheck=False)
                else:
                    assert chunk_records is not None
                    yield chunk()
                    start += n
                    first_line += lines
                    if records:
                        if ring:
                            rec, ip = rings[used % ring]
                            used += 1
                        else:
                            rec = np.empty(chunk_records, dtype=RECORD)
                            ip = np.empty(chunk_records, dtype=np.uint64)
                        big = -1
                    else:
                        va = np.empty(chunk_records, dtype=np.uint64)
                        size = np.empty(chunk_records, dtype=np.uint16)
                        kind = np.empty(chunk_records, dtype=np.uint8)
                        ip = np.empty(chunk_records, dtype=np.uint64)
                    n = 0
                    lines = skipped = bad = 0
                    examples = []
            elif status == ST_NOMEM:
                raise MemoryError(f"{fspath}: out of memory for the set of touched pages")
            else:  # pragma: no cover - the scanner has no other status
                raise AssertionError(f"scan_block status {status}")
        if eof:
            break
        rest = have - limit
        if rest > max_line:
            # No record is this long; it is a valgrind message or garbage.
            lines += 1
            if buf[limit:limit + 2] == b"==":
                skipped += 1
            else:
                bad += 1
                # Enough bytes for _text() to show the same prefix as for a short line.
                bad_line(bytes(buf[limit:limit + 4 * _TEXT_MAX + 4]), 8)
            discarding = True
            have = 0
            continue
        buf[0:rest] = buf[limit:have]
        have = rest
        # The carried partial line needs at least one more read.
        target = max(block_size, have + 1)

    if grow or n or lines:
        yield chunk()

