"""The Valgrind lackey importer: syntax, bad lines, compression, chunks, the real trace."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pks_emu import AccessKind, TraceFormatError
from pks_emu import lackey as lackey_mod
from pks_emu._lackey import ST_BAD, ST_DONE, ST_FULL, scan_block
from pks_emu.lackey import MAX_BAD_EXAMPLES, LackeyTrace, iter_lackey, parse_lackey

# A real valgrind 3.19 lackey trace of `gzip -c /etc/services`, shipped with
# the repository (examples/README.md says how it was made).
REAL_TRACE = Path(__file__).resolve().parents[1] / "examples" / "gzip-services.lackey.xz"

R, W, F = int(AccessKind.READ), int(AccessKind.WRITE), int(AccessKind.FETCH)


# --- an independent reference: regular expressions over split lines -----------------------

_REC = re.compile(rb"(I  | [LSM] )([0-9a-fA-F]{1,16}),([0-9]{1,10})\Z")
_SB = re.compile(rb"SB [0-9a-fA-F]{1,16}\Z")
_KINDS = {b"I  ": [F], b" L ": [R], b" S ": [W], b" M ": [R, W]}


def ref_parse(data: bytes):
    """(va, size, kind, skipped, bad line numbers) by the rules in pks_emu/lackey.py."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    va, size, kind, skipped, bad = [], [], [], 0, []
    for i, line in enumerate(lines, 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b"==") or line == b"" or _SB.match(line):
            skipped += 1
            continue
        m = _REC.match(line)
        if m is None or not 1 <= int(m.group(3)) <= 65535:
            bad.append(i)
            continue
        for k in _KINDS[m.group(1)]:
            va.append(int(m.group(2), 16))
            size.append(int(m.group(3)))
            kind.append(k)
    return va, size, kind, skipped, bad, len(lines)


def write(tmp_path: Path, data: bytes, name: str = "trace.lackey") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def assert_same(t: LackeyTrace, data: bytes) -> None:
    va, size, kind, skipped, bad, nlines = ref_parse(data)
    assert t.va.dtype == np.uint64 and t.size.dtype == np.uint16 and t.kind.dtype == np.uint8
    assert t.va.tolist() == va
    assert t.size.tolist() == size
    assert t.kind.tolist() == kind
    assert (t.lines, t.skipped_lines, t.bad_lines) == (nlines, skipped, len(bad))
    assert [ln for ln, _ in t.bad_examples] == bad[:MAX_BAD_EXAMPLES]


# --- the syntax ---------------------------------------------------------------------------

SAMPLE = (b"==7525== Lackey, an example Valgrind tool\n"
          b"==7525== \n"
          b"I  0401ab70,3\n"
          b" S 1fff000758,8\n"
          b" L 04a1ade0,8\n"
          b" M 04033e06,1\n"
          b"I  0401ab73,5\n"
          b"==7525== Exit code:       0\n")


def test_each_line_kind(tmp_path):
    t = parse_lackey(write(tmp_path, SAMPLE))
    assert t.va.tolist() == [0x0401ab70, 0x1fff000758, 0x04a1ade0, 0x04033e06, 0x04033e06, 0x0401ab73]
    assert t.size.tolist() == [3, 8, 8, 1, 1, 5]
    assert t.kind.tolist() == [F, W, R, R, W, F]
    assert len(t) == 6
    assert (t.lines, t.skipped_lines, t.bad_lines, t.record_lines) == (8, 3, 0, 5)
    assert t.bad_examples == []
    assert t.path == str(tmp_path / "trace.lackey")
    assert t.compression == "none"


def test_modify_is_a_read_then_a_write(tmp_path):
    t = parse_lackey(write(tmp_path, b" M 7ff0001234,512\n M 00001000,2\n"))
    assert t.kind.tolist() == [R, W, R, W]
    assert t.va.tolist() == [0x7ff0001234, 0x7ff0001234, 0x1000, 0x1000]
    assert t.size.tolist() == [512, 512, 2, 2]
    assert t.lines == 2


