"""asv benchmarks of trace format v2 (issue 10): the record codec's encode and
decode rates, the size of the bundled lackey trace in v2, and the reader's
rate over a whole file.

Data, written once per run by ``setup_cache`` into asv's working folder:

* ``lackey``: the records and IPs of examples/gzip-services.lackey.xz
  (``gzip -c /etc/services`` under ``valgrind --tool=lackey --trace-mem=yes``,
  2.80 M records; cut to 64 Ki records in quick mode), through the default
  policy, as ``lackey_to_v2`` makes them;
* ``replay``: the same trace through examples/protect-heap.toml as a v1 file
  (``convert_lackey``) and a v2 file (``lackey_to_v2``), replayed whole;
* ``synthetic``: the replay benchmarks' hit scan (one CPU, 512 pages, reads
  and writes, one WRMSR of IA32_PKRS per 100 records) with a fixed IP per
  site, like the generators' traces.

Targets: encode >= 50 M records/s; decode cheap enough that replaying v2
stays >= 80 % of replaying v1 (about 2.5 ns a record); <= 3 bytes an access
and <= 1/4 of the lackey text.
"""
from __future__ import annotations

import io
import os
import time

import numpy as np

from pks_emu._core import REPLAY_STATUS, ReplayEngine, load_cpu_state
from pks_emu._tracev2 import Codec
from pks_emu.constants import MSR_IA32_PKRS
from pks_emu.machine import Machine
from pks_emu.lackey import iter_lackey
from pks_emu.trace import v2
from pks_emu.trace.convert import convert_lackey
from pks_emu.trace.format import KEEP_CPL, RECORD, RecordType
from pks_emu.trace.replay import replay

from .common import EXAMPLES, HIT_PAGES, PKRS_OPEN, QUICK, REPEATS, REPLAY_RECORDS, SEED, scan_addresses

LACKEY = os.path.join(EXAMPLES, "gzip-services.lackey.xz")
#: Uncompressed size of the bundled lackey text (xz -dc | wc -c).
LACKEY_TEXT_BYTES = 39_399_054
LACKEY_RECORDS = 1 << 16 if QUICK else None
CHUNK = v2.DEFAULT_CHUNK_RECORDS
CODECS = ["none", "lz4", "zstd"]


def _lackey_arrays() -> tuple[np.ndarray, np.ndarray]:
    recs, ips = [], []
    n = 0
    for chunk in iter_lackey(LACKEY, chunk_records=1 << 20):
        r = np.zeros(len(chunk), RECORD)
        r["type"] = RecordType.ACCESS
        r["op"] = chunk.kind
        r["size"] = chunk.size
        r["cpl"] = KEEP_CPL
        r["addr"] = chunk.va
        recs.append(r)
        ips.append(chunk.ip)
        n += len(r)
        if LACKEY_RECORDS is not None and n >= LACKEY_RECORDS:
            break
    r, ip = np.concatenate(recs), np.concatenate(ips)
    if LACKEY_RECORDS is not None:
        r, ip = r[:LACKEY_RECORDS], ip[:LACKEY_RECORDS]
    return r, ip


def _synthetic_arrays() -> tuple[np.ndarray, np.ndarray]:
    n = REPLAY_RECORDS
    va, kind = scan_addresses(n, HIT_PAGES, SEED)
    recs = np.zeros(n, RECORD)
    recs["type"] = RecordType.ACCESS
    recs["op"] = kind
    recs["size"] = 8
    recs["cpl"] = KEEP_CPL
    recs["addr"] = va
    idx = np.arange(99, n, 100)
    recs["type"][idx] = RecordType.WRMSR
    recs["op"][idx] = 0
    recs["size"][idx] = 0
    recs["addr"][idx] = MSR_IA32_PKRS
    recs["value"][idx] = PKRS_OPEN
    # a plausible fixed IP per site: 64 sites, the site chosen by the access kind and page
    ip = (np.uint64(0x401000) + (((va >> np.uint64(12)) % np.uint64(32)) * np.uint64(2)
                                 + kind.astype(np.uint64) % np.uint64(2)) * np.uint64(0x18))
    return recs, ip.astype(np.uint64)


