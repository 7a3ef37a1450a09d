"""Arbitrary bytes in records or headers: the replay either runs or raises
TraceFormatError naming the file; it never crashes and never reads past a
buffer (the debug build runs these with bounds checks on)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pks_emu
from pks_emu.constants import CR4_PKE, CR4_PKS, MSR_IA32_PKRS, PKS_INIT_VALUE
from pks_emu.errors import TraceFormatError
from pks_emu.trace.format import HEADER_SIZE, RECORD, RECORD_SIZE, read_header
from pks_emu.trace.replay import replay
from pks_emu.trace.writer import TraceWriter

BASE = 0xffffc90000000000


def _template(path, n):
    m = pks_emu.Machine(ncpus=2)
    a = m.address_space()
    a.map(BASE, 0x100000, pkey=1)
    for c in m.cpus:
        c.cr4 = c.cr4 | CR4_PKE | CR4_PKS
        c.wrmsr(MSR_IA32_PKRS, PKS_INIT_VALUE)
    a.activate()
    with TraceWriter(path, m, max_tasks=8) as w:
        for _ in range(n):
            w.access(0, BASE, "read")


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=RECORD_SIZE, max_size=RECORD_SIZE * 40).map(
    lambda b: b[: len(b) - len(b) % RECORD_SIZE]),
    st.integers(0, 0xFFFF))
def test_random_records_never_crash(tmp_path_factory, raw, entropy):
    path = tmp_path_factory.mktemp("fz") / "t.pkt"
    n = len(raw) // RECORD_SIZE
    _template(path, n)
    recs = np.frombuffer(raw, dtype=RECORD).copy()
    # Bias half the records towards valid ones so the loop gets deep.
    rng = np.random.default_rng(entropy)
    sane = rng.random(n) < 0.5
    recs["type"][sane] %= 11
    recs["cpu"][sane] %= 2
    recs["op"][sane & (recs["type"] == 0)] %= 3
    recs["size"][sane] = recs["size"][sane] % 4096 + 1
    recs["cpl"][sane] %= 4
    h = read_header(path)
    data = bytearray(path.read_bytes())
    data[h.records_offset:] = recs.tobytes()
    path.write_bytes(bytes(data))
    try:
        r = replay(path, chunk_records=int(rng.integers(1, 64)))
    except TraceFormatError as e:
        assert str(path) in str(e) and "record" in str(e)
    else:
        assert r.records_replayed == n
        assert np.all(np.diff(r.faults["record"].astype(np.int64)) >= 0)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, HEADER_SIZE - 1), st.integers(0, 255))
def test_corrupt_header_bytes_never_crash(tmp_path_factory, offset, value):
    path = tmp_path_factory.mktemp("fh") / "t.pkt"
    _template(path, 4)
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))
    try:
        r = replay(path)
    except TraceFormatError as e:
        assert str(path) in str(e)
    else:
        assert r.records_replayed == r.records
