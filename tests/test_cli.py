"""The pks-emu command line: replay, gen, convert, info (exit codes, output, bad input)."""
from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from pks_emu.cli import main
from pks_emu.trace.format import read_header
from pks_emu.trace.generators import GENERATORS
from pks_emu.trace.replay import replay

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LACKEY = EXAMPLES / "gzip-services.lackey.xz"
POLICY = EXAMPLES / "protect-heap.toml"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pmem_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "pmem.pkt"
    assert main(["gen", "pmem-stray", "-o", str(path), "--records", "20000", "--seed", "3"]) == 0
    return path


def test_gen_is_reproducible(tmp_path, capsys):
    for name in GENERATORS:
        a, b, c = tmp_path / f"{name}-a.pkt", tmp_path / f"{name}-b.pkt", tmp_path / f"{name}-c.pkt"
        extra = ["--pages", "4096"] if name == "tlb-miss-scan" else []
        assert run(capsys, "gen", name, "-o", a, "--records", "5000", "--seed", "7", *extra)[0] == 0
        assert run(capsys, "gen", name, "-o", b, "--records", "5000", "--seed", "7", *extra)[0] == 0
        assert run(capsys, "gen", name, "-o", c, "--records", "5000", "--seed", "8", *extra)[0] == 0
        assert a.read_bytes() == b.read_bytes(), name
        assert a.read_bytes() != c.read_bytes(), name


def test_generated_workloads_fault_where_they_should(tmp_path):
    from pks_emu.trace.generators import gen_kmap_nesting, gen_multi_task, gen_pmem_stray
    s = gen_pmem_stray(str(tmp_path / "p.pkt"), records=30000, seed=1)
    r = replay(tmp_path / "p.pkt")
    # Only the stray writes fault, each a supervisor write denied by key 1.
    assert len(r.faults) == s["stray_writes"] > 0
    assert set(r.faults_by_error_code()) == {0x23} and set(r.faults_by_pkey()) == {1}
    s = gen_kmap_nesting(str(tmp_path / "k.pkt"), records=30000, seed=1)
    r = replay(tmp_path / "k.pkt")
    # Handlers that touch the page without their own mapping fault; the
    # interrupted windows, restored on exit, never do.
    assert len(r.faults) == s["expected_faults"] > 0
    assert r.kernel["max_exception_depth"] == 2
    s = gen_multi_task(str(tmp_path / "m.pkt"), records=30000, seed=1, tasks=6, cpus=3)
    r = replay(tmp_path / "m.pkt")
    assert len(r.faults) == s["foreign_accesses"] > 0
    assert r.kernel["pkrs_writes_avoided"] > 0


def test_replay_summary_and_json(pmem_trace, capsys):
    code, out, err = run(capsys, "replay", pmem_trace, "-q")
    assert code == 0 and err == ""
    assert "faults" in out and "0x23 P|W|PK" in out and "key 1" in out
    code, out, _ = run(capsys, "replay", pmem_trace, "--json")
    d = json.loads(out)
    assert code == 0 and d["schema"] == "pks-emu-replay/2"
    assert d["fault_count"] == len(d["faults"]) > 0
    assert d["faults_by_pkey"] == {"1": d["fault_count"]}
    assert set(d["faults"][0]) >= {"record", "cpu", "vector", "kind", "address", "error_code", "pkey"}
    assert d["records_replayed"] == d["records"] == read_header(pmem_trace).record_count


def test_replay_fail_on_fault_and_stop(pmem_trace, capsys):
    assert run(capsys, "replay", pmem_trace, "-q", "--fail-on-fault")[0] == 3
    code, out, _ = run(capsys, "replay", pmem_trace, "--json", "--stop-on-fault")
    d = json.loads(out)
    assert code == 0 and d["fault_count"] == 1 and d["stopped_early"]
    code, out, _ = run(capsys, "replay", pmem_trace, "--json", "--max-faults", "2")
    assert json.loads(out)["fault_count"] == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".npy"])