def _encode_chunks(codec: Codec, recs: np.ndarray, ip: np.ndarray) -> list[tuple[bytes, int, int]]:
    b = recs.view(np.uint8)
    out = []
    for i in range(0, len(recs), CHUNK):
        k = min(CHUNK, len(recs) - i)
        raw, ml = codec.encode(b[24 * i:24 * (i + k)], ip[i:i + k])
        out.append((raw, ml, k))
    return out


class TraceV2Codec:
    """The compiled record codec alone, chunk by chunk (in memory)."""

    params = [["lackey", "synthetic"]]
    param_names = ["trace"]
    timeout = 600

    def setup_cache(self):
        data = {"lackey": _lackey_arrays(), "synthetic": _synthetic_arrays()}
        path = os.path.abspath("tracev2-arrays.npz")
        np.savez(path, **{f"{k}_{f}": a for k, (r, ip) in data.items() for f, a in (("recs", r), ("ip", ip))})
        return path

    def setup(self, path, trace):
        z = np.load(path)
        self.recs, self.ip = z[f"{trace}_recs"], z[f"{trace}_ip"]
        self.codec = Codec(1)
        self.chunks = _encode_chunks(self.codec, self.recs, self.ip)
        self.out = np.empty(CHUNK, RECORD)
        self.out_ip = np.empty(CHUNK, np.uint64)

    def _decode(self):
        ob = self.out.view(np.uint8)
        for raw, ml, k in self.chunks:
            self.codec.decode(raw, ml, k, False, ob, self.out_ip)

    def time_encode(self, path, trace):
        _encode_chunks(self.codec, self.recs, self.ip)

    def time_decode(self, path, trace):
        self._decode()

    def track_encode_mrecords_per_s(self, path, trace):
        best = float("inf")
        for _ in range(REPEATS):
            t = time.perf_counter()
            _encode_chunks(self.codec, self.recs, self.ip)
            best = min(best, time.perf_counter() - t)
        return len(self.recs) / best / 1e6

    track_encode_mrecords_per_s.unit = "M records/s"

    def track_decode_ns_per_record(self, path, trace):
        best = float("inf")
        for _ in range(REPEATS):
            t = time.perf_counter()
            self._decode()
            best = min(best, time.perf_counter() - t)
        return best / len(self.recs) * 1e9

    track_decode_ns_per_record.unit = "ns/record"

    def track_bytes_per_record(self, path, trace):
        # Raw streams (codec none) without block and chunk headers.
        return sum(len(raw) for raw, _, _ in self.chunks) / len(self.recs)

    track_bytes_per_record.unit = "bytes/record"


class TraceV2Files:
    """Whole v2 files of the bundled lackey trace, per codec: size, and the
    reader's rate (blocks, CRC, codec, decode, record validation)."""

    params = [CODECS]
    param_names = ["codec"]
    timeout = 600

    def setup_cache(self):
        recs, ip = _lackey_arrays()
        paths = {}
        for codec in CODECS:
            paths[codec] = os.path.abspath(f"tracev2-lackey-{codec}.pkt2")
            with v2.V2Writer(paths[codec], v2.TraceHeaderV2(), codec=codec) as w:
                w.write(recs, ip)
        return paths, len(recs)

    def time_write(self, cache, codec):
        # Encoding the same records again, to memory, with validation.
        with v2.open_trace_v2(cache[0][codec]) as r:
            parts = [(x.copy(), i.copy()) for _, x, i, _ in r.chunks()]
        f = io.BytesIO()
        with v2.V2Writer(f, v2.TraceHeaderV2(), codec=codec) as w:
            for x, i in parts:
                w.write(x, i)

    def time_read(self, cache, codec):
        with v2.open_trace_v2(cache[0][codec]) as r:
            for _ in r.chunks(reuse=True):
                pass

    def track_read_mrecords_per_s(self, cache, codec):
        best = float("inf")
        for _ in range(REPEATS):
            t = time.perf_counter()
            self.time_read(cache, codec)
            best = min(best, time.perf_counter() - t)
        return cache[1] / best / 1e6

    track_read_mrecords_per_s.unit = "M records/s"

    def track_bytes_per_access(self, cache, codec):
        return os.path.getsize(cache[0][codec]) / cache[1]

    track_bytes_per_access.unit = "bytes/access"

    def track_text_ratio(self, cache, codec):
        # lackey text bytes per v2 byte (target >= 4); full trace only
        if LACKEY_RECORDS is not None:
            return LACKEY_TEXT_BYTES / 2_796_100 * cache[1] / os.path.getsize(cache[0][codec])
        return LACKEY_TEXT_BYTES / os.path.getsize(cache[0][codec])

    track_text_ratio.unit = "x"


