"""``pks-emu capture`` options (the errors caught before QEMU starts)."""
import argparse

import pytest

from pks_emu.capture import cli
from pks_emu.errors import PksEmuError


def parse(*argv):
    p = argparse.ArgumentParser(prog="pks-emu capture")
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_options():
    a = parse("-o", "t.pkt2", "--smp", "2", "-m", "2G", "--append", "memmap=64M!1G",
              "--module", "nd_pmem", "--module", "x.ko", "--fetches", "--start", "user",
              "--limit", "5", "--", "-plugin", "other.so", "-rtc", "base=utc")
    assert a.output == "t.pkt2" and a.smp == 2 and a.memory == "2G"
    assert a.module == ["nd_pmem", "x.ko"] and a.fetches and a.start == "user" and a.limit == 5
    assert a.qemu_args == ["-plugin", "other.so", "-rtc", "base=utc"]
    with pytest.raises(SystemExit):
        parse("-o", "t", "--count-only")   # one or the other


def test_run_errors(monkeypatch):
    with pytest.raises(PksEmuError, match="give -o TRACE"):
        cli.run(parse())
    with pytest.raises(PksEmuError, match="--json and '-o -'"):
        monkeypatch.setattr("sys.stdout.isatty", lambda: False)
        cli.run(parse("-o", "-", "--json"))


@pytest.mark.parametrize("speed", [False, True])
def test_bad_policy_fails_before_qemu_starts(tmp_path, monkeypatch, speed):
    # The policy is checked first: an error after QEMU started would leave a
    # boot running for nothing (and, before the fix, an orphaned QEMU).
    import pks_emu.capture as capture_mod
    import pks_emu.capture.speed as speed_mod
    started = []
    monkeypatch.setattr(capture_mod, "capture_pipe", lambda **kw: started.append(kw))
    monkeypatch.setattr(speed_mod, "measure_speed", lambda **kw: started.append(kw))
    pol = tmp_path / "p.toml"
    pol.write_text('[[region]]\nname = "rodata"\nsection = "rodata"\npkey = 1\n')
    argv = ["--policy", str(pol)] + (["--speed"] if speed else [])
    with pytest.raises(PksEmuError, match=r"region 1 \(rodata\): names symbols, but no kallsyms"):
        cli.run(parse(*argv))
    pol.write_text('[[region]]\nname = "x"\nstart = 0x1000\nend = 0x2000\npkey = 99\n')
    with pytest.raises(PksEmuError, match="pkey"):
        cli.run(parse(*argv))
    assert started == []


def test_nice_option():
    assert parse("--nice", "7").nice == (7, 7)
    assert parse("--nice", "5,19").nice == (5, 19)
    assert parse().nice is None
    from pks_emu.capture.speed import DEFAULT_NICE
    assert cli._nice(parse()) == DEFAULT_NICE == (5, 19)
    for bad in ("20", "-1", "1,2,3", "x", "5,"):
        with pytest.raises(SystemExit):
            parse("--nice", bad)


def test_bad_pa_shortcut_is_refused_before_anything_runs():
    from pks_emu.capture import capture
    for count_only in (False, True):
        with pytest.raises(PksEmuError, match="pa_shortcut 'maybe': expected 'on', 'off' or 'check'"):
            capture(None, count_only=count_only, pa_shortcut="maybe")
