"""The command-line contract (docs/cli.md, issue 13), through real processes:
every subcommand x every class of bad input exits 2 with exactly one line on
stderr, naming the file/record/value and what was expected, never a
traceback, and leaves no output file that looks complete; Ctrl-C exits 130
with one line and leaves nothing behind; a closed stdout pipe stays quiet."""
from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sigint import default_sigint
from pks_emu import Machine, TraceWriter
from pks_emu.trace.format import read_header

PKS_EMU = [sys.executable, "-m", "pks_emu.cli"]


def pks_emu(*argv, env=None, cwd=None, prefix=(), timeout=120):
    e = dict(os.environ, **(env or {}))
    e.pop("COLUMNS", None)
    return subprocess.run([*prefix, *PKS_EMU, *map(str, argv)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    m = Machine()
    a = m.address_space()
    a.map_range(0x400000, 0x1000000, 0x4000, user=True)
    a.activate()
    good = d / "good.pkt"
    with TraceWriter(good, m) as w:
        for i in range(4):
            w.access(0, 0x400000 + 8 * i, "read")
    raw = good.read_bytes()
    h = read_header(good)
    files = {"good": good}

    def put(name, data):
        p = d / name
        p.write_bytes(data)
        files[name.split(".")[0]] = p                   # "{magic}" for magic.pkt
    put("empty", b"")
    put("magic.pkt", b"PKSEMUTX" + raw[8:])
    put("trunc-mem.pkt", raw[:h.memory_offset + 5000])
    put("trunc-rec.pkt", raw[:-10])
    bad = bytearray(raw)
    bad[h.records_offset + 2 * 24] = 99                 # record 2: unknown type
    put("badrec.pkt", bytes(bad))
    put("lk", b"I  0401ab70,3\n L 04a1ade0,8\n")
    put("badline.lk", b"I  0401ab70,3\n Q 04a1ade0,8\n")
    put("bigsize.lk", b"I  0401ab70,3\n S 04a1ade0,5000\n")
    put("garbage.gz", gzip.compress(b"I  0401ab70,3\n") + b"garbage!")
    put("trunc.gz", gzip.compress(b"I  0401ab70,3\n" * 100)[:30])
    put("policy-type.toml", b'[registers]\nnxe = "false"\n')
    put("policy-ncpus.toml", b"[machine]\nncpus = 2\n")
    put("policy-syntax.toml", b"[registers\n")
    files["dir"] = d
    files["missing"] = d / "missing.pkt"
    files["notdir"] = good / "x"                        # a path through a file
    return files


#: (argv with {names} of the inputs fixture and {out}, text the line must contain)
CASES = [
    # info
    (["info", "{missing}"], "{missing}"),
    (["info", "{dir}"], "is a directory"),
    (["info", "{notdir}"], "Not a directory"),
    (["info", "{empty}"], "empty file"),
    (["info", "{magic}"], "damaged pks_emu trace"),
    (["info", "{trunc-mem}"], "truncated inside the memory image"),
    (["info", "{trunc-rec}"], "truncated"),
    (["info", "{badrec}"], "record 2: unknown record type 99"),
    (["info", "{badline}"], "{badline}:2"),
    (["info", "{garbage}"], "trailing garbage"),
    (["info", "{trunc}"], "truncated gzip data"),
    (["info", "{good}", "-o", "{dir}/none/out.txt"], "no such folder"),
    (["info", "{good}", "-o", "/dev/full"], "/dev/full"),
    (["info", "{good}", "-o", "{good}"], "also an input"),
    # convert
    (["convert", "{missing}", "{out}"], "{missing}"),
    (["convert", "{dir}", "{out}"], "Is a directory"),
    (["convert", "{empty}", "{out}"], "empty file"),
    (["convert", "{good}", "{out}"], "is a native pks_emu trace"),
    (["convert", "{magic}", "{out}"], "damaged pks_emu trace"),
    (["convert", "{badline}", "{out}"], "{badline}:2"),
    (["convert", "{bigsize}", "{out}"], "access size 5000"),
    (["convert", "{garbage}", "{out}"], "trailing garbage"),
    (["convert", "{lk}", "{dir}/none/out.pkt"], "no such folder"),
    (["convert", "{lk}", "/dev/full"], "No space left"),
    (["convert", "{lk}", "{lk}"], "also an input"),
    (["convert", "{lk}", "{out}", "--policy", "{policy-type}"], "nxe = 'false'"),
    (["convert", "{lk}", "{out}", "--policy", "{policy-ncpus}"], "ncpus"),
    (["convert", "{lk}", "{out}", "--policy", "{policy-syntax}"], "not valid TOML"),
    (["convert", "{lk}", "{out}", "--policy", "{missing}"], "{missing}"),
    # replay
    (["replay", "{missing}"], "{missing}"),
    (["replay", "{dir}"], "{dir}"),
    (["replay", "{empty}"], "empty file"),
    (["replay", "{magic}"], "damaged pks_emu trace"),
    (["replay", "{trunc-mem}"], "truncated inside the memory image"),
    (["replay", "{badrec}"], "record 2"),
    (["replay", "{bigsize}"], "access size 5000"),
    (["replay", "{lk}", "--policy", "{policy-type}"], "nxe"),
    (["replay", "{good}", "--list", "-1"], "--list"),
    (["replay", "{good}", "--max-faults", "0"], "--max-faults 0"),
    (["replay", "{good}", "--max-faults", str(1 << 70)], "--max-faults 1180591620717411303424"),
    (["info", "{good}", "-o", "/proc/x.txt"], "/proc/x.txt: cannot create the output: No such file"),
    (["replay", "{good}", "--faults", "{dir}/none/f.csv"], "no such folder"),
    (["replay", "{good}", "--faults", "{out}.txt"], "unknown format"),
    # gen
    (["gen", "pmem-stray", "-o", "{dir}/none/out.pkt", "--records", "10"], "no such folder"),
    (["gen", "pmem-stray", "-o", "/dev/full", "--records", "10"], "No space left"),
    (["gen", "pmem-stray", "-o", "{out}", "--records", "0"], "--records 0"),
    (["gen", "pmem-stray", "-o", "{out}", "--seed", "-1"], "--seed -1"),
    (["gen", "pmem-stray", "-o", "{out}", "--cpus", "0"], "--cpus 0"),
    (["gen", "pmem-stray", "-o", "{out}", "--cpus", "300"], "--cpus 300"),
    (["gen", "tlb-miss-scan", "-o", "{out}", "--pages", "0"], "--pages 0"),
    (["gen", "tlb-miss-scan", "-o", "{out}", "--records", "x"], "--records"),
    (["gen", "nope", "-o", "{out}"], "invalid choice"),
    (["gen", "pmem-stray", "-o", "{dir}"], "is a directory"),
    (["gen", "pmem-stray", "-o", ""], "output file name is empty"),
    (["gen", "pmem-stray", "-o", "{out}", "--levels", "5"], "--levels applies to tlb-miss-scan only"),
    # selftest, bench
    (["selftest", "--ncpus", "300"], "--ncpus 300"),
    (["selftest", "--ncpus", "0"], "--ncpus 0"),
    (["selftest", "--features=-warp"], "unknown feature"),
    (["bench", "--repeat", "0"], "--repeat"),
    (["bench", "--only", "nope"], "invalid choice"),
]


def looks_complete(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_exits_2_with_one_line(inputs, tmp_path, argv, needle):
    subst = {k: str(v) for k, v in inputs.items()}
    subst["out"] = str(tmp_path / "out.pkt")
    argv = [a.format(**subst) for a in argv]
    before = {p: p.read_bytes() for p in inputs.values() if p.is_file()}
    p = pks_emu(*argv)
    lines = p.stderr.splitlines()
    assert p.returncode == 2, (argv, p.returncode, p.stderr)
    assert len(lines) == 1, (argv, p.stderr)
    assert "Traceback" not in p.stderr
    assert lines[0].startswith("pks-emu")
    assert needle.format(**subst) in lines[0], (needle, lines[0])
    assert not looks_complete(tmp_path / "out.pkt")
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())      # nothing left
    assert not [q for q in inputs["dir"].iterdir() if ".partial-" in q.name]
    assert not (inputs["dir"] / "none").exists()
    for q, data in before.items():                                     # inputs untouched
        assert q.read_bytes() == data, q


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv to test an unreadable file")
@pytest.mark.parametrize("cmd", [["info"], ["replay"], ["convert", "/tmp/never-written.pkt"]])
def test_unreadable_file(cmd):
    # root reads everything: run as nobody on a root-only file (in a folder
    # nobody may enter, as pytest's own are not)
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="pks-emu-contract-", dir="/tmp"))
    os.chmod(folder, 0o755)
    secret = folder / "secret.lk"
    secret.write_text("I  0401ab70,3\n")
    os.chmod(secret, 0o600)
    args = [cmd[0], secret, *cmd[1:]]
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    env = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import pks_emu.cli"],
                           capture_output=True, env=dict(os.environ, **env), cwd="/", timeout=60)
    if probe.returncode != 0:
        shutil.rmtree(folder)
        pytest.skip("user nobody cannot run this build (its folders are not readable)")
    p = pks_emu(*args, prefix=as_nobody, env=env, cwd="/")
    lines = p.stderr.splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    shutil.rmtree(folder)
    assert str(secret) in lines[0] and "Permission denied" in lines[0]