def test_replay_writes_every_fault(pmem_trace, tmp_path, capsys, suffix):
    out_path = tmp_path / f"faults{suffix}"
    assert run(capsys, "replay", pmem_trace, "-q", "--faults", out_path)[0] == 0
    n = len(replay(pmem_trace).faults)
    if suffix == ".npy":
        assert len(np.load(out_path)) == n
    elif suffix == ".csv":
        lines = out_path.read_text().splitlines()
        assert lines[0].startswith("record,cpu,vector") and len(lines) == n + 1
        assert ",#PF,write," in lines[1] and "P|W|PK" in lines[1]
    else:
        rows = [json.loads(x) for x in out_path.read_text().splitlines()]
        assert len(rows) == n and rows[0]["pkey"] == 1


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.pkt"
    bad.write_bytes(b"PKSEMUTR" + b"\0" * 10)
    code, out, err = run(capsys, "replay", bad)
    assert code == 2 and err.count("\n") == 1 and "bad.pkt" in err and "truncated header" in err
    code, _, err = run(capsys, "replay", tmp_path / "missing.pkt")
    assert code == 2 and "missing.pkt: no such file" in err
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("I  0401ab70,3\n L 04a1ade0,8\nhello world\n")
    code, _, err = run(capsys, "replay", garbage)
    assert code == 2 and "garbage.txt:3" in err and "hello world" in err
    code, _, err = run(capsys, "info", garbage)
    assert code == 2 and "garbage.txt:3" in err and "hello world" in err
    code, _, err = run(capsys, "replay", garbage, "--faults", tmp_path / "x.bin", "--skip-bad")
    assert code == 2 and "unknown format '.bin'" in err


def test_policy_errors_name_the_file_and_setting(tmp_path, capsys):
    pol = tmp_path / "p.toml"
    for text, msg in [
        ("[[region]]\nstart = 1\n", "region 1: start and end are required"),
        ("[default]\nmap = 'kernel'\n", "map = 'kernel'"),
        ("[registers]\npkru = { 17 = 'ro' }\n", "key 17 out of range"),
        ("[registers]\npkru = { 3 = 'maybe' }\n", "rights 'maybe' for key 3"),
        ("[[region]]\nstart = 5\nend = 2\n", "start 0x5 is not below end 0x2"),
        ("[oops]\n", "unknown section(s) ['oops']"),
        ("not toml [", "not valid TOML"),
    ]:
        pol.write_text(text)
        code, _, err = run(capsys, "replay", LACKEY, "--policy", pol)
        assert code == 2 and "p.toml" in err and msg in err, (text, err)


def test_lackey_replay_with_the_example_policy(capsys):
    code, out, _ = run(capsys, "replay", LACKEY, "--policy", POLICY, "--json")
    d = json.loads(out)
    # Every store to the heap (key 3, write-disabled in PKRU) faults; nothing else does.
    assert code == 0
    assert d["faults_by_error_code"] == {"0x27": d["fault_count"]}
    assert d["faults_by_pkey"] == {"3": d["fault_count"]}
    heap = [int(f["address"], 16) for f in d["faults"]]
    assert all(0x4a00000 <= a < 0x4b00000 for a in heap)
    assert d["record_counts"]["access"] == 2_796_100


def test_lackey_counts_match_an_independent_count(tmp_path, capsys):
    """Stores to the heap counted straight from the text equal the PK faults."""
    text = lzma.open(LACKEY, "rt").read().splitlines()
    expected = 0
    for line in text:
        if line[:2] in (" S", " M"):
            addr = int(line[3:].split(",")[0], 16)
            if 0x4a00000 <= addr < 0x4b00000:
                expected += 1
    code, out, _ = run(capsys, "replay", LACKEY, "--policy", POLICY, "--json")
    assert json.loads(out)["fault_count"] == expected


def test_unmapped_region_gives_not_present_faults(tmp_path, capsys):
    pol = tmp_path / "p.toml"
    pol.write_text("[[region]]\nname='stack'\nstart=0x1ff0000000\nend=0x2000000000\nmap='unmapped'\n")
    code, out, _ = run(capsys, "replay", LACKEY, "--policy", pol, "--json")
    d = json.loads(out)
    # User-mode accesses to not-present pages: U, plus W for stores; no P, no PK.
    assert set(d["faults_by_error_code"]) <= {"0x4", "0x6"} and d["fault_count"] > 0
    assert d["faults_by_pkey"] == {}