def replay_v2(path: str, *, prefetch: int = 0, validate: bool = False) -> tuple[int, int, float]:
    """Replay a v2 file with the compiled engine, chunk by chunk (what the lead's
    integration does): (records, faults, seconds of the record loop)."""
    with v2.open_trace_v2(path) as r:
        h = r.header
        m = Machine(paging_levels=h.paging_levels, ncpus=h.ncpus, features=h.features,
                    compat=h.compat, maxphyaddr=h.maxphyaddr, tlb_entries=h.tlb_entries)
        for i, state in enumerate(r.cpu_states):
            load_cpu_state(m.cpus[i], *state)
        for pa, frame in r.memory():
            m.memory.write(pa, bytes(frame))
        engine = ReplayEngine(m, max_tasks=h.max_tasks, pkrs_init=h.pkrs_init, max_faults=0)
        n = 0
        start = time.perf_counter()
        # The engine checks every record itself, as it does for v1 files.
        for first, recs, ip, pa in r.chunks(reuse=True, prefetch=prefetch, validate=validate):
            status = engine.run(recs.view(np.uint8).data, first)
            if status != REPLAY_STATUS["done"]:
                raise RuntimeError(f"{path}: replay status {status} at chunk {first}")
            n += len(recs)
        elapsed = time.perf_counter() - start
    return n, len(engine.faults_array()), elapsed


class TraceV2Replay:
    """Replaying the bundled lackey trace (protect-heap policy) from v1 and from
    v2: v2 must reach >= 80 % of v1's speed (issue 10). Wall time of the whole
    replay call, best of several; ``prefetch`` decodes on a second thread."""

    timeout = 600

    def setup_cache(self):
        policy = os.path.join(EXAMPLES, "protect-heap.toml")
        p1, p2 = os.path.abspath("tracev2-replay.pkt"), os.path.abspath("tracev2-replay.pkt2")
        convert_lackey(LACKEY, p1, policy=policy)
        v2.lackey_to_v2(LACKEY, p2, policy=policy)
        return p1, p2

    @staticmethod
    def _best(fn) -> float:
        best = float("inf")
        for _ in range(REPEATS):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    def time_replay_v1(self, paths):
        replay(paths[0])

    def time_replay_v2(self, paths):
        replay_v2(paths[1])

    def time_replay_v2_prefetch(self, paths):
        replay_v2(paths[1], prefetch=2)

    def track_v2_over_v1_speed(self, paths):
        t1 = self._best(lambda: replay(paths[0]))
        t2 = self._best(lambda: replay_v2(paths[1]))
        return t1 / t2

    track_v2_over_v1_speed.unit = "v1 time / v2 time"

    def track_v2_prefetch_over_v1_speed(self, paths):
        t1 = self._best(lambda: replay(paths[0]))
        t2 = self._best(lambda: replay_v2(paths[1], prefetch=2))
        return t1 / t2

    track_v2_prefetch_over_v1_speed.unit = "v1 time / v2 time"

    def track_faults_equal(self, paths):
        # Pins the answer: both formats give the same faults (1 = equal).
        f1 = len(replay(paths[0]).faults)
        f2 = replay_v2(paths[1])[1]
        return float(f1 == f2)

    track_faults_equal.unit = "bool"


