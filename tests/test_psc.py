"""Paging-structure caches (SDM §4.10.3, invalidation §4.10.4.1), the walk
memo and the permission tables of the fast path (issue 11).

* By hand: what fills the PML4E/PDPTE/PDE caches, what invalidates them
  (INVLPG of any address, MOV to CR3, flushes, a #PF for the faulting
  address), that a cached upper-level entry is used instead of memory (a stale
  PDE is visible exactly as on hardware) and that the option turns them off.
* Properties: random interleavings of register writes, WRMSR/WRPKRU, INVLPG,
  CR3 loads, page-table edits (each followed by the invalidation a kernel
  does) and accesses, on a CPU with the caches and one without, give the
  reference model's outcome and A/D bits on both.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pks_emu
import refmodel as ref
from refmodel import Regs

VA = 0xFFFF_C900_0000_0000
PA = 0x4000_0000
MSR_PKRS = 0x6E1


def machine(levels=4, compat="sdm", psc=True):
    m = pks_emu.Machine(paging_levels=levels, compat=compat)
    a = m.address_space()
    for i in range(4):
        a.map(VA + i * 0x1000, PA + i * 0x1000, pkey=i)
    a.map(VA + 0x20_0000, PA + 0x10_0000)              # another PDE, same PDPTE
    a.activate()
    cpu = m.cpus[0]
    cpu.paging_structure_caches = psc
    return m, a, cpu


def test_default_on_in_sdm_off_in_qemu():
    assert pks_emu.Machine().cpus[0].paging_structure_caches
    assert not pks_emu.Machine(compat="qemu").cpus[0].paging_structure_caches


@pytest.mark.parametrize("levels", [4, 5])
def test_walks_fill_and_use_the_pde_cache(levels):
    m, a, cpu = machine(levels)
    cpu.reset_counters()
    cpu.access(VA, "read")                   # full walk: fills PML5E/PML4E, PDPTE, PDE caches
    cpu.access(VA + 0x1000, "read")          # same PDE: only the PTE is read
    cpu.access(VA + 0x20_0000, "read")       # another PDE under the cached PDPTE
    c = cpu.counters()
    assert c["walks"] == 3 and c["tlb_misses"] == 3
    assert c["pde_cache_hits"] == 1 and c["pdpte_cache_hits"] == 1
    assert c["pml4e_cache_hits"] == 0 and c["pml5e_cache_hits"] == 0


def test_off_option_walks_every_level():
    m, a, cpu = machine(psc=False)
    cpu.access(VA, "read")
    cpu.access(VA + 0x1000, "read")
    c = cpu.counters()
    assert c["pde_cache_hits"] == c["pdpte_cache_hits"] == c["pml4e_cache_hits"] == 0


@pytest.mark.parametrize("psc", [True, False])
def test_a_stale_pde_is_used_until_invalidated(psc):
    """SDM §4.10.3.1: a cached PDE may be used instead of the PDE in memory
    after software changed it; INVLPG of any address invalidates every
    paging-structure-cache entry (§4.10.4.1)."""
    m, a, cpu = machine(psc=psc)
    cpu.access(VA, "read")                   # caches the PDE of VA
    ea = a.entry_address(VA, 2)
    pde = m.memory.read_u64(ea)
    m.memory.write_u64(ea, pde & ~1)         # PDE not present, no invalidation
    t = cpu.translate(VA + 0x1000, "read")   # not in the TLB
    if psc:
        assert t.ok and t.pa == PA + 0x1000  # the cached PDE still translates
    else:
        assert not t.ok and t.error_code == 0
    cpu.invlpg(VA + 0x3000_0000)             # any address at all
    t = cpu.translate(VA + 0x2000, "read")
    assert not t.ok and t.error_code == 0
    assert cpu.translate(VA, "read").ok     # the TLB entry of VA itself is still there


@pytest.mark.parametrize("how", ["cr3", "flush", "flush_keep_global"])
def test_cr3_load_and_flushes_drop_the_caches(how):
    m, a, cpu = machine()
    cpu.access(VA, "read")
    ea = a.entry_address(VA, 2)
    m.memory.write_u64(ea, m.memory.read_u64(ea) & ~1)
    if how == "cr3":
        cpu.cr3 = cpu.cr3
    else:
        cpu.flush_tlb(keep_global=how == "flush_keep_global")
    t = cpu.translate(VA + 0x1000, "read")
    assert not t.ok and t.error_code == 0


def test_a_page_fault_drops_the_entries_for_its_address():
    """SDM §4.10.4.1: a #PF invalidates the paging-structure-cache entries
    that would be used for the faulting linear address."""
    m, a, cpu = machine()
    cpu.cpl = 0
    cpu.access(VA, "read")
    ea = a.entry_address(VA, 2)
    m.memory.write_u64(ea, m.memory.read_u64(ea) & ~2)     # PDE read-only, no invalidation
    cpu.cr0 = cpu.cr0 | ref.CR0_WP
    # Through the cached (writable) PDE the write is allowed on page 1...
    assert cpu.translate(VA + 0x1000, "write").ok
    # ...then a fault on page 2 for another reason (its key, PKRS) drops them:
    cpu.cr4 = cpu.cr4 | ref.CR4_PKS
    cpu.wrmsr(MSR_PKRS, 3 << 4)                             # key 2: AD and WD
    assert cpu.translate(VA + 0x2000, "read").error_code == pks_emu.PF_P | pks_emu.PF_PK
    cpu.wrmsr(MSR_PKRS, 0)
    t = cpu.translate(VA + 0x3000, "write")                # fresh walk: the read-only PDE
    assert not t.ok and t.error_code == pks_emu.PF_P | pks_emu.PF_W


def test_cached_entries_are_not_reread_so_their_accessed_flag_stays_clear():
    """A cache hit skips the upper entries, as on hardware (their A flags were
    set when they were cached); software clearing A without invalidation sees
    it stay clear until the next full walk."""
    m, a, cpu = machine()
    cpu.access(VA, "read")
    ea = a.entry_address(VA, 2)
    m.memory.write_u64(ea, m.memory.read_u64(ea) & ~ref.A)
    cpu.access(VA + 0x1000, "read")
    assert not m.memory.read_u64(ea) & ref.A
    cpu.invlpg(VA)
    cpu.access(VA + 0x2000, "read")
    assert m.memory.read_u64(ea) & ref.A


def test_a_fault_storm_replays_walks_exactly():
    """The walk memo: repeated faulting walks of the same pages count as walks
    and see every change of the page tables at once."""
    m, a, cpu = machine()
    cpu.cr4 = cpu.cr4 | ref.CR4_PKS
    cpu.wrmsr(MSR_PKRS, 0xFF << 2)                         # keys 1..4 AD|WD
    for _ in range(3):
        assert cpu.translate(VA + 0x1000, "read").error_code == pks_emu.PF_P | pks_emu.PF_PK
    c = cpu.counters()
    assert c["walks"] == 3 and c["page_faults"] == 3
    ea, e, _ = a.lookup(VA + 0x1000)
    m.memory.write_u64(ea, e & ~(0xF << 59))                # key 0, no invalidation needed:
    t = cpu.translate(VA + 0x1000, "read")                 # faults fill nothing
    assert t.ok and t.pkey == 0
    ea3 = a.entry_address(VA, 3)
    m.memory.write_u64(ea3, m.memory.read_u64(ea3) & ~1)    # PDPTE not present
    cpu.invlpg(VA + 0x2000)
    assert cpu.translate(VA + 0x2000, "read").error_code == 0


def test_permission_tables_follow_direct_register_loads():
    """load_cpu_state writes the registers directly and flushes: the tables
    of the fast path must follow."""
    from pks_emu._core import load_cpu_state
    m, a, cpu = machine()
    cpu.access(VA + 0x1000, "read")
    assert load_cpu_state(cpu, cpu.cr0, cpu.cr3, cpu.cr4 | ref.CR4_PKS, cpu.efer, 2, 0, 0,
                          0b1100) is None                   # key 1 AD|WD
    assert cpu.translate(VA + 0x1000, "read").error_code == pks_emu.PF_P | pks_emu.PF_PK


# --- properties --------------------------------------------------------------------------

PAGES = [VA + i * 0x1000 for i in range(4)] + [VA + 0x20_0000, 0x0000_1000_0000_0000]


def _build(levels, psc, seed_keys):
    m = pks_emu.Machine(paging_levels=levels)
    a = m.address_space()
    for i, va in enumerate(PAGES):
        a.map(va, PA + i * 0x1000, pkey=seed_keys[i], user=va < 1 << 63)
    a.activate()
    cpu = m.cpus[0]
    cpu.paging_structure_caches = psc
    cpu.cr4 = cpu.cr4 | ref.CR4_PKE | ref.CR4_PKS
    return m, a, cpu


def _words(m):
    words = {}
    for frame in m.memory.frame_addresses():
        data = m.memory.read(frame, 4096)
        for i in range(512):
            w = int.from_bytes(data[8 * i:8 * i + 8], "little")
            if w:
                words[frame + 8 * i] = w
    return words


STEP = st.one_of(
    st.tuples(st.just("access"), st.sampled_from(range(len(PAGES))), st.integers(0, 2),
              st.sampled_from([0, 8, 0xFF8]), st.sampled_from([1, 8, 16]), st.booleans()),
    st.tuples(st.just("pkrs"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("pkru"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("cr4"), st.sampled_from([ref.CR4_SMEP, ref.CR4_SMAP, ref.CR4_PKE,
                                               ref.CR4_PKS, 1 << 7])),
    st.tuples(st.just("wp")),
    st.tuples(st.just("nxe")),
    st.tuples(st.just("cpl"), st.sampled_from([0, 0, 3]), st.booleans()),
    st.tuples(st.just("invlpg"), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("cr3")),
    st.tuples(st.just("edit"), st.sampled_from(range(len(PAGES))), st.integers(1, 4),
              st.sampled_from([ref.P, ref.RW, ref.US, ref.XD, ref.A, 0xF << 59])),
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(levels=st.sampled_from([4, 5]), keys=st.lists(st.integers(0, 15), min_size=len(PAGES),
                                                      max_size=len(PAGES)),
       steps=st.lists(STEP, min_size=1, max_size=40))
def test_with_and_without_caches_the_core_matches_the_model(levels, keys, steps):
    cpus = []
    for psc in (True, False):
        m, a, cpu = _build(levels, psc, keys)
        cpus.append((m, a, cpu))
    model = ref.DictMemory(_words(cpus[0][0]))
    regs = Regs(cr3=cpus[0][2].cr3, cr4=cpus[0][2].cr4)
    for step in steps:
        kind = step[0]
        if kind == "access":
            _, page, k, off, size, implicit = step
            va = PAGES[page] + off
            want = ref.access(model, regs, va, k, size, implicit)
            for m, a, cpu in cpus:
                got = cpu.translate(va, k, size=size, implicit=implicit)
                assert got.ok == want.ok, (step, got, want)
                if want.ok:
                    assert got.pa == want.pa
                else:
                    assert got.vector == want.vector and (want.vector == 13 or (
                        got.error_code == want.error_code and got.address == want.address))
                # the A/D bits too
                assert all(m.memory.read_u64(ea) == w for ea, w in model.words.items())
            continue
        for m, a, cpu in cpus:
            if kind == "pkrs":
                cpu.cpl, cpl = 0, cpu.cpl
                cpu.wrmsr(MSR_PKRS, step[1])
                cpu.cpl = cpl
            elif kind == "pkru" and regs.cr4 & ref.CR4_PKE:
                cpu.wrpkru(step[1])
            elif kind in ("cr4", "wp", "nxe", "cr3"):
                cpu.cpl, cpl = 0, cpu.cpl
                if kind == "cr4":
                    cpu.cr4 = cpu.cr4 ^ step[1]
                elif kind == "wp":
                    cpu.cr0 = cpu.cr0 ^ ref.CR0_WP
                elif kind == "nxe":
                    cpu.efer = cpu.efer ^ ref.EFER_NXE
                else:
                    cpu.cr3 = cpu.cr3
                cpu.cpl = cpl
            elif kind == "cpl":
                cpu.cpl = step[1]
                cpu.rflags = 2 | (ref.RFLAGS_AC if step[2] else 0)
            elif kind == "invlpg":
                cpu.invlpg(step[1])
            elif kind == "edit":
                _, page, level, bit = step
                ea = a.entry_address(PAGES[page], level)
                if ea is None:
                    continue
                m.memory.write_u64(ea, m.memory.read_u64(ea) ^ bit)
                # the invalidation a kernel does: INVLPG for a PTE, a full
                # flush for an upper-level entry (other pages' TLB entries)
                if level == 1:
                    cpu.invlpg(PAGES[page])
                else:
                    cpu.flush_tlb()
        c0 = cpus[0][2]
        regs = regs.with_(cr0=c0.cr0, cr4=c0.cr4, efer=c0.efer, rflags=c0.rflags, cpl=c0.cpl,
                          pkru=c0.pkru, pkrs=c0.pkrs)
        if kind == "edit":
            model = ref.DictMemory(_words(cpus[0][0]))
    assert cpus[0][2].counters()["walks"] <= cpus[1][2].counters()["walks"]
