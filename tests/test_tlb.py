"""The per-CPU TLB (docs/rules.md §1.10, SDM §4.10): what flushes it, what
does not, stale translations and the opt-in stale-use check."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import (CR4_PGE, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP, EFER_NXE,
                               MSR_IA32_PKRS, PAGE_SIZE_1G, PAGE_SIZE_2M, PTE_A, PTE_D)
from refmodel import configure, outcome, pf

VA = 0xFFFF_C900_0000_0000          # 1-GiB aligned kernel address
UVA = 0x0000_5555_0000_0000
PA = 0x4000_0000
PA2 = 0x8000_0000


def setup(compat="sdm", size=4096, user=False, global_=False, pkey=2, ncpus=1):
    m = pks_emu.Machine(compat=compat, ncpus=ncpus)
    a = m.address_space()
    va = UVA if user else VA
    a.map(va, PA, size, user=user, pkey=pkey, global_=global_)
    a.activate()
    return m, a, m.cpus[0], va


def retarget(m, a, va, pa):
    """Point the leaf of ``va`` at ``pa`` without any invalidation."""
    ea, e, size = a.lookup(va)
    m.memory.write_u64(ea, (e & ~(((1 << 52) - 1) & ~(size - 1))) | pa)


# --- key registers do not flush -------------------------------------------------------

def test_wrmsr_pkrs_does_not_flush_and_next_access_sees_new_rights():
    m, a, cpu, va = setup()
    configure(cpu, pks=True)
    assert cpu.access(va, "read") == PA
    flushes, occupancy = cpu.counters()["tlb_flushes"], cpu.tlb_occupancy()
    cpu.wrmsr(MSR_IA32_PKRS, 1 << 4)                 # AD for key 2
    assert cpu.counters()["tlb_flushes"] == flushes
    assert cpu.tlb_occupancy() == occupancy
    hits = cpu.counters()["tlb_hits"]
    assert outcome(cpu, va, "read") == pf("P|PK")    # the live PKRS decides...
    assert cpu.counters()["tlb_hits"] == hits + 1    # ...on a TLB hit
    cpu.wrmsr(MSR_IA32_PKRS, 0)
    assert outcome(cpu, va, "read") == "ok"


def test_wrpkru_does_not_flush_and_next_access_sees_new_rights():
    m, a, cpu, va = setup(user=True)
    configure(cpu, pke=True, cpl=3)
    assert cpu.access(va, "write") == PA
    flushes = cpu.counters()["tlb_flushes"]
    cpu.wrpkru(2 << 4)                                # WD for key 2
    assert cpu.counters()["tlb_flushes"] == flushes
    hits, misses = cpu.counters()["tlb_hits"], cpu.counters()["tlb_misses"]
    assert outcome(cpu, va, "write") == pf("P|W|U|PK")     # decided on the TLB entry
    assert cpu.counters()["tlb_hits"] == hits + 1
    # SDM §4.10.4.1: the #PF invalidated the entry, so the read walks again.
    assert outcome(cpu, va, "read") == "ok"
    assert cpu.counters()["tlb_misses"] == misses + 1


def test_qemu_flushes_on_wrpkru_and_wrmsr_pkrs():
    """QEMU 7.2 helper_wrpkru and helper_wrmsr flush (documented in _registers.pxi)."""
    m, a, cpu, va = setup(compat="qemu")
    configure(cpu, pke=True)
    cpu.access(va, "read")
    n = cpu.counters()["tlb_flushes"]
    cpu.wrpkru(0)
    cpu.wrmsr(MSR_IA32_PKRS, 0)
    assert cpu.counters()["tlb_flushes"] == n + 2


# --- stale entries and INVLPG -------------------------------------------------------------

def test_pte_edit_without_flush_keeps_stale_translation():
    m, a, cpu, va = setup()
    assert cpu.access(va + 8, "read") == PA + 8
    retarget(m, a, va, PA2)
    assert cpu.access(va + 8, "read") == PA + 8      # stale, as hardware may do
    a.invalidate(va)
    assert cpu.access(va + 8, "read") == PA2 + 8


def test_unmap_and_key_change_without_flush_are_stale():
    m, a, cpu, va = setup()
    configure(cpu, pks=True, pkrs=3 << 2 * 7)         # key 7 denied
    cpu.access(va, "read")
    a.set_pkey(va, 7)
    assert outcome(cpu, va, "read") == "ok"           # cached key 2
    a.invalidate(va)
    assert outcome(cpu, va, "read") == pf("P|PK")
    a.set_pkey(va, 2)
    a.invalidate(va)
    cpu.access(va, "read")
    a.unmap(va)
    assert outcome(cpu, va, "read") == "ok"
    cpu.invlpg(va)
    assert outcome(cpu, va, "read") == 0


@pytest.mark.parametrize("size", [PAGE_SIZE_2M, PAGE_SIZE_1G], ids=["2M", "1G"])
def test_invlpg_anywhere_in_a_large_page_drops_it(size):
    m, a, cpu, va = setup(size=size)
    offsets = [0, 0x1000, size // 2 + 0x5000, size - 0x1000]   # distinct TLB slots
    for off in offsets:
        assert cpu.access(va + off, "read") == PA + off
    assert cpu.tlb_occupancy() == len(offsets)        # one entry per 4-KiB piece
    retarget(m, a, va, PA2)
    assert cpu.access(va + 0x1000, "read") == PA + 0x1000
    cpu.invlpg(va + size - 0x10)                      # an address in the last 4 KiB
    assert cpu.tlb_occupancy() == 0
    for off in offsets:
        assert cpu.access(va + off, "read") == PA2 + off


def test_invlpg_of_another_page_keeps_the_entry():
    m, a, cpu, va = setup()
    a.map(va + 0x1000, PA + 0x1000)
    cpu.access(va, "read")
    retarget(m, a, va, PA2)
    cpu.invlpg(va + 0x1000)
    cpu.invlpg(va + (1024 << 12))                     # same direct-mapped slot, other page
    assert cpu.access(va, "read") == PA
    assert cpu.counters()["invlpg"] == 2


def test_invlpg_drops_global_entries():
    m, a, cpu, va = setup(global_=True)
    configure(cpu, pge=True)
    cpu.access(va, "read")
    retarget(m, a, va, PA2)
    cpu.invlpg(va)
    assert cpu.access(va, "read") == PA2


# --- MOV to CR3 ------------------------------------------------------------------------------

@pytest.mark.parametrize("pge,compat,kept", [(True, "sdm", True), (False, "sdm", False),
                                             (True, "qemu", False)],
                         ids=["PGE=1 keeps global", "PGE=0 drops global", "qemu drops global"])
def test_cr3_reload_and_global_entries(pge, compat, kept):
    m, a, cpu, va = setup(compat=compat, global_=True)
    a.map(va + 0x1000, PA + 0x1000)                   # not global
    configure(cpu, pge=pge)
    cpu.access(va, "read")
    cpu.access(va + 0x1000, "read")
    retarget(m, a, va, PA2)
    retarget(m, a, va + 0x1000, PA2 + 0x1000)
    cpu.cr3 = cpu.cr3
    assert cpu.access(va, "read") == (PA if kept else PA2)
    assert cpu.access(va + 0x1000, "read") == PA2 + 0x1000


def test_cr3_switch_keeps_global_kernel_mapping():
    m, a, cpu, va = setup(global_=True)
    configure(cpu, pge=True)
    cpu.access(va, "read")
    b = m.address_space()                             # no mapping of va at all
    b.activate(cpu)
    assert cpu.access(va, "read") == PA               # the global entry survived
    cpu.flush_tlb()
    assert outcome(cpu, va, "read") == 0


# --- MOV to CR4 / EFER -------------------------------------------------------------------------

@pytest.mark.parametrize("bit", [CR4_PKE, CR4_PKS, CR4_SMEP, CR4_SMAP, CR4_PGE],
                         ids=["PKE", "PKS", "SMEP", "SMAP", "PGE"])
@pytest.mark.parametrize("compat", ["sdm", "qemu"])
def test_cr4_change_flush(bit, compat):
    m, a, cpu, va = setup(compat=compat)
    cpu.access(va, "read")
    retarget(m, a, va, PA2)
    cpu.cr4 = cpu.cr4 | bit
    flushed = not (compat == "qemu" and bit in (CR4_PKE, CR4_PKS))
    assert cpu.access(va, "read") == (PA2 if flushed else PA)


def test_cr4_write_without_change_does_not_flush():
    m, a, cpu, va = setup()
    cpu.access(va, "read")
    n = cpu.counters()["tlb_flushes"]
    cpu.cr4 = cpu.cr4
    assert cpu.counters()["tlb_flushes"] == n


@pytest.mark.parametrize("compat,want", [("sdm", pf("P|PK")), ("qemu", "ok")])
def test_qemu_keeps_the_stale_key_decision_after_cr4_pks(compat, want):
    """QEMU 7.2 caches the key decision and does not flush on CR4.PKS: the
    entry filled with PKS=0 keeps allowing the access."""
    m, a, cpu, va = setup(compat=compat)
    configure(cpu, pkrs=1 << 4)                        # AD for key 2, but PKS=0
    assert outcome(cpu, va, "read") == "ok"
    cpu.cr4 = cpu.cr4 | CR4_PKS
    assert outcome(cpu, va, "read") == want
    cpu.flush_tlb()
    assert outcome(cpu, va, "read") == pf("P|PK")


@pytest.mark.parametrize("compat,want", [("sdm", "ok"), ("qemu", "ok")])
def test_qemu_refills_when_the_stale_key_decision_denies(compat, want):
    """QEMU keeps a stale decision only while it allows the access: a cached
    entry that denies makes QEMU walk again (tlb_fill), and the fresh walk
    after CR4.PKE was cleared allows the read."""
    m, a, cpu, va = setup(compat=compat, user=True)
    configure(cpu, pke=True, pkru=1 << 4, cpl=3)      # AD for key 2
    assert outcome(cpu, va, "fetch") == "ok"           # fetches ignore keys: fills with PKE=1
    assert outcome(cpu, va, "read") == pf("P|U|PK")
    cpu.cpl = 0
    cpu.cr4 = cpu.cr4 & ~CR4_PKE                       # sdm flushes; qemu does not
    cpu.cpl = 3
    assert outcome(cpu, va, "read") == want


@pytest.mark.parametrize("compat,flushed", [("sdm", True), ("qemu", False)])
def test_efer_nxe_change(compat, flushed):
    m, a, cpu, va = setup(compat=compat)
    cpu.access(va, "read")
    retarget(m, a, va, PA2)
    cpu.efer = cpu.efer | EFER_NXE
    assert cpu.access(va, "read") == (PA2 if flushed else PA)


def test_cr0_wp_change_needs_no_flush_rights_are_live():
    m, a, cpu, va = setup()
    a.protect(va, writable=False)
    cpu.access(va, "read")
    assert outcome(cpu, va, "write") == "ok"           # WP=0: supervisor may write
    cpu.cr0 = cpu.cr0 | (1 << 16)
    assert outcome(cpu, va, "write") == pf("P|W")


# --- A/D through the TLB --------------------------------------------------------------------

def test_dirty_set_on_first_write_through_read_filled_entry():
    m, a, cpu, va = setup()
    cpu.access(va, "read")
    assert a.lookup(va)[1] & (PTE_A | PTE_D) == PTE_A
    misses = cpu.counters()["tlb_misses"]
    cpu.access(va, "write")
    assert a.lookup(va)[1] & (PTE_A | PTE_D) == PTE_A | PTE_D
    assert cpu.counters()["tlb_misses"] == misses + 1  # the write re-walked to set D
    cpu.access(va, "write")
    assert cpu.counters()["tlb_misses"] == misses + 1  # now a hit


def test_denied_write_through_read_filled_entry_sets_no_dirty():
    m, a, cpu, va = setup()
    a.protect(va, writable=False)
    configure(cpu, wp=True)
    cpu.access(va, "read")
    assert outcome(cpu, va, "write") == pf("P|W")
    assert not a.lookup(va)[1] & PTE_D


def test_tlb_hit_sets_no_accessed_bit():
    m, a, cpu, va = setup()
    cpu.access(va, "read")
    ea, e, _ = a.lookup(va)
    m.memory.write_u64(ea, e & ~PTE_A)                 # software clears A, no flush
    cpu.access(va, "read")
    assert not m.memory.read_u64(ea) & PTE_A


def test_non_leaf_accessed_bits_set_on_a_faulting_walk():
    """Documented design choice (_paging.pxi): A is set on a non-leaf entry once
    it passed its P/RSVD checks, even if the access then faults."""
    m, a, cpu, va = setup()
    a.unmap(va)
    for level in (4, 3, 2):
        ea = a.entry_address(va, level)
        m.memory.write_u64(ea, m.memory.read_u64(ea) & ~PTE_A)
    assert outcome(cpu, va, "read") == 0
    for level in (4, 3, 2):
        assert m.memory.read_u64(a.entry_address(va, level)) & PTE_A
    assert not m.memory.read_u64(a.entry_address(va, 1)) & PTE_A


def test_each_cpu_has_its_own_tlb():
    m, a, cpu0, va = setup(ncpus=2)
    cpu1 = m.cpus[1]
    cpu0.access(va, "read")
    cpu1.access(va, "read")
    retarget(m, a, va, PA2)
    cpu0.invlpg(va)
    assert cpu0.access(va, "read") == PA2
    assert cpu1.access(va, "read") == PA
    a.invalidate(va)                                   # all CPUs running this CR3
    assert cpu1.access(va, "read") == PA2


# --- the stale-use check --------------------------------------------------------------------

def test_stale_check_logs_stale_uses():
    m, a, cpu, va = setup()
    a.map(va + 0x1000, PA + 0x1000, pkey=4)
    cpu.stale_check = True
    assert cpu.stale_check
    cpu.access(va + 0x10, "read")
    cpu.access(va + 0x10, "read")                      # hit, tables unchanged: not stale
    assert cpu.stale_uses == [] and cpu.counters()["stale_uses"] == 0
    retarget(m, a, va, PA2)
    a.set_pkey(va, 9)
    cpu.access(va + 0x10, "read")
    cpu.access(va + 0x1000, "read")
    a.unmap(va + 0x1000)
    cpu.access(va + 0x1000, "read")
    log = cpu.stale_uses
    assert log == [
        {"va": va + 0x10, "cached_pa": PA, "cached_pkey": 2, "fresh_pa": PA2, "fresh_pkey": 9,
         "fresh_error": None},
        {"va": va + 0x1000, "cached_pa": PA + 0x1000, "cached_pkey": 4, "fresh_pa": None,
         "fresh_pkey": None, "fresh_error": 0},
    ]
    assert cpu.counters()["stale_uses"] == 2


def test_stale_check_is_side_effect_free_and_opt_in():
    m, a, cpu, va = setup()
    cpu.access(va, "read")
    retarget(m, a, va, PA2)
    cpu.access(va, "read")
    assert cpu.counters()["stale_uses"] == 0           # off by default
    cpu.stale_check = True
    walks = cpu.counters()["walks"]
    ea = a.lookup(va)[0]
    m.memory.write_u64(ea, m.memory.read_u64(ea) & ~PTE_A)
    assert cpu.access(va, "read") == PA                # still the stale translation
    assert cpu.counters()["walks"] == walks            # the check's walk is not counted
    assert not m.memory.read_u64(ea) & PTE_A           # and sets no A bit
    assert cpu.counters()["stale_uses"] == 1
    cpu.stale_check = False
    cpu.access(va, "read")
    assert cpu.counters()["stale_uses"] == 1


def test_stale_check_flags_rights_changes():
    m, a, cpu, va = setup()
    cpu.stale_check = True
    cpu.access(va, "read")
    a.protect(va, writable=False)
    cpu.access(va, "read")
    assert len(cpu.stale_uses) == 1
    assert cpu.stale_uses[0]["fresh_pa"] == PA


def test_translation_reports_the_key_of_this_access_on_a_tlb_hit():
    m, a, cpu, va = setup(pkey=2)
    a.map(va + 0x1000, PA + 0x1000, pkey=3)
    assert cpu.translate(va, "read").pkey == 2
    assert cpu.translate(va + 0x1000, "read").pkey == 3
    hits = cpu.counters()["tlb_hits"]
    assert cpu.translate(va, "read").pkey == 2          # a hit must not report the last key
    assert cpu.counters()["tlb_hits"] == hits + 1


@pytest.mark.parametrize("compat", ["sdm", "qemu"])
def test_spurious_fault_from_a_stale_entry_happens_once(compat):
    """SDM §4.10.4.1: a #PF invalidates the faulting address's TLB entries.
    The PTE is made writable without INVLPG: the SDM CPU faults once on the
    stale read-only entry, then walks and succeeds; QEMU walks again before
    faulting, so it never faults."""
    import pks_emu
    from pks_emu.constants import CR0_WP, PTE_A, PTE_D, PTE_P, PTE_RW
    m = pks_emu.Machine(compat=compat)
    a = m.address_space()
    va = 0x40_0000_0000
    a.map(va, 0x5000, prot=PTE_P | PTE_A | PTE_D)        # read-only, D already set
    a.activate()
    cpu = m.cpus[0]
    cpu.cr0 = cpu.cr0 | CR0_WP
    cpu.access(va, "read")                                # cached read-only
    ea, e, _ = a.lookup(va)
    m.memory.write_u64(ea, e | PTE_RW)                    # no INVLPG
    first = cpu.translate(va, "write")
    second = cpu.translate(va, "write")
    if compat == "sdm":
        assert not first.ok and first.error_code == pks_emu.PF_P | pks_emu.PF_W
    else:
        assert first.ok
    assert second.ok and second.pa == 0x5000


@pytest.mark.parametrize("compat", ["sdm", "qemu"])
def test_a_faulting_write_through_a_clean_entry_drops_it(compat):
    """A write through a D=0 entry misses and walks; when that walk faults,
    the #PF invalidates the entry the reads were using (SDM §4.10.4.1), so
    the next read walks too. QEMU keeps its read entry when a refill faults."""
    m, a, cpu, va = setup(compat=compat)
    a.protect(va, writable=False)
    configure(cpu, wp=True)
    cpu.access(va, "read")                               # a D=0 entry, readable
    assert outcome(cpu, va, "write") == pf("P|W")
    hits, misses = cpu.counters()["tlb_hits"], cpu.counters()["tlb_misses"]
    assert outcome(cpu, va, "read") == "ok"
    dropped = compat == "sdm"
    assert cpu.counters()["tlb_misses"] == misses + dropped
    assert cpu.counters()["tlb_hits"] == hits + (not dropped)


@pytest.mark.parametrize("compat", ["sdm", "qemu"])
def test_a_stale_clean_entry_is_gone_after_the_write_fault(compat):
    """The page is unmapped without INVLPG: reads keep using the stale D=0
    entry until a write walks, finds P=0 and faults; that fault drops the
    entry, so the next read faults too (SDM). QEMU's read entry stays."""
    m, a, cpu, va = setup(compat=compat)
    cpu.access(va, "read")
    ea, e, _ = a.lookup(va)
    m.memory.write_u64(ea, 0)                            # not present, no INVLPG
    assert outcome(cpu, va, "read") == "ok"              # stale, still cached
    assert outcome(cpu, va, "write") == pf("W")
    assert outcome(cpu, va, "read") == (pf("") if compat == "sdm" else "ok")


@pytest.mark.parametrize("size", [PAGE_SIZE_2M, PAGE_SIZE_1G])
def test_a_faulting_walk_in_a_large_page_drops_its_other_pieces(size):
    """The pieces of a large page cached for other 4-KiB pages are entries
    for the faulting address too (SDM §4.10.4.1)."""
    m, a, cpu, va = setup(size=size)
    a.protect(va, writable=False)
    configure(cpu, wp=True)
    other = va + 5 * 4096
    cpu.access(other, "read")                            # one piece, D=0
    assert outcome(cpu, va, "write") == pf("P|W")        # a miss in va's slot
    misses = cpu.counters()["tlb_misses"]
    assert outcome(cpu, other, "read") == "ok"
    assert cpu.counters()["tlb_misses"] == misses + 1
