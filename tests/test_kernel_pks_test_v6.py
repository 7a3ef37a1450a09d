"""lib/pks/pks_test.c of V4-V6 (and V7), every case, through run_pks."""
from __future__ import annotations

import errno

import pytest

import pks_emu
from pks_emu.constants import (PF_PK, PF_W, PKEY_DISABLE_ACCESS, PKEY_DISABLE_WRITE,
                               PKS_INIT_VALUE, pkey_update_pkval)
from pks_emu.kernel import RUN_PKS, FaultLoopError, Kernel, KernelOops
from pks_emu.kernel.pks_test import PKEY_TEST_ARY


def boot(api="v6", ncpus=2, **kw):
    k = Kernel(pks_emu.Machine(ncpus=ncpus), api=api, **kw)
    t = k.create_task("test_pks", 0, user=True)
    k.schedule(0, t)
    return k, t


def log_lines(k, start=0):
    return [m for _, m in k.dmesg[start:]]


@pytest.mark.parametrize("row", range(len(PKEY_TEST_ARY)))
def test_access_matrix_row(row):
    """One row of pkey_test_ary: set the mode with pks_mk_*, one 8-byte
    memcpy with the key armed, compare with exception_caught()."""
    k, t = boot()
    mod = k.pks_test
    mode, write, expect = PKEY_TEST_ARY[row]
    with k.syscall(t):
        ctx = mod.alloc_ctx("row test")
        page = mod.alloc_test_page(ctx.pkey)
        faults = k.counters()["pk_faults"]
        mod.set_mode(ctx.pkey, mode)
        assert mod.test_it(ctx, mode, write, expect, page)
        assert (k.counters()["pk_faults"] > faults) is expect
        assert (mod.fault_cnt == 1) is expect
        # the hook relaxed the saved value, so a faulting row leaves RW behind
        if expect:
            assert (k.rdmsr_pkrs() >> 2 * ctx.pkey) & 3 == 0
        # the wrong expectation is reported
        mod.set_mode(ctx.pkey, mode)
        assert not mod.test_it(ctx, mode, write, not expect, page)


def test_run_through_debugfs_with_debug_report():
    k, t = boot()
    f = k.open(t, RUN_PKS)
    assert f.read(t) == b"not run\n"
    assert f.write(t, "4") == 1
    assert f.read(t) == b"PASS\n"
    lines = log_lines(k)
    assert "pks_test: for CPU 0 : 0x55555554" in lines
    assert "pks_test: for CPU 1 : 0x55555554" in lines  # read inside the IPI
    assert sum("A:1 W:0" in m for m in lines) == 30     # keys 1..15 on 2 CPUs
    assert any(m.endswith(f"pkey {f.private_data.pkey}") and "ptep flags" in m for m in lines)
    assert k.pks_test.fault_cnt == 3                    # rows 1, 2, 5


def test_run_all_keys_1_to_15_and_exception_test():
    k, t = boot()
    f = k.open(t, RUN_PKS)
    assert f.write(t, "3") == 1
    lines = log_lines(k)
    tested = [m for m in lines if "BEGIN: pkey" in m]
    assert [int(m.split()[-2]) for m in tested] == list(range(1, 16))
    assert sum("Testing : PASS" in m for m in lines) == 15
    assert "pks_test:      ***** END: exception checking : PASS" in lines
    assert k.pks_test.last_run_all is True
    # the fd now holds a key: a second run_all gets only 14
    start = len(k.dmesg)
    f.write(t, "3")
    assert sum("BEGIN: pkey" in m for m in log_lines(k, start)) == 14
    assert any("run_all: 14 keys tested: PASS" in m for m in log_lines(k, start))
    # all test keys were given back; the fd's key is freed on close
    assert list(k.key_allocator.allocated()) == [0, f.private_data.pkey]
    f.close(t)
    assert list(k.key_allocator.allocated()) == [0]


def test_exception_test_four_checks_pass():
    k, t = boot()
    with k.syscall(t):
        assert k.pks_test.run_exception_test()
    # it faulted once and left no frame behind
    assert k.counters()["pk_faults"] == 1 and not t.frames
    assert not [m for m in log_lines(k) if "FAIL" in m]