def test_banner_superblock_and_empty_lines_are_skipped_and_counted(tmp_path):
    data = (b"==1== Command: prog\n\nSB 04a1ade0\nI  0401ab70,3\n\r\n"
            b"SB 0000000000000abc\n==1== \n")
    t = parse_lackey(write(tmp_path, data))
    assert t.va.tolist() == [0x0401ab70]
    assert (t.lines, t.skipped_lines, t.bad_lines) == (7, 6, 0)


def test_crlf_line_ends(tmp_path):
    data = SAMPLE.replace(b"\n", b"\r\n")
    t = parse_lackey(write(tmp_path, data))
    assert_same(t, data)
    assert t.kind.tolist() == [F, W, R, R, W, F]


@pytest.mark.parametrize("end", [b"", b"\r"])
def test_no_final_newline(tmp_path, end):
    data = b"I  0401ab70,3\n L 04a1ade0,8" + end
    t = parse_lackey(write(tmp_path, data))
    assert t.va.tolist() == [0x0401ab70, 0x04a1ade0]
    assert t.size.tolist() == [3, 8]
    assert t.lines == 2


def test_uppercase_hex_and_address_widths(tmp_path):
    data = (b"I  0401AB70,3\n L FFFFFFFFFFFFFFFF,8\n S ffffffffffffffff,4\n"
            b" L 0000000000000000,1\n S 1,2\n")
    t = parse_lackey(write(tmp_path, data))
    assert t.va.tolist() == [0x0401AB70, 2**64 - 1, 2**64 - 1, 0, 1]
    assert t.kind.tolist() == [F, R, W, R, W]


def test_size_limits(tmp_path):
    t = parse_lackey(write(tmp_path, b" L 1000,65535\n L 1000,0000000001\n"))
    assert t.size.tolist() == [65535, 1]


def test_empty_and_banner_only_files(tmp_path):
    t = parse_lackey(write(tmp_path, b""))
    assert (len(t), t.lines) == (0, 0)
    t = parse_lackey(write(tmp_path, b"==1== hello\n==1== bye"))
    assert (len(t), t.lines, t.skipped_lines) == (0, 2, 2)
    assert list(iter_lackey(write(tmp_path, b""))) == []


# --- malformed lines ----------------------------------------------------------------------

BAD = [
    (b"X 0040,3", "unknown record type"),
    (b"L 04a1ade0,8", "unknown record type"),              # the leading space is missing
    (b" L  04a1ade0,8", "ADDR must be 1 to 16 hex digits"),  # two spaces
    (b"I 0401ab70,3", "unknown record type"),               # one space after I
    (b" X 04a1ade0,8", "unknown record type"),
    (b" l 04a1ade0,8", "unknown record type"),
    (b" L 12zz,4", "followed by ','"),
    (b" L 0x1234,4", "followed by ','"),
    (b" L ,4", "ADDR must be 1 to 16 hex digits"),
    (b" L 1234,", "SIZE must be a decimal number"),
    (b" L 1234", "followed by ','"),
    (b" L 1234,0", "SIZE must be 1..65535"),
    (b" L 1234,65536", "SIZE must be 1..65535"),
    (b" L 1234,00000000001", "SIZE must be 1..65535"),
    (b" L 1234,99999999999999999999999", "SIZE must be 1..65535"),
    (b" L 1234,-4", "SIZE must be a decimal number"),
    (b" L 12345678901234567,4", "ADDR must be 1 to 16 hex digits"),
    (b" L 1234,4 ", "nothing may follow SIZE"),
    (b" L 1234,4,5", "nothing may follow SIZE"),
    (b" L 1234,4\r\r", "nothing may follow SIZE"),
    (b" L 1234,4x", "nothing may follow SIZE"),
    (b"SB ", "'SB ADDR'"),
    (b"SB 1234 x", "'SB ADDR'"),
    (b"=", "unknown record type"),
    (b" ", "unknown record type"),
    (b"\t", "unknown record type"),
    (b"I  04\x0001ab70,3", "followed by ','"),
    (b"\xff\xfe garbage", "unknown record type"),
]


