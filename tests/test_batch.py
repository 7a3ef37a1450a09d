"""pks_emu.access_batch: the same outcomes, TLB use and A/D updates as a loop
of CPU.translate calls; argument validation names the bad index."""
from __future__ import annotations

import numpy as np
import pytest

import pks_emu
from pks_emu.constants import CR4_PKE, CR4_PKS, MSR_IA32_PKRS, PTE_A, PTE_D

USER = 0x0000_5000_0000_0000
KERN = 0xFFFF_8880_0000_0000


def build(levels=4, compat="sdm"):
    """A deterministic machine: the same calls give the same tables and registers."""
    m = pks_emu.Machine(paging_levels=levels, compat=compat, tlb_entries=64)
    a = m.address_space()
    for i in range(8):
        a.map(USER + i * 0x1000, 0x10_0000 + i * 0x1000, user=True, pkey=i % 4,
              writable=i != 1)
        a.map(KERN + i * 0x1000, 0x20_0000 + i * 0x1000, pkey=(i % 4) + 4, writable=i != 5)
    a.map(KERN + 0x20_0000, 0x40_0000, 2 << 20, pkey=6)
    a.activate()
    cpu = m.cpus[0]
    cpu.cr4 = cpu.cr4 | CR4_PKE | CR4_PKS
    cpu.wrpkru(0b01_10_00_00)            # key 2 WD, key 3 AD
    cpu.wrmsr(MSR_IA32_PKRS, 0b10_01_00_00 << 8)   # key 6 AD, key 7 WD
    cpu.cr0 = cpu.cr0 | (1 << 16)
    return m, a, cpu


