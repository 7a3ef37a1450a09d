"""AddressSpace (the page-table builder) and the physical memory it writes to."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import (PAGE_KERNEL, PAGE_SIZE, PAGE_SIZE_1G, PAGE_SIZE_2M, PTE_A, PTE_D,
                               PTE_G, PTE_P, PTE_PS, PTE_RW, PTE_US, PTE_XD)
from pks_emu.paging import TABLE_FLAGS

ADDR = ((1 << 52) - 1) & ~0xFFF


def space(levels=4, ncpus=1):
    m = pks_emu.Machine(paging_levels=levels, ncpus=ncpus)
    return m, m.address_space()


# --- map / lookup ------------------------------------------------------------------

@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize("size,leaf_level", [(PAGE_SIZE, 1), (PAGE_SIZE_2M, 2), (PAGE_SIZE_1G, 3)],
                         ids=["4K", "2M", "1G"])
def test_map_writes_a_leaf_at_the_right_level(levels, size, leaf_level):
    m, a = space(levels)
    va = 0xFFFF_8880_0000_0000 if levels == 4 else 0xFF11_0000_0000_0000
    pa = 3 * PAGE_SIZE_1G
    a.map(va, pa, size, writable=False, user=True, nx=True, pkey=11, global_=True)
    ea, e, got_size = a.lookup(va + size - 1)
    assert got_size == size
    assert ea == a.entry_address(va, leaf_level)
    assert e & ADDR == pa
    flags = PTE_P | PTE_US | PTE_XD | PTE_G | (PTE_PS if size > PAGE_SIZE else 0)
    assert e & ~ADDR == flags | (11 << 59)
    assert pks_emu.pte_pkey(e) == 11 and a.pkey_of(va) == 11
    # the tables above the leaf are present, writable and user: the leaf decides
    for level in range(levels, leaf_level, -1):
        assert m.memory.read_u64(a.entry_address(va, level)) & 0xFFF == TABLE_FLAGS
    # and the walk of the CPU agrees with the builder
    a.activate()
    walked = m.cpus[0].walk(va)
    assert [lv for lv, _, _ in walked] == list(range(levels, leaf_level - 1, -1))
    assert walked[-1][1:] == (ea, e)


def test_map_with_prot_flags():
    m, a = space()
    a.map(0x200000, 0x5000, prot=pks_emu.PAGE_KERNEL_PKEY(4) | 0xABC000)
    ea, e, _ = a.lookup(0x200000)
    assert e == 0x5000 | PAGE_KERNEL | (4 << 59)         # address bits of prot are ignored
    a.map(0x400000, 0x600000, PAGE_SIZE_2M, prot=PAGE_KERNEL)
    assert a.lookup(0x400000)[1] & PTE_PS


def test_tables_are_allocated_away_from_low_memory():
    m, a = space()
    a.map(0x1000, 0x1000)
    assert a.cr3 >= 1 << 32
    for level in (4, 3, 2, 1):
        assert a.entry_address(0x1000, level) >= 1 << 32


def test_lookup_and_entry_address_of_unmapped():
    m, a = space()
    assert a.lookup(0x1000) is None
    assert a.entry_address(0x1000, 4) is not None      # the top table always exists
    assert a.entry_address(0x1000, 1) is None
    assert a.pkey_of(0x1000) is None
    a.map(0x200000, 0, PAGE_SIZE_2M)
    assert a.entry_address(0x200000, 1) is None        # below a 2-MiB leaf there is no PT
    with pytest.raises(ValueError, match="level"):
        a.entry_address(0x1000, 5)
    with pytest.raises(ValueError, match="level"):
        a.entry_address(0x1000, 0)


@pytest.mark.parametrize("args,kwargs,match", [
    ((0x1000, 0x1000, 8192), {}, "page size"),
    ((0x0000_8000_0000_0000, 0), {}, "not canonical"),
    ((0x1800, 0x1000), {}, "aligned"),
    ((0x200000, 0x1000, PAGE_SIZE_2M), {}, "aligned"),
    ((0x1000, 1 << 52), {}, "below 2\\*\\*52"),
    ((0x1000, 0x1000), {"pkey": 16}, "pkey"),
    ((0x1000, 0x1000), {"prot": 1 << 64}, "64 bits"),
])
def test_map_rejects_bad_arguments(args, kwargs, match):
    m, a = space()
    with pytest.raises(ValueError, match=match):
        a.map(*args, **kwargs)


def test_map_refuses_to_mix_page_sizes():
    m, a = space()
    a.map(0x200000, 0x200000, PAGE_SIZE_2M)
    with pytest.raises(ValueError, match="2 MiB page"):
        a.map(0x201000, 0x1000)
    a.map(0x40000000, 0x1000)
    with pytest.raises(ValueError, match="page table already covers"):
        a.map(0x40000000, 0x40000000, PAGE_SIZE_2M)


def test_fifty_seven_bit_addresses_need_five_levels():
    m4, a4 = space(4)
    with pytest.raises(ValueError, match="canonical"):
        a4.map(0x0100_0000_0000_0000 - PAGE_SIZE, 0)
    m5, a5 = space(5)
    a5.map(0x00FF_FFFF_FFFF_F000, 0x2000)
    a5.activate()
    assert m5.cpus[0].access(0x00FF_FFFF_FFFF_F008, "read") == 0x2008


# --- map_range ----------------------------------------------------------------------

def test_map_range_across_page_tables():
    m, a = space()
    va = 0x7F00_001F_E000                     # PT index 510: the range spans two PTs
    a.map_range(va, 0x10_0000, 6 * PAGE_SIZE, user=True, pkey=3, writable=False)
    a.activate()
    cpu = m.cpus[0]
    for i in range(6):
        ea, e, size = a.lookup(va + i * PAGE_SIZE)
        assert e == (0x10_0000 + i * PAGE_SIZE) | PTE_P | PTE_US | (3 << 59)
        assert cpu.access(va + i * PAGE_SIZE + 1, "read") == 0x10_0000 + i * PAGE_SIZE + 1
    assert a.lookup(va + 6 * PAGE_SIZE) is None
    assert a.lookup(va - PAGE_SIZE) is None


def test_map_range_errors():
    m, a = space()
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        a.map_range(0x1000, 0x1000, 100)
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        a.map_range(0x1000, 0x1000, 0)
    with pytest.raises(TypeError, match="prot"):
        a.map_range(0x1000, 0x1000, PAGE_SIZE, prot=PAGE_KERNEL)
    with pytest.raises(ValueError, match="canonical"):
        a.map_range(0x0000_7FFF_FFFF_F000, 0, 2 * PAGE_SIZE)
    with pytest.raises(ValueError, match="2\\*\\*52"):
        a.map_range(0x1000, (1 << 52) - PAGE_SIZE, 2 * PAGE_SIZE)


# --- unmap / protect / set_pkey -------------------------------------------------------

def test_unmap_protect_set_pkey():
    m, a = space()
    a.map(0x3000, 0x9000, pkey=1)
    old = a.protect(0x3000, writable=False, user=True, nx=True, global_=True)
    assert old == 0x9000 | PTE_P | PTE_RW | (1 << 59)
    e = a.lookup(0x3000)[1]
    assert e == 0x9000 | PTE_P | PTE_US | PTE_XD | PTE_G | (1 << 59)
    a.protect(0x3000, nx=False, global_=False)
    assert a.lookup(0x3000)[1] == 0x9000 | PTE_P | PTE_US | (1 << 59)
    assert a.set_pkey(0x3000, 15) == 0x9000 | PTE_P | PTE_US | (1 << 59)
    assert a.pkey_of(0x3000) == 15
    assert a.unmap(0x3000) == 0x9000 | PTE_P | PTE_US | (15 << 59)
    assert a.lookup(0x3000) is None
    assert a.unmap(0x3000) == 0
    with pytest.raises(ValueError, match="not mapped"):
        a.protect(0x3000, writable=True)
    a.map(0x3000, 0x9000)
    with pytest.raises(ValueError, match="pkey"):
        a.set_pkey(0x3000, -1)


def test_protect_keeps_accessed_and_dirty():
    m, a = space()
    a.map(0x3000, 0x9000)
    a.activate()
    m.cpus[0].access(0x3000, "write")
    a.set_pkey(0x3000, 2)
    assert a.lookup(0x3000)[1] & (PTE_A | PTE_D) == PTE_A | PTE_D


# --- activate / invalidate ----------------------------------------------------------------

def test_activate_and_invalidate_follow_cr3():
    m, a = space(ncpus=3)
    b = m.address_space()
    a.map(0x5000, 0x1000)
    b.map(0x5000, 0x2000)
    a.activate()
    b.activate(2)
    assert [c.cr3 for c in m.cpus] == [a.cr3, a.cr3, b.cr3]
    assert [c.access(0x5000, "read") for c in m.cpus] == [0x1000, 0x1000, 0x2000]
    a.unmap(0x5000)
    b.unmap(0x5000)
    a.invalidate(0x5000)                      # CPUs 0 and 1 only
    assert [c.counters()["invlpg"] for c in m.cpus] == [1, 1, 0]
    assert m.cpus[2].access(0x5000, "read") == 0x2000    # still cached there
    with pytest.raises(pks_emu.PageFault):
        m.cpus[0].access(0x5000, "read")
    a.activate(m.cpus[1])
    assert m.cpus[1].cr3 == a.cr3


# --- physical memory ----------------------------------------------------------------------

def test_memory_roundtrip_and_bounds():
    mem = pks_emu.Machine().memory
    assert mem.read_u64(0x1234_5678_0000) == 0 and mem.frames == 0   # reads do not allocate
    mem.write_u64(0xFFC, 0x1122334455667788)           # unaligned, across two frames
    assert mem.read_u64(0xFFC) == 0x1122334455667788
    assert mem.read(0xFFC, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert mem.frames == 2
    mem.write((1 << 52) - 4, b"abcd")
    assert mem.read((1 << 52) - 4, 4) == b"abcd"
    with pytest.raises(ValueError, match="52-bit"):
        mem.write((1 << 52) - 2, b"abcd")
    with pytest.raises(ValueError, match="52-bit"):
        mem.read_u64((1 << 52) - 4)
    with pytest.raises(ValueError, match="64 bits"):
        mem.write_u64(0, 1 << 64)
    with pytest.raises(ValueError, match="negative"):
        mem.read(0, -1)


def test_alloc_frames():
    m = pks_emu.Machine(maxphyaddr=40)
    a = m.alloc_frames(2)
    b = m.alloc_frames(1, align=PAGE_SIZE_2M)
    assert a == (1 << 40) - 2 * PAGE_SIZE
    assert b % PAGE_SIZE_2M == 0 and b < a
    assert m.memory.read(a, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    with pytest.raises(ValueError, match="at least 1"):
        m.alloc_frames(0)
    with pytest.raises(ValueError, match="power of two"):
        m.alloc_frames(1, align=3 * PAGE_SIZE)