# --- figures outside asv ------------------------------------------------------------------
# python -m benchmarks.bench_tracev2 LACKEY_FILE...          sizes, rates, replay ratio
# python -m benchmarks.bench_tracev2 --once decode|encode FILE.pkt2
#     (for valgrind --tool=callgrind --toggle-collect='*tv2_decode*' / '*tv2_encode*')

def _figures(path: str) -> None:
    import tempfile
    text = 0
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith((b"\x1f\x8b", b"\xfd7zXZ", b"BZh")):
        import lzma
        with lzma.open(path) if magic.startswith(b"\xfd7zXZ") else open(path, "rb") as f:
            while True:
                b = f.read(1 << 24)
                if not b:
                    break
                text += len(b)
    else:
        text = os.path.getsize(path)
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for codec in CODECS:
            files[codec] = os.path.join(d, f"t-{codec}.pkt2")
            t = time.perf_counter()
            s = v2.lackey_to_v2(path, files[codec], codec=codec)
            n = s["records_written"]
            size = os.path.getsize(files[codec])
            print(f"{os.path.basename(path)} [{codec}]: {n} records, {size} bytes: {size / n:.3f} bytes/access, "
                  f"lackey text / v2 = {text / size:.1f} (lackey_to_v2 {time.perf_counter() - t:.1f} s)")
        with v2.open_trace_v2(files["none"]) as r:
            parts = [(x, i) for _, x, i, _ in r.chunks()][:256]
        recs = np.concatenate([x for x, _ in parts])
        ips = np.concatenate([i for _, i in parts])
        codec = Codec(1)
        best = float("inf")
        for _ in range(5):
            t = time.thread_time()
            chunks = _encode_chunks(codec, recs, ips)
            best = min(best, time.thread_time() - t)
        print(f"  encode (Codec.encode, {len(recs)} records): {len(recs) / best / 1e6:.0f} M records/s (thread CPU time)")
        out, out_ip = np.empty(CHUNK, RECORD), np.empty(CHUNK, np.uint64)
        best = float("inf")
        for _ in range(5):
            t = time.thread_time()
            for raw, ml, k in chunks:
                codec.decode(raw, ml, k, False, out.view(np.uint8), out_ip)
            best = min(best, time.thread_time() - t)
        print(f"  decode (Codec.decode): {best / len(recs) * 1e9:.2f} ns/record (thread CPU time)")
        for c, p in files.items():
            best = float("inf")
            for _ in range(3):
                t = time.thread_time()
                with v2.open_trace_v2(p) as r:
                    k = sum(len(x[1]) for x in r.chunks(reuse=True, validate=False))
                best = min(best, time.thread_time() - t)
            print(f"  read the whole file [{c}]: {best / k * 1e9:.2f} ns/record (thread CPU time)")
        p1 = os.path.join(d, "t.pkt")
        convert_lackey(path, p1)
        t1 = TraceV2Replay._best(lambda: replay(p1))
        for pf in (0, 2):
            t2 = TraceV2Replay._best(lambda: replay_v2(files[v2.DEFAULT_CODEC], prefetch=pf))
            print(f"  replay v1 {t1:.3f} s, v2 [{v2.DEFAULT_CODEC}, prefetch={pf}] {t2:.3f} s: v2 speed = "
                  f"{t1 / t2:.2f} x v1 (wall)")


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--once"]:
        what, p = sys.argv[2], sys.argv[3]
        with v2.open_trace_v2(p) as r:
            raws = [(bytes(raw), ml, nrec) for _, _, nrec, _, ml, raw in r.raw_chunks()]
        c = Codec(1)
        total = sum(k for _, _, k in raws)
        if what == "decode":
            o, oi = np.empty(max(k for *_, k in raws), RECORD), np.empty(max(k for *_, k in raws), np.uint64)
            for raw, ml, k in raws:
                c.decode(raw, ml, k, False, o.view(np.uint8), oi)
        else:
            with v2.open_trace_v2(p) as r:
                for _, x, i, _ in r.chunks():
                    c.encode(x.view(np.uint8), i)
        print(f"{what}: {total} records")
    else:
        for p in sys.argv[1:]:
            _figures(p)
