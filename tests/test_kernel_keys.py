"""V4-V6 allocator, V7/V10 static keys, and the consumer API by version."""
from __future__ import annotations

import errno

import pytest

import pks_emu
from pks_emu.constants import (PKEY_DISABLE_ACCESS, PKEY_DISABLE_WRITE, PKS_INIT_VALUE,
                               pkey_update_pkval)
from pks_emu.kernel import Kernel, PksApiError, StaticKeys
from pks_emu.kernel.keys import consumers_for


def boot(api="v6", ncpus=1, features=pks_emu.ALL_FEATURES, **kw):
    return Kernel(pks_emu.Machine(ncpus=ncpus, features=features), api=api, **kw)


def test_alloc_lowest_free_then_enospc():
    k = boot(pks_test=False)
    keys = [k.pks_key_alloc(f"user {i}") for i in range(15)]
    assert keys == list(range(1, 16))
    assert k.pks_key_alloc("one too many") == -errno.ENOSPC
    assert ("err", "Cannot allocate supervisor key for one too many") in k.dmesg
    k.pks_key_free(7)
    k.pks_key_free(3)
    assert k.pks_key_alloc("again") == 3
    assert k.pks_key_alloc("again 2") == 7
    # names are kept for debugging exhaustion; key 0 is the kernel's
    assert k.key_allocator.allocated()[0] == "kernel"
    assert k.key_allocator.allocated()[3] == "again"


def test_alloc_without_pks_is_eopnotsupp():
    k = boot(features=pks_emu.ALL_FEATURES - {"pks"})
    assert k.pks_key_alloc("x") == -errno.EOPNOTSUPP
    with pytest.raises(OSError) as e:
        k.alloc_key("x")
    assert e.value.errno == errno.EOPNOTSUPP


def test_key_zero_never_freed_or_handed_out():
    k = boot(pks_test=False)
    k.pks_key_free(0)
    k.pks_key_free(16)
    k.pks_key_free(-1)
    assert [m for lvl, m in k.dmesg if "Invalid PKey" in m] == [
        "Invalid PKey value: 0", "Invalid PKey value: 16", "Invalid PKey value: -1"]
    assert k.key_allocator.owner(0) == "kernel"
    assert 0 not in [k.pks_key_alloc(str(i)) for i in range(15)]
    with pytest.raises(OSError) as e:
        k.free_key(0)
    assert e.value.errno == errno.EINVAL


def test_pythonic_alloc_raises_enospc():
    k = boot(pks_test=False)
    for i in range(15):
        k.alloc_key(str(i))
    with pytest.raises(OSError) as e:
        k.alloc_key("full")
    assert e.value.errno == errno.ENOSPC


def test_free_resets_only_the_calling_task():
    """The V6 flaw: another task keeps RW on a freed, re-allocated key."""
    k = boot(ncpus=2, pks_test=False)
    owner = k.create_task("owner", 0)
    worker = k.create_task("worker", 1)
    k.schedule(0, owner)
    k.schedule(1, worker)
    with k.on_cpu(owner):
        key = k.alloc_key("first user")
        k.pks_mk_readwrite(key)
    with k.on_cpu(worker):
        k.pks_mk_readwrite(key)
    with k.on_cpu(owner):
        k.pks_key_free(key)
        assert (owner.thread.saved_pkrs >> 2 * key) & 3 == PKEY_DISABLE_ACCESS
        new_key = k.alloc_key("second user")
        assert new_key == key
        secret = k.vmalloc(4096, new_key)
        with pytest.raises(pks_emu.kernel.KernelOops):
            k.write_bytes(owner, secret, b"x")  # owner: AD as promised...
    k.write_bytes(worker, secret, b"stray")     # ...but the worker still writes
    assert k.read_bytes(worker, secret, 5) == b"stray"


def test_mk_setters_update_thread_and_msr():
    k = boot()
    t = k.current(0)
    key = k.alloc_key("k")
    k.pks_mk_readwrite(key)
    assert t.thread.saved_pkrs == pkey_update_pkval(PKS_INIT_VALUE, key, 0)
    assert k.rdmsr_pkrs(0) == k.pkrs_cache(0) == t.thread.pkrs
    k.pks_mk_readonly(key)
    assert (k.rdmsr_pkrs(0) >> 2 * key) & 3 == PKEY_DISABLE_WRITE
    k.pks_mk_noaccess(key)
    assert k.rdmsr_pkrs(0) == PKS_INIT_VALUE
    with pytest.raises(ValueError, match="pkey 16 out of range"):
        k.pks_mk_readwrite(16)