def random_accesses(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.choice(np.array([USER, KERN, KERN + 0x20_0000, 0x0000_8000_0000_0000,
                                0x0100_0000_0000_0000], dtype=np.uint64), n)
    off = rng.integers(0, 0xA000, n, dtype=np.uint64)
    off[rng.random(n) < 0.1] = 0xFFC                    # page-crossing
    va = base + off
    kind = rng.integers(0, 3, n, dtype=np.uint8)
    size = rng.choice(np.array([1, 4, 8, 16], dtype=np.uint16), n)
    implicit = rng.random(n) < 0.2
    return va, kind, size, implicit


def loop(cpu, va, kind, size, implicit):
    pa = np.zeros(len(va), dtype=np.uint64)
    err = np.empty(len(va), dtype=np.int32)
    for i in range(len(va)):
        t = cpu.translate(int(va[i]), int(kind[i]), size=int(size[i]), implicit=bool(implicit[i]))
        if t.ok:
            pa[i], err[i] = t.pa, -1
        else:
            err[i] = -2 if t.vector == 13 else t.error_code
    return pa, err


@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize("compat", ["sdm", "qemu"])
@pytest.mark.parametrize("cpl", [0, 3])
def test_batch_equals_loop_of_translate(levels, compat, cpl):
    m1, a1, cpu1 = build(levels, compat)
    m2, a2, cpu2 = build(levels, compat)
    cpu1.cpl = cpu2.cpl = cpl
    va, kind, size, implicit = random_accesses(3000, seed=levels * 10 + cpl)
    pa_b, err_b = pks_emu.access_batch(cpu1, va, kind, size, implicit)
    pa_l, err_l = loop(cpu2, va, kind, size, implicit)
    assert pa_b.dtype == np.uint64 and err_b.dtype == np.int32
    np.testing.assert_array_equal(err_b, err_l)
    np.testing.assert_array_equal(pa_b, pa_l)
    # the outcomes are varied, not all one kind
    assert {-1, -2} <= set(np.unique(err_b).tolist())
    assert (err_b >= 0).sum() > 100
    # the same TLB use and the same A/D updates
    assert cpu1.counters() == cpu2.counters()
    for f in m1.memory.frame_addresses():
        assert m1.memory.read(f, 4096) == m2.memory.read(f, 4096)


@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize("compat", ["sdm", "qemu"])
@pytest.mark.parametrize("one_kind", [False, True])
@pytest.mark.parametrize("implicit", [False, True])
def test_batch_with_one_size_equals_loop(levels, compat, one_kind, implicit):
    """One size and one implicit flag for the whole batch: the loop that takes
    hits and runs of TLB misses in turn (page-crossing accesses and faults in
    between, runs that start at the first access and end at the last)."""
    m1, a1, cpu1 = build(levels, compat)
    m2, a2, cpu2 = build(levels, compat)
    va, kind, _, _ = random_accesses(4000, seed=levels + 2 * one_kind + 4 * implicit)
    rng = np.random.default_rng(levels)
    # stretches of distinct pages (misses in a row with a 64-entry TLB) and of one page (hits)
    va[:300] = KERN + 0x20_0000 + np.arange(300, dtype=np.uint64) * 0x1000 + 8
    va[1000:1200] = KERN + 0x3000 + rng.integers(0, 500, 200, dtype=np.uint64) * 8
    va[-150:] = KERN + 0x20_0000 + np.arange(150, dtype=np.uint64)[::-1] * 0x1000
    if one_kind:
        kind = 1                                        # writes: D updates too
        kinds = np.ones(len(va), dtype=np.uint8)
    else:
        kinds = kind
    size = np.full(len(va), 8, dtype=np.uint16)
    flags = np.full(len(va), implicit)
    pa_b, err_b = pks_emu.access_batch(cpu1, va, kind, 8, implicit)
    pa_l, err_l = loop(cpu2, va, kinds, size, flags)
    np.testing.assert_array_equal(err_b, err_l)
    np.testing.assert_array_equal(pa_b, pa_l)
    assert {-1, -2} <= set(np.unique(err_b).tolist()) and (err_b >= 0).sum() > 50
    c = cpu1.counters()
    assert c == cpu2.counters()
    assert c["tlb_misses"] > 500 and c["tlb_hits"] > 150
    for f in m1.memory.frame_addresses():
        assert m1.memory.read(f, 4096) == m2.memory.read(f, 4096)


def test_error_code_convention_and_pa_zero_on_faults():
    m, a, cpu = build()
    va = np.array([USER + 0x10, USER + 0x3010, 0x0000_8000_0000_0000, KERN + 0x9000, KERN + 0x5008],
                  dtype=np.uint64)
    kind = np.array([0, 0, 0, 0, 1], dtype=np.uint8)
    pa, err = pks_emu.access_batch(cpu, va, kind, 8)
    assert err.tolist() == [-1, pks_emu.PF_P | pks_emu.PF_PK, -2, 0, pks_emu.PF_P | pks_emu.PF_W]
    assert pa.tolist() == [0x10_0010, 0, 0, 0, 0]


def test_batch_uses_current_registers_and_the_tlb():
    m, a, cpu = build()
    va = np.full(10, KERN + 0x2000, dtype=np.uint64)   # key 6 -> AD in PKRS
    _, err = pks_emu.access_batch(cpu, va, 0)
    assert (err == pks_emu.PF_P | pks_emu.PF_PK).all()
    cpu.wrmsr(MSR_IA32_PKRS, 0)                        # no flush: the next batch sees it
    before = cpu.counters()
    pa, err = pks_emu.access_batch(cpu, va, "read")
    assert (err == -1).all() and (pa == 0x20_2000).all()
    after = cpu.counters()
    assert after["tlb_misses"] - before["tlb_misses"] == 1
    assert after["tlb_hits"] - before["tlb_hits"] == 9
    assert after["reads_supervisor"] - before["reads_supervisor"] == 10


def test_batch_sets_dirty_through_read_filled_entries():
    m, a, cpu = build()
    va = np.array([KERN, KERN, KERN], dtype=np.uint64)
    _, err = pks_emu.access_batch(cpu, va, np.array([0, 1, 1], dtype=np.uint8))
    assert err.tolist() == [-1, -1, -1]
    assert a.lookup(KERN)[1] & (PTE_A | PTE_D) == PTE_A | PTE_D


@pytest.mark.parametrize("kind", ["write", pks_emu.AccessKind.WRITE, 1, ["write", "w"],
                                  [pks_emu.AccessKind.WRITE, 1]])
def test_kind_spellings(kind):
    m, a, cpu = build()
    n = len(kind) if isinstance(kind, list) else 2
    va = np.full(n, USER + 0x1000, dtype=np.uint64)   # read-only user page, key 1 allowed
    cpu.cpl = 3
    _, err = pks_emu.access_batch(cpu, va, kind)
    assert (err == pks_emu.PF_P | pks_emu.PF_W | pks_emu.PF_U).all()


def test_python_list_of_kernel_addresses():
    m, a, cpu = build()
    pa, err = pks_emu.access_batch(cpu, [KERN, USER, KERN + 8], 0)
    assert err.tolist() == [-1, -1, -1]
    assert pa.tolist() == [0x20_0000, 0x10_0000, 0x20_0008]


def test_empty_batch():
    m, a, cpu = build()
    pa, err = pks_emu.access_batch(cpu, np.zeros(0, dtype=np.uint64), 0)
    assert pa.shape == err.shape == (0,)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kind=np.array([0, 1, 2, 3, 0], dtype=np.uint8)), ValueError, r"kind\[3\] = 3"),
    (dict(kind=[0, 0, -1, 0, 0]), ValueError, r"kind\[2\] = -1"),
    (dict(kind="execute"), ValueError, "kind 'execute'"),
    (dict(kind=[0, "r", "x", "jump", 0]), ValueError, r"kind\[3\] = 'jump'"),
    (dict(kind=0, size=np.array([8, 8, 0, 8, 8])), ValueError, r"size\[2\] = 0"),
    (dict(kind=0, size=[8, 8, 8, 8, 4097]), ValueError, r"size\[4\] = 4097"),
    (dict(kind=0, size=65537), ValueError, r"size\[0\] = 65537"),
    (dict(kind=0, size=np.array([8, 65537, 8, 8, 8])), ValueError, r"size\[1\] = 65537"),
    (dict(kind=0, size=-8), ValueError, r"size\[0\] = -8"),
    (dict(kind=0, implicit=[0, 0, 0, 2, 0]), ValueError, r"implicit\[3\] = 2"),
    (dict(kind=[0, 1, 2]), ValueError, r"kind has shape \(3,\).*5 values"),
    (dict(kind=0, size=np.array([8.0] * 5)), TypeError, "size must be integers"),
])
def test_validation_names_the_index(kwargs, exc, match):
    m, a, cpu = build()
    va = np.full(5, USER, dtype=np.uint64)
    with pytest.raises(exc, match=match):
        pks_emu.access_batch(cpu, va, **kwargs)
    assert cpu.counters()["tlb_misses"] == 0          # nothing ran


