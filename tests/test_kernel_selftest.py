"""pks-emu selftest, called through pks_emu.cli.main (no subprocess)."""
from __future__ import annotations

import pytest

from pks_emu.cli import main
from pks_emu.kernel import Kernel


def lines(capsys):
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("api,names", [
    ("v6", ["run", "context_switch", "run_all"]),
    ("v7", ["run", "context_switch", "run_all", "abandon"]),
    ("v10", ["check_defaults", "single", "context_switch", "exception", "exception_update"]),
])
def test_default_run_passes(capsys, api, names):
    assert main(["selftest", "--api", api]) == 0
    out = lines(capsys)
    assert [line.split("\t")[1] for line in out if line.startswith("[RUN]")][:len(names)] == names
    assert out.count("[OK]") == len(names)
    assert "[FAIL]" not in out


def test_v10_run_all_skipped_without_config_and_ok_with_it(capsys):
    assert main(["selftest", "--api", "v10", "run_all"]) == 0
    assert lines(capsys) == ["[RUN]\trun_all", "[SKIP] Test not supported"]
    assert main(["selftest", "--api", "v10", "--all-keys", "run_all"]) == 0
    assert lines(capsys) == ["[RUN]\trun_all", "[OK]"]


@pytest.mark.parametrize("api", ["v6", "v10"])
def test_without_pks_everything_skips(capsys, api):
    assert main(["selftest", "--api", api, "--features=-pks"]) == 0
    out = lines(capsys)
    runs = [x for x in out if x.startswith("[RUN]")]
    assert out.count("[SKIP] Test not supported") == len(runs) > 0


def test_crash_tests_only_when_named(capsys):
    assert main(["selftest", "--api", "v10", "create_fault"]) == 0
    out = lines(capsys)
    assert out[0] == "[RUN]\tcreate_fault" and out[-1] == "[OK]"
    assert "Killed" in out and any(x.startswith("PKRS: 0x55555554") for x in out)
    assert main(["selftest", "--api", "v6", "crash"]) == 0
    assert "Killed" in lines(capsys)


def test_invalid_test_name(capsys):
    assert main(["selftest", "--api", "v10", "single", "nope"]) == 1
    assert lines(capsys)[-2:] == ["[RUN]\t'nope'", "[SKIP]\tInvalid test"]


def test_failure_gives_nonzero_exit(capsys, monkeypatch):
    monkeypatch.setattr(Kernel, "pks_sched_in", lambda self, task, cpu: None)
    assert main(["selftest", "--api", "v10", "context_switch"]) == 1
    assert lines(capsys) == ["[RUN]\tcontext_switch", "[FAIL]"]


def test_debug_prints_the_kernel_log(capsys):
    assert main(["selftest", "--api", "v6", "-d", "--cpu", "9", "run"]) == 0
    out = lines(capsys)
    # --cpu is clamped to the last CPU, as test_pks_64 -c does
    assert any("for CPU 1 : 0x55555554" in x for x in out)
    assert out[-1] == "[OK]"


def test_bad_features_is_a_clear_error(capsys):
    assert main(["selftest", "--features=-pks,nx"]) == 2
    assert "either all items are changes" in capsys.readouterr().err
    assert main(["selftest", "--features=-warp"]) == 2
    assert "unknown feature 'warp'" in capsys.readouterr().err
    assert main(["selftest", "--api", "v6", "--all-keys"]) == 2


def test_list(capsys):
    assert main(["selftest", "--api", "v10", "--list"]) == 0
    out = lines(capsys)
    assert out[0] == "check_defaults" and out[-1].startswith("create_fault")
