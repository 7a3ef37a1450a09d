"""The design-flaw scenarios in examples/ run and show the flaw."""
from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_v6_free_realloc(capsys):
    out = run_example("kernel_v6_free_realloc.py", capsys)
    assert "re-allocated to driver B as key 1" in out
    assert "owner task: oops on key 1" in out
    assert "worker still reads driver B's page: b\"B's data\"" in out


def test_v10_handler_recompute(capsys):
    out = run_example("kernel_v10_handler_recompute.py", capsys)
    lines = out.splitlines()
    assert "key 2 AD, key 3 AD" in lines[1]          # handler entry: the defaults
    assert "key 2 RW, key 3 RW" in lines[2]          # after one pks_set_*: interrupted rights
    assert lines[-1].startswith("after exit: key 4 AD")
