"""One test per row of the decision tables of docs/rules.md §1.6 (in full: docs/semantics.md).

Each case maps a user page (UP) and a supervisor page (SP) with key 5, puts
the CPU in the row's state and checks the outcome ("ok" or the exact #PF error
code). Access kinds: U = CPL 3; Se = explicit at CPL 0; Si = implicit at CPL 0;
Si3 = implicit at CPL 3 (still a supervisor-mode access, SDM §4.6.1).
The expected values are written by hand from the tables, not computed.
"""
from __future__ import annotations

import pytest

import pks_emu
from refmodel import configure, outcome, pf

KEY = 5
AD = 1 << (2 * KEY)          # PKR_AD_KEY(5)
WD = 2 << (2 * KEY)          # PKR_WD_KEY(5)
DENY_ALL = 0xFFFFFFFF        # AD and WD for every key
VA_UP = 0x0000_7F00_0040_0000
VA_SP = 0xFFFF_8880_0020_0000
PA_UP = 0x1234_5000
PA_SP = 0x2345_6000

ACCESS = {"U": (3, False), "Se": (0, False), "Si": (0, True), "Si3": (3, True)}


def run(access: str, page: str, kind: str, *, compat: str = "sdm", rw: bool = True,
        xd: bool = False, **state):
    m = pks_emu.Machine(compat=compat)
    a = m.address_space()
    a.map(VA_UP, PA_UP, user=True, writable=rw, nx=xd, pkey=KEY)
    a.map(VA_SP, PA_SP, user=False, writable=rw, nx=xd, pkey=KEY)
    cpu = m.cpus[0]
    a.activate(cpu)
    cpl, implicit = ACCESS[access]
    configure(cpu, cpl=cpl, **state)
    va = VA_UP if page == "UP" else VA_SP
    result = outcome(cpu, va + 0x18, kind, implicit=implicit)
    if result == "ok":
        # the physical address must be the mapped frame + offset
        t = cpu.translate(va + 0x18, kind, implicit=implicit)
        assert t.pa == (PA_UP if page == "UP" else PA_SP) + 0x18
        assert t.pkey == KEY
    return result


def case(row_id, access, page, expected, **state):
    return pytest.param(access, page, expected, state, id=row_id)


def check(access, page, kind, expected, state):
    got = run(access, page, kind, **state)
    want = expected if expected == "ok" else pf(expected)
    assert got == want, (f"{access} {kind} of {page} with {state}: got "
                         f"{got if got == 'ok' else pks_emu.pf_error_code_str(got)}, want {expected}")


# --- Data reads ---------------------------------------------------------------

