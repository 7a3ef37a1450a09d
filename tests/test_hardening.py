"""Issue 13: no crash, no traceback, nothing lost — one test per class of bad
input, I/O error, interrupt or API misuse (the subprocess matrix is in
test_cli_contract.py)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from pks_emu import Machine, TraceWriter
from pks_emu.atomic import PARTIAL_MARK, OutputError, atomic_output
from pks_emu.cli import main
from pks_emu.errors import TraceFormatError
from pks_emu.lackey import parse_lackey
from pks_emu.trace.convert import convert_lackey
from pks_emu.trace.format import HEADER_SIZE, read_header
from pks_emu.trace.policy import build_machine, load_policy


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def lackey(tmp_path, text: str | bytes, name: str = "t.lackey"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def small_trace(tmp_path, name="t.pkt", ncpus=1, records=3):
    m = Machine(ncpus=ncpus)
    a = m.address_space()
    a.map_range(0x400000, 0x1000000, 0x4000, user=True)
    a.activate()
    path = tmp_path / name
    with TraceWriter(path, m) as w:
        for i in range(records):
            w.access(i % ncpus, 0x400000 + 8 * i, "read")
    return path


# --- atomic outputs ---------------------------------------------------------------------

def test_atomic_output_appears_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as f:
        f.write(b"abc")
        assert not target.exists()                      # not yet
        assert [p.name for p in tmp_path.iterdir()][0].startswith(".out.bin" + PARTIAL_MARK)
    assert target.read_bytes() == b"abc"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_error_or_interrupt_leaves_the_target_alone(tmp_path, exc):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_output(target) as f:
            f.write(b"new, half")
            raise exc()
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]         # no temporary left


def test_atomic_output_errors_name_the_path(tmp_path):
    with pytest.raises(OutputError, match="no such folder") as e:
        with atomic_output(tmp_path / "missing" / "x"):
            pass
    assert str(tmp_path / "missing" / "x") in str(e.value)
    with pytest.raises(OutputError, match="/dev/full: cannot write: No space left"):
        with atomic_output("/dev/full") as f:
            f.write(b"x" * 100)
    with pytest.raises(OutputError, match="is a directory"):
        with atomic_output(tmp_path):
            pass


def test_trace_writer_interrupted_leaves_nothing(tmp_path):
    m = Machine()
    path = tmp_path / "t.pkt"
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(path, m) as w:
            w.access(0, 0x1000, "read")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # an error inside a batch, too
    with pytest.raises(ValueError):
        with TraceWriter(path, m) as w:
            w.accesses(0, np.arange(4, dtype=np.uint64), 0, size=5000)
    assert list(tmp_path.iterdir()) == []


def test_trace_writer_dropped_without_close_leaves_nothing(tmp_path):
    w = TraceWriter(tmp_path / "t.pkt", Machine())
    w.access(0, 0x1000, "read")
    del w
    assert list(tmp_path.iterdir()) == []


def test_gen_interrupted_leaves_no_file(tmp_path, monkeypatch, capsys):
    from pks_emu.trace import writer
    calls = {"n": 0}
    real = writer.TraceWriter.extend

    def extend(self, recs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, recs)
    monkeypatch.setattr(writer.TraceWriter, "extend", extend)
    out = tmp_path / "g.pkt"
    code, _, err = run(capsys, "gen", "pmem-stray", "-o", out, "--records", "300000")
    assert code == 130
    one_error_line(err, "interrupted")
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_its_input_as_output(tmp_path, capsys):
    src = lackey(tmp_path, "I  0401ab70,3\n")
    before = src.read_bytes()
    code, _, err = run(capsys, "convert", src, src)
    assert code == 2
    one_error_line(err, str(src), "also an input")
    assert src.read_bytes() == before
    pol = tmp_path / "p.toml"
    pol.write_text("[registers]\ncpl = 3\n")
    code, _, err = run(capsys, "convert", src, pol, "--policy", pol)
    assert code == 2 and pol.read_text() == "[registers]\ncpl = 3\n"
    # through a different spelling of the same path, and a hard link
    os.link(src, tmp_path / "link.lackey")
    with pytest.raises(OutputError):
        convert_lackey(src, tmp_path / "link.lackey")
    assert src.read_bytes() == before


def test_info_output_is_atomic(tmp_path, capsys):
    t = small_trace(tmp_path)
    out = tmp_path / "info.json"
    assert run(capsys, "info", t, "--json", "-o", out)[0] == 0
    assert '"records": 3' in out.read_text()
    code, _, err = run(capsys, "info", t, "-o", tmp_path / "no" / "x")
    assert code == 2
    one_error_line(err, "no such folder")


# --- tracebacks -> one line, exit 2 -----------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["info", "{missing}"], "{missing}"),
    (["info", "{dir}"], "is a directory"),
    (["info", "/etc/passwd/x"], "Not a directory"),
    (["convert", "{missing}", "{dir}/o.pkt"], "{missing}"),
    (["convert", "{dir}", "{dir}/o.pkt"], "{dir}"),
    (["convert", "{lk}", "{dir}/none/o.pkt"], "no such folder"),
    (["convert", "{lk}", "/dev/full"], "/dev/full"),
    (["gen", "pmem-stray", "-o", "/dev/full", "--records", "10"], "/dev/full"),
    (["gen", "pmem-stray", "-o", "{dir}/none/x.pkt", "--records", "10"], "no such folder"),
    (["gen", "tlb-miss-scan", "--pages", "0", "-o", "{dir}/x.pkt", "--records", "10"], "--pages 0"),
    (["gen", "pmem-stray", "--seed", "-1", "-o", "{dir}/x.pkt", "--records", "10"], "--seed -1"),
    (["selftest", "--ncpus", "300"], "--ncpus 300"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, needle):
    lk = lackey(tmp_path, "I  0401ab70,3\n")
    subst = {"missing": str(tmp_path / "nope"), "dir": str(tmp_path), "lk": str(lk)}
    argv = [a.format(**subst) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    one_error_line(err, needle.format(**subst))
    assert not (tmp_path / "x.pkt").exists() and not (tmp_path / "o.pkt").exists()


def test_bench_repeat_zero_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--repeat", "0"])
    assert e.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_os_error_without_a_path_still_names_it(tmp_path, capsys, monkeypatch):
    # A read error of an open file carries no file name; the message must.
    lk = lackey(tmp_path, "I  0401ab70,3\n")
    import pks_emu.lackey as L
    real = L._Reader.readinto

    def failing(self, mv):
        if self.compression == "none":
            raise OSError(5, "Input/output error")
        return real(self, mv)
    monkeypatch.setattr(L._Reader, "readinto", lambda self, mv: (_ for _ in ()).throw(
        L._with_path(OSError(5, "Input/output error"), self.fspath)))
    code, _, err = run(capsys, "info", lk)
    assert code == 2
    one_error_line(err, str(lk), "Input/output error")


def test_broken_pipe_is_quiet(tmp_path, capsys, monkeypatch):
    t = small_trace(tmp_path)
    import pks_emu.cli.info as info

    def boom(*a, **k):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(info, "_run", boom)
    monkeypatch.setattr("pks_emu.cli._quiet_stdout", lambda: None)
    code, out, err = run(capsys, "info", t)
    assert code == 0 and err == ""


def test_unexpected_value_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import pks_emu.cli.info as info

    def boom(*a, **k):
        raise ValueError("something\nspanning lines")
    monkeypatch.setattr(info, "_run", boom)
    code, _, err = run(capsys, "info", small_trace(tmp_path))
    assert code == 2
    one_error_line(err, "something spanning lines")


# --- lackey input outside the native format's range --------------------------------------

def test_lackey_size_above_4096_names_the_line(tmp_path, capsys):
    lk = lackey(tmp_path, "I  0401ab70,3\n==1== hi\n S 0401ab70,5000\n")
    code, _, err = run(capsys, "convert", lk, tmp_path / "o.pkt")
    assert code == 2
    one_error_line(err, f"{lk}:3", "5000", "1..4096")
    assert not (tmp_path / "o.pkt").exists()
    code, _, err = run(capsys, "replay", lk)
    assert code == 2
    one_error_line(err, f"{lk}:3")


def test_lackey_store_crossing_into_noncanonical_space_faults(tmp_path, capsys):
    lk = lackey(tmp_path, " S 7ffffffffffe,8\n L 00401000,8\n")
    out = tmp_path / "o.pkt"
    stats = convert_lackey(lk, out)
    assert stats["pages_unmapped"] == 1 and stats["pages_mapped"] == 2
    from pks_emu import replay
    r = replay(out)
    assert r.records_replayed == 2
    assert [int(v) for v in r.faults["vector"]] == [13]   # the crossing store: #GP


def test_damaged_native_magic_is_named(tmp_path, capsys):
    t = small_trace(tmp_path)
    raw = bytearray(t.read_bytes())
    raw[6:8] = b"TX"
    t.write_bytes(bytes(raw))
    for cmd in (["info", t], ["replay", t], ["convert", t, tmp_path / "o.pkt"]):
        code, _, err = run(capsys, *cmd)
        assert code == 2
        one_error_line(err, "damaged pks_emu trace", "PKSEMUTX")
    with pytest.raises(TraceFormatError, match="is a native pks_emu trace"):
        parse_lackey(small_trace(tmp_path, "ok.pkt"))


def test_gzip_trailing_garbage_says_so(tmp_path):
    p = tmp_path / "t.gz"
    p.write_bytes(gzip.compress(b"I  0401ab70,3\n") + b"garbage!")
    with pytest.raises(TraceFormatError, match="trailing garbage after the gzip data "
                                               r"\(after 14 decompressed bytes\)"):
        parse_lackey(p)


def test_error_lines_keep_the_format_text(tmp_path, capsys):
    # one_line() joins lines but must not squeeze the two spaces of 'I  ADDR,SIZE'
    code, _, err = run(capsys, "info", lackey(tmp_path, "hello\n"))
    assert code == 2
    one_error_line(err, "expected 'I  ADDR,SIZE'")


def test_info_on_dev_null_is_refused(capsys):
    code, _, err = run(capsys, "info", "/dev/null")
    assert code == 2
    one_error_line(err, "/dev/null: empty input")


def test_empty_input_is_refused(tmp_path, capsys):
    e = lackey(tmp_path, b"", "empty")
    for cmd in (["info", e], ["replay", e], ["convert", e, tmp_path / "o.pkt"]):
        code, _, err = run(capsys, *cmd)
        assert code == 2, cmd
        one_error_line(err, "empty file")
    assert not (tmp_path / "o.pkt").exists()
    banner = lackey(tmp_path, "==1== only a banner\n", "banner")
    code, _, err = run(capsys, "replay", banner)
    assert code == 2
    one_error_line(err, "no records in 1 lines")


# --- native traces: messages ----------------------------------------------------------------

def test_info_on_a_bad_record_is_one_line(tmp_path, capsys):
    t = small_trace(tmp_path)
    raw = bytearray(t.read_bytes())
    h = read_header(t)
    raw[h.records_offset + 24 + 1] = 7          # record 1: CPU 7 of 1
    t.write_bytes(bytes(raw))
    code, _, err = run(capsys, "info", t)
    assert code == 2
    one_error_line(err, "record 1", "CPU 7 out of range")


def test_truncated_inside_the_memory_image(tmp_path):
    t = small_trace(tmp_path)
    h = read_header(t)
    cut = h.memory_offset + 4096 + 100              # inside frame 0 or 1
    t.write_bytes(t.read_bytes()[:cut])
    with pytest.raises(TraceFormatError, match="truncated inside the memory image"):
        read_header(t)


def test_five_level_header_without_la57(tmp_path, capsys):
    t = small_trace(tmp_path)
    raw = bytearray(t.read_bytes())
    raw[16] = 5                                     # paging_levels
    feats = struct.unpack_from("<I", raw, 20)[0]
    struct.pack_into("<I", raw, 20, feats & ~64)    # no la57
    t.write_bytes(bytes(raw))
    code, _, err = run(capsys, "info", t)
    assert code == 2
    one_error_line(err, "5-level paging without the la57 feature")
    code, _, err = run(capsys, "replay", t)
    assert code == 2
    one_error_line(err, "la57")
    assert HEADER_SIZE == 128


# --- policies ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    ('[registers]\nnxe = "false"\n', "[registers] nxe = 'false'"),
    ('[registers]\nwp = 0\n', "[registers] wp = 0"),
    ("[registers]\ncpl = true\n", "[registers] cpl = True"),
    ("[registers]\npkru = true\n", "[registers] pkru = True"),
    ("[registers]\npkru = { 3 = [1] }\n", "rights [1] for key 3"),
    ("[registers]\ncr4 = [1]\n", "[registers] cr4 = [1]"),
    ("[default]\npkey = true\n", "[default]: pkey = True"),
    ("[default]\nstart = 1.5\n", "[default]: start = 1.5"),
    ('[default]\nmap = 3\n', "map = 3"),
    ('[default]\nname = 3\n', "name = 3"),
    ("[machine]\nncpus = 2\n", "[machine]: unknown or unsupported setting(s) ['ncpus']"),
    ("[machine]\npaging_levels = true\n", "paging_levels = True"),
    ("registers = 5\n", "[registers]: expected a table"),
    ("region = [1]\n", "region 1: expected a table"),
    ("default = 3\n", "[default]: expected a table"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_policy_types_are_checked(tmp_path, body, needle):
    p = tmp_path / "p.toml"
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(TraceFormatError) as e:
        load_policy(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_policy_booleans_still_work(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[registers]\nnxe = false\nwp = true\ncpl = 0\npkru = 0\n")
    pol = load_policy(p)
    assert pol.nxe is False and pol.cpl == 0
    m, _ = build_machine(pol, np.array([0x400], dtype=np.uint64))
    assert not m.cpus[0].efer & (1 << 11)


# --- replay: silent wrong answers, --faults, interrupts --------------------------------------

def test_replay_refuses_a_machine_that_does_not_match_the_trace(tmp_path):
    from pks_emu import replay
    t = small_trace(tmp_path, ncpus=2, records=6)
    with pytest.raises(ValueError, match="needs 2 CPU"):
        replay(t, machine=Machine())
    with pytest.raises(ValueError, match="4-level"):
        replay(t, machine=Machine(ncpus=2, paging_levels=5))
    assert replay(t).records_replayed == 6


def test_replay_list_must_not_be_negative(tmp_path, capsys):
    t = small_trace(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["replay", str(t), "--list", "-1"])
    assert e.value.code == 2
    assert "--list" in capsys.readouterr().err
    assert run(capsys, "replay", t, "--list", "0")[0] == 0


def test_faults_file_is_atomic(tmp_path, capsys, monkeypatch):
    from pks_emu.cli import replay as cli_replay
    t = small_trace(tmp_path)
    out = tmp_path / "f.csv"
    full = tmp_path / "full.csv"
    full.symlink_to("/dev/full")
    code, _, err = run(capsys, "replay", t, "--faults", full)
    assert code == 2
    one_error_line(err, "full.csv", "No space left")
    code, _, err = run(capsys, "replay", t, "--faults", tmp_path / "no" / "f.csv")
    assert code == 2
    one_error_line(err, "no such folder")
    lk = lackey(tmp_path, "I  0401ab70,3\n")
    pol = tmp_path / "p.toml"
    pol.write_text('[default]\nmap = "unmapped"\n')
    assert run(capsys, "replay", lk, "--policy", pol, "--faults", out)[0] == 0
    assert out.read_text().count("\n") == 2
    # (an interrupt while the faults are written: test_cli_contract.py)


def test_lackey_replay_interrupted_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    import tempfile

    import pks_emu.trace.policy as pol
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lk = lackey(tmp_path, "I  0401ab70,3\n")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    # The lackey replay maps each chunk's pages as it goes: interrupt it there.
    monkeypatch.setattr(pol.PolicyMapper, "map_new_pages", interrupted)
    code, _, err = run(capsys, "replay", lk)
    assert code == 130
    one_error_line(err, "interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.lackey"]


def test_atomic_output_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with atomic_output(link) as f:
        f.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
