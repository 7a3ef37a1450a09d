"""Issue 13, kernel model: V7's test configuration and Kconfig, the oops
report's PKRS line, the four places V7 applies the abandon mask (each test
fails if the mask is dropped at its place only), and selftest --cpu."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import PF_PK, PKEY_DISABLE_ACCESS, PKS_INIT_VALUE
from pks_emu.kernel import Kernel, KernelOops
from pks_emu.kernel.keys import StaticKeys, consumers_for

AD1 = PKEY_DISABLE_ACCESS << 2      # key 1 AD


def boot(api="v7", ncpus=1, **kw):
    return Kernel(pks_emu.Machine(ncpus=ncpus), api=api, **kw)


def key_bits(value: int, key: int) -> int:
    return (value >> 2 * key) & 3


# --- V7 test configuration and Kconfig ----------------------------------------------------

def test_v7_pks_test_forces_keys_1_to_15_ad_whatever_other_consumers_say():
    k = boot(consumers=[("MINE", 0)])            # a consumer that asks for RW
    assert k.PKS_KEY_PKS_TEST == 1 and k.PKS_KEY_MINE == 2
    assert k.pkrs_init_value == PKS_INIT_VALUE == 0x55555554
    assert key_bits(k.pkrs_init_value, 2) == PKEY_DISABLE_ACCESS
    # without the test module the consumer's RW default stands
    k = boot(pks_test=False, consumers=[("MINE", 0)])
    assert key_bits(k.pkrs_init_value, 1) == 0
    assert key_bits(k.pkrs_init_value, 2) == PKEY_DISABLE_ACCESS


def test_v7_static_keys_follow_the_pks_test_flag():
    keys = StaticKeys("v7", [("PKS_TEST", PKEY_DISABLE_ACCESS), ("MINE", 0)], pks_test=True)
    assert keys.init_value == 0x55555554
    keys = StaticKeys("v7", [("MINE", 0)], pks_test=False)
    assert keys.init_value == 0x55555554 & ~(3 << 2)


def test_v7_kconfig_refuses_pks_test_with_pmem():
    with pytest.raises(ValueError, match="PKS_TEST depends on !GENERAL_PKS_USER"):
        boot(pmem=True)
    with pytest.raises(ValueError, match="GENERAL_PKS_USER"):
        consumers_for("v7", pks_test=True, pmem=True, all_keys=False)
    k = boot(pks_test=False, pmem=True)
    assert k.pks_active and k.PKS_KEY_PGMAP_PROTECTION == 1


def test_v7_without_any_consumer_has_pks_off():
    # ARCH_ENABLE_SUPERVISOR_PKEYS: def_bool y, depends on PKS_TEST || GENERAL_PKS_USER
    k = boot(pks_test=False)
    assert not k.pks_active
    assert boot().pks_active


def test_kernel_config_flags_must_be_bools():
    with pytest.raises(TypeError, match="pmem must be True or False"):
        boot("v10", pmem="yes")


# --- oops report -------------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["v6", "v7"])
def test_v4_v7_oops_prints_pkrs_only_for_pk_faults(api):
    k = boot(api)
    with pytest.raises(KernelOops) as e:
        k.access(0, 0xFFFFC90040000000, "read")       # not present: no PF_PK
    assert not e.value.error_code & PF_PK
    assert "PKRS" not in e.value.report()
    assert not any("PKRS" in m for _, m in k.dmesg)
    k = boot(api)
    t = k.create_task("victim", 0)      # (V7's idle task starts with PKRS 0: full access)
    k.schedule(0, t)
    key = k.alloc_key("x") if api == "v6" else 1
    page = k.vmalloc(4096, key)
    with pytest.raises(KernelOops) as e:
        k.write_bytes(t, page, b"x")
    assert "PKRS: 0x55555554" in e.value.report()


def test_v10_oops_prints_pkrs_always():
    k = boot("v10")
    with pytest.raises(KernelOops) as e:
        k.access(0, 0xFFFFC90040000000, "read")
    assert "PKRS: 0x55555554" in e.value.report()


# --- the four places V7 applies the abandon mask (spec: V7 07/18, 08/18, 10/18) ---------------

@pytest.fixture
def abandoned():
    """V7, 2 CPUs; a task created and switched in on CPU 1 *before* the test
    key is abandoned on CPU 0; another created before but not yet running."""
    k = boot(ncpus=2)
    key = k.PKS_KEY_PKS_TEST
    running = k.create_task("running", 1)
    k.schedule(1, running)
    waiting = k.create_task("waiting", 1)
    with k.on_cpu(0):
        k.pks_abandon_protections(key)
    assert key_bits(running.thread.pkrs, key) == PKEY_DISABLE_ACCESS   # not touched yet
    assert key_bits(waiting.thread.pkrs, key) == PKEY_DISABLE_ACCESS
    return k, key, running, waiting


def test_abandon_mask_new_tasks(abandoned):
    # pks_init_task(): pkrs_init_value & pkrs_pkey_allowed_mask
    k, key, _, _ = abandoned
    t = k.create_task("new", 0)
    assert key_bits(t.thread.pkrs, key) == 0
    assert t.thread.pkrs == PKS_INIT_VALUE & ~(3 << 2 * key)


def test_abandon_mask_sched_in(abandoned):
    # pkrs_write_current(): saved_pkrs &= allowed_mask; write_pkrs(saved_pkrs)
    k, key, _, waiting = abandoned
    k.schedule(1, waiting)
    assert key_bits(waiting.thread.pkrs, key) == 0
    assert key_bits(k.rdmsr_pkrs(1), key) == 0


def test_abandon_mask_exception_entry(abandoned):
    # pkrs_save_irq(): write_pkrs(pkrs_init_value & pkrs_pkey_allowed_mask)
    k, key, running, _ = abandoned
    with k.exception(1):
        assert key_bits(k.rdmsr_pkrs(1), key) == 0
        assert key_bits(k.pkrs_cache(1), key) == 0


def test_abandon_mask_fault_path(abandoned):
    # handle_abandoned_pks_value(): ept->thread_pkrs &= allowed_mask, retry.
    # The task running on CPU 1 since before the abandon still has AD in its
    # saved value and in the MSR: its access faults, and only the fault path
    # can drop the AD (no switch-in, no new task happens).
    k, key, running, _ = abandoned
    page = k.vmalloc(4096, key)
    faults = k.counters()["pk_faults"]
    k.write_bytes(running, page, b"ok")
    assert k.counters()["pk_faults"] == faults + 1
    assert key_bits(running.thread.pkrs, key) == 0
    assert k.oopses == []


# --- selftest --cpu ----------------------------------------------------------------------------

@pytest.mark.parametrize("ncpus,asked,expected", [(3, 9, 2), (3, 1, 1), (3, -4, 0), (1, 5, 0)])
def test_selftest_cpu_is_clamped_to_the_last_cpu(monkeypatch, capsys, ncpus, asked, expected):
    from pks_emu.cli import main
    seen = []
    real = Kernel.create_task

    def spy(self, name, cpu=0, **kw):
        if kw.get("user"):
            seen.append(cpu)
        return real(self, name, cpu, **kw)
    monkeypatch.setattr(Kernel, "create_task", spy)
    assert main(["selftest", "--api", "v6", "--ncpus", str(ncpus), "--cpu", str(asked), "run"]) == 0
    assert seen and set(seen) == {expected}
    capsys.readouterr()