READS = [
    # U UP: always; key rule PKEon => ADu=0
    case("U-UP: allowed", "U", "UP", "ok"),
    case("U-UP: PKE=1 ADu=1 -> PK", "U", "UP", "P|U|PK", pke=True, pkru=AD),
    case("U-UP: PKE=1 WDu=1 does not block reads", "U", "UP", "ok", pke=True, pkru=WD),
    case("U-UP: PKE=0 ignores ADu", "U", "UP", "ok", pke=False, pkru=AD),
    case("U-UP: PKRS does not apply to a user page", "U", "UP", "ok", pks=True, pkrs=DENY_ALL),
    case("U-UP: ADu of another key does not apply", "U", "UP", "ok", pke=True, pkru=DENY_ALL & ~(3 << 2 * KEY)),
    # U SP: never; PK only from the key rule (PKRS)
    case("U-SP: never", "U", "SP", "P|U"),
    case("U-SP: PKS=1 ADs=1 -> PK too (sdm)", "U", "SP", "P|U|PK", pks=True, pkrs=AD),
    case("U-SP: PKS=1 ADs=1, qemu -> no PK", "U", "SP", "P|U", pks=True, pkrs=AD, compat="qemu"),
    case("U-SP: PKS=0 ignores ADs", "U", "SP", "P|U", pkrs=AD),
    # Se SP: always; PKSon => ADs=0
    case("Se-SP: allowed", "Se", "SP", "ok"),
    case("Se-SP: PKS=1 ADs=1 -> PK", "Se", "SP", "P|PK", pks=True, pkrs=AD),
    case("Se-SP: PKS=1 WDs=1 does not block reads", "Se", "SP", "ok", pks=True, pkrs=WD, wp=True),
    case("Se-SP: PKS=0 ignores ADs", "Se", "SP", "ok", pkrs=AD),
    case("Se-SP: PKRU does not apply to a supervisor page", "Se", "SP", "ok", pke=True, pkru=DENY_ALL),
    # Si SP: always; PKSon => ADs=0
    case("Si-SP: allowed", "Si", "SP", "ok"),
    case("Si-SP: PKS=1 ADs=1 -> PK", "Si", "SP", "P|PK", pks=True, pkrs=AD),
    case("Si3-SP: implicit at CPL3 allowed", "Si3", "SP", "ok"),
    case("Si3-SP: PKS=1 ADs=1 -> PK, U=0", "Si3", "SP", "P|PK", pks=True, pkrs=AD),
    # Se UP: SMAP=0 always; SMAP=1 only with AC=1; PKEon => ADu=0
    case("Se-UP: SMAP=0 allowed", "Se", "UP", "ok"),
    case("Se-UP: SMAP=1 AC=1 allowed", "Se", "UP", "ok", smap=True, ac=True),
    case("Se-UP: SMAP=1 AC=0 -> fault", "Se", "UP", "P", smap=True),
    case("Se-UP: SMAP=0 PKE=1 ADu=1 -> PK", "Se", "UP", "P|PK", pke=True, pkru=AD),
    case("Se-UP: SMAP=1 AC=1 PKE=1 ADu=1 -> PK", "Se", "UP", "P|PK", smap=True, ac=True, pke=True, pkru=AD),
    case("Se-UP: SMAP=1 AC=0 PKE=1 ADu=1 -> PK and SMAP", "Se", "UP", "P|PK", smap=True, pke=True, pkru=AD),
    case("Se-UP: PKRU chosen by address type, not PKRS", "Se", "UP", "ok", pks=True, pkrs=DENY_ALL),
    # Si UP: SMAP=0 always; SMAP=1 never
    case("Si-UP: SMAP=0 allowed", "Si", "UP", "ok"),
    case("Si-UP: SMAP=1 AC=0 -> fault", "Si", "UP", "P", smap=True),
    case("Si-UP: SMAP=1 AC=1 -> fault (sdm)", "Si", "UP", "P", smap=True, ac=True),
    case("Si-UP: SMAP=1 AC=1 CPL0, qemu -> allowed", "Si", "UP", "ok", smap=True, ac=True, compat="qemu"),
    case("Si3-UP: SMAP=1 AC=1 CPL3, qemu -> fault", "Si3", "UP", "P", smap=True, ac=True, compat="qemu"),
    case("Si3-UP: SMAP=1 AC=1 CPL3 -> fault, U=0", "Si3", "UP", "P", smap=True, ac=True),
    case("Si-UP: SMAP=0 PKE=1 ADu=1 -> PK", "Si", "UP", "P|PK", pke=True, pkru=AD),
]


@pytest.mark.parametrize("access,page,expected,state", READS)
def test_data_read(access, page, expected, state):
    check(access, page, "read", expected, state)


# --- Data writes --------------------------------------------------------------

