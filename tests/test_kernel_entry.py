"""Exception entry/exit: aux slots, nesting, per-version user-mode and NMI rules."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import PKEY_DISABLE_ACCESS, PKS_INIT_VALUE, pkey_update_pkval
from pks_emu.kernel import Kernel, KernelStateError


def boot(api="v10", ncpus=1, **kw):
    return Kernel(pks_emu.Machine(ncpus=ncpus), api=api, **kw)


def make_rw(k, key, cpu=0):
    with k.on_cpu(cpu):
        if k.version.name == "v10":
            k.pks_set_readwrite(key)
        else:
            k.pks_mk_readwrite(key)


@pytest.mark.parametrize("api", ["v6", "v7", "v10"])
def test_entry_saves_loads_default_exit_restores(api):
    k = boot(api)
    key = 1
    if api == "v6":
        key = k.alloc_key("k")
    t = k.create_task("t", 0)
    k.schedule(0, t)
    make_rw(k, key)
    value = t.thread.pkrs
    assert k.rdmsr_pkrs(0) == value
    regs = k.irqentry_enter(0)
    assert regs.aux.pkrs == value and regs.ept.thread_pkrs == value
    assert k.rdmsr_pkrs(0) == k.pkrs_cache(0) == PKS_INIT_VALUE
    assert t.thread.pkrs == value  # the thread field still holds the interrupted value
    k.irqentry_exit(regs)
    assert k.rdmsr_pkrs(0) == k.pkrs_cache(0) == value


@pytest.mark.parametrize("depth", [1, 2, 5, 40])
def test_nested_exceptions_each_get_a_slot(depth):
    k = boot("v10")
    key = k.PKS_KEY_TEST
    frames, values = [], []
    for level in range(depth):
        # each level changes the key inside its handler before the next arrives
        with k.on_cpu(0):
            k.pks_update_protection(key, level % 3)
        values.append(k.current().thread.pkrs)
        frames.append(k.irqentry_enter(0, vector=32 + level))
        assert frames[-1].depth == level + 1
    assert [f.aux.pkrs for f in frames] == values
    if depth > 1:
        with pytest.raises(KernelStateError, match="innermost"):
            k.irqentry_exit(frames[0])
    with pytest.raises(TypeError, match="PtRegs"):
        k.irqentry_exit(object())
    for f, v in zip(reversed(frames), reversed(values)):
        k.irqentry_exit(f)
        assert k.rdmsr_pkrs(0) == v == k.current().thread.pkrs
    assert not k.current().frames


@pytest.mark.parametrize("api,saves", [("v6", False), ("v7", False), ("v10", True)])
def test_user_mode_entry_by_version(api, saves):
    k = boot(api)
    u = k.create_task("user", 0, user=True)
    k.schedule(0, u)
    assert k.machine.cpus[0].cpl == 3
    regs = k.irqentry_enter(0)
    assert regs.user_mode and k.machine.cpus[0].cpl == 0
    assert regs.aux.saved is saves
    k.irqentry_exit(regs)
    assert k.machine.cpus[0].cpl == 3
    # an NMI saves in every version
    nmi = k.irqentry_nmi_enter(0)
    assert nmi.aux.saved
    with pytest.raises(KernelStateError, match="NMI"):
        k.irqentry_exit(nmi)
    k.irqentry_nmi_exit(nmi)
    assert k.counters()["nmis"] == 1


def test_v6_user_entry_keeps_the_msr_for_the_handler():
    k = boot("v6")
    u = k.create_task("user", 0, user=True)
    k.schedule(0, u)
    key = k.alloc_key("k")
    with k.syscall(u):
        k.pks_mk_readwrite(key)
    regs = k.irqentry_enter(0)
    # V4-V7 return early from user-mode entry: the handler runs with the task's value
    assert k.rdmsr_pkrs(0) == u.thread.pkrs != PKS_INIT_VALUE
    k.irqentry_exit(regs)


def test_handler_changes_are_discarded_unless_update_exception():
    k = boot("v10")
    key = k.PKS_KEY_TEST
    before = k.current().thread.pkrs
    with k.exception(0) as regs:
        k.pks_set_readwrite(key)
        assert (k.rdmsr_pkrs() >> 2 * key) & 3 == 0
    assert k.current().thread.pkrs == before == k.rdmsr_pkrs(0)
    with k.exception(0) as regs:
        k.pks_update_exception(regs, key, 0)
    assert k.rdmsr_pkrs(0) == pkey_update_pkval(before, key, 0)


def test_v10_handler_recomputes_from_interrupted_value():
    """The flaw of docs/rules.md §2.8, note 1: one pks_set_* inside the handler brings
    back the interrupted context's rights on every other key."""
    k = boot("v10", pks_test_all_keys=True)
    for key in (3, 4):
        make_rw(k, key)
    with k.exception(0):
        msr = k.rdmsr_pkrs()
        assert msr == 0x4  # the default: keys 3, 4 as PKS_INIT_VALUE has them
        k.pks_set_noaccess(5)
        msr = k.rdmsr_pkrs()
    # after one call, keys 3 and 4 carry the interrupted RW, key 5 AD
    assert (msr >> 6) & 3 == 0 and (msr >> 8) & 3 == 0 and (msr >> 10) & 3 == PKEY_DISABLE_ACCESS


def test_handler_that_schedules_comes_back_with_thread_value():
    """Note 4: a switch inside the handler reloads thread.pkrs, not the default."""
    k = boot("v10")
    t = k.create_task("t", 0)
    k.schedule(0, t)
    make_rw(k, k.PKS_KEY_TEST)
    regs = k.irqentry_enter(0)
    assert k.rdmsr_pkrs(0) == PKS_INIT_VALUE
    k.schedule(0, k.percpu[0].idle)
    k.schedule(0, t)
    assert k.rdmsr_pkrs(0) == t.thread.pkrs != PKS_INIT_VALUE
    k.irqentry_exit(regs)


def test_frames_follow_the_task_across_migration():
    k = boot("v10", ncpus=2)
    t = k.create_task("t", 0)
    k.schedule(0, t)
    regs = k.irqentry_enter(0)
    k.migrate(t, 1)
    k.irqentry_exit(regs)  # restores on CPU 1, where the task now runs
    assert k.rdmsr_pkrs(1) == t.thread.pkrs and not t.frames


def test_on_each_cpu_uses_ipis_on_other_cpus():
    k = boot("v10", ncpus=3)
    seen = k.on_each_cpu(lambda cpu: len(k.current(cpu).frames))
    assert seen == [0, 1, 1]
    assert k.counters()["exceptions"] == 2