def test_va_validation():
    m, a, cpu = build()
    with pytest.raises(TypeError, match="va must be an integer array"):
        pks_emu.access_batch(cpu, np.array([1.5e9]), 0)
    with pytest.raises(ValueError, match=r"va\[1\] = -5"):
        pks_emu.access_batch(cpu, np.array([0, -5], dtype=np.int64), 0)
    with pytest.raises(OverflowError):
        pks_emu.access_batch(cpu, [0, -5], 0)
    with pytest.raises(ValueError, match="one-dimensional"):
        pks_emu.access_batch(cpu, np.zeros((2, 2), dtype=np.uint64), 0)
    # signed arrays with valid values are fine
    _, err = pks_emu.access_batch(cpu, np.array([USER], dtype=np.int64), 0)
    assert err.tolist() == [-1]


def test_out_arrays_are_filled_in_place_and_checked():
    m = pks_emu.Machine()
    a = m.address_space()
    a.map(0x1000, 0x7000)
    a.activate()
    cpu = m.cpus[0]
    va = np.array([0x1008, 0x2000, 0x1010], dtype=np.uint64)
    pa = np.full(3, 99, dtype=np.uint64)
    err = np.full(3, 99, dtype=np.int32)
    got = cpu.access_batch(va, "read", out=(pa, err))
    assert got[0] is pa and got[1] is err
    assert list(pa) == [0x7008, 0, 0x7010] and list(err) == [-1, 0, -1]
    with pytest.raises(ValueError, match="out pa must be a writable contiguous uint64 array of 3"):
        cpu.access_batch(va, "read", out=(np.zeros(2, np.uint64), err))
    with pytest.raises(ValueError, match="out error_code"):
        cpu.access_batch(va, "read", out=(pa, np.zeros(3, np.int64)))
    with pytest.raises(TypeError, match="pair of arrays"):
        cpu.access_batch(va, "read", out=pa)
