"""The on_fault callback API over the batch check (pks_emu.hooks, issue 5)."""
from __future__ import annotations

import numpy as np
import pytest

import pks_emu
from pks_emu import hooks
from pks_emu.constants import PF_P, PF_PK, PF_W, PKR_WD_KEY
from test_cimport import SUP_OPEN_VA, SUP_VA, USER_VA, accesses, scenario


def test_without_callback_is_the_plain_batch():
    va, kind = accesses(200, seed=3)
    m1, c1 = scenario()
    m2, c2 = scenario()
    pa1, e1 = hooks.access_batch(c1, va, kind)
    pa2, e2 = pks_emu.access_batch(c2, va, kind)
    np.testing.assert_array_equal(pa1, pa2)
    np.testing.assert_array_equal(e1, e2)


@pytest.mark.parametrize("cpl", [0, 3])
def test_continue_gives_the_same_results_and_counters_as_the_plain_batch(cpl):
    va, kind = accesses(500, seed=cpl + 1)
    m1, c1 = scenario()
    m2, c2 = scenario()
    c1.cpl = c2.cpl = cpl
    log = hooks.FaultLog()
    pa1, e1 = hooks.access_batch(c1, va, kind, on_fault=log)
    pa2, e2 = pks_emu.access_batch(c2, va, kind)
    np.testing.assert_array_equal(pa1, pa2)
    np.testing.assert_array_equal(e1, e2)
    assert c1.counters() == c2.counters()
    faulting = np.flatnonzero(e2 != -1).tolist()
    assert [i for i, _ in log] == faulting and faulting
    for i, exc in log:
        t = c2.translate(int(va[i]), int(kind[i]), 1)
        if e2[i] == -2:
            assert isinstance(exc, pks_emu.GeneralProtectionFault)
        else:
            assert isinstance(exc, pks_emu.PageFault)
            assert (exc.address, exc.error_code, exc.pkey) == (t.address, t.error_code, t.pkey)


def test_retry_after_opening_the_key():
    m, cpu = scenario()
    va = np.array([SUP_OPEN_VA, SUP_VA + 8, SUP_VA + 16, SUP_OPEN_VA], dtype=np.uint64)
    calls = []

    def on_fault(i, exc):
        calls.append((i, exc.address, exc.error_code, exc.pkey))
        cpu.wrmsr(pks_emu.MSR_IA32_PKRS, 0)
        return hooks.RETRY

    pa, err = hooks.access_batch(cpu, va, "write", size=8, on_fault=on_fault)
    assert calls == [(1, SUP_VA + 8, PF_P | PF_W | PF_PK, 3)]
    assert err.tolist() == [-1, -1, -1, -1]
    assert pa[1] == cpu.translate(SUP_VA + 8, "write").pa


def test_retry_that_changes_nothing_is_bounded():
    m, cpu = scenario()
    with pytest.raises(RuntimeError, match=r"access 0 at 0xffff888000000000.*3 times"):
        hooks.access_batch(cpu, [SUP_VA], 1, on_fault=lambda i, e: hooks.RETRY, max_retries=3)


def test_callback_exception_stops_the_batch():
    m, cpu = scenario()
    va = np.array([SUP_VA, SUP_OPEN_VA], dtype=np.uint64)
    before = cpu.counters()["writes_supervisor"]

    def stop(i, exc):
        raise exc

    with pytest.raises(pks_emu.PageFault) as ei:
        hooks.access_batch(cpu, va, 1, on_fault=stop)
    assert ei.value.address == SUP_VA
    assert cpu.counters()["writes_supervisor"] == before + 1   # the second access never ran


def test_key_policy_change_in_callback_applies_to_later_accesses():
    """A handler may tighten policy: later accesses see the new PKRU."""
    m, cpu = scenario()
    cpu.cpl = 3
    cpu.wrpkru(0)
    va = np.array([USER_VA, USER_VA + 8, USER_VA + 16], dtype=np.uint64)
    kinds = np.array([1, 1, 1], dtype=np.uint8)

    def on_fault(i, exc):
        return None

    pa, err = hooks.access_batch(cpu, va, kinds, on_fault=on_fault)
    assert err.tolist() == [-1, -1, -1]
    cpu.wrpkru(PKR_WD_KEY(5))
    pa, err = hooks.access_batch(cpu, va, kinds, on_fault=on_fault)
    assert all(e >= 0 and e & PF_PK for e in err.tolist())


@pytest.mark.parametrize("args,match", [
    (dict(kind=3), r"kind\[0\] = 3"),
    (dict(kind="modify"), "not understood"),
    (dict(kind=0, size=0), r"size\[0\] = 0"),
    (dict(kind=0, size=[1, 2]), "expected a scalar or 1 values"),
    (dict(kind=0, size=-1), r"size\[0\] = -1 does not fit"),
])
def test_bad_input_names_the_index(args, match):
    m, cpu = scenario()
    with pytest.raises(ValueError, match=match):
        hooks.access_batch(cpu, [SUP_OPEN_VA], on_fault=hooks.FaultLog(), **args)


def test_callback_must_be_callable():
    m, cpu = scenario()
    with pytest.raises(TypeError, match="on_fault must be callable"):
        hooks.access_batch(cpu, [SUP_OPEN_VA], 0, on_fault=42)


def test_memory_is_not_busy_after_the_batch():
    m, cpu = scenario()
    hooks.access_batch(cpu, [SUP_VA, SUP_OPEN_VA], 1, on_fault=hooks.FaultLog())
    m.memory.write(0x1000, b"ok")      # would raise MachineBusyError if the loop leaked
