"""Sweeps on Dask (pks_emu.sweep, ``pks-emu sweep``; docs/sweeps.md).

One LocalCluster of 2 worker processes serves the module. The traces are
small seeded lackey texts (3,000 lines each) with loads and stores in the
heap region of examples/protect-heap.toml and in a second region that the
second policy closes with another key.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sigint import default_sigint
import pks_emu
from pks_emu.cli import main
from pks_emu.trace.convert import convert_lackey

distributed = pytest.importorskip("distributed")
pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from pks_emu.sweep import (CANCELLED, TIMING_COLUMNS, SweepInterrupted, read_table,  # noqa: E402
                           sweep, write_table)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HEAP_POLICY = EXAMPLES / "protect-heap.toml"
N_LINES = 3000

#: Key 5 on 0x5000000-0x5100000, no access; the heap (key 3) read/write.
SECOND_POLICY = """\
[registers]
cpl = 3
pkru = { 5 = "no-access" }
cr4 = ["pke", "pks", "smep", "smap"]

[[region]]
name = "heap"
start = 0x4a00000
end = 0x4b00000
pkey = 3

[[region]]
name = "arena"
start = 0x5000000
end = 0x5100000
pkey = 5
"""


def lackey_text(seed: int, n: int = N_LINES) -> str:
    """A lackey trace: code, stack, heap (0x4a00000) and arena (0x5000000) accesses."""
    rng = np.random.default_rng(seed)
    out = ["==1== Lackey, an example Valgrind tool\n"]
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            out.append(f"I  {0x400000 + int(rng.integers(0, 1 << 14)) * 4:08x},{int(rng.integers(1, 8))}\n")
            continue
        area = rng.choice([0x1ffefff000, 0x4a00000, 0x5000000], p=[0.5, 0.3, 0.2])
        addr = int(area) + int(rng.integers(0, 1 << 12)) * 8
        kind = rng.choice([" L", " S", " M"], p=[0.6, 0.35, 0.05])
        out.append(f"{kind} {addr:08x},8\n")
    out.append("==1== \n")
    return "".join(out)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep-inputs")
    traces = []
    for i in range(4):
        p = d / f"t{i}.lackey"
        p.write_text(lackey_text(1000 + i, N_LINES + 500 * i))
        traces.append(str(p))
    second = d / "arena-no-access.toml"
    second.write_text(SECOND_POLICY)
    bad_policy = d / "bad.toml"
    bad_policy.write_text("[registers\ncpl = 3\n")
    corrupt = d / "corrupt.lackey"
    corrupt.write_text("I  00400000,3\n L 0x-this-is-no-address\n")
    return {"traces": traces, "policies": [str(HEAP_POLICY), str(second)], "dir": d,
            "bad_policy": str(bad_policy), "corrupt": str(corrupt)}


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def table(inputs, client):
    return sweep(inputs["traces"], inputs["policies"], ["sdm", "qemu"], client=client, progress=False)


def single_replay(trace: str, policy: str, compat: str, tmp: Path) -> dict:
    native = tmp / "one.pkt"
    convert_lackey(trace, native, policy=policy)
    return pks_emu.replay(native, compat=compat).to_dict()


def test_sixteen_rows_equal_sixteen_single_replays(table, inputs, tmp_path):
    assert len(table) == 16
    assert (table["status"] == "done").all() and table["error"].isna().all()
    i = 0
    for trace in inputs["traces"]:
        for policy in inputs["policies"]:
            for compat in ("sdm", "qemu"):
                row = table.iloc[i]
                assert (row["trace"], row["policy"], row["compat"], row["api"]) == (trace, policy, compat, None)
                d = single_replay(trace, policy, compat, tmp_path)
                for name, value in d["counters"].items():
                    assert row[name] == value, (i, name)
                assert row["records"] == d["records"] and row["fault_count"] == d["fault_count"]
                assert row["accesses"] == d["accesses"]
                for code, n in d["faults_by_error_code"].items():
                    assert row[f"faults_ec_{code}"] == n
                for key, n in d["faults_by_pkey"].items():
                    assert row[f"faults_pkey_{key}"] == n
                ec = [c for c in table.columns if c.startswith("faults_ec_")]
                assert sum(row[c] for c in ec) == sum(d["faults_by_error_code"].values())
                i += 1
    # The traces do fault, under both keys (3: stores, read-only; 5: any access).
    heap = table["policy"] == inputs["policies"][0]
    assert (table.loc[heap, "faults_pkey_3"] > 0).all() and (table.loc[~heap, "faults_pkey_5"] > 0).all()
    assert table["worker"].str.startswith("tcp://").all()
    assert table.attrs["partial"] is False


def test_failures_stay_in_their_rows(inputs, client, tmp_path):
    native = tmp_path / "native.pkt"
    convert_lackey(inputs["traces"][0], native)
    traces = [inputs["traces"][0], str(tmp_path / "missing.lackey"), inputs["corrupt"], str(native)]
    t = sweep(traces, [inputs["policies"][0], inputs["bad_policy"]], client=client, progress=False,
              results_dir=tmp_path / "results")
    assert len(t) == 8
    status = dict(zip(zip(t["trace"], t["policy"]), zip(t["status"], t["error"])))
    good, bad = inputs["policies"][0], inputs["bad_policy"]
    assert status[(inputs["traces"][0], good)] == ("done", None)
    for (trace, policy), (st, err) in status.items():
        if (trace, policy) != (inputs["traces"][0], good):
            assert st == "failed" and err and "\n" not in err, (trace, policy, err)
    assert "missing.lackey" in status[(traces[1], good)][1]
    assert "bad.toml" in status[(inputs["traces"][0], bad)][1]
    assert "policy" in status[(str(native), good)][1]
    failed = t[t["status"] == "failed"]
    assert failed["fault_count"].isna().all() and failed["page_faults"].isna().all()
    # Only the combination that ran keeps its JSON result.
    files = sorted(os.listdir(tmp_path / "results"))
    assert files == ["0000-t0-protect-heap-trace-any.json"]
    d = json.loads((tmp_path / "results" / files[0]).read_text())
    assert d["counters"]["page_faults"] == t.iloc[0]["page_faults"]


def test_api_versions_are_rows(inputs, client):
    # A lackey trace has no kernel records: every version gives the same counts.
    t = sweep(inputs["traces"][:1], api=[None, "v6", "v10"], client=client, progress=False)
    assert list(t["status"]) == ["done", "done", "done"]
    assert list(t["api"].fillna("-")) == ["-", "v6", "v10"] or len(set(t["api"])) == 3
    assert t.iloc[0]["fault_count"] == t.iloc[1]["fault_count"] == t.iloc[2]["fault_count"]
    with pytest.raises(ValueError, match="v99"):
        sweep(inputs["traces"][:1], api=["v99"], client=client, progress=False)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_table_round_trips(table, tmp_path, suffix):
    path = tmp_path / f"table{suffix}"
    write_table(table, path)
    back = read_table(path)
    pd.testing.assert_frame_equal(back, table)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_same_table_with_one_and_two_workers(table, inputs):
    # No client: sweep starts (and closes) its own one-worker LocalCluster.
    one = sweep(inputs["traces"], inputs["policies"], ["sdm", "qemu"], n_workers=1, progress=False)
    assert one["worker"].nunique() == 1 and table["worker"].nunique() == 2
    pd.testing.assert_frame_equal(one.drop(columns=list(TIMING_COLUMNS)),
                                  table.drop(columns=list(TIMING_COLUMNS)))


def test_interrupt_cancels_the_rest_and_keeps_what_finished(inputs, client, monkeypatch):
    real = distributed.as_completed

    def interrupted_after_two(futures, *a, **kw):
        for n, f in enumerate(real(futures, *a, **kw)):
            if n == 2:
                raise KeyboardInterrupt
            yield f
    monkeypatch.setattr(distributed, "as_completed", interrupted_after_two)
    with pytest.raises(SweepInterrupted) as info:
        sweep(inputs["traces"], inputs["policies"], ["sdm", "qemu"], client=client, progress=False)
    t = info.value.table
    assert len(t) == 16 and t.attrs["partial"] is True
    assert (t["status"] == "done").sum() == 2 and (t["status"] == CANCELLED).sum() == 14
    assert t.loc[t["status"] == CANCELLED, "page_faults"].isna().all()


def test_cli_end_to_end(inputs, client, tmp_path, capsys):
    out = tmp_path / "sweep.parquet"
    rc = main(["sweep", *inputs["traces"][:2], "--policy", "default", *inputs["policies"],
               "--compat", "sdm", "qemu", "--scheduler", client.scheduler.address,
               "-o", str(out), "--results-dir", str(tmp_path / "res")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "12 combinations: 12 done, 0 failed" in printed
    t = read_table(out)
    assert len(t) == 12 and list(t["policy"][:4]) == [None, None, *inputs["policies"][:1] * 2]
    assert list(t["compat"][:2]) == ["sdm", "qemu"]
    assert len(os.listdir(tmp_path / "res")) == 12


@pytest.mark.parametrize("args,message", [
    (["{t}", "-o", "table.txt"], "unknown table format '.txt'"),
    (["/nonexistent/trace.lackey"], "/nonexistent/trace.lackey: no such file"),
    (["{t}", "--policy", "/nonexistent.toml"], "--policy /nonexistent.toml: no such file"),
    (["{t}", "--workers", "0"], "--workers 0"),
])
def test_cli_bad_arguments_exit_2_with_one_line(inputs, capsys, args, message):
    rc = main(["sweep", *[a.format(t=inputs["traces"][0]) for a in args]])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_cli_interrupt_writes_the_partial_table(tmp_path):
    """SIGINT to the whole process group, as Ctrl-C does: exit 130, one line,
    no traceback, the finished rows written and the others cancelled."""
    trace = str(EXAMPLES / "gzip-services.lackey.xz")
    out, res = tmp_path / "partial.csv", tmp_path / "res"
    cmd = [sys.executable, "-c", "import sys; from pks_emu.cli import main; sys.exit(main())", "sweep", trace, trace, trace, "--policy", "default",
           str(HEAP_POLICY), "--workers", "1", "-q", "-o", str(out), "--results-dir", str(res)]
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path,
    # and the source tree has no compiled core when the package is installed.
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=default_sigint,
                         text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (res.is_dir() and any(n.endswith(".json") for n in os.listdir(res))):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, stderr
    assert stderr.startswith("pks-emu sweep: interrupted:") and stderr.count("\n") == 1, stderr
    t = read_table(out)
    assert len(t) == 6 and t.attrs["partial"] is True
    assert 1 <= (t["status"] == "done").sum() < 6
    assert set(t["status"]) <= {"done", CANCELLED}


def test_core_imports_without_dask_and_names_the_extra():
    code = ("import sys\n"
            "sys.modules['distributed'] = None\n"
            "import pks_emu\n"
            "assert 'dask' not in sys.modules and 'pandas' not in sys.modules\n"
            "try:\n"
            "    pks_emu.sweep(['x.lackey'])\n"
            "except pks_emu.PksEmuError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd="/")
    assert r.returncode == 0, r.stderr
    assert "pip install 'pks-emu[dist]'" in r.stdout


def test_a_task_that_dies_fails_its_row_only(inputs, client, monkeypatch):
    import pks_emu.sweep as mod

    def dies_on_t1(trace, *args):
        if trace.endswith("t1.lackey"):
            raise MemoryError("worker out of memory")
        return real(trace, *args)
    real = mod._task
    monkeypatch.setattr(mod, "_task", dies_on_t1)
    t = sweep(inputs["traces"][:3], client=client, progress=False)
    assert list(t["status"]) == ["done", "failed", "done"]
    assert t.iloc[1]["error"] == "worker out of memory"


def test_schema_2_sites_become_the_top_sites_column():
    from pks_emu.sweep import _values
    site = {"ip": "0x401a2b", "symbol": "deflate+0x1b", "source": "deflate.c:123", "vector": "#PF",
            "kind": "write", "pkey": 3, "error_code": 39, "error_code_bits": "P|W|U|PK", "count": 9,
            "first_record": 10, "last_record": 99, "sample_addresses": ["0x4a0c010"]}
    d = {"schema": "pks-emu-replay/2", "records": 100, "records_replayed": 100, "accesses": 90,
         "fault_count": 12, "counters": {"page_faults": 12}, "faults_by_error_code": {"0x27": 12},
         "faults_by_pkey": {"3": 12}, "elapsed_seconds": 0.5,
         "sites": [site, dict(site, ip="0x401a40", count=3)], "sites_total": 57}
    v = _values(d, top_sites=1)
    assert v["sites_total"] == 57
    assert json.loads(v["top_sites"]) == [{"ip": "0x401a2b", "symbol": "deflate+0x1b", "vector": "#PF",
                                           "kind": "write", "pkey": 3, "error_code": 39,
                                           "error_code_bits": "P|W|U|PK", "count": 9}]
    # Schema 1 (no sites): the columns stay missing.
    v1 = _values({k: x for k, x in d.items() if not k.startswith("sites")}, top_sites=5)
    assert v1["top_sites"] is None and v1["sites_total"] is None