@pytest.mark.parametrize("line,why", BAD)
def test_malformed_line_raises_with_file_line_and_text(tmp_path, line, why):
    data = b"==1== x\nI  0401ab70,3\n" + line + b"\n L 04a1ade0,8\n"
    p = write(tmp_path, data)
    with pytest.raises(TraceFormatError) as ei:
        parse_lackey(p)
    msg = str(ei.value)
    text = line[:-1] if line.endswith(b"\r") else line
    shown = repr(text.decode("utf-8", "backslashreplace"))
    assert msg.startswith(f"{p}:3: bad record {shown}: expected 'I  ADDR,SIZE' or ' L|S|M ADDR,SIZE'")
    assert why in msg
    assert "\n" not in msg
    assert (ei.value.path, ei.value.line_number) == (str(p), 3)
    # the same through the chunked reader
    with pytest.raises(TraceFormatError, match=re.escape(f"{p}:3: bad record")):
        for _ in iter_lackey(p, chunk_records=2):
            pass


@pytest.mark.parametrize("line,why", BAD)
def test_malformed_line_skipped_and_counted(tmp_path, line, why):
    data = b"==1== x\nI  0401ab70,3\n" + line + b"\n L 04a1ade0,8\n"
    t = parse_lackey(write(tmp_path, data), skip_bad=True)
    assert t.va.tolist() == [0x0401ab70, 0x04a1ade0]
    assert t.kind.tolist() == [F, R]
    assert (t.lines, t.skipped_lines, t.bad_lines) == (4, 1, 1)
    assert len(t.bad_examples) == 1
    lineno, text = t.bad_examples[0]
    assert lineno == 3
    assert text == (line[:-1] if line.endswith(b"\r") else line).decode("utf-8", "backslashreplace")


def test_long_text_is_truncated_in_the_message(tmp_path):
    line = b"Q" * 500
    p = write(tmp_path, b"I  0401ab70,3\n" + line + b"\n")
    with pytest.raises(TraceFormatError) as ei:
        parse_lackey(p)
    assert f"{p}:2: bad record '{'Q' * 77}...'" in str(ei.value)
    assert len(str(ei.value)) < 300


def test_only_the_first_bad_examples_are_kept(tmp_path):
    data = b"".join(b"bad %d\nI  %08x,4\n" % (i, i) for i in range(50))
    t = parse_lackey(write(tmp_path, data), skip_bad=True)
    assert t.bad_lines == 50
    assert len(t.bad_examples) == MAX_BAD_EXAMPLES
    assert t.bad_examples[:2] == [(1, "bad 0"), (3, "bad 1")]
    assert t.bad_examples[-1] == (39, "bad 19")
    assert t.va.tolist() == list(range(50))


