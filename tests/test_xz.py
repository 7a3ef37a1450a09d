"""The compiled xz reader (pks_emu/_xz.pyx) against Python's lzma and xz(1)."""
from __future__ import annotations

import io
import lzma
import random
import shutil
import subprocess

import pytest

from pks_emu import _xz
from pks_emu.errors import TraceFormatError
from pks_emu.lackey import parse_lackey

pytestmark = pytest.mark.skipif(not _xz.available(), reason="liblzma.so.5 is not loadable")


def decode(data: bytes, piece: int = 1 << 16) -> bytes:
    s = _xz.XzStream(io.BufferedReader(io.BytesIO(data)))
    out = bytearray()
    buf = bytearray(piece)
    while True:
        n = s.readinto(buf)
        if not n:
            return bytes(out)
        out += buf[:n]


def text(n: int, seed: int = 1) -> bytes:
    r = random.Random(seed)
    return b"".join(b" L %08x,%d\n" % (r.getrandbits(32), r.choice((1, 2, 4, 8))) for _ in range(n))


@pytest.mark.parametrize("check", [lzma.CHECK_NONE, lzma.CHECK_CRC32, lzma.CHECK_CRC64,
                                   lzma.CHECK_SHA256])
@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_same_bytes_as_python_lzma(check, piece):
    data = text(3000)
    packed = lzma.compress(data, check=check)
    assert decode(packed, piece) == data == lzma.decompress(packed)


def test_concatenated_streams_padding_and_empty_streams():
    a, b = text(500, 1), text(700, 2)
    packed = lzma.compress(a) + b"\0" * 8 + lzma.compress(b"") + lzma.compress(b)
    assert decode(packed) == a + b


def test_input_larger_than_one_read():
    # Incompressible data: the compressed stream spans several IN_SIZE reads.
    data = random.Random(5).randbytes(3 * _xz.IN_SIZE + 12345)
    assert decode(lzma.compress(data, preset=0)) == data


def test_tell_counts_decompressed_bytes():
    data = text(1000)
    s = _xz.XzStream(io.BufferedReader(io.BytesIO(lzma.compress(data))))
    assert s.read(100) == data[:100] and s.tell() == 100
    assert s.read() == data[100:] and s.tell() == len(data)
    assert s.read(10) == b"" and s.readinto(bytearray(10)) == 0


def test_truncated_is_eoferror():
    packed = lzma.compress(text(2000))
    with pytest.raises(EOFError):
        decode(packed[:len(packed) // 2])
    with pytest.raises(EOFError):
        decode(packed[:-1])


@pytest.mark.parametrize("tail", [b"junk" * 8, b"\0\0\0", b"\x01"])
def test_data_after_the_last_stream_is_an_error_as_in_xz(tail, tmp_path):
    packed = lzma.compress(text(100)) + tail
    with pytest.raises((lzma.LZMAError, EOFError)):
        decode(packed)
    if shutil.which("xz"):
        p = tmp_path / "t.xz"
        p.write_bytes(packed)
        assert subprocess.run(["xz", "-dc", str(p)], capture_output=True).returncode != 0


def test_corrupt_data_is_lzmaerror():
    packed = bytearray(lzma.compress(text(5000)))
    packed[len(packed) // 2:len(packed) // 2 + 16] = b"\xff" * 16
    with pytest.raises((lzma.LZMAError, EOFError)):
        decode(bytes(packed))


def test_not_xz_is_a_format_error():
    with pytest.raises(lzma.LZMAError, match="format"):
        decode(b"this is not xz data at all")


def test_closed_stream_refuses_reads():
    s = _xz.XzStream(io.BufferedReader(io.BytesIO(lzma.compress(b"abc"))))
    with s:
        assert not s.closed and s.readable()
    assert s.closed
    with pytest.raises(ValueError):
        s.readinto(bytearray(4))


def test_lackey_reader_uses_it_and_python_lzma_gives_the_same_trace(tmp_path, monkeypatch):
    data = b"".join(b"I  %08x,4\n L %08x,8\n" % (i, 4096 * i) for i in range(20_000))
    p = tmp_path / "t.lackey.xz"
    p.write_bytes(lzma.compress(data))
    fast = parse_lackey(p)
    monkeypatch.setattr(_xz, "available", lambda: False)
    slow = parse_lackey(p)
    assert fast.compression == slow.compression == "xz"
    assert fast.va.tolist() == slow.va.tolist() and fast.ip.tolist() == slow.ip.tolist()
    assert len(fast) == 40_000


def test_lackey_reader_names_the_file_on_trailing_garbage(tmp_path):
    p = tmp_path / "g.lackey.xz"
    p.write_bytes(lzma.compress(b" L 00001000,4\n") + b"garbage after the stream")
    with pytest.raises(TraceFormatError, match=f"{p}: corrupt xz data after 14 decompressed"):
        parse_lackey(p)
