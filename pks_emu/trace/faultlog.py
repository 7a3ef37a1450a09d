"""The per-fault log (``pks-emu replay --faults FILE``): every fault, none
dropped, as CSV, JSON Lines or a numpy ``.npy`` file, chosen by suffix.

The rows are formatted in compiled code (``pks_emu._core.format_fault_block``)
block by block, so millions of faults take seconds, not minutes. The file
appears atomically: it is written under a temporary name beside the target
and renamed when complete (a failed or interrupted run leaves no half file).

Columns (CSV header; the JSONL keys are the same, ``error_code_bits`` and
``pkey`` only for #PF, ``error_code`` as a number, absent ``ip`` as null):
``record,cpu,vector,kind,address,error_code,error_code_bits,pkey,ip``.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._core import FAULT_DTYPE_FIELDS, FAULT_TABLE_SLOT, format_fault_block
from ..constants import pf_error_code_str
from ..errors import PksEmuError

FAULT_DTYPE = np.dtype(FAULT_DTYPE_FIELDS)
#: The ``.npy`` log's dtype: the fault log plus the instruction pointer.
FAULT_IP_DTYPE = np.dtype(FAULT_DTYPE_FIELDS + [("ip", "<u8")])
CSV_HEADER = "record,cpu,vector,kind,address,error_code,error_code_bits,pkey,ip\n"
VECTOR_NAMES = {6: "#UD", 13: "#GP", 14: "#PF"}
KIND_NAMES = {0: "read", 1: "write", 2: "fetch", 255: "insn"}
#: Faults formatted per call of the compiled formatter.
BLOCK = 1 << 16


def _table(texts: list[str]) -> np.ndarray:
    out = np.zeros((256, FAULT_TABLE_SLOT), np.uint8)
    for i, t in enumerate(texts):
        b = t.encode()
        assert len(b) < FAULT_TABLE_SLOT
        out[i, 0] = len(b)
        out[i, 1:1 + len(b)] = np.frombuffer(b, np.uint8)
    return out.reshape(-1)


def _bits_text(i: int) -> str:
    # Table index: error-code bits 6:0, and bit 15 (SGX) as bit 7.
    return pf_error_code_str((i & 0x7F) | ((i & 0x80) << 8))


def _tables(json: bool):
    if json:
        vec = [f'"{VECTOR_NAMES[v]}"' if v in VECTOR_NAMES else str(v) for v in range(256)]
        kind = [f'"{KIND_NAMES[k]}"' if k in KIND_NAMES else str(k) for k in range(256)]
    else:
        vec = [VECTOR_NAMES.get(v, str(v)) for v in range(256)]
        kind = [KIND_NAMES.get(k, str(k)) for k in range(256)]
    return _table(vec), _table(kind), _table([_bits_text(i) for i in range(256)])


def _atomic_open(path: str):
    from ..atomic import is_special
    if is_special(path):     # a device or FIFO cannot be renamed onto: write it directly
        return open(path, "wb"), None
    from ..atomic import PARTIAL_MARK
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + PARTIAL_MARK, dir=d)
    return os.fdopen(fd, "wb"), tmp


def write_faults_fast(path: str | os.PathLike, faults: np.ndarray, ips: np.ndarray | None = None) -> int:
    """Write every fault of ``faults`` (a ``FAULT_DTYPE_FIELDS`` array), with
    the instruction pointers ``ips`` (one per fault, 0 = unknown; None: no
    IPs) to ``path``: ``.csv``, ``.jsonl``/``.json`` or ``.npy``. Returns the
    number of rows. Raises PksEmuError for an unknown suffix or an I/O error."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".csv", ".jsonl", ".json", ".npy"):
        raise PksEmuError(f"--faults {path}: unknown format {suffix!r}: expected .csv, .jsonl or .npy")
    faults = np.ascontiguousarray(faults)
    if faults.dtype != FAULT_DTYPE:
        faults = np.ascontiguousarray(faults.astype(FAULT_DTYPE))
    n = len(faults)
    if ips is not None:
        ips = np.ascontiguousarray(ips, dtype=np.uint64).reshape(-1)
        if len(ips) != n:
            raise ValueError(f"ips: {len(ips)} values for {n} faults")
    try:
        f, tmp = _atomic_open(path)
    except OSError as e:
        raise PksEmuError(f"--faults {path}: cannot write: {e.strerror or e}") from None
    try:
        with f:
            if suffix == ".npy":
                out = np.zeros(n, FAULT_IP_DTYPE)
                for name in FAULT_DTYPE.names or ():
                    out[name] = faults[name]
                if ips is not None:
                    out["ip"] = ips
                np.save(f, out)
            else:
                json = suffix != ".csv"
                vec, kind, bits = _tables(json)
                if not json:
                    f.write(CSV_HEADER.encode())
                raw = faults.view(np.uint8).reshape(-1)
                none = np.empty(0, np.uint64)
                size = FAULT_DTYPE.itemsize

                def block(lo: int) -> bytes:
                    hi = min(n, lo + BLOCK)
                    return format_fault_block(raw[lo * size:hi * size],
                                              none if ips is None else ips[lo:hi], json, vec, kind, bits)
                # The formatter runs without the GIL: format the next block in
                # a thread while this one is written.
                starts = range(0, n, BLOCK)
                if len(starts) <= 1:
                    for lo in starts:
                        f.write(block(lo))
                else:
                    with ThreadPoolExecutor(max_workers=1) as pool:
                        pending = pool.submit(block, starts[0])
                        for nxt in starts[1:]:
                            text = pending.result()
                            pending = pool.submit(block, nxt)
                            f.write(text)
                        f.write(pending.result())
        if tmp is not None:
            os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise PksEmuError(f"--faults {path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return n


def _unlink(p: str | None) -> None:
    if p is None:
        return
    try:
        os.unlink(p)
    except OSError:
        pass


def _npy_header(rows: int) -> bytes:
    """A ``.npy`` (format 1.0) header for ``rows`` rows of FAULT_IP_DTYPE,
    always the same length: written first with a provisional count, it is
    written again over itself once the count is known."""
    text = ("{'descr': %r, 'fortran_order': False, 'shape': (%d,), }"
            % (np.lib.format.dtype_to_descr(FAULT_IP_DTYPE), rows))
    longest = len(text) - len(str(rows)) + 20          # 20 digits hold any uint64
    total = -(-(10 + longest + 1) // 64) * 64          # magic, version, length, text, newline
    text = text.ljust(total - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + (total - 10).to_bytes(2, "little") + text.encode("latin1")


class FaultLogStream:
    """The per-fault log written as the replay goes (bounded memory): rows
    are appended block by block under a temporary name beside ``path``;
    ``close()`` renames it into place, ``abort()`` removes it, so a failed or
    interrupted run leaves no file that looks complete. A ``.npy`` log's
    header holds the row count: it is written with a provisional count and
    rewritten in place at close (so the file must be a regular file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.suffix = os.path.splitext(self.path)[1].lower()
        if self.suffix not in (".csv", ".jsonl", ".json", ".npy"):
            raise PksEmuError(f"--faults {self.path}: unknown format {self.suffix!r}: "
                              "expected .csv, .jsonl or .npy")
        try:
            self._f, self._tmp = _atomic_open(self.path)
        except OSError as e:
            folder = os.path.dirname(os.path.abspath(self.path))
            reason = ("no such folder" if isinstance(e, FileNotFoundError) and not os.path.isdir(folder)
                      else e.strerror or str(e))
            raise PksEmuError(f"--faults {self.path}: cannot write: {reason}") from None
        self.rows = 0
        self._json = self.suffix != ".csv"
        self._tables = _tables(self._json)
        if self.suffix == ".csv":
            self._write(CSV_HEADER.encode())
        elif self.suffix == ".npy":
            if self._tmp is None:
                self.abort()
                raise PksEmuError(f"--faults {self.path}: a .npy log needs a regular file (its "
                                  "header holds the row count, known at the end): use .csv or "
                                  ".jsonl for a pipe or a device")
            self._write(_npy_header(0))

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            raise PksEmuError(f"--faults {self.path}: cannot write: {e.strerror or e}") from None

    def write(self, faults: np.ndarray, ips: np.ndarray | None = None) -> None:
        n = len(faults)
        if not n:
            return
        faults = np.ascontiguousarray(faults.astype(FAULT_DTYPE, copy=False))
        ips = (np.zeros(n, np.uint64) if ips is None
               else np.ascontiguousarray(ips, dtype=np.uint64).reshape(-1))
        if self.suffix == ".npy":
            out = np.zeros(n, FAULT_IP_DTYPE)
            for name in FAULT_DTYPE.names or ():
                out[name] = faults[name]
            out["ip"] = ips
            self._write(out.data)           # the array's own bytes, no copy
        else:
            vec, kind, bits = self._tables
            raw = faults.view(np.uint8).reshape(-1)
            size = FAULT_DTYPE.itemsize
            for lo in range(0, n, BLOCK):
                hi = min(n, lo + BLOCK)
                self._write(format_fault_block(raw[lo * size:hi * size], ips[lo:hi], self._json,
                                               vec, kind, bits))
        self.rows += n

    def close(self) -> int:
        """Finish the file and rename it into place; the number of rows."""
        try:
            if self.suffix == ".npy":
                self._f.seek(0)
                self._f.write(_npy_header(self.rows))
            self._f.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
        except OSError as e:
            _unlink(self._tmp)
            raise PksEmuError(f"--faults {self.path}: cannot write: {e.strerror or e}") from None
        return self.rows

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        _unlink(self._tmp)
