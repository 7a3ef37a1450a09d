"""lib/pks/pks_test.c of V9/V10, every case, through run_pks."""
from __future__ import annotations

import errno

import pytest

import pks_emu
from pks_emu.constants import PF_PK, PF_W, PKEY_DISABLE_ACCESS, PKS_INIT_VALUE
from pks_emu.kernel import RUN_PKS, Kernel, KernelOops
from pks_emu.kernel.selftest import Runner


def boot(ncpus=2, **kw):
    k = Kernel(pks_emu.Machine(ncpus=ncpus), api="v10", **kw)
    t = k.create_task("test_pks_64", 0, user=True)
    k.schedule(0, t)
    return k, t


def run(k, t, cmd):
    f = k.open(t, RUN_PKS)
    r = f.write(t, cmd)
    res = f.read(t)
    f.close(t)
    return r, res


def errors(k):
    return [m for lvl, m in k.dmesg if lvl == "err"]


def test_check_defaults_every_cpu():
    k, t = boot(ncpus=3)
    assert run(k, t, "0") == (1, b"PASS\n")
    assert k.counters()["exceptions"] == 2  # CPUs 1 and 2 checked from the IPI


def test_check_defaults_fails_when_this_cpu_is_not_default():
    k, t = boot()
    with k.syscall(t):
        k.pks_set_readwrite(k.PKS_KEY_TEST)
    assert run(k, t, "0") == (1, b"FAIL\n")
    assert any("cpu 0 value incorrect" in m for m in errors(k))


def test_single_four_rows_and_final_noaccess():
    k, t = boot()
    assert run(k, t, "1") == (1, b"PASS\n")
    assert k.counters()["pk_faults"] == 2  # the two NO_ACCESS rows
    assert (t.thread.pkrs >> 2 * k.PKS_KEY_TEST) & 3 == PKEY_DISABLE_ACCESS
    assert k.pks_test.g_ctx_under_test is None
    assert run(k, t, "10") == (2, b"PASS\n")  # one character is read: "10" is "1"


def test_single_detects_a_missing_fault(monkeypatch):
    # A CPU core that let every access through would make rows 1-2 fail.
    k, t = boot()
    monkeypatch.setattr(k, "pks_set_noaccess", lambda pkey, cpu=None: k.pks_set_readwrite(pkey))
    assert run(k, t, "1") == (1, b"FAIL\n")
    assert any("pkey test FAILED" in m for m in errors(k))


def test_context_switch_arm_check_through_selftest_flow():
    k, t = boot(ncpus=2)
    assert Runner(k, 1).context_switch_v10() == 0
    # the child's arm made its value RW; the parent's "1" left NOACCESS in its own
    assert k.pkrs_cache(1) == k.rdmsr_pkrs(1)


def test_check_ctx_switch_without_arm_fails():
    k, t = boot()
    assert run(k, t, "3") == (1, b"FAIL\n")


def test_exception_four_checks_and_restore():
    k, t = boot()
    assert run(k, t, "4") == (1, b"PASS\n")
    assert k.counters()["pk_faults"] == 1
    assert not errors(k)
    # restored value is RW for the test key (the callback's relax), not AD
    assert (t.thread.pkrs >> 2 * k.PKS_KEY_TEST) & 3 == 0


def test_exception_detects_default_not_loaded(monkeypatch):
    from pks_emu.kernel import entry
    monkeypatch.setattr(entry.EntryMixin, "_pks_save_pt_regs",
                        lambda self, idx, regs: setattr(regs.aux, "pkrs", regs.task.thread.pkrs))
    k, t = boot()
    assert run(k, t, "4") == (1, b"FAIL\n")
    assert "Exception default value not set" in " ".join(errors(k))


def test_exception_update_second_write_does_not_fault():
    k, t = boot()
    assert run(k, t, "5") == (1, b"PASS\n")
    assert k.counters()["pk_faults"] == 1


def test_exception_update_detects_aux_not_updated(monkeypatch):
    k, t = boot()

    def only_current(regs, pkey, prot):
        with k.on_cpu(regs.task.cpu):
            k.pks_update_protection(pkey, prot)  # the handler's copy only
    monkeypatch.setattr(k, "pks_update_exception", only_current)
    with pytest.raises(pks_emu.kernel.FaultLoopError):
        run(k, t, "5")  # the first write never completes


def test_run_all_keys_needs_the_config():
    k, t = boot()
    assert run(k, t, "6") == (-errno.ENOENT, b"FAIL\n")
    k, t = boot(pks_test_all_keys=True)
    assert run(k, t, "6") == (1, b"PASS\n")
    assert k.counters()["pk_faults"] == 30  # two NO_ACCESS rows for each of 15 keys


def test_bad_commands():
    k, t = boot()
    assert run(k, t, "x")[0] == -errno.EINVAL
    assert run(k, t, "7") == (-errno.ENOENT, b"FAIL\n")


def test_create_fault_oops_and_unlock():
    k, t = boot()
    f = k.open(t, RUN_PKS)
    assert f.write(t, "9") == 1          # armed
    with pytest.raises(KernelOops) as e:
        f.write(t, "9")
    oops = e.value
    assert oops.error_code == 0x1 | PF_W | PF_PK
    assert oops.pkey == k.PKS_KEY_TEST and oops.owner == "PKS_KEY_TEST"
    assert oops.pkrs == PKS_INIT_VALUE and t.state == "dead"
    # release() of the dead task's fd unlocked test_run_lock (need_unlock)
    assert k.pks_test.test_run_lock is None
    t2 = k.create_task("again", 0, user=True)
    k.schedule(0, t2)
    assert run(k, t2, "1") == (1, b"PASS\n")


def test_another_command_disarms_the_crash_test():
    k, t = boot()
    f = k.open(t, RUN_PKS)
    f.write(t, "9")
    f.write(t, "0")
    assert f.write(t, "9") == 1 and t.state == "running"
