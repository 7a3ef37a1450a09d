"""Trace format v2 (pks_emu.trace.v2, pks_emu/_tracev2.pyx): round trips,
converters, streaming, and the errors of damaged input."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pks_emu._tracev2 import PA_NONE, Codec
from pks_emu.errors import TraceFormatError
from pks_emu.lackey import parse_lackey
from pks_emu.trace import v2
from pks_emu.trace.convert import convert_lackey
from pks_emu.trace.format import CPU_STATE, FRAME_ENTRY_SIZE, RECORD, RecordType, read_header
from pks_emu.trace.generators import gen_multi_task, gen_pmem_stray

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
LACKEY = os.path.join(EXAMPLES, "gzip-services.lackey.xz")

STATE = (0x80010033, 0x1000, 0x1406e0 | 0x1000000, 0xd01, 2, 0, 0, 0x55555554)


def header(ncpus=2, **kw) -> v2.TraceHeaderV2:
    return v2.TraceHeaderV2(ncpus=ncpus, **kw)


def random_records(rng: np.random.Generator, n: int, ncpus: int = 2, *, valid: bool = True):
    """Records of every type, clustered addresses (so every coding mode is used), ip and pa."""
    recs = np.zeros(n, RECORD)
    acc = rng.random(n) < 0.8
    recs["type"] = np.where(acc, RecordType.ACCESS, rng.integers(1, RecordType.PKS_ABANDON, n))  # abandon: V7 only
    recs["cpu"] = rng.integers(0, ncpus, n) * (rng.random(n) < 0.3)
    recs["op"] = np.where(acc, rng.integers(0, 3, n), rng.choice([0, 3, 4], n))
    recs["flags"] = rng.integers(0, 4, n) * (rng.random(n) < 0.1)
    sizes = np.array([1, 2, 4, 8, 16, 32, 64, 3, 5, 7, 9, 15, 100, 4096])
    recs["size"] = np.where(acc, rng.choice(sizes, n), 0)
    recs["cpl"] = np.where(rng.random(n) < 0.8, 0xFF, rng.integers(0, 4, n))
    base = rng.choice(np.array([0x400000, 0x7fff0000_0000, 0xffff8880_00000000, 0xffffffff_81000000],
                               dtype=np.uint64), n)
    recs["addr"] = base + (rng.integers(0, 1 << 16, n).astype(np.uint64) & ~np.uint64(7))
    ctrl = recs["type"] != RecordType.ACCESS
    recs["addr"][ctrl & (recs["type"] == RecordType.PTE_WRITE)] &= np.uint64(0xFFFFFFF8)
    recs["addr"][ctrl & np.isin(recs["type"], (RecordType.WRMSR, RecordType.RDMSR))] = 0x6e1
    recs["value"] = np.where(ctrl, rng.integers(0, 2, n), 0)
    upd = recs["type"] == RecordType.PKS_UPDATE
    recs["op"][upd] = rng.integers(0, 4, int(upd.sum()))   # protection bits 0..3
    if not valid:
        recs["value"] = rng.integers(0, 1 << 63, n, dtype=np.uint64) * (rng.random(n) < 0.5)
        recs["pad"] = rng.integers(0, 256, n) * (rng.random(n) < 0.1)
        odd_size = acc & (rng.random(n) < 0.03)
        recs["size"][odd_size] = rng.choice(np.array([0, 4097, 65535], dtype=np.uint16), int(odd_size.sum()))
        recs["cpl"][rng.random(n) < 0.01] = 7
    ip = np.where(rng.random(n) < 0.5, recs["addr"], rng.integers(0, 1 << 48, n, dtype=np.uint64))
    ip = ip.astype(np.uint64)
    ip[rng.random(n) < 0.1] = 0
    off = recs["addr"] & np.uint64(0xFFF)
    pa = ((rng.integers(0, 1 << 20, n).astype(np.uint64) << np.uint64(12)) | off)
    pa[rng.random(n) < 0.2] = PA_NONE
    odd = rng.random(n) < 0.05
    pa[odd] = rng.integers(0, 1 << 62, int(odd.sum()), dtype=np.uint64)
    return recs, ip, pa


def write(path_or_file, recs, ip, pa=None, *, hdr=None, memory=(), **kw):
    hdr = hdr or header(trace_flags=v2.TF_HAS_PA if pa is not None else 0)
    with v2.V2Writer(path_or_file, hdr, **kw) as w:
        for fpa, data in memory:
            w.write_memory(fpa, data)
        w.write(recs, ip, pa)
    return w


def read_all(src, **kw):
    with v2.open_trace_v2(src) as r:
        mem = [(pa, bytes(f)) for pa, f in r.memory()]
        parts = list(r.chunks(**kw))
    if not parts:
        return r, mem, np.zeros(0, RECORD), np.zeros(0, np.uint64), None
    recs = np.concatenate([p[1] for p in parts])
    ip = np.concatenate([p[2] for p in parts])
    pa = None if parts[0][3] is None else np.concatenate([p[3] for p in parts])
    return r, mem, recs, ip, pa


# --- the codec ------------------------------------------------------------------------


@settings(deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 3000), ncpus=st.integers(1, 5),
       with_pa=st.booleans())
def test_codec_round_trip(seed, n, ncpus, with_pa):
    rng = np.random.default_rng(seed)
    recs, ip, pa = random_records(rng, n, ncpus, valid=False)
    c = Codec(ncpus)
    raw, main_len = c.encode(recs.view(np.uint8), ip, pa if with_pa else None)
    out = np.zeros(n, RECORD)
    ip2 = np.zeros(n, np.uint64)
    pa2 = np.zeros(n, np.uint64)
    assert c.decode(bytes(raw), main_len, n, with_pa, out.view(np.uint8), ip2, pa2) is None
    assert out.tobytes() == recs.tobytes()
    assert (ip2 == ip).all()
    if with_pa:
        assert (pa2 == pa).all()


@settings(deadline=None)
@given(addrs=st.lists(st.integers(0, 2**64 - 1), max_size=50),
       ips=st.lists(st.integers(0, 2**64 - 1), max_size=50),
       pas=st.lists(st.one_of(st.just(PA_NONE), st.integers(0, 2**63 - 1)), max_size=50),
       sizes=st.lists(st.integers(1, 4096), max_size=50), kinds=st.lists(st.integers(0, 2), max_size=50))
def test_codec_round_trip_extreme_values(addrs, ips, pas, sizes, kinds):
    n = len(addrs)
    recs = np.zeros(n, RECORD)
    recs["addr"] = addrs
    recs["size"] = (sizes * (n // max(len(sizes), 1) + 1))[:n] if sizes else 8
    recs["op"] = (kinds * (n // max(len(kinds), 1) + 1))[:n] if kinds else 0
    recs["cpl"] = 0xFF
    ip = np.array((ips + [0] * n)[:n], dtype=np.uint64)
    pa = np.array((pas + [PA_NONE] * n)[:n], dtype=np.uint64)
    c = Codec(1)
    raw, ml = c.encode(recs.view(np.uint8), ip, pa)
    out, ip2, pa2 = np.zeros(n, RECORD), np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    assert c.decode(bytes(raw), ml, n, True, out.view(np.uint8), ip2, pa2) is None
    assert out.tobytes() == recs.tobytes() and (ip2 == ip).all() and (pa2 == pa).all()


def test_codec_refuses_what_it_cannot_code():
    recs = np.zeros(3, RECORD)
    recs["cpu"][2] = 4
    with pytest.raises(ValueError) as e:
        Codec(2).encode(recs.view(np.uint8), np.zeros(3, np.uint64))
    assert e.value.args[1] == 2
    recs["cpu"] = 0
    pa = np.array([0, 1 << 63, 0], np.uint64)
    with pytest.raises(ValueError):
        Codec(2).encode(recs.view(np.uint8), np.zeros(3, np.uint64), pa)
    with pytest.raises(ValueError):
        Codec(0)
    with pytest.raises(ValueError):
        Codec(1).encode(b"x" * 25, np.zeros(1, np.uint64))


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=400), nrec=st.integers(0, 300), split=st.integers(0, 400),
       has_pa=st.booleans(), ncpus=st.integers(1, 3))
def test_decoder_on_random_bytes_never_crashes(data, nrec, split, has_pa, ncpus):
    split = min(split, len(data))
    out = np.zeros(nrec, RECORD)
    r = Codec(ncpus).decode(data, split if has_pa else len(data), nrec, has_pa, out.view(np.uint8),
                            np.zeros(nrec, np.uint64), np.zeros(nrec, np.uint64))
    if r is not None:
        code, rec, msg = r
        assert 0 <= rec <= nrec and msg


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)),
                                                      min_size=1, max_size=4),
       cut=st.integers(0, 10**6))
def test_decoder_on_damaged_chunks_never_crashes(seed, flips, cut):
    rng = np.random.default_rng(seed)
    recs, ip, pa = random_records(rng, 200, 2)
    c = Codec(2)
    raw, ml = c.encode(recs.view(np.uint8), ip, pa)
    raw = bytearray(raw)
    for pos, bit in flips:
        raw[pos % len(raw)] ^= 1 << bit
    raw = bytes(raw[:len(raw) - cut % 8])
    out = np.zeros(200, RECORD)
    c.decode(raw, min(ml, len(raw)), 200, True, out.view(np.uint8), np.zeros(200, np.uint64),
             np.zeros(200, np.uint64))


def test_decode_validates_its_buffers():
    c = Codec(1)
    with pytest.raises(ValueError):
        c.decode(b"\x02", 1, 2, False, np.zeros(24, np.uint8), np.zeros(2, np.uint64))
    with pytest.raises(ValueError):
        c.decode(b"\x02", 2, 1, False, np.zeros(24, np.uint8), np.zeros(1, np.uint64))
    with pytest.raises(ValueError):
        c.decode(b"\x02", 1, 1, True, np.zeros(24, np.uint8), np.zeros(1, np.uint64))
    assert c.decode(b"\x02", 1, 1, False, np.zeros(24, np.uint8), np.zeros(1, np.uint64)) is None
    assert c.decode(b"\x02\x02", 2, 1, False, np.zeros(24, np.uint8), np.zeros(1, np.uint64))[0] == 7


# --- files and streams -----------------------------------------------------------------


@pytest.mark.parametrize("codec", sorted(v2.CODECS))
@pytest.mark.parametrize("with_pa", [False, True])
def test_file_round_trip(tmp_path, codec, with_pa):
    rng = np.random.default_rng(1)
    recs, ip, pa = random_records(rng, 10_000, 2)
    hdr = header(trace_flags=(v2.TF_HAS_PA if with_pa else 0) | v2.TF_KERNEL_CAPTURE, api=10,
                 cpu_states=[STATE, STATE])
    frames = [(0x1000, bytes(range(256)) * 16), (0x5000, b"\1" * 8192)]
    path = tmp_path / "t.pkt2"
    w = write(path, recs, ip, pa if with_pa else None, hdr=hdr, memory=frames, codec=codec,
              chunk_records=999)
    assert w.count == 10_000 and w.chunks == 11 and w.frames == 3
    r, mem, recs2, ip2, pa2 = read_all(path)
    assert r.header.api == 10 and r.header.trace_flags == hdr.trace_flags and r.header.ncpus == 2
    assert r.cpu_states == [STATE, STATE]
    assert mem == [(0x1000, frames[0][1]), (0x5000, b"\1" * 4096), (0x6000, b"\1" * 4096)]
    assert recs2.tobytes() == recs.tobytes() and (ip2 == ip).all()
    assert (pa2 == pa).all() if with_pa else pa2 is None
    assert r.totals == (10_000, 11, 3)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_writer_splits_and_joins_batches(tmp_path):
    rng = np.random.default_rng(2)
    recs, ip, _ = random_records(rng, 5000, 2)
    with v2.V2Writer(tmp_path / "a.pkt2", header(), chunk_records=1000) as w:
        for lo, hi in ((0, 10), (10, 2500), (2500, 2501), (2501, 5000)):
            w.write(recs[lo:hi], ip[lo:hi])
        w.flush()
    r, _, recs2, ip2, _ = read_all(tmp_path / "a.pkt2", reuse=True)
    # reuse=True hands out one buffer: only the last chunk survives concatenation
    with v2.open_trace_v2(tmp_path / "a.pkt2") as r:
        firsts = [(f, len(x)) for f, x, _, _ in r.chunks()]
    assert sum(n for _, n in firsts) == 5000
    assert [f for f, _ in firsts] == list(np.cumsum([0] + [n for _, n in firsts[:-1]]))


def test_writer_checks_records_and_order(tmp_path):
    recs = np.zeros(2, RECORD)
    recs["type"] = RecordType.ACCESS
    recs["size"] = 0
    with pytest.raises(TraceFormatError, match="record 1: access size 0"):
        with v2.V2Writer(tmp_path / "x.pkt2", header()) as w:
            recs["size"][0] = 8
            w.write(recs)
    assert not os.listdir(tmp_path)      # the temporary file is gone, nothing renamed
    with v2.V2Writer(io.BytesIO(), header()) as w:
        recs["size"] = 8
        w.write(recs)
        with pytest.raises(ValueError, match="before the first record"):
            w.write_memory(0, b"\0" * 4096)
        with pytest.raises(ValueError, match="HAS_PA"):
            w.write(recs, None, np.zeros(2, np.uint64))
    with pytest.raises(ValueError):
        v2.V2Writer(io.BytesIO(), header(), codec="brotli")


def test_empty_trace(tmp_path):
    w = write(tmp_path / "e.pkt2", np.zeros(0, RECORD), np.zeros(0, np.uint64))
    assert w.count == 0
    r, mem, recs, _, _ = read_all(tmp_path / "e.pkt2")
    assert len(recs) == 0 and r.totals == (0, 0, 0)


def test_is_v2_magic(tmp_path):
    write(tmp_path / "a.pkt2", np.zeros(0, RECORD), np.zeros(0, np.uint64))
    data = (tmp_path / "a.pkt2").read_bytes()
    assert v2.is_v2_magic(data[:16])
    assert not v2.is_v2_magic(data[:9])
    assert not v2.is_v2_magic(b"PKSEMUTR\x01\x00")
    assert not v2.is_v2_magic(b"I  0401ab70,3\n")


def test_pipe_streaming():
    rng = np.random.default_rng(3)
    recs, ip, pa = random_records(rng, 20_000, 2)
    rfd, wfd = os.pipe()

    def produce():
        with os.fdopen(wfd, "wb") as f:
            write(f, recs, ip, pa, chunk_records=4096, memory=[(0x2000, b"\7" * 4096)])

    t = threading.Thread(target=produce)
    t.start()
    with os.fdopen(rfd, "rb", buffering=0) as f:    # unbuffered: short reads
        r, mem, recs2, ip2, pa2 = read_all(f)
    t.join()
    assert mem == [(0x2000, b"\7" * 4096)]
    assert recs2.tobytes() == recs.tobytes() and (ip2 == ip).all() and (pa2 == pa).all()


def test_stdin_dash(tmp_path):
    rng = np.random.default_rng(4)
    recs, ip, _ = random_records(rng, 3000, 2)
    path = tmp_path / "s.pkt2"
    write(path, recs, ip)
    code = ("import sys; from pks_emu.trace.v2 import open_trace_v2\n"
            "r = open_trace_v2('-'); n = sum(len(c[1]) for c in r.chunks()); print(n, r.totals)")
    with open(path, "rb") as f:
        out = subprocess.run([sys.executable, "-c", code], stdin=f, capture_output=True, text=True, cwd="/",
                             timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "3000"


# --- damaged input --------------------------------------------------------------------------


_SMALL: list = []


def _small_trace():
    """A 3000-record trace with CPU states, one frame and pa, in 6 chunks (built once)."""
    if not _SMALL:
        rng = np.random.default_rng(5)
        recs, ip, pa = random_records(rng, 3000, 2)
        hdr = header(trace_flags=v2.TF_HAS_PA, cpu_states=[STATE, STATE])
        f = io.BytesIO()
        write(f, recs, ip, pa, hdr=hdr, chunk_records=500, memory=[(0x3000, b"\5" * 4096)])
        _SMALL.append((f.getvalue(), recs))
    return _SMALL[0]


@pytest.fixture
def small_trace():
    return _small_trace()


def test_truncation_delivers_complete_chunks_then_names_the_end_marker(small_trace):
    data, recs = small_trace
    for cut in sorted({*range(0, 300, 7), *range(len(data) - 200, len(data)), len(data) // 2,
                       len(data) // 3, 4300, 4400}):
        got = []
        with pytest.raises(TraceFormatError) as e:
            with v2.open_trace_v2(io.BytesIO(data[:cut])) as r:
                for first, x, ip, pa in r.chunks():
                    got.append(x)
        msg = str(e.value)
        assert "<stream>" in msg
        assert ("truncated" in msg) or ("not a pks_emu trace" in msg and cut == 0), (cut, msg)
        if cut > 4096 + 128:
            assert "end marker" in msg, (cut, msg)
        if got:
            joined = np.concatenate(got)
            assert joined.tobytes() == recs[:len(joined)].tobytes()


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 10**9), bit=st.integers(0, 7))
def test_any_bit_flip_is_a_trace_format_error(pos, bit):
    data, recs = _small_trace()
    d = bytearray(data)
    d[pos % len(d)] ^= 1 << bit
    with pytest.raises(TraceFormatError):
        read_all(io.BytesIO(bytes(d)))


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=300))
def test_random_bytes_are_a_trace_format_error(junk):
    with pytest.raises(TraceFormatError):
        read_all(io.BytesIO(junk))


def test_damaged_magic_is_named(small_trace):
    data, _ = small_trace
    with pytest.raises(TraceFormatError, match="damaged pks_emu trace"):
        read_all(io.BytesIO(b"PKSEMUTQ" + data[8:]))
    with pytest.raises(TraceFormatError, match="not a pks_emu trace"):
        read_all(io.BytesIO(b"I  0401ab70,3\n" * 20))


def test_damaged_chunk_names_file_chunk_and_record(tmp_path):
    # A chunk whose checksum is right but whose content is not (a buggy writer).
    path = tmp_path / "bad.pkt2"
    with v2.V2Writer(path, header(ncpus=1)) as w:
        w._block(v2.TAG_CHUNK, v2.CHUNK.pack(0, 3, 3, 3, 0, 0, 0), b"\x02\x02\xff")
        w.count, w.chunks = 3, 1
    with pytest.raises(TraceFormatError) as e:
        read_all(path)
    msg = str(e.value)
    assert str(path) in msg and "chunk 0" in msg and "record 2" in msg and "reserved escape op" in msg


def test_end_marker_totals_are_checked(tmp_path):
    path = tmp_path / "t.pkt2"
    rng = np.random.default_rng(6)
    recs, ip, _ = random_records(rng, 100, 2)
    with v2.V2Writer(path, header()) as w:
        w.write(recs, ip)
        w.flush()
        w.count += 1
    with pytest.raises(TraceFormatError, match="end marker says 101 records"):
        read_all(path)


def test_newer_version_and_bad_header_fields(small_trace):
    import struct

    from pks_emu._tracev2 import crc32c
    data, _ = small_trace

    def patched(off, fmt, value):
        d = bytearray(data)
        struct.pack_into(fmt, d, off, value)
        struct.pack_into("<I", d, 48, crc32c(bytes(d[:48])))
        return bytes(d)

    with pytest.raises(TraceFormatError, match="version 3"):
        read_all(io.BytesIO(patched(8, "<H", 3)))
    with pytest.raises(TraceFormatError, match="api 5"):
        read_all(io.BytesIO(patched(36, "<H", 5)))
    with pytest.raises(TraceFormatError, match="trace_flags"):
        read_all(io.BytesIO(patched(40, "<I", 8)))
    with pytest.raises(TraceFormatError, match="CPU count 0"):
        read_all(io.BytesIO(patched(17, "<B", 0)))


# --- converters ----------------------------------------------------------------------------


@pytest.mark.parametrize("gen", [gen_pmem_stray, gen_multi_task])
def test_convert_v1_to_v2_keeps_everything(tmp_path, gen):
    v1 = tmp_path / "a.pkt"
    gen(str(v1), records=20_000, seed=3)
    stats = v2.convert_v1_to_v2(v1, tmp_path / "a.pkt2", chunk_records=4096)
    h1 = read_header(v1)
    r, mem, recs, ip, pa = read_all(tmp_path / "a.pkt2")
    assert stats["records"] == h1.record_count == len(recs)
    mm = np.memmap(v1, dtype=RECORD, mode="r", offset=h1.records_offset, shape=(h1.record_count,))
    assert recs.tobytes() == mm.tobytes()
    assert (ip == 0).all() and pa is None
    assert r.cpu_states == h1.cpu_states
    with open(v1, "rb") as f:
        f.seek(h1.memory_offset)
        raw = f.read(h1.memory_frames * FRAME_ENTRY_SIZE)
    want = [(int.from_bytes(raw[i:i + 8], "little"), raw[i + 8:i + FRAME_ENTRY_SIZE])
            for i in range(0, len(raw), FRAME_ENTRY_SIZE)]
    assert mem == want
    for k in ("paging_levels", "ncpus", "compat", "maxphyaddr", "features", "max_tasks",
              "tlb_entries", "pkrs_init"):
        assert getattr(r.header, k) == getattr(h1, k), k
    assert os.path.getsize(tmp_path / "a.pkt2") < os.path.getsize(v1) / 4


def test_lackey_to_v2_matches_the_v1_path(tmp_path):
    policy = os.path.join(EXAMPLES, "protect-heap.toml")
    s1 = convert_lackey(LACKEY, tmp_path / "g.pkt", policy=policy)
    s2 = v2.lackey_to_v2(LACKEY, tmp_path / "g.pkt2", policy=policy, parse_records=1 << 18)
    assert s1["records_written"] == s2["records_written"] == 2_796_100
    h1 = read_header(tmp_path / "g.pkt")
    r, mem, recs, ip, pa = read_all(tmp_path / "g.pkt2")
    mm = np.memmap(tmp_path / "g.pkt", dtype=RECORD, mode="r", offset=h1.records_offset,
                   shape=(h1.record_count,))
    assert recs.tobytes() == mm.tobytes()
    assert [tuple(s) for s in r.cpu_states] == [tuple(s) for s in h1.cpu_states]
    assert len(mem) == h1.memory_frames
    t = parse_lackey(LACKEY)
    assert (ip == t.ip).all()
    # issue 10 targets: <= 1/4 of the text, <= 3 bytes an access
    text_bytes = 39_399_054
    size = os.path.getsize(tmp_path / "g.pkt2")
    assert size <= text_bytes / 4 and size / len(recs) <= 3


def test_lackey_ip_is_the_preceding_instruction(tmp_path):
    p = tmp_path / "t.lackey"
    p.write_text("==1== hi\n L 00001000,8\nI  00400000,3\n L 00001008,8\n M 00001010,4\n"
                 "I  00400003,2\n S 00002000,8\nI  00400005,1\n")
    t = parse_lackey(p)
    assert t.ip.tolist() == [0, 0x400000, 0x400000, 0x400000, 0x400000, 0x400003, 0x400003, 0x400005]
    from pks_emu.lackey import iter_lackey
    chunks = list(iter_lackey(p, chunk_records=2))
    assert np.concatenate([c.ip for c in chunks]).tolist() == t.ip.tolist()


def test_cpu_state_block_packs_like_v1():
    assert len(CPU_STATE.pack(*STATE)) == 64


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_gives_the_same_chunks_and_errors(tmp_path, depth):
    rng = np.random.default_rng(7)
    recs, ip, pa = random_records(rng, 20_000, 2)
    path = tmp_path / "p.pkt2"
    write(path, recs, ip, pa, chunk_records=3000)
    with v2.open_trace_v2(path) as r:
        got = [(f, x.copy(), i.copy(), p.copy()) for f, x, i, p in r.chunks(prefetch=depth)]
    assert np.concatenate([g[1] for g in got]).tobytes() == recs.tobytes()
    assert (np.concatenate([g[2] for g in got]) == ip).all()
    assert (np.concatenate([g[3] for g in got]) == pa).all()
    data = path.read_bytes()[:-30]
    seen = []
    with pytest.raises(TraceFormatError, match="end marker"):
        with v2.open_trace_v2(io.BytesIO(data)) as r:
            for f, x, i, p in r.chunks(prefetch=depth):
                seen.append(len(x))
    assert sum(seen) == 20_000
    # stopping early ends the thread
    with v2.open_trace_v2(path) as r:
        it = r.chunks(prefetch=depth)
        next(it)
        it.close()


def test_written_file_has_the_umask_mode_and_v1_is_named(tmp_path):
    path = tmp_path / "m.pkt2"
    write(path, np.zeros(0, RECORD), np.zeros(0, np.uint64))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    gen_pmem_stray(str(tmp_path / "a.pkt"), records=100, seed=1)
    with pytest.raises(TraceFormatError, match="version 1"):
        v2.open_trace_v2(tmp_path / "a.pkt")
    with pytest.raises(ValueError, match="standard input"):
        v2.lackey_to_v2("-", tmp_path / "x.pkt2")


def test_lackey_ip_carries_across_blocks(tmp_path):
    from pks_emu.lackey import _read
    lines = []
    for k in range(300):
        lines.append(f"I  {0x400000 + 4 * k:08x},4")
        lines.append(f" L {0x1000 + 8 * k:08x},8")
        if k % 7 == 0:
            lines.append(f" M {0x2000 + k:08x},1")
    p = tmp_path / "b.lackey"
    p.write_text("\n".join(lines) + "\n")
    whole = parse_lackey(p)
    parts = list(_read(p, chunk_records=5, skip_bad=False, block_size=64, max_line=64))
    assert np.concatenate([c.ip for c in parts]).tolist() == whole.ip.tolist()
    assert whole.ip[1] == 0x400000 and whole.ip[-1] == 0x400000 + 4 * 299


def test_crc32c_check_value_and_both_implementations():
    from pks_emu._tracev2 import crc32c
    assert crc32c(b"123456789") == crc32c(b"123456789", software=True) == 0xE3069283
    data = np.random.default_rng(8).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    assert crc32c(data) == crc32c(data, software=True) == crc32c(data[777:], crc32c(data[:777]))
    assert crc32c(b"") == 0 and crc32c(b"", 5) == 5


def test_api_names_and_codes(tmp_path):
    for api, code in (("v6", 6), (7, 7), ("v10", 10), (0, 0)):
        f = io.BytesIO()
        with v2.V2Writer(f, header(api=api)) as w:
            pass
        assert v2.open_trace_v2(io.BytesIO(f.getvalue())).header.api == code
    with pytest.raises(ValueError):
        v2.V2Writer(io.BytesIO(), header(api="v8"))