# --- interrupts ------------------------------------------------------------------------------

def interrupt_when_writing(argv, folder: Path, env=None, timeout=120, sig=signal.SIGINT,
                           marker=None):
    """Start pks-emu, wait until its temporary output exists (a name in
    ``folder`` containing ``marker``, default any temporary), send SIGINT."""
    e = dict(os.environ, **(env or {}))
    proc = subprocess.Popen([*PKS_EMU, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, preexec_fn=default_sigint)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            names = [q.name for q in folder.iterdir()]
            if any(marker in n if marker else (".partial-" in n or n.startswith("pks-emu-"))
                   for n in names):
                time.sleep(0.05)
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be interrupted: use a bigger input"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_ctrl_c_during_gen(tmp_path):
    out = tmp_path / "big.pkt"
    rc, _, err = interrupt_when_writing(["gen", "pmem-stray", "-o", out, "--records", "20000000"],
                                        tmp_path)
    assert rc == 130, err
    assert len(err.splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_gen_cleans_up_too(tmp_path):
    out = tmp_path / "big.pkt"
    rc, _, err = interrupt_when_writing(["gen", "pmem-stray", "-o", out, "--records", "20000000"],
                                        tmp_path, sig=signal.SIGTERM)
    assert rc == 143, err
    assert len(err.splitlines()) == 1 and "terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_convert(tmp_path):
    src = tmp_path / "big.lk"
    line = b"".join(b"I  %08x,4\n L %08x,8\n" % (0x400000 + 4 * i, 0x600000 + 8 * i)
                    for i in range(50000))
    with open(src, "wb") as f:
        for _ in range(40):             # 4 million records
            f.write(line)
    out = tmp_path / "big.pkt"
    rc, _, err = interrupt_when_writing(["convert", src, out], tmp_path)
    assert rc == 130, err
    assert len(err.splitlines()) == 1 and "interrupted" in err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["big.lk"]


def test_ctrl_c_during_lackey_replay_leaves_no_temporary(tmp_path):
    # A lackey replay streams its input (no temporary file at all): feed it
    # through a pipe that stays open, and interrupt it while it waits for more.
    line = b"".join(b" S %08x,8\n" % (0x600000 + 8 * i) for i in range(50000))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([*PKS_EMU, "replay", "-", "-q"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TMPDIR=str(tmp)), preexec_fn=default_sigint)
    try:
        for _ in range(10):
            proc.stdin.write(line)
        proc.stdin.flush()
        time.sleep(1.0)
        assert proc.poll() is None, "the replay ended while its input was still open"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert len(err.splitlines()) == 1 and "interrupted" in err
    assert list(tmp.iterdir()) == []


def test_ctrl_c_while_writing_faults_leaves_no_fault_file(tmp_path):
    # every access faults (all pages unmapped): millions of faults to write
    src = tmp_path / "big.lk"
    line = b"".join(b" S %08x,8\n" % (0x600000 + 8 * i) for i in range(50000))
    with open(src, "wb") as f:
        for _ in range(60):
            f.write(line)
    pol = tmp_path / "unmapped.toml"
    pol.write_text('[default]\nmap = "unmapped"\n')
    out = tmp_path / "out"
    out.mkdir()
    faults = out / "faults.jsonl"
    rc, _, err = interrupt_when_writing(["replay", src, "--policy", pol, "-q", "--faults", faults],
                                        out, env={"TMPDIR": str(out)},
                                        marker=".faults.jsonl.partial-")
    assert rc == 130, err
    assert len(err.splitlines()) == 1 and "interrupted" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("argv", [["info", "{good}"], ["info", "--json", "{good}"],
                                  ["replay", "{good}"], ["selftest", "--api", "v10", "single"]])
def test_stdout_on_a_full_disk(inputs, argv):
    argv = [a.format(good=inputs["good"]) for a in argv]
    with open("/dev/full", "w") as full:
        p = subprocess.run([*PKS_EMU, *argv], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [f"pks-emu {argv[0]}: error: <stdout>: cannot write: "
                                     "No space left on device"], p.stderr


def test_broken_pipe_is_quiet(inputs):
    # `pks-emu info --json X | head -c 1`: no BrokenPipeError traceback
    p = subprocess.run(f"{sys.executable} -m pks_emu.cli info --json {inputs['good']} | head -c 1",
                       shell=True, capture_output=True, text=True, timeout=60)
    assert p.stderr == ""