def test_without_pks_setters_change_thread_only():
    # V6 pks_mk_* update saved_pkrs even without PKS; write_pkrs does nothing.
    k = boot(features=pks_emu.ALL_FEATURES - {"pks"})
    k.pks_mk_readwrite(3)
    assert (k.current().thread.pkrs >> 6) & 3 == 0
    assert k.counters()["pkrs_writes"] == 0
    assert k.machine.cpus[0].cr4 & (1 << 24) == 0


@pytest.mark.parametrize("api,missing", [("v6", "pks_set_readwrite"), ("v6", "pks_update_exception"),
                                         ("v10", "pks_key_alloc"), ("v10", "pks_mk_readonly"),
                                         ("v7", "pks_key_alloc"), ("v10", "pks_abandon_protections")])
def test_functions_absent_from_a_version(api, missing):
    k = boot(api)
    with pytest.raises(PksApiError, match=missing):
        getattr(k, missing)(1) if missing != "pks_update_exception" else k.pks_update_exception(None, 1, 0)


def test_v10_key_assignment_and_init_value():
    both = StaticKeys("v10", consumers_for("v10", pks_test=True, pmem=True, all_keys=False))
    assert (both.PKS_KEY_PGMAP_PROTECTION, both.PKS_KEY_TEST, both.PKS_KEY_MAX) == (1, 2, 3)
    assert both.init_value == 0x55555554
    test_only = StaticKeys("v10", consumers_for("v10", pks_test=True, pmem=False, all_keys=False))
    assert (test_only.PKS_KEY_TEST, test_only.PKS_KEY_MAX, test_only.init_value) == (1, 2, 0x55555554)
    all_keys = StaticKeys("v10", consumers_for("v10", pks_test=True, pmem=False, all_keys=True),
                          all_keys=True)
    assert (all_keys.PKS_KEY_MAX, all_keys.init_value) == (16, 0x4)
    rw = StaticKeys("v10", [("MINE", 0)])
    assert rw.init_value == 0x55555550  # key 1 declared RW
    with pytest.raises(ValueError, match="PKS_TEST_ALL_KEYS"):
        consumers_for("v10", pks_test=True, pmem=True, all_keys=True)


def test_v10_setters_and_warn_on_key_max():
    k = boot("v10")
    key = k.PKS_KEY_TEST
    k.pks_set_readwrite(key)
    assert k.rdmsr_pkrs() == pkey_update_pkval(PKS_INIT_VALUE, key, 0)
    k.pks_set_noaccess(key)
    assert k.rdmsr_pkrs() == PKS_INIT_VALUE
    before = k.current().thread.pkrs
    k.pks_update_protection(5, 0)  # >= PKS_KEY_MAX (2): WARN_ON_ONCE, nothing done
    k.pks_update_protection(6, 0)
    assert k.current().thread.pkrs == before
    assert k.warnings == 1 and "PKS_KEY_MAX" in k.dmesg[-1][1]
    k.pks_update_protection(key, 0x7)  # masked to 2 bits, with a warning
    assert (k.current().thread.pkrs >> 2 * key) & 3 == 3
    assert k.warnings == 2
    with pytest.raises(PksApiError, match="PKS_KEY_PGMAP_PROTECTION"):
        k.PKS_KEY_PGMAP_PROTECTION


def test_v10_without_consumers_has_pks_off():
    k = boot("v10", pks_test=False)
    assert not k.pks_available()
    assert k.machine.cpus[0].cr4 & (1 << 24) == 0
    k.pks_set_readwrite(1)  # silently nothing
    assert k.current().thread.pkrs == PKS_INIT_VALUE


def test_v7_abandon_is_global_and_irreversible():
    k = boot("v7", ncpus=2)
    key = k.PKS_KEY_PKS_TEST
    other = k.create_task("other", 1)
    k.schedule(1, other)
    page = k.vmalloc(4096, key)
    with pytest.raises(pks_emu.kernel.KernelOops):
        k.write_bytes(other, page, b"a")  # AD before abandoning
    other = k.create_task("other2", 1)
    k.schedule(1, other)
    with k.on_cpu(0):
        k.pks_abandon_protections(key)
        k.pks_mk_noaccess(key)  # no way back: the mask forces RW
    assert (k.current(0).thread.pkrs >> 2 * key) & 3 == 0
    # A task already running on CPU 1 with AD: the fault path drops it
    # (handle_abandoned_pks_value) and the access is retried.
    assert (other.thread.pkrs >> 2 * key) & 3 == PKEY_DISABLE_ACCESS
    k.write_bytes(other, page, b"b")
    assert (other.thread.pkrs >> 2 * key) & 3 == 0
    assert k.counters()["pk_faults"] >= 2
