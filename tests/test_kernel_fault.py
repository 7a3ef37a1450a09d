"""PK faults on kernel addresses: key lookup, callbacks, oops, PMEM modes."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import PAGE_SIZE_2M, PF_P, PF_PK, PF_U, PF_W, PKS_INIT_VALUE
from pks_emu.kernel import FaultLoopError, Kernel, KernelOops, KernelStateError, SegmentationFault


def boot(api="v10", ncpus=1, **kw):
    return Kernel(pks_emu.Machine(ncpus=ncpus), api=api, **kw)


@pytest.mark.parametrize("api", ["v6", "v7", "v10"])
def test_unhandled_pk_fault_oopses_with_key_owner_and_pkrs(api):
    k = boot(api)
    t = k.create_task("victim", 0)
    k.schedule(0, t)
    key = k.alloc_key("secret store") if api == "v6" else 1
    page = k.vmalloc(4096, key)
    with pytest.raises(KernelOops) as e:
        k.write_bytes(t, page + 8, b"x")
    oops = e.value
    assert oops.address == page + 8
    assert oops.error_code == PF_P | PF_W | PF_PK
    assert oops.pkey == key
    assert oops.owner == {"v6": "secret store", "v7": "PKS_KEY_PKS_TEST", "v10": "PKS_KEY_TEST"}[api]
    assert oops.pkrs == t.thread.pkrs == PKS_INIT_VALUE
    assert oops.task == "victim" and oops.cpu == 0
    assert "PKRS: 0x55555554" in oops.report()
    assert t.state == "dead" and k.current(0) is k.percpu[0].idle
    assert k.counters()["oopses"] == 1 and k.oopses == [oops]
    assert any("Oops" in m for _, m in k.dmesg)
    with pytest.raises(KernelStateError):
        k.access(t, page, "read")


def test_not_present_fault_oopses_without_key():
    k = boot("v6")
    with pytest.raises(KernelOops) as e:
        k.access(0, 0xFFFFC90040000000, "read")
    assert e.value.pkey is None and not e.value.error_code & PF_P


def test_callback_relaxes_with_update_exception_and_retry_succeeds():
    k = boot("v10")
    key = k.PKS_KEY_TEST
    calls = []

    def cb(regs, address, write):
        calls.append((address, write, regs.aux.pkrs))
        k.pks_update_exception(regs, key, 0)
        return True
    k.set_fault_callback(key, cb)
    page = k.vmalloc(4096, key)
    k.write_bytes(0, page, b"hello")
    assert calls == [(page, True, PKS_INIT_VALUE)]
    assert k.read_bytes(0, page, 5) == b"hello"  # stays RW for the interrupted context
    assert len(calls) == 1


def test_callback_claiming_without_relaxing_is_a_fault_loop():
    k = boot("v10")
    k.set_fault_callback(k.PKS_KEY_TEST, lambda regs, a, w: True)
    page = k.vmalloc(4096, k.PKS_KEY_TEST)
    with pytest.raises(FaultLoopError, match="without relaxing"):
        k.read_bytes(0, page, 1)
    assert not k.current(0).frames  # every frame was left


def test_key_read_from_a_large_page():
    k = boot("v10", pks_test_all_keys=True)
    seen = []

    def cb(regs, address, write):
        seen.append(k.walk_init_mm_key(address))
        regs.aux.pkrs &= ~(3 << 2 * 7)
        return True
    k.set_fault_callback(7, cb)
    big = k.vmalloc(PAGE_SIZE_2M, 7, page_size=PAGE_SIZE_2M)
    entry, level = k.lookup_address(big + 0x12345)
    assert level == 2 and k.follow_pte(big) is None
    with k.on_cpu(0):
        k.pks_update_protection(7, 1)
    k.write_bytes(0, big + 0x12345, b"z")
    assert seen == [7]


def test_walk_checks_large_before_present():
    # pmd_large() is tested first (V10 16/44): a PS=1, P=0 PDE still yields its key
    k = boot("v10")
    big = k.vmalloc(PAGE_SIZE_2M, 1, page_size=PAGE_SIZE_2M)
    ea, e, _ = k.init_mm.lookup(big)
    k.machine.memory.write_u64(ea, e & ~1)
    assert k.walk_init_mm_key(big) == 1
    assert k.walk_init_mm_key(0xFFFFC98000000000) is None


def test_v7_callback_signature_and_table_bound():
    k = boot("v7", consumers=[("MINE", 1)])
    mine = k.PKS_KEY_MINE
    got = []
    k.set_fault_callback(mine, lambda address, write: got.append((address, write)) or False)
    page = k.vmalloc(4096, mine)
    k.read_bytes(0, page, 1)  # V7 INIT_THREAD has saved_pkrs = 0: the idle task may
    t = k.create_task("t", 0)  # a task from pks_init_task() gets the AD default
    k.schedule(0, t)
    with pytest.raises(KernelOops):
        k.read_bytes(t, page, 1)
    assert got == [(page, False)]
    with pytest.raises(ValueError, match="out of range"):
        k.set_fault_callback(k.PKS_KEY_NR_CONSUMERS, lambda a, w: True)


def test_user_mode_access_to_kernel_page_is_sigsegv():
    k = boot("v10")
    u = k.create_task("u", 0, user=True)
    k.schedule(0, u)
    page = k.vmalloc(4096, 0)
    with pytest.raises(SegmentationFault) as e:
        k.access(u, page, "read")
    assert e.value.error_code & PF_U and u.state == "running"


@pytest.mark.parametrize("mode", ["relaxed", "strict"])
def test_pmem_fault_modes(mode):
    k = boot("v10", pmem=True, pmem_fault_mode=mode)
    pm = k.pmem
    assert (pm.pkey, k.PKS_KEY_TEST) == (1, 2)
    t = k.create_task("writer", 0)
    k.schedule(0, t)
    pmem = pm.memremap_pages(8192)
    with pm.kmap_local(t):
        k.write_bytes(t, pmem, b"persistent")
    assert (t.thread.pkrs >> 2 * pm.pkey) & 3 == 1  # window closed again
    if mode == "relaxed":
        k.write_bytes(t, pmem + 4096, b"stray")  # warned once, let through
        assert pm.relaxed_faults == 1 and k.warnings == 1
        k.write_bytes(t, pmem + 4100, b"again")  # the context stays relaxed
        assert pm.relaxed_faults == 1
    else:
        with pytest.raises(KernelOops) as e:
            k.write_bytes(t, pmem + 4096, b"stray")
        assert e.value.owner == "PKS_KEY_PGMAP_PROTECTION"
    with pytest.raises(ValueError):
        pm.fault_mode = "lenient"


def test_five_level_paging_kernel():
    k = Kernel(pks_emu.Machine(paging_levels=5), api="v10")
    page = k.vmalloc(4096, k.PKS_KEY_TEST)
    assert page >> 48 == 0xFFA0
    assert k.walk_init_mm_key(page) == k.PKS_KEY_TEST
    t = k.create_task("t", 0)
    k.schedule(0, t)
    with pytest.raises(KernelOops) as e:
        k.read_bytes(t, page, 8)
    assert e.value.pkey == k.PKS_KEY_TEST and e.value.error_code == PF_P | PF_PK