def test_convert_then_replay_equals_direct_replay(tmp_path, capsys):
    out_path = tmp_path / "g.pkt"
    code, out, _ = run(capsys, "convert", LACKEY, out_path, "--policy", POLICY)
    assert code == 0 and "pages mapped 200" in out
    direct = json.loads(run(capsys, "replay", LACKEY, "--policy", POLICY, "--json")[1])
    converted = json.loads(run(capsys, "replay", out_path, "--json")[1])
    for key in ("fault_count", "faults_by_error_code", "record_counts", "counters"):
        assert direct[key] == converted[key], key
    code, out, _ = run(capsys, "info", out_path, "--json")
    info = json.loads(out)
    assert info["records"] == 2_796_100 and info["access_kinds"]["fetch"] > 2_000_000
    assert info["initial_cpus"][0]["pkru"] == "0x80"
    code, _, err = run(capsys, "replay", out_path, "--policy", POLICY)
    assert code == 2 and "--policy applies to lackey traces" in err


def test_info_of_generated_trace(pmem_trace, capsys):
    code, out, _ = run(capsys, "info", pmem_trace)
    assert code == 0 and "pks-emu info" in out and "wrmsr" in out and "per CPU" in out


def test_compat_override_changes_the_user_to_supervisor_pk_bit(tmp_path, capsys):
    """A user-mode read of a supervisor page whose PKRS key denies: PK is set
    under the SDM (KVM, Xen) and not under QEMU 7.2."""
    import pks_emu
    from pks_emu.constants import CR4_PKS, MSR_IA32_PKRS
    from pks_emu.trace.writer import TraceWriter
    m = pks_emu.Machine()
    a = m.address_space()
    a.map(0x7000000000, 0x100000, pkey=2)            # supervisor page, key 2
    a.activate()
    m.cpus[0].cr4 = m.cpus[0].cr4 | CR4_PKS
    m.cpus[0].wrmsr(MSR_IA32_PKRS, 0x55555554)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        w.access(0, 0x7000000000, "read", cpl=3)
    sdm = json.loads(run(capsys, "replay", path, "--json")[1])
    qemu = json.loads(run(capsys, "replay", path, "--json", "--compat", "qemu")[1])
    assert sdm["faults_by_error_code"] == {"0x25": 1} and sdm["header"]["compat"] == "sdm"
    assert qemu["faults_by_error_code"] == {"0x5": 1} and qemu["header"]["compat"] == "qemu"


def test_stale_check_reports_a_pte_write_without_invlpg(tmp_path, capsys):
    import pks_emu
    from pks_emu.trace.writer import TraceWriter
    m = pks_emu.Machine()
    a = m.address_space()
    va = 0x40_0000_0000
    a.map(va, 0x100000)
    a.activate()
    ea, e, _ = a.lookup(va)
    path = tmp_path / "t.pkt"
    with TraceWriter(path, m) as w:
        w.access(0, va, "read")
        w.pte_write(ea, (e & ~0xFFFFFFFFF000) | 0x200000)     # remap, no INVLPG
        w.access(0, va, "read")                                 # stale: still 0x100000
        w.invlpg(0, va)
        w.access(0, va, "read")                                 # fresh
    code, out, _ = run(capsys, "replay", path, "--json", "--stale-check")
    d = json.loads(out)
    assert code == 0 and d["counters"]["stale_uses"] == 1
    assert d["stale_uses"] == [{"va": hex(va), "cached_pa": "0x100000", "cached_pkey": 0,
                                "fresh_pa": "0x200000", "fresh_pkey": 0, "fresh_error": None,
                                "cpu": 0}]
    code, out, _ = run(capsys, "replay", path)
    assert "stale TLB" not in out                              # off by default
    code, out, _ = run(capsys, "replay", path, "--stale-check")
    assert "stale TLB   1 hits" in out and "cached 0x100000" in out and "now 0x200000" in out


def test_info_of_a_lackey_trace(capsys):
    code, out, _ = run(capsys, "info", LACKEY, "--json")
    d = json.loads(out)
    assert code == 0 and d["format"] == "lackey" and d["compression"] == "xz"
    assert d["lines"] == 2_786_873 and d["records"] == 2_796_100
    assert d["access_kinds"]["fetch"] == 2_065_294 and d["pages"] >= 190
    code, out, _ = run(capsys, "info", LACKEY)
    assert "Valgrind lackey" in out and "2,796,100" in out