def test_binary_garbage_never_crashes(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    data = data.replace(b"\x1f\x8b", b"..").replace(b"\xfd7zXZ", b".....")
    p = write(tmp_path, b"I  0401ab70,3\n" + data)
    with pytest.raises(TraceFormatError, match=re.escape(f"{p}:2: bad record")):
        parse_lackey(p)
    t = parse_lackey(p, skip_bad=True)
    assert_same(t, b"I  0401ab70,3\n" + data)


def test_line_longer_than_the_carry_limit(tmp_path):
    # Lines that cross a block boundary and exceed max_line take the discard path.
    long_banner = b"==1== " + b"x" * 5000
    long_bad = b"I  " + b"0" * 5000 + b",4"
    data = (b"I  0401ab70,3\n" + long_banner + b"\n L 04a1ade0,8\n" + long_bad + b"\n S 10,2\n"
            + long_banner)
    p = write(tmp_path, data)
    for block_size in (7, 64, 1000, 1 << 20):
        (t,) = lackey_mod._read(p, chunk_records=None, skip_bad=True, block_size=block_size,
                                max_line=100)
        assert_same(t, data)
        assert t.bad_examples == [(4, "I  " + "0" * 74 + "...")]
        with pytest.raises(TraceFormatError, match=re.escape(f"{p}:4: bad record 'I  000")):
            list(lackey_mod._read(p, chunk_records=None, skip_bad=False, block_size=block_size,
                                  max_line=100))
    t = parse_lackey(write(tmp_path, b"==1== " + b"y" * 300_000 + b"\nI  0401ab70,3\n"))
    assert (t.lines, t.skipped_lines, len(t)) == (2, 1, 1)


# --- block boundaries and chunks against the reference ------------------------------------

_hexd = st.text("0123456789abcdefABCDEF", min_size=1, max_size=18)
_record = st.builds(lambda p, a, s: p + a.encode() + b"," + s.encode(),
                    st.sampled_from([b"I  ", b" L ", b" S ", b" M "]), _hexd,
                    st.one_of(st.integers(1, 512).map(str), st.text("0123456789", max_size=7)))
_other = st.one_of(st.just(b""), st.just(b"==99== banner"), _hexd.map(lambda h: b"SB " + h.encode()),
                   st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
                   st.text(" ILSMB=,0123456789abcxz\r\t", max_size=30).map(str.encode))
_lines = st.lists(st.one_of(_record, _record, _record, _other), max_size=60)


@given(lines=_lines, crlf=st.booleans(), final_nl=st.booleans(),
       block_size=st.integers(1, 80), chunk=st.one_of(st.none(), st.integers(2, 9)))
def test_any_block_and_chunk_size_matches_the_reference(tmp_path_factory, lines, crlf, final_nl,
                                                         block_size, chunk):
    nl = b"\r\n" if crlf else b"\n"
    data = nl.join(lines) + (nl if final_nl and lines else b"")
    # Text that starts like a native trace is refused as one, and text that
    # starts with a compressor's magic is read as compressed (both tested on
    # their own).
    assume(not data.startswith(b"PKSEMU"))
    assume(not lackey_mod._MAGIC.match(data[:10]))
    p = tmp_path_factory.mktemp("h") / "t.lackey"
    p.write_bytes(data)
    parts = list(lackey_mod._read(p, chunk_records=chunk, skip_bad=True, block_size=block_size,
                                  max_line=40))
    if chunk is not None:
        assert all(len(c) <= chunk for c in parts)
        assert all(len(c) >= chunk - 1 for c in parts[:-1])
    t = LackeyTrace(np.concatenate([c.va for c in parts] or [np.empty(0, np.uint64)]),
                    np.concatenate([c.size for c in parts] or [np.empty(0, np.uint16)]),
                    np.concatenate([c.kind for c in parts] or [np.empty(0, np.uint8)]),
                    lines=sum(c.lines for c in parts),
                    skipped_lines=sum(c.skipped_lines for c in parts),
                    bad_lines=sum(c.bad_lines for c in parts),
                    bad_examples=[e for c in parts for e in c.bad_examples])
    assert_same(t, data)
    assert [c.start for c in parts] == [sum(len(c) for c in parts[:i]) for i in range(len(parts))]
    assert [c.first_line for c in parts] == [sum(c.lines for c in parts[:i])
                                             for i in range(len(parts))]


def test_chunks_concatenate_to_the_whole(tmp_path):
    rng = np.random.default_rng(1)
    n = 30_000
    kinds = rng.integers(0, 4, n)
    addrs = rng.integers(0, 2**63, n, dtype=np.uint64)
    prefix = [b"I  ", b" L ", b" S ", b" M "]
    data = b"".join(prefix[k] + b"%x,%d\n" % (int(a), 1 + int(a) % 512) for k, a in zip(kinds, addrs))
    p = write(tmp_path, b"==5== start\n" + data)
    whole = parse_lackey(p)
    assert len(whole) == n + int((kinds == 3).sum())
    for chunk_records in (2, 3, 1000, 1 << 20):
        chunks = list(iter_lackey(p, chunk_records=chunk_records))
        assert all(len(c) <= chunk_records for c in chunks)
        for name in ("va", "size", "kind"):
            assert np.array_equal(np.concatenate([getattr(c, name) for c in chunks]),
                                  getattr(whole, name))
        assert sum(c.lines for c in chunks) == whole.lines == n + 1
        assert sum(c.skipped_lines for c in chunks) == 1


@pytest.mark.parametrize("bad", [0, 1, 2**70, "4", 2.0, True])
def test_chunk_records_is_validated(tmp_path, bad):
    with pytest.raises(ValueError, match="chunk_records"):
        iter_lackey(write(tmp_path, SAMPLE), chunk_records=bad)


# --- compression and files ----------------------------------------------------------------

@pytest.mark.parametrize("compress,name", [(gzip.compress, "gzip"), (lzma.compress, "xz"),
                                           (bz2.compress, "bzip2")])
def test_compressed_input_detected_by_content(tmp_path, compress, name):
    data = SAMPLE * 100
    # Misleading names: detection must come from the magic bytes.
    p = write(tmp_path, compress(data), "trace.txt")
    t = parse_lackey(p)
    assert t.compression == name
    assert_same(t, data)
    chunks = list(iter_lackey(p, chunk_records=7))
    assert np.array_equal(np.concatenate([c.va for c in chunks]), t.va)
    plain = parse_lackey(write(tmp_path, data, "plain.xz"))
    assert plain.compression == "none"
    assert np.array_equal(plain.va, t.va)


def test_concatenated_gzip_members(tmp_path):
    p = write(tmp_path, gzip.compress(SAMPLE) + gzip.compress(b"I  0000abcd,2\n"))
    t = parse_lackey(p)
    assert t.va.tolist()[-1] == 0xabcd and len(t) == 7


def test_truncated_xz(tmp_path):
    data = b"".join(b"I  %08x,4\n" % i for i in range(20_000))
    packed = lzma.compress(data)
    p = write(tmp_path, packed[: len(packed) // 2], "cut.lackey.xz")
    with pytest.raises(TraceFormatError, match=re.escape(f"{p}: truncated xz data")):
        parse_lackey(p)
    with pytest.raises(TraceFormatError, match=re.escape(str(p))):
        list(iter_lackey(p, chunk_records=100))


def test_corrupt_xz_and_gzip(tmp_path):
    data = b"".join(b" L %08x,4\n" % i for i in range(20_000))
    for compress, name in ((lzma.compress, "xz"), (gzip.compress, "gzip")):
        packed = bytearray(compress(data))
        mid = len(packed) // 2
        packed[mid:mid + 16] = b"\x00" * 16
        p = write(tmp_path, bytes(packed), f"bad.{name}")
        with pytest.raises(TraceFormatError) as ei:
            parse_lackey(p)
        assert str(ei.value).startswith(f"{p}: corrupt {name} data") or \
            str(ei.value).startswith(f"{p}: truncated {name} data")
    # A header alone: the magic promises data that is not there.
    p = write(tmp_path, b"\xfd7zXZ\x00", "header-only")
    with pytest.raises(TraceFormatError, match=re.escape(f"{p}: ")):
        parse_lackey(p)


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope.lackey"
    with pytest.raises(FileNotFoundError, match=re.escape(str(p))):
        parse_lackey(p)
    with pytest.raises(FileNotFoundError, match=re.escape(str(p))):
        next(iter_lackey(str(p)))


def test_pathlike_and_str(tmp_path):
    p = write(tmp_path, SAMPLE)
    assert parse_lackey(str(p)).va.tolist() == parse_lackey(p).va.tolist()


# --- the compiled scanner's own checks ----------------------------------------------------

def test_scan_block_validates_its_arguments():
    va = np.zeros(4, np.uint64)
    sz = np.zeros(4, np.uint16)
    kd = np.zeros(4, np.uint8)
    with pytest.raises(ValueError, match="newline"):
        scan_block(b"I  1,1", 0, 6, va, sz, kd, 0, True)
    with pytest.raises(ValueError, match="one length"):
        scan_block(b"I  1,1\n", 0, 7, va, sz[:3], kd, 0, True)
    with pytest.raises(ValueError, match="pos"):
        scan_block(b"I  1,1\n", 0, 8, va, sz, kd, 0, True)
    with pytest.raises(ValueError, match="n = 5"):
        scan_block(b"I  1,1\n", 0, 7, va, sz, kd, 5, True)
    assert scan_block(b"I  1,1\n", 0, 7, va, sz, kd, 0, True)[:3] == (ST_DONE, 7, 1)
    # Full output: stops before the record, consuming nothing.
    assert scan_block(b" M 1,1\n", 0, 7, va, sz, kd, 3, True)[:4] == (ST_FULL, 0, 3, 0)
    st_, pos, n, lines, skipped, bad, bs, be, why = scan_block(
        b"I  1,1\nzz\r\nI  2,2\n", 0, 18, va, sz, kd, 0, True)
    assert (st_, pos, n, lines, bad, bs, be) == (ST_BAD, 11, 1, 2, 1, 7, 10)
    # Zero-capacity output arrays are fine too.
    e64, e16, e8 = np.empty(0, np.uint64), np.empty(0, np.uint16), np.empty(0, np.uint8)
    assert scan_block(b"==\nI  1,1\n", 0, 10, e64, e16, e8, 0, True)[:5] == (ST_FULL, 3, 0, 1, 1)


# --- the real trace -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_text():
    if not REAL_TRACE.exists():
        pytest.fail(f"the shared real trace {REAL_TRACE} is missing")
    with lzma.open(REAL_TRACE) as f:
        return f.read()


def test_real_trace_totals(real_text):
    t = parse_lackey(REAL_TRACE)
    # A plain Python count by line prefix, independent of the scanner.
    counts = {"I": 0, "L": 0, "S": 0, "M": 0, "==": 0, "other": 0}
    for line in real_text.split(b"\n")[:-1]:
        if line.startswith(b"I  "):
            counts["I"] += 1
        elif line[:1] == b" " and line[1:2] in (b"L", b"S", b"M"):
            counts[line[1:2].decode()] += 1
        elif line.startswith(b"=="):
            counts["=="] += 1
        else:
            counts["other"] += 1
    assert t.lines == real_text.count(b"\n") == 2_786_873
    assert (t.skipped_lines, t.bad_lines, counts["other"]) == (counts["=="], 0, 0)
    kinds = np.bincount(t.kind, minlength=3)
    assert kinds[F] == counts["I"]
    assert kinds[R] == counts["L"] + counts["M"]
    assert kinds[W] == counts["S"] + counts["M"]
    assert len(t) == counts["I"] + counts["L"] + counts["S"] + 2 * counts["M"]
    assert t.compression == "xz"


def test_real_trace_records_match_the_reference(real_text, tmp_path):
    head = b"".join(real_text.splitlines(keepends=True)[:200_000])
    p = write(tmp_path, head, "head.lackey")
    assert_same(parse_lackey(p), head)


def test_real_trace_chunks_use_bounded_memory(real_text, tmp_path):
    # A plain copy: an xz -9 stream alone needs its 64 MiB dictionary.
    p = write(tmp_path, real_text, "real.lackey")
    whole = parse_lackey(p)
    tracemalloc.start()
    try:
        n = lines = 0
        for c in lackey_mod._read(p, chunk_records=1 << 15, skip_bad=False,
                                  block_size=1 << 20, max_line=64 << 10):
            assert len(c) <= 1 << 15
            assert np.array_equal(c.va, whole.va[c.start:c.start + len(c)])
            assert np.array_equal(c.kind, whole.kind[c.start:c.start + len(c)])
            n += len(c)
            lines += c.lines
        _, chunked_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        del whole
        again = parse_lackey(p)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (n, lines) == (len(again), again.lines)
    # 1 MiB of block and 360 kB of arrays, against ~31 MB of arrays for the whole
    # trace (tracemalloc sees numpy's buffers, as whole_peak shows).
    assert chunked_peak < 3 << 20, chunked_peak
    assert whole_peak > 30 << 20, whole_peak
