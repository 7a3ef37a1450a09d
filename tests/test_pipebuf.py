"""The capture's read-ahead pipe buffer (pks_emu/capture/pipebuf.py), on real pipes."""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from pks_emu.capture.pipebuf import READ_SIZE, PipeBuffer


def writer(fd: int, data: bytes, pieces: list[int], result: dict) -> threading.Thread:
    def run() -> None:
        pos = 0
        try:
            for n in pieces:
                while n:
                    k = os.write(fd, data[pos:pos + n])
                    pos += k
                    n -= k
        except OSError as e:
            result["error"] = e.errno
        finally:
            result["written"] = pos
            os.close(fd)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_bytes_come_out_in_order_whatever_the_read_sizes():
    rng = random.Random(3)
    data = rng.randbytes(5 * READ_SIZE + 12345)
    pieces, left = [], len(data)
    while left:
        n = min(left, rng.choice((1, 7, 4096, 70000, READ_SIZE + 3)))
        pieces.append(n)
        left -= n
    r, w = os.pipe()
    res: dict = {}
    t = writer(w, data, pieces, res)
    out = bytearray()
    with PipeBuffer(r, limit=2 * READ_SIZE) as pb:
        assert pb.peek(16)[:16] == data[:16]          # peek consumes nothing
        while True:
            n = rng.choice((1, 13, 4096, 300000, 3 * READ_SIZE))
            b = pb.read(n) if rng.random() < 0.5 else None
            if b is None:
                buf = bytearray(n)
                k = pb.readinto(buf)
                b = bytes(buf[:k])
            if not b:
                break
            # fewer bytes than asked only at the end of the stream
            assert len(b) == n or len(out) + len(b) == len(data)
            out += b
        assert pb.read(10) == b""
    t.join(10)
    assert bytes(out) == data and res["written"] == len(data)


def test_peek_joins_small_writes():
    r, w = os.pipe()
    res: dict = {}
    data = bytes(range(64))
    t = writer(w, data, [1] * 64, res)
    with PipeBuffer(r) as pb:
        assert pb.peek(40)[:40] == data[:40]
        assert pb.read(64) == data
    t.join(10)


def test_memory_is_bounded_and_the_writer_waits():
    limit = 2 * READ_SIZE
    data = os.urandom(16 * READ_SIZE)
    r, w = os.pipe()
    res: dict = {}
    t = writer(w, data, [len(data)], res)
    pb = PipeBuffer(r, limit=limit)
    time.sleep(0.5)             # the thread has read all it may
    held = pb._held
    assert limit <= held < limit + READ_SIZE + 1
    assert "written" not in res   # the writer waits on the full pipe
    got = b"".join(iter(lambda: pb.read(1 << 20), b""))
    assert got == data and pb.peak < limit + READ_SIZE + 1
    pb.close()
    t.join(10)


def test_closing_early_gives_the_writer_a_broken_pipe():
    r, w = os.pipe()
    res: dict = {}
    t = writer(w, b"x" * (64 * READ_SIZE), [64 * READ_SIZE], res)
    pb = PipeBuffer(r, limit=READ_SIZE)
    assert pb.read(100) == b"x" * 100
    pb.close()
    t.join(10)
    assert not t.is_alive() and res.get("error") == errno.EPIPE
    with pytest.raises(ValueError):
        pb.read(1)


def test_limit_below_one_read_is_refused():
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="at least"):
            PipeBuffer(r, limit=100)
    finally:
        os.close(r)
        os.close(w)


def test_capture_pipe_refuses_a_small_buffer_before_starting_anything():
    from pks_emu.capture import capture_pipe
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="at least"):
        capture_pipe(buffer=10)
    assert set(os.listdir("/proc/self/fd")) == before     # no descriptor left open
    assert [t.name for t in threading.enumerate() if t.name == "pks-emu-capture"] == []
