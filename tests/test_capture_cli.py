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
