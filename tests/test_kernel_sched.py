"""Boot, tasks, the per-CPU pkrs_cache, fork/exec, migration."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import CR4_PKS, MSR_IA32_PKRS, PKS_INIT_VALUE, pkey_update_pkval
from pks_emu.kernel import Kernel, KernelStateError


def boot(api="v6", ncpus=2, **kw):
    return Kernel(pks_emu.Machine(ncpus=ncpus), api=api, **kw)


@pytest.mark.parametrize("api,boot_writes", [("v6", 1), ("v7", 2), ("v10", 2)])
def test_boot_every_cpu(api, boot_writes):
    k = boot(api, ncpus=3)
    for pc in k.percpu:
        assert pc.cpu.cr4 & CR4_PKS
        assert pc.cpu.rdmsr(MSR_IA32_PKRS) == pc.pkrs_cache
        assert pc.current is pc.idle
    # V6: setup_pks's cached write; V7: that plus the idle task's saved_pkrs=0
    # (INIT_THREAD); V10: the unconditional WRMSR plus pks_write_pkrs.
    per_cpu = k.machine.counters()["wrmsr_pkrs"] / 3
    assert per_cpu == boot_writes
    if api == "v7":
        assert k.rdmsr_pkrs(0) == 0  # early tasks get full access (V7)
    else:
        assert k.rdmsr_pkrs(0) == PKS_INIT_VALUE


def test_v10_all_keys_boot_value():
    k = boot("v10", pks_test_all_keys=True)
    assert k.PKS_INIT_VALUE == 0x4
    assert all(k.rdmsr_pkrs(i) == 0x4 for i in range(2))


def test_switch_writes_msr_only_when_value_changes():
    k = boot("v10", ncpus=1)
    a = k.create_task("a", 0)
    b = k.create_task("b", 0)
    c0 = k.counters()
    k.schedule(0, a)
    k.schedule(0, b)  # same value: cache hit
    c1 = k.counters()
    assert c1["pkrs_writes"] == c0["pkrs_writes"]
    assert c1["pkrs_writes_avoided"] == c0["pkrs_writes_avoided"] + 2
    with k.on_cpu(0):
        k.pks_set_readwrite(k.PKS_KEY_TEST)  # b changes its value
    w = k.machine.counters()["wrmsr_pkrs"]
    k.schedule(0, a)
    k.schedule(0, b)
    assert k.machine.counters()["wrmsr_pkrs"] == w + 2
    assert k.rdmsr_pkrs(0) == pkey_update_pkval(PKS_INIT_VALUE, k.PKS_KEY_TEST, 0)
    # the kernel's count agrees with the CPU's
    assert k.counters()["pkrs_writes"] == k.machine.counters()["wrmsr_pkrs"]


@pytest.mark.parametrize("api,resets", [("v6", True), ("v7", True), ("v10", False)])
def test_fork_copies_exec_resets_by_version(api, resets):
    k = boot(api, ncpus=1)
    p = k.create_task("parent", 0, user=True)
    k.schedule(0, p)
    key = 1
    with k.syscall(p):
        if api == "v6":
            key = k.alloc_key("k")
            k.pks_mk_readwrite(key)
        elif api == "v7":
            k.pks_mk_readwrite(key)
        else:
            k.pks_set_readwrite(key)
    value = p.thread.pkrs
    child = k.fork(p, "child")
    assert child.thread.pkrs == value and child.cpl == 3
    k.exec(child)
    assert child.thread.pkrs == (PKS_INIT_VALUE if resets else value)
    # exec changes the thread field only; the MSR follows at switch-in
    msr = k.rdmsr_pkrs(0)
    k.exec(p)
    assert k.rdmsr_pkrs(0) == msr
    k.schedule(0, child)
    assert k.rdmsr_pkrs(0) == child.thread.pkrs


def test_migration_between_cpus():
    k = boot("v10", ncpus=2)
    t = k.create_task("t", 0)
    k.schedule(0, t)
    with k.on_cpu(t):
        k.pks_set_readwrite(k.PKS_KEY_TEST)
    v = t.thread.pkrs
    k.migrate(t, 1)
    assert t.cpu == 1 and k.current(1) is t and k.current(0) is k.percpu[0].idle
    assert k.rdmsr_pkrs(1) == k.pkrs_cache(1) == v
    assert k.rdmsr_pkrs(0) == PKS_INIT_VALUE  # CPU 0 went back to idle's value
    with pytest.raises(KernelStateError, match="running on CPU 1"):
        k.schedule(0, t)
    u = k.create_task("u", 0)
    with pytest.raises(KernelStateError, match="belongs to CPU 0"):
        k.schedule(1, u)


def test_dead_and_not_running_tasks_are_refused():
    k = boot("v6", ncpus=1)
    t = k.create_task("t", 0)
    with pytest.raises(KernelStateError, match="not running"):
        k.access(t, 0xFFFFC90000000000, "read")
    k.schedule(0, t)
    k.exit_task(t)
    with pytest.raises(KernelStateError, match="dead"):
        k.schedule(0, t)
    with pytest.raises(ValueError, match="out of range"):
        k.create_task("x", 5)


def test_v6_test_pks_selftest_flow():
    """tools/testing/selftests/x86/test_pks.c (V4-V6): two tasks on one CPU;
    the child makes its key RW, the parent sets its own key; after switching
    back, the child must still see RW."""
    k = boot("v6", ncpus=2)
    parent = k.create_task("test_pks", 1, user=True)
    k.schedule(1, parent)
    child = k.fork(parent)
    k.schedule(1, child)
    fc = k.open(child, "/sys/kernel/debug/x86/run_pks")
    assert fc.write(child, "0") == 1 and fc.read(child) == b"PASS\n"
    fc.write(child, "1")
    child_key = fc.private_data.pkey
    k.schedule(1, parent)
    fp = k.open(parent, "/sys/kernel/debug/x86/run_pks")
    fp.write(parent, "0")
    assert fp.private_data.pkey != child_key
    assert (k.rdmsr_pkrs(1) >> 2 * child_key) & 3 != 0  # the parent has no access
    k.schedule(1, child)
    fc.write(child, "2")
    assert fc.read(child) == b"PASS\n"
    assert (k.rdmsr_pkrs(1) >> 2 * child_key) & 3 == 0
    assert k.pkrs_cache(1) == k.rdmsr_pkrs(1)


def test_v10_test_pks_context_switch_flow_detects_a_broken_switch(monkeypatch):
    from pks_emu.kernel.selftest import Runner
    k = boot("v10", ncpus=1)
    assert Runner(k, 0).context_switch_v10() == 0
    # Break x86_pkrs_load: the check must now fail.
    monkeypatch.setattr(Kernel, "pks_sched_in", lambda self, task, cpu: None)
    k2 = boot("v10", ncpus=1)
    assert Runner(k2, 0).context_switch_v10() != 0