@pytest.mark.parametrize("broken,message", [
    ("no_save", "checking ept_regs->thread_pkrs"),
    ("no_default", "PKRS cache and MSR"),
    ("no_restore", None),
])
def test_exception_test_detects_broken_entry_code(monkeypatch, broken, message):
    from pks_emu.kernel import entry
    orig_save = entry.EntryMixin._pks_save_pt_regs
    orig_exit = entry.EntryMixin._exit

    def save(self, idx, regs):
        if broken == "no_save":
            regs.aux.pkrs = 0  # a slot that does not hold the thread value
            return
        if broken == "no_default":
            regs.aux.pkrs = regs.task.thread.pkrs  # saved, but the MSR keeps its value
            return
        orig_save(self, idx, regs)

    def exit_(self, regs, nmi):
        if broken == "no_restore":
            regs.aux.pkrs = None
        orig_exit(self, regs, nmi)
    monkeypatch.setattr(entry.EntryMixin, "_pks_save_pt_regs", save)
    monkeypatch.setattr(entry.EntryMixin, "_exit", exit_)
    k, t = boot()
    if message is None:
        # Without the restore the retried memcpy faults forever (a hang on
        # real hardware); the emulator stops it.
        with pytest.raises(FaultLoopError), k.syscall(t):
            k.pks_test.run_exception_test()
        return
    with k.syscall(t):
        ok = k.pks_test.run_exception_test()
    assert not ok
    assert any(message in m for m in log_lines(k))


def test_context_switch_arm_and_check():
    k, t = boot(ncpus=1)
    f = k.open(t, RUN_PKS)
    f.write(t, "0")
    f.write(t, "1")
    key = f.private_data.pkey
    other = k.create_task("other", 0)
    k.schedule(0, other)
    assert (k.rdmsr_pkrs(0) >> 2 * key) & 3 == PKEY_DISABLE_ACCESS
    k.schedule(0, t)
    f.write(t, "2")
    assert f.read(t) == b"PASS\n"
    assert k.pkrs_cache(0) == k.rdmsr_pkrs(0)


def test_context_switch_check_fails_when_the_switch_does_not_restore(monkeypatch):
    monkeypatch.setattr(Kernel, "pks_sched_in", lambda self, task, cpu: None)
    k, t = boot(ncpus=1)
    f = k.open(t, RUN_PKS)
    f.write(t, "0")
    f.write(t, "1")
    other = k.create_task("other", 0)
    k.schedule(0, other)
    with k.on_cpu(0):
        k.pks_mk_noaccess(f.private_data.pkey)
    k.schedule(0, t)
    f.write(t, "2")
    assert f.read(t) == b"FAIL\n"
    assert any("Context switch check failed" in m for m in log_lines(k))


def test_crash_test_needs_two_nines_and_oopses():
    k, t = boot()
    f = k.open(t, RUN_PKS)
    f.write(t, "9")
    assert any("CAUTION: Test 9" in m for m in log_lines(k))
    f.write(t, "0")   # any other command disarms
    f.write(t, "9")
    fd_key = f.private_data.pkey
    with pytest.raises(KernelOops) as e:
        f.write(t, "9")
    oops = e.value
    assert oops.error_code == 0x1 | PF_W | PF_PK
    assert oops.owner == "crashing kernel\n" and oops.pkey != fd_key
    # the fd's key was left read-only by the last row of "0"
    assert oops.pkrs == pkey_update_pkval(PKS_INIT_VALUE, fd_key, PKEY_DISABLE_WRITE)
    assert t.state == "dead"
    # the dying task released its fd (its key is free again); crash_it's key leaked
    assert k.key_allocator.allocated() == {0: "kernel", oops.pkey: "crashing kernel\n"}


def test_no_pks_no_debugfs_file():
    k = Kernel(pks_emu.Machine(features=pks_emu.ALL_FEATURES - {"pks"}))
    t = k.create_task("test_pks", 0, user=True)
    k.schedule(0, t)
    with pytest.raises(FileNotFoundError) as e:
        k.open(t, RUN_PKS)
    assert e.value.errno == errno.ENOENT


def test_v7_static_key_and_abandon_command():
    k, t = boot("v7")
    f = k.open(t, RUN_PKS)
    assert f.write(t, "0") == 1 and f.read(t) == b"PASS\n"
    assert f.private_data.pkey == k.PKS_KEY_PKS_TEST == 1
    assert f.write(t, "6") == 1 and f.read(t) == b"PASS\n"
    assert k.pkrs_pkey_allowed_mask == 0xFFFFFFFF  # reset at the end
    assert k.current(0) is t and t.state == "running"
    f.write(t, "3")
    assert k.pks_test.last_run_all is True


def test_v7_abandon_test_fails_if_abandon_does_nothing(monkeypatch):
    monkeypatch.setattr(Kernel, "pks_abandon_protections", lambda self, key, cpu=None: None)
    k, t = boot("v7")
    f = k.open(t, RUN_PKS)
    f.write(t, "6")
    assert f.read(t) == b"FAIL\n"