WRITES = [
    # U UP: RW_all; PKEon => ADu=0 and WDu=0
    case("U-UP: RW=1 allowed", "U", "UP", "ok"),
    case("U-UP: RW=0 -> fault", "U", "UP", "P|W|U", rw=False),
    case("U-UP: RW=0 with WP=0 still faults", "U", "UP", "P|W|U", rw=False, wp=False),
    case("U-UP: PKE=1 ADu=1 -> PK", "U", "UP", "P|W|U|PK", pke=True, pkru=AD),
    case("U-UP: PKE=1 WDu=1 -> PK even with WP=0", "U", "UP", "P|W|U|PK", pke=True, pkru=WD, wp=False),
    case("U-UP: PKE=1 WDu=1 and RW=0 -> PK", "U", "UP", "P|W|U|PK", pke=True, pkru=WD, rw=False),
    case("U-UP: PKE=0 ignores WDu", "U", "UP", "ok", pkru=WD),
    # U SP: never
    case("U-SP: never", "U", "SP", "P|W|U"),
    case("U-SP: PKS=1 WDs=1 -> PK too (sdm, user write)", "U", "SP", "P|W|U|PK", pks=True, pkrs=WD),
    case("U-SP: PKS=1 ADs=1, qemu -> no PK", "U", "SP", "P|W|U", pks=True, pkrs=AD, compat="qemu"),
    # Se or Si SP: WP=0 always, WP=1 RW_all; PKSon => ADs=0 and (WP=0 or WDs=0)
    case("Se-SP: WP=0 RW=0 allowed", "Se", "SP", "ok", rw=False),
    case("Se-SP: WP=1 RW=0 -> fault", "Se", "SP", "P|W", rw=False, wp=True),
    case("Se-SP: WP=1 RW=1 allowed", "Se", "SP", "ok", wp=True),
    case("Se-SP: PKS=1 ADs=1 WP=0 -> PK", "Se", "SP", "P|W|PK", pks=True, pkrs=AD),
    case("Se-SP: PKS=1 WDs=1 WP=0 allowed", "Se", "SP", "ok", pks=True, pkrs=WD),
    case("Se-SP: PKS=1 WDs=1 WP=1 -> PK", "Se", "SP", "P|W|PK", pks=True, pkrs=WD, wp=True),
    case("Se-SP: PKS=1 WDs=1 WP=1 RW=0 -> PK", "Se", "SP", "P|W|PK", pks=True, pkrs=WD, wp=True, rw=False),
    case("Se-SP: PKS=0 ignores ADs", "Se", "SP", "ok", pkrs=AD, wp=True),
    case("Si-SP: WP=0 RW=0 allowed", "Si", "SP", "ok", rw=False),
    case("Si-SP: WP=1 RW=0 -> fault", "Si", "SP", "P|W", rw=False, wp=True),
    case("Si-SP: PKS=1 WDs=1 WP=1 -> PK", "Si", "SP", "P|W|PK", pks=True, pkrs=WD, wp=True),
    case("Si3-SP: WP=1 RW=0 -> fault, U=0", "Si3", "SP", "P|W", rw=False, wp=True),
    case("Si3-SP: PKS=1 WDs=1 WP=0 allowed (supervisor)", "Si3", "SP", "ok", pks=True, pkrs=WD),
    case("Si3-SP: PKS=1 WDs=1 WP=1 -> PK, U=0", "Si3", "SP", "P|W|PK", pks=True, pkrs=WD, wp=True),
    # Se UP: SMAP=1 and AC=0 never; else WP=0 always, WP=1 RW_all
    case("Se-UP: SMAP=1 AC=0 -> fault", "Se", "UP", "P|W", smap=True),
    case("Se-UP: SMAP=1 AC=1 WP=0 RW=0 allowed", "Se", "UP", "ok", smap=True, ac=True, rw=False),
    case("Se-UP: SMAP=1 AC=1 WP=1 RW=0 -> fault", "Se", "UP", "P|W", smap=True, ac=True, rw=False, wp=True),
    case("Se-UP: SMAP=1 AC=1 WP=1 RW=1 allowed", "Se", "UP", "ok", smap=True, ac=True, wp=True),
    case("Se-UP: SMAP=0 WP=0 RW=0 allowed", "Se", "UP", "ok", rw=False),
    case("Se-UP: SMAP=0 WP=1 RW=0 -> fault", "Se", "UP", "P|W", rw=False, wp=True),
    case("Se-UP: PKE=1 WDu=1 WP=0 allowed", "Se", "UP", "ok", pke=True, pkru=WD),
    case("Se-UP: PKE=1 WDu=1 WP=1 -> PK", "Se", "UP", "P|W|PK", pke=True, pkru=WD, wp=True),
    case("Se-UP: PKE=1 ADu=1 WP=0 -> PK", "Se", "UP", "P|W|PK", pke=True, pkru=AD),
    case("Se-UP: SMAP=1 AC=0 PKE=1 ADu=1 -> PK", "Se", "UP", "P|W|PK", smap=True, pke=True, pkru=AD),
    # Si UP: SMAP=1 never; else WP=0 always, WP=1 RW_all
    case("Si-UP: SMAP=1 AC=1 -> fault (sdm)", "Si", "UP", "P|W", smap=True, ac=True),
    case("Si-UP: SMAP=1 AC=1, qemu -> allowed", "Si", "UP", "ok", smap=True, ac=True, compat="qemu"),
    case("Si-UP: SMAP=0 WP=0 RW=0 allowed", "Si", "UP", "ok", rw=False),
    case("Si-UP: SMAP=0 WP=1 RW=0 -> fault", "Si", "UP", "P|W", rw=False, wp=True),
    case("Si-UP: PKE=1 WDu=1 WP=1 -> PK", "Si", "UP", "P|W|PK", pke=True, pkru=WD, wp=True),
    case("Si-UP: PKE=1 WDu=1 WP=0 allowed", "Si", "UP", "ok", pke=True, pkru=WD),
    case("Si3-UP: SMAP=1 AC=0 -> fault, U=0", "Si3", "UP", "P|W", smap=True),
]


@pytest.mark.parametrize("access,page,expected,state", WRITES)
def test_data_write(access, page, expected, state):
    check(access, page, "write", expected, state)


# --- Instruction fetches: keys never apply --------------------------------------

