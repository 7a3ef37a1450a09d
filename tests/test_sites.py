"""The compiled fault-site aggregator (pks_emu/_sites.pxi) against a small
pure-Python reference aggregation of the same fault streams."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pks_emu._core import FAULT_DTYPE_FIELDS, SITE_SAMPLES, TIMELINE_OTHER, FaultSites

COLUMNS = ("record", "cpu", "ip", "address", "pkey", "error_code", "vector", "kind")


def reference(stream, *, bucket_records=1, max_buckets=1024, max_pages=1 << 20, records=0):
    """Aggregate ``stream`` (tuples in COLUMNS order) the slow, obvious way."""
    sites: dict[tuple, dict] = {}
    pages: dict[tuple[int, int], int] = {}
    dropped = 0
    ticks = []
    for rec, _cpu, ip, addr, pkey, code, vec, kind in stream:
        if not -1 <= pkey <= 15:
            pkey = -1
        key = (ip, vec, kind, pkey, code)
        s = sites.setdefault(key, {"count": 0, "first": rec, "last": rec, "samples": []})
        s["count"] += 1
        s["first"] = min(s["first"], rec)
        s["last"] = max(s["last"], rec)
        if addr not in s["samples"] and len(s["samples"]) < SITE_SAMPLES:
            s["samples"].append(addr)
        if kind <= 2:
            pk = (addr >> 12 << 12, pkey)
            if pk in pages:
                pages[pk] += 1
            elif len(pages) < max_pages:
                pages[pk] = 1
            else:
                dropped += 1
        pk_fault = vec == 14 and code & 0x20 and 0 <= pkey <= 15
        ticks.append((rec, pkey if pk_fault else TIMELINE_OTHER))
    last = max([r for r, _ in ticks] + ([records - 1] if records else []), default=None)
    width = bucket_records
    timeline = np.zeros((17, 0), np.uint64)
    if last is not None:
        while last // width >= max_buckets:
            width *= 2
        timeline = np.zeros((17, last // width + 1), np.uint64)
        for rec, row in ticks:
            timeline[row, rec // width] += 1
    ranked = sorted(sites.items(), key=lambda kv: (-kv[1]["count"], kv[1]["first"], kv[0][0], kv[0][3],
                                                   kv[0][1], kv[0][2], kv[0][4]))
    page_rows = sorted(pages.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1]))
    return ranked, width, timeline, page_rows, dropped


def as_columns(stream):
    cols = list(zip(*stream)) if stream else [[] for _ in COLUMNS]
    return [np.array(c, dtype=t) for c, t in zip(cols, (np.uint64, np.uint8, np.uint64, np.uint64,
                                                           np.int32, np.int32, np.uint8, np.uint8))]


def check_equal(fs: FaultSites, stream, *, records=0, exact_pages=True, **params):
    ranked, width, timeline, page_rows, dropped = reference(stream, records=records, **params)
    got = fs.sites()
    assert fs.sites_total == len(ranked) == len(got)
    assert fs.faults == len(stream)
    for row, ((ip, vec, kind, pkey, code), s) in zip(got, ranked):
        assert (int(row["ip"]), int(row["vector"]), int(row["kind"]), int(row["pkey"]),
                int(row["error_code"])) == (ip, vec, kind, pkey, code)
        assert (int(row["count"]), int(row["first_record"]), int(row["last_record"])) == \
            (s["count"], s["first"], s["last"])
        n = int(row["n_samples"])
        assert [int(a) for a in row["samples"][:n]] == s["samples"]
    w, arr = fs.timeline_array(records)
    assert w == width
    np.testing.assert_array_equal(arr, timeline)
    pages = fs.pages()
    if exact_pages:
        assert [(int(p["page"]), int(p["pkey"]), int(p["count"])) for p in pages] == \
            [(pg, key, n) for (pg, key), n in page_rows]
        assert fs.pages_dropped == dropped
    # Never silent: what the page table holds plus what it dropped is every access fault.
    n_access = sum(1 for f in stream if f[7] <= 2)
    assert int(pages["count"].sum()) + fs.pages_dropped == n_access
    assert fs.pages_total == len(pages) <= params.get("max_pages", 1 << 20)


fault = st.tuples(
    st.integers(0, 1 << 20) | st.integers(0, (1 << 63) - 1),         # record
    st.integers(0, 3),                                                 # cpu
    st.sampled_from([0, 0x401a2b, 0x401a30, 0xffffffff81000000]),     # ip
    st.sampled_from([0x4a0c010, 0x4a0c018, 0x4a0d000, 0x5000, 0xffff888000001000, 0]) | st.integers(0, (1 << 64) - 1),
    st.sampled_from([-1, 0, 3, 15]) | st.integers(-128, 127),           # pkey
    st.sampled_from([0x27, 0x25, 0x7, 0x21, 0, 0x35]) | st.integers(-(1 << 31), (1 << 31) - 1),
    st.sampled_from([14, 14, 13, 6]),                                  # vector
    st.sampled_from([0, 1, 2, 255]),                                   # kind
)
params = st.fixed_dictionaries({
    "bucket_records": st.sampled_from([1, 2, 64, 1 << 16]),
    "max_buckets": st.sampled_from([2, 4, 16, 1024]),
    "max_pages": st.integers(0, 6) | st.just(1 << 20),
})


@settings(max_examples=300, deadline=None)
@given(st.lists(fault, max_size=60), params, st.integers(0, 1 << 24))
def test_matches_reference(stream, p, records):
    fs = FaultSites(**p)
    fs.add_many(*as_columns(stream))
    check_equal(fs, stream, records=records, **p)


@settings(max_examples=200, deadline=None)
@given(st.lists(fault, max_size=40), st.lists(fault, max_size=40), params)
def test_merge_equals_one_aggregation(a, b, p):
    fa, fb = FaultSites(**p), FaultSites(**p)
    fa.add_many(*as_columns(a))
    fb.add_many(*as_columns(b))
    fa.merge(fb)
    # With room for every page, merging equals aggregating a then b; with
    # overflow, which entries the merged table keeps depends on the other's
    # table order, but nothing is lost (check_equal's totals).
    room = p["max_pages"] >= len({(f[3] >> 12, f[4]) for f in a + b})
    check_equal(fa, a + b, exact_pages=room, **p)


def test_sequential_records_rescale_many_times():
    # A long run: record indices up to 2**40 through a 1024-bucket timeline
    # that starts one record wide (30 doublings), many sites and pages (the
    # hash tables grow several times).
    rng = np.random.default_rng(7)
    n = 20000
    rec = np.sort(rng.integers(0, 1 << 40, n, dtype=np.uint64))
    ip = rng.integers(0, 3000, n, dtype=np.uint64) * 4 + 0x400000
    addr = rng.integers(0, 1 << 26, n, dtype=np.uint64) + 0x4a00000
    pkey = rng.integers(-1, 16, n).astype(np.int32)
    code = np.where(pkey >= 0, 0x27, 0x7).astype(np.int32)
    stream = list(zip(rec.tolist(), [0] * n, ip.tolist(), addr.tolist(), pkey.tolist(), code.tolist(),
                      [14] * n, [1] * n))
    fs = FaultSites(max_pages=5000)
    for lo in range(0, n, 3000):          # several calls, as chunked replay does
        fs.add_many(*(c[lo:lo + 3000] for c in as_columns(stream)))
    check_equal(fs, stream, max_pages=5000, records=1 << 41)
    assert fs.pages_dropped > 0 and fs.pages_total == 5000
    w, arr = fs.timeline_array()
    assert w == 1 << 30 and arr.shape == (17, int(rec[-1]) // w + 1)


def test_fault_log_and_dict():
    faults = np.zeros(5, dtype=np.dtype(FAULT_DTYPE_FIELDS))
    faults["record"] = [10, 11, 12, 500, 501]
    faults["address"] = [0x4a0c010, 0x4a0c018, 0x4a0c010, 0x4a0d008, 0x100]
    faults["error_code"] = [0x27, 0x27, 0x27, 0x27, 0]
    faults["vector"] = [14, 14, 14, 14, 13]
    faults["pkey"] = [3, 3, 3, 3, -1]
    faults["kind"] = [1, 1, 1, 1, 255]
    fs = FaultSites(max_buckets=4, bucket_records=64)
    fs.add_faults(faults, ip=np.array([0x401a2b, 0x401a2b, 0x401a2b, 0x401a30, 0x401a40], np.uint64))

    class Sym:
        def lookup_many(self, ips):
            return [{0x401a2b: "deflate+0x1b"}.get(int(i)) for i in ips], [None] * len(ips)

    d = fs.to_dict(Sym(), records=1000)
    assert d["sites_total"] == 3 and d["pages_total"] == 2 and d["pages_dropped"] == 0
    top = d["sites"][0]
    assert top == {"ip": "0x401a2b", "symbol": "deflate+0x1b", "source": None, "vector": "#PF",
                   "kind": "write", "pkey": 3, "error_code": 0x27, "error_code_bits": "P|W|U|PK",
                   "count": 3, "first_record": 10, "last_record": 12,
                   "sample_addresses": ["0x4a0c010", "0x4a0c018"]}
    assert d["sites"][2]["vector"] == "#GP" and d["sites"][2]["pkey"] is None
    assert d["sites"][2]["kind"] == "insn" and d["sites"][2]["error_code_bits"] == ""
    # 1000 records in at most 4 buckets starting 64 wide: 256 records a bucket.
    assert d["timeline"] == {"bucket_records": 256, "buckets": 4,
                             "by_pkey": {"3": [3, 1, 0, 0], "other": [0, 1, 0, 0]}}
    # The instruction fault has no page.
    assert d["pages"] == [{"page": "0x4a0c000", "pkey": 3, "count": 3},
                          {"page": "0x4a0d000", "pkey": 3, "count": 1}]


def test_empty_and_bad_parameters():
    fs = FaultSites()
    assert fs.timeline() == {"bucket_records": 1, "buckets": 0, "by_pkey": {}}
    assert fs.timeline(5)["buckets"] == 5
    assert len(fs.sites()) == 0 and len(fs.pages()) == 0
    for bad in ({"max_buckets": 3}, {"max_buckets": 1}, {"bucket_records": 0}, {"bucket_records": 6}):
        with pytest.raises(ValueError):
            FaultSites(**bad)
    with pytest.raises(ValueError, match="same length"):
        fs.add_many([1], [0], [0], [0], [0], [0], [14], [0, 1])
    with pytest.raises(ValueError, match="differ"):
        fs.merge(FaultSites(max_buckets=8))
    with pytest.raises(ValueError, match="itself"):
        fs.merge(fs)


# --- the per-fault log writer (pks_emu/trace/faultlog.py) ------------------

def random_faults(n, seed=11):
    rng = np.random.default_rng(seed)
    f = np.zeros(n, dtype=np.dtype(FAULT_DTYPE_FIELDS))
    f["record"] = rng.integers(0, 1 << 63, n, dtype=np.uint64)
    f["record"][:3] = [0, 1, (1 << 64) - 1]
    f["address"] = rng.integers(0, 1 << 63, n, dtype=np.uint64) * 2
    f["address"][:2] = [0, (1 << 64) - 1]
    f["error_code"] = rng.choice([0x27, 0x25, 0x7, 0, 0x8021, -5, -(1 << 31), (1 << 31) - 1], n)
    f["vector"] = rng.choice([14, 14, 13, 6, 0, 255], n)
    f["pkey"] = rng.integers(-128, 128, n)
    f["kind"] = rng.choice([0, 1, 2, 255, 7], n)
    f["cpu"] = rng.integers(0, 256, n)
    ips = rng.integers(0, 1 << 64, n, dtype=np.uint64)
    ips[::4] = 0
    return f, ips


def write_faults(path: str, faults) -> None:
    """The per-row CSV writer the fast one replaced, kept as its reference."""
    from pks_emu.constants import pf_error_code_str
    from pks_emu.trace.replay import KIND_NAMES, VECTOR_NAMES
    with open(path, "w") as f:
        f.write("record,cpu,vector,kind,address,error_code,error_code_bits,pkey\n")
        for x in faults:
            vec = int(x["vector"])
            code = int(x["error_code"])
            f.write(f"{int(x['record'])},{int(x['cpu'])},{VECTOR_NAMES.get(vec, vec)},"
                    f"{KIND_NAMES.get(int(x['kind']), int(x['kind']))},{int(x['address']):#x},"
                    f"{code:#x},{pf_error_code_str(code) if vec == 14 else ''},"
                    f"{int(x['pkey']) if int(x['pkey']) >= 0 else ''}\n")


def test_fault_log_csv_equals_the_old_writer(tmp_path):
    from pks_emu.trace.faultlog import write_faults_fast
    f, ips = random_faults(3000)
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    write_faults(str(old), f)
    assert write_faults_fast(new, f, ips) == len(f)
    old_lines = old.read_text().splitlines()
    new_lines = new.read_text().splitlines()
    assert new_lines[0] == old_lines[0] + ",ip"
    for o, n, ip in zip(old_lines[1:], new_lines[1:], ips.tolist()):
        assert n == o + "," + (f"{ip:#x}" if ip else "")
    assert len(new_lines) == len(old_lines)
    write_faults_fast(new, f)          # no IPs: the column stays, empty
    assert all(line.endswith(",") for line in new.read_text().splitlines()[1:])


def test_fault_log_jsonl_and_npy(tmp_path):
    import json

    from pks_emu.trace.faultlog import FAULT_IP_DTYPE, write_faults_fast
    from pks_emu.trace.replay import fault_to_dict
    f, ips = random_faults(2000, seed=12)
    p = tmp_path / "f.jsonl"
    write_faults_fast(p, f, ips)
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    assert len(rows) == len(f)
    for row, x, ip in zip(rows, f, ips.tolist()):
        want = fault_to_dict(x)
        want["ip"] = f"{ip:#x}" if ip else None
        assert row == want
    q = tmp_path / "f.npy"
    write_faults_fast(q, f, ips)
    back = np.load(q)
    assert back.dtype == FAULT_IP_DTYPE
    for name in f.dtype.names:
        np.testing.assert_array_equal(back[name], f[name])
    np.testing.assert_array_equal(back["ip"], ips)
    write_faults_fast(tmp_path / "e.csv", f[:0])
    assert (tmp_path / "e.csv").read_text() == "record,cpu,vector,kind,address,error_code,error_code_bits,pkey,ip\n"


def test_fault_log_is_atomic(tmp_path, monkeypatch):
    from pks_emu.errors import PksEmuError
    from pks_emu.trace import faultlog
    f, ips = random_faults(faultlog.BLOCK * 2 + 10)
    target = tmp_path / "faults.csv"
    target.write_text("previous\n")
    calls = []

    def failing(*a):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return b"x\n"
    monkeypatch.setattr(faultlog, "format_fault_block", failing)
    with pytest.raises(PksEmuError, match="No space left"):
        faultlog.write_faults_fast(target, f, ips)
    assert target.read_text() == "previous\n"            # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["faults.csv"]   # no temporary left
    with pytest.raises(PksEmuError, match="unknown format"):
        faultlog.write_faults_fast(tmp_path / "f.txt", f)
    with pytest.raises(PksEmuError, match="cannot write"):
        faultlog.write_faults_fast(tmp_path / "missing-dir" / "f.csv", f)


def test_streamed_npy_log(tmp_path):
    """The streamed .npy log: written block by block under a provisional
    header, which close() rewrites with the row count; np.load reads it back
    exactly. A .npy log cannot go to a device or a pipe (no header to fix)."""
    from pks_emu.errors import PksEmuError
    from pks_emu.trace.faultlog import FAULT_IP_DTYPE, FaultLogStream, _npy_header
    assert {len(_npy_header(n)) for n in (0, 9, 10**9, 2**64 - 1)} == {len(_npy_header(0))}
    assert len(_npy_header(0)) % 64 == 0
    f, ips = random_faults(5000, seed=13)
    s = FaultLogStream(tmp_path / "s.npy")
    for lo in range(0, 5000, 1700):
        s.write(f[lo:lo + 1700], ips[lo:lo + 1700])
    s.write(f[:3])                                      # no IPs: 0
    assert s.close() == 5003
    back = np.load(tmp_path / "s.npy")
    assert back.dtype == FAULT_IP_DTYPE and len(back) == 5003
    for name in f.dtype.names:
        np.testing.assert_array_equal(back[name][:5000], f[name])
        np.testing.assert_array_equal(back[name][5000:], f[name][:3])
    np.testing.assert_array_equal(back["ip"], np.concatenate([ips, np.zeros(3, np.uint64)]))
    empty = FaultLogStream(tmp_path / "e.npy")
    assert empty.close() == 0 and len(np.load(tmp_path / "e.npy")) == 0
    (tmp_path / "dev.npy").symlink_to("/dev/null")
    with pytest.raises(PksEmuError, match="dev.npy: a .npy log needs a regular file"):
        FaultLogStream(tmp_path / "dev.npy")


def test_aggregates_a_real_replay(tmp_path):
    # The fault log of a real replay (a generated kernel workload with #PF
    # PK faults), folded by site: the totals agree with the replay's own.
    from pks_emu.trace.generators import gen_kmap_nesting
    from pks_emu.trace.replay import replay
    path = tmp_path / "k.pkt"
    gen_kmap_nesting(str(path), records=50_000, seed=3)
    r = replay(path)
    assert len(r.faults) > 100
    fs = FaultSites(max_buckets=64)
    # A plausible IP per site: the fault's kind and key (the v1 trace has none).
    ip = 0x1000 + r.faults["kind"].astype(np.uint64) * 16 + (r.faults["pkey"].astype(np.int64) + 1).astype(np.uint64)
    fs.add_faults(r.faults, ip)
    d = fs.to_dict(records=r.records)
    assert sum(s["count"] for s in d["sites"]) == len(r.faults) == fs.faults
    by_code: dict[str, int] = {}
    for s in d["sites"]:
        if s["vector"] == "#PF":
            by_code[f"{s['error_code']:#x}"] = by_code.get(f"{s['error_code']:#x}", 0) + s["count"]
    assert by_code == r.to_dict()["faults_by_error_code"]
    pk = {k: sum(v) for k, v in d["timeline"]["by_pkey"].items() if k != "other"}
    assert pk == r.to_dict()["faults_by_pkey"]
    assert d["timeline"]["buckets"] * d["timeline"]["bucket_records"] >= r.records
    assert d["timeline"]["buckets"] <= 64
    firsts = {(int(x["record"])) for x in r.faults}
    assert all(s["first_record"] in firsts and s["last_record"] in firsts for s in d["sites"])
