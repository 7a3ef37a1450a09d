"""#PF error-code bits and precedence (docs/rules.md §1.7, §1.8, SDM §4.7), reserved
bits (SDM §4.5), leaf sizes, paging depths, canonical addresses and accesses
that cross a page boundary."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import PAGE_SIZE, PAGE_SIZE_1G, PAGE_SIZE_2M, PTE_A, PTE_D, PTE_P
from refmodel import configure, outcome, pf

KEY = 9
DENY_ALL = 0xFFFFFFFF
VA = 0x0000_0040_0000_0000          # 1-GiB aligned, so every leaf size fits
PA = 0x0000_0008_0000_0000          # 1-GiB aligned
LEVEL_IDS = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


def machine(levels=4, compat="sdm", features=pks_emu.ALL_FEATURES, maxphyaddr=52,
            size=PAGE_SIZE, user=False, **map_kw):
    m = pks_emu.Machine(paging_levels=levels, compat=compat, features=features,
                        maxphyaddr=maxphyaddr)
    a = m.address_space()
    a.map(VA, PA, size, user=user, pkey=KEY, **map_kw)
    cpu = m.cpus[0]
    a.activate(cpu)
    return m, a, cpu


def edit(m, ea, set_=0, clear=0):
    m.memory.write_u64(ea, (m.memory.read_u64(ea) | set_) & ~clear)


# --- P=0: no PK, no RSVD (precedence rule 1) ---------------------------------

@pytest.mark.parametrize("levels,level", [(4, 4), (4, 3), (4, 2), (4, 1), (5, 5), (5, 1)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("access,kind,want", [
    ("user read", "read", "U"),
    ("user write", "write", "W|U"),
    ("supervisor write", "write", "W"),
])
def test_not_present_carries_no_pk(levels, level, access, kind, want):
    m, a, cpu = machine(levels, user=True)
    edit(m, a.entry_address(VA, level), clear=PTE_P)
    configure(cpu, cpl=3 if access.startswith("user") else 0, pke=True, pks=True,
              pkru=DENY_ALL, pkrs=DENY_ALL, wp=True)
    with pytest.raises(pks_emu.PageFault) as ei:
        cpu.access(VA, kind)
    assert ei.value.error_code == pf(want)
    assert ei.value.address == VA
    assert ei.value.pkey is None       # the walk never reached a leaf


def test_not_present_entry_with_reserved_bits_is_not_present():
    """RSVD is reported only if P=1 (SDM §4.7)."""
    m, a, cpu = machine(maxphyaddr=40)
    edit(m, a.entry_address(VA, 1), set_=1 << 45, clear=PTE_P)
    assert outcome(cpu, VA, "read") == 0


def test_reserved_bit_above_not_present_lower_level_reports_rsvd():
    """The walk checks each level in turn: a reserved bit in the PDE comes first."""
    m, a, cpu = machine(maxphyaddr=40)
    edit(m, a.entry_address(VA, 2), set_=1 << 41)
    edit(m, a.entry_address(VA, 1), clear=PTE_P)
    assert outcome(cpu, VA, "read") == pf("P|RSVD")


# --- reserved bits: P|RSVD, never PK (precedence rule 2) -----------------------

def _rsvd_case(id_, levels=4, level=1, bit=None, size=PAGE_SIZE, maxphyaddr=52,
               features=pks_emu.ALL_FEATURES, nxe=True, want="P|RSVD", compat="sdm"):
    return pytest.param(levels, level, bit, size, maxphyaddr, features, nxe, want, compat, id=id_)


RSVD_CASES = [
    *[_rsvd_case(f"bit 45 > MAXPHYADDR 40 in {LEVEL_IDS[lv]}", level=lv, bit=45, maxphyaddr=40)
      for lv in (4, 3, 2, 1)],
    _rsvd_case("bit 51 > MAXPHYADDR 46 in PML5E", levels=5, level=5, bit=51, maxphyaddr=46),
    *[_rsvd_case(f"XD without NXE in {LEVEL_IDS[lv]}", level=lv, bit=63, nxe=False)
      for lv in (4, 3, 2, 1)],
    _rsvd_case("XD with NXE is not reserved", level=1, bit=63, nxe=True, want="ok"),
    _rsvd_case("PS in PML4E", level=4, bit=7),
    _rsvd_case("PS in PML5E", levels=5, level=5, bit=7),
    _rsvd_case("PDPTE.PS without the 1g feature", level=3, size=PAGE_SIZE_1G,
               features=pks_emu.ALL_FEATURES - {"1g"}),
    _rsvd_case("PDPTE.PS without 1g, qemu: a 1G page", level=3, size=PAGE_SIZE_1G,
               features=pks_emu.ALL_FEATURES - {"1g"}, compat="qemu", want="ok"),
    _rsvd_case("1G leaf bit 13", level=3, bit=13, size=PAGE_SIZE_1G),
    _rsvd_case("1G leaf bit 29", level=3, bit=29, size=PAGE_SIZE_1G),
    _rsvd_case("1G leaf bit 12 (PAT) allowed", level=3, bit=12, size=PAGE_SIZE_1G, want="ok"),
    _rsvd_case("2M leaf bit 13", level=2, bit=13, size=PAGE_SIZE_2M),
    _rsvd_case("2M leaf bit 20", level=2, bit=20, size=PAGE_SIZE_2M),
    _rsvd_case("2M leaf bit 12 (PAT) allowed", level=2, bit=12, size=PAGE_SIZE_2M, want="ok"),
    _rsvd_case("PTE bit 7 (PAT) allowed", level=1, bit=7, want="ok"),
    _rsvd_case("non-leaf PDE bits 62:52 ignored", level=2, bit=55, want="ok"),
    _rsvd_case("leaf bits 58:52 ignored", level=1, bit=52, want="ok"),
    _rsvd_case("qemu: RSVD without P", level=1, bit=45, maxphyaddr=40, compat="qemu", want="RSVD"),
    _rsvd_case("qemu: XD without NXE, RSVD without P", level=2, bit=63, nxe=False, compat="qemu",
               want="RSVD"),
]


@pytest.mark.parametrize("levels,level,bit,size,maxphyaddr,features,nxe,want,compat", RSVD_CASES)
def test_reserved_bits(levels, level, bit, size, maxphyaddr, features, nxe, want, compat):
    m, a, cpu = machine(levels, compat=compat, features=features, maxphyaddr=maxphyaddr, size=size)
    leaf_level = {PAGE_SIZE: 1, PAGE_SIZE_2M: 2, PAGE_SIZE_1G: 3}[size]
    ea = a.entry_address(VA, level)
    if bit is not None:
        edit(m, ea, set_=1 << bit)
    # Keys that deny everything: a reserved-bit fault still carries no PK.
    configure(cpu, nxe=nxe and "nx" in features, pke=True, pks=True, pkru=DENY_ALL,
              pkrs=DENY_ALL if want != "ok" else 0)
    got = outcome(cpu, VA + 0x123, "read")
    if want == "ok":
        assert got == "ok"
        t = cpu.translate(VA + 0x123, "read")
        assert t.pa == PA + 0x123               # PAT / ignored bits do not move the frame
        assert level != leaf_level or t.pkey == KEY
    else:
        assert got == pf(want)
        with pytest.raises(pks_emu.PageFault) as ei:
            cpu.access(VA + 0x123, "write")
        assert ei.value.error_code == pf(want) | pf("W")
        assert ei.value.pkey is None


def test_reserved_bit_fault_of_a_fetch_reports_i_d():
    m, a, cpu = machine(maxphyaddr=40)
    edit(m, a.entry_address(VA, 1), set_=1 << 44)
    configure(cpu, smep=True, cpl=3)
    assert outcome(cpu, VA, "fetch") == pf("P|RSVD|U|I")


# --- PK whenever the key denies (precedence rule 3) ------------------------------

@pytest.mark.parametrize("cpl,user_page,kind,state,want", [
    pytest.param(3, True, "write", dict(pke=True, pkru=1 << 2 * KEY), "P|W|U|PK",
                 id="U write RW=0 and ADu -> PK"),
    pytest.param(0, False, "write", dict(pks=True, pkrs=2 << 2 * KEY, wp=True), "P|W|PK",
                 id="Se write RW=0 WP=1 and WDs -> PK"),
    pytest.param(0, True, "read", dict(smap=True, pke=True, pkru=1 << 2 * KEY), "P|PK",
                 id="Se read UP SMAP AC=0 and ADu -> PK"),
    pytest.param(3, False, "read", dict(pks=True, pkrs=1 << 2 * KEY), "P|U|PK",
                 id="U read SP and ADs -> PK (sdm)"),
])
def test_pk_even_when_rights_also_fail(cpl, user_page, kind, state, want):
    m, a, cpu = machine(user=user_page, writable=False)
    configure(cpu, cpl=cpl, **state)
    with pytest.raises(pks_emu.PageFault) as ei:
        cpu.access(VA, kind)
    assert ei.value.error_code == pf(want)
    assert ei.value.pkey == KEY
    # Without the key denial the same access still faults, without PK.
    configure(cpu, cpl=cpl, **{k: v for k, v in state.items() if k not in ("pkru", "pkrs")})
    assert outcome(cpu, VA, kind) == pf(want) & ~pf("PK")


# --- I/D only with SMEP or NXE ---------------------------------------------------

@pytest.mark.parametrize("smep,nxe,want_i", [(False, False, False), (True, False, True),
                                             (False, True, True), (True, True, True)],
                         ids=["SMEP=0 NXE=0", "SMEP=1 NXE=0", "SMEP=0 NXE=1", "SMEP=1 NXE=1"])
def test_i_d_bit_only_with_smep_or_nxe(smep, nxe, want_i):
    m, a, cpu = machine(user=False)
    configure(cpu, cpl=3, smep=smep, nxe=nxe)
    code = outcome(cpu, VA, "fetch")               # U fetch of a supervisor page
    assert code == pf("P|U") | (pf("I") if want_i else 0)
    # not-present fetches get I/D by the same rule
    assert outcome(cpu, VA + (1 << 30), "fetch") == pf("U") | (pf("I") if want_i else 0)


def test_i_d_never_on_data_accesses():
    m, a, cpu = machine(user=False)
    configure(cpu, cpl=3, smep=True, nxe=True)
    assert outcome(cpu, VA, "read") == pf("P|U")
    assert outcome(cpu, VA, "write") == pf("P|W|U")


# --- U/S and W/R describe the access ------------------------------------------------

def test_u_s_comes_from_the_access_not_the_page():
    m, a, cpu = machine(user=True)
    configure(cpu, cpl=0, smap=True)               # supervisor access to a user page
    assert outcome(cpu, VA, "read") == pf("P")
    m2, a2, cpu2 = machine(user=False)
    configure(cpu2, cpl=3)                         # user access to a supervisor page
    assert outcome(cpu2, VA, "read") == pf("P|U")


@pytest.mark.parametrize("cpl", [0, 1, 2, 3])
def test_implicit_access_is_supervisor_at_any_cpl(cpl):
    m, a, cpu = machine(user=False)
    configure(cpu, cpl=cpl, pks=True, pkrs=1 << 2 * KEY)
    assert outcome(cpu, VA, "read", implicit=True) == pf("P|PK")
    assert outcome(cpu, VA, "write", implicit=True) == pf("P|W|PK")
    want_u = pf("U") if cpl == 3 else 0
    assert outcome(cpu, VA, "read") == pf("P|PK") | want_u


@pytest.mark.parametrize("cpl", [1, 2])
def test_cpl_1_and_2_are_supervisor_mode(cpl):
    m, a, cpu = machine(user=False)
    configure(cpu, cpl=cpl)
    assert outcome(cpu, VA, "read") == "ok"


# --- leaves of each size, both depths -----------------------------------------------

@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize("size", [PAGE_SIZE, PAGE_SIZE_2M, PAGE_SIZE_1G], ids=["4K", "2M", "1G"])
def test_leaf_sizes_translate_and_carry_the_key(levels, size):
    m, a, cpu = machine(levels, size=size, user=True)
    offset = size - 8
    assert cpu.access(VA + offset, "read") == PA + offset
    t = cpu.translate(VA + offset, "read")
    assert t.pkey == KEY
    configure(cpu, cpl=3, pke=True, pkru=1 << 2 * KEY)
    assert outcome(cpu, VA + offset, "read") == pf("P|U|PK")
    assert outcome(cpu, VA + size, "read") == pf("U")          # next page: not mapped


def test_key_bits_of_non_leaf_entries_are_ignored():
    m, a, cpu = machine(user=False)
    for level in (4, 3, 2):
        edit(m, a.entry_address(VA, level), set_=0xF << 59)    # key 15 in non-leaf entries
    configure(cpu, pks=True, pkrs=3 << 2 * 15)                 # deny key 15
    assert outcome(cpu, VA, "read") == "ok"
    assert cpu.translate(VA, "read").pkey == KEY


def test_five_level_uses_the_pml5e():
    m, a, cpu = machine(5)
    va57 = 0x00AB_0000_0000_0000
    a.map(va57, 0x7000, pkey=3)
    assert cpu.access(va57 + 5, "read") == 0x7005
    edit(m, a.entry_address(va57, 5), clear=PTE_P)
    cpu.flush_tlb()
    assert outcome(cpu, va57, "read") == 0
    assert outcome(cpu, VA, "read") == "ok"                    # a different PML5E


# --- canonical addresses ---------------------------------------------------------------

@pytest.mark.parametrize("levels,va,size,want", [
    (4, 0x0000_8000_0000_0000, 1, "#GP"),
    (4, 0xFFFF_7FFF_FFFF_F000, 1, "#GP"),
    (4, 0x00FF_FFFF_FFFF_F000, 1, "#GP"),
    (4, 0x0000_7FFF_FFFF_F000, 1, 0),
    (4, 0xFFFF_8000_0000_0000, 1, 0),
    (4, 0x0000_7FFF_FFFF_FFFC, 8, "#GP"),     # crosses into non-canonical
    (4, 0x0000_7FFF_FFFF_FFF8, 8, 0),
    (5, 0x0000_8000_0000_0000, 1, 0),         # canonical with 57 bits
    (5, 0x0100_0000_0000_0000, 1, "#GP"),
    (5, 0xFEFF_FFFF_FFFF_F000, 1, "#GP"),
    (5, 0xFF00_0000_0000_0000, 1, 0),
    (5, 0x00FF_FFFF_FFFF_FFFC, 8, "#GP"),     # crosses into non-canonical
    (4, 0xFFFF_FFFF_FFFF_FFFC, 8, "#GP"),     # wraps past 2**64
], ids=lambda v: hex(v) if isinstance(v, int) and v > 8 else str(v))
def test_canonical(levels, va, size, want):
    m, a, cpu = machine(levels)
    got = outcome(cpu, va, "read", size=size)
    assert got == want
    if want == "#GP":
        with pytest.raises(pks_emu.GeneralProtectionFault):
            cpu.access(va, "write", size=size)
        assert cpu.counters()["gp_faults"] == 2
        assert cpu.counters()["page_faults"] == 0


def test_non_canonical_is_gp_even_when_the_first_page_is_mapped():
    m, a, cpu = machine(4)
    a.map(0x0000_7FFF_FFFF_F000, 0x9000)
    assert cpu.access(0x0000_7FFF_FFFF_FFF8, "read", size=8) == 0x9FF8
    assert outcome(cpu, 0x0000_7FFF_FFFF_FFFC, "read", size=8) == "#GP"


# --- accesses that cross a 4-KiB boundary --------------------------------------------------

def test_crossing_access_both_pages_mapped():
    m, a, cpu = machine()
    a.map(VA + PAGE_SIZE, PA + 0x10 * PAGE_SIZE, pkey=KEY)
    assert cpu.access(VA + PAGE_SIZE - 4, "write", size=8) == PA + PAGE_SIZE - 4
    # both leaves are dirty now
    for page in (VA, VA + PAGE_SIZE):
        assert a.lookup(page)[1] & (PTE_A | PTE_D) == PTE_A | PTE_D


def test_crossing_access_second_page_not_present():
    m, a, cpu = machine()
    with pytest.raises(pks_emu.PageFault) as ei:
        cpu.access(VA + PAGE_SIZE - 2, "write", size=4)
    assert ei.value.address == VA + PAGE_SIZE          # CR2: the first byte of the second page
    assert ei.value.error_code == pf("W")
    # the first page was accessed and written before the fault
    assert a.lookup(VA)[1] & (PTE_A | PTE_D) == PTE_A | PTE_D


def test_crossing_access_second_page_key_denied():
    m, a, cpu = machine()
    a.map(VA + PAGE_SIZE, PA + PAGE_SIZE, pkey=KEY + 1)
    configure(cpu, pks=True, pkrs=1 << 2 * (KEY + 1))
    t = cpu.translate(VA + PAGE_SIZE - 1, "read", size=2)
    assert (t.ok, t.error_code, t.address, t.pkey) == (False, pf("P|PK"), VA + PAGE_SIZE, KEY + 1)


def test_crossing_access_first_page_faults_reports_va():
    m, a, cpu = machine()
    a.map(VA + PAGE_SIZE, PA + PAGE_SIZE)
    a.unmap(VA)
    t = cpu.translate(VA + PAGE_SIZE - 3, "read", size=8)
    assert (t.error_code, t.address) == (0, VA + PAGE_SIZE - 3)


def test_crossing_between_large_pages():
    m, a, cpu = machine(size=PAGE_SIZE_2M)
    a.map(VA + PAGE_SIZE_2M, PA + 4 * PAGE_SIZE_2M, PAGE_SIZE_2M, writable=False)
    configure(cpu, wp=True)
    t = cpu.translate(VA + PAGE_SIZE_2M - 8, "write", size=16)
    assert (t.error_code, t.address) == (pf("P|W"), VA + PAGE_SIZE_2M)
    assert cpu.access(VA + PAGE_SIZE_2M - 8, "read", size=16) == PA + PAGE_SIZE_2M - 8


def test_access_size_is_validated():
    m, a, cpu = machine()
    for bad in (0, 4097):
        with pytest.raises(ValueError, match="size"):
            cpu.access(VA, "read", size=bad)
    with pytest.raises(ValueError, match="kind"):
        cpu.access(VA, "execute")
    with pytest.raises(ValueError, match="kind"):
        cpu.access(VA, 3)


def test_page_fault_exception_fields():
    m, a, cpu = machine(user=True)
    configure(cpu, cpl=3, pke=True, pkru=2 << 2 * KEY)
    with pytest.raises(pks_emu.PageFault) as ei:
        cpu.access(VA + 0x40, pks_emu.AccessKind.WRITE)
    e = ei.value
    assert (e.vector, e.address, e.error_code, e.pkey, e.cpu) == (14, VA + 0x40, pf("P|W|U|PK"), KEY, 0)
    assert "PK" in str(e) and "pkey 9" in str(e)


@pytest.mark.parametrize("maxphyaddr", [52, 46])
def test_frame_bits_up_to_maxphyaddr_are_address_bits(maxphyaddr):
    m, a, cpu = machine(maxphyaddr=maxphyaddr)
    top = 1 << (maxphyaddr - 1)
    edit(m, a.entry_address(VA, 1), set_=top)
    assert cpu.access(VA + 8, "read") == PA + top + 8