FETCHES = [
    # U UP: no XD (when NXE=1)
    case("U-UP: allowed", "U", "UP", "ok"),
    case("U-UP: XD=1 NXE=1 -> fault", "U", "UP", "P|U|I", xd=True, nxe=True),
    case("U-UP: PKE=1 ADu=1 ignored by fetches", "U", "UP", "ok", pke=True, pkru=DENY_ALL),
    case("U-UP: RW=0 does not matter", "U", "UP", "ok", rw=False),
    # U SP: never
    case("U-SP: never (no I/D without SMEP/NXE)", "U", "SP", "P|U"),
    case("U-SP: never, NXE=1 -> I/D", "U", "SP", "P|U|I", nxe=True),
    case("U-SP: PKS=1 ADs=1 -> still no PK", "U", "SP", "P|U|I", nxe=True, pks=True, pkrs=DENY_ALL),
    # S SP: no XD
    case("S-SP: allowed", "Se", "SP", "ok"),
    case("S-SP: XD=1 NXE=1 -> fault", "Se", "SP", "P|I", xd=True, nxe=True),
    case("S-SP: PKS=1 ADs=1 ignored by fetches", "Se", "SP", "ok", pks=True, pkrs=DENY_ALL),
    case("S-SP: SMEP=1 allowed", "Se", "SP", "ok", smep=True),
    # S UP: SMEP=0 and no XD
    case("S-UP: SMEP=0 allowed", "Se", "UP", "ok"),
    case("S-UP: SMEP=1 -> fault", "Se", "UP", "P|I", smep=True),
    case("S-UP: SMEP=0 XD=1 NXE=1 -> fault", "Se", "UP", "P|I", xd=True, nxe=True),
    case("S-UP: SMAP=1 AC=0 does not apply to fetches", "Se", "UP", "ok", smap=True),
    case("S-UP: PKE=1 ADu=1 ignored by fetches", "Se", "UP", "ok", pke=True, pkru=DENY_ALL),
    case("S-UP: SMEP=1 with PKE=1 ADu=1 -> no PK", "Se", "UP", "P|I", smep=True, pke=True, pkru=DENY_ALL),
]


@pytest.mark.parametrize("access,page,expected,state", FETCHES)
def test_fetch(access, page, expected, state):
    check(access, page, "fetch", expected, state)


# --- Rights are combined over all levels (SDM §4.6.1) ----------------------------

def _machine_with_upper_flags(level: int, clear: int, *, user_leaf: bool = True):
    """A user, writable leaf whose entry at ``level`` has ``clear`` bits cleared."""
    m = pks_emu.Machine()
    a = m.address_space()
    a.map(VA_UP, PA_UP, user=user_leaf, writable=True, pkey=KEY)
    ea = a.entry_address(VA_UP, level)
    m.memory.write_u64(ea, m.memory.read_u64(ea) & ~clear)
    cpu = m.cpus[0]
    a.activate(cpu)
    return cpu


@pytest.mark.parametrize("level", [4, 3, 2], ids=["PML4E", "PDPTE", "PDE"])
def test_us_zero_in_upper_level_makes_a_supervisor_address(level):
    cpu = _machine_with_upper_flags(level, pks_emu.constants.PTE_US)
    configure(cpu, cpl=3, pke=True, pks=True, pkrs=AD)
    # A user access faults (U SP), and the key comes from PKRS: supervisor address.
    assert outcome(cpu, VA_UP, "read") == pf("P|U|PK")
    configure(cpu, cpl=0, pke=True, pkru=DENY_ALL, smap=True)
    # A supervisor access is not subject to SMAP nor PKRU: it is a supervisor page.
    assert outcome(cpu, VA_UP, "read") == "ok"


@pytest.mark.parametrize("level", [4, 3, 2], ids=["PML4E", "PDPTE", "PDE"])
def test_rw_zero_in_upper_level_blocks_writes(level):
    cpu = _machine_with_upper_flags(level, pks_emu.constants.PTE_RW)
    configure(cpu, cpl=3)
    assert outcome(cpu, VA_UP, "write") == pf("P|W|U")
    assert outcome(cpu, VA_UP, "read") == "ok"
    configure(cpu, cpl=0, wp=True)
    assert outcome(cpu, VA_UP, "write") == pf("P|W")
    configure(cpu, cpl=0, wp=False)
    assert outcome(cpu, VA_UP, "write") == "ok"


@pytest.mark.parametrize("level", [4, 3, 2], ids=["PML4E", "PDPTE", "PDE"])
def test_xd_in_upper_level_blocks_fetches(level):
    m = pks_emu.Machine()
    a = m.address_space()
    a.map(VA_SP, PA_SP, pkey=KEY)
    ea = a.entry_address(VA_SP, level)
    m.memory.write_u64(ea, m.memory.read_u64(ea) | pks_emu.constants.PTE_XD)
    cpu = m.cpus[0]
    a.activate(cpu)
    configure(cpu, nxe=True)
    assert outcome(cpu, VA_SP, "fetch") == pf("P|I")
    assert outcome(cpu, VA_SP, "read") == "ok"
