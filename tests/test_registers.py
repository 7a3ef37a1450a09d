"""Control registers, MSRs, PKRU and CPUID (docs/rules.md §1.1, §1.2, §1.3, SDM Vol. 2B
MOV CR / WRMSR / RDPKRU / WRPKRU / CPUID, SDM Vol. 3A §2.5)."""
from __future__ import annotations

import pytest

import pks_emu
from pks_emu.constants import (CR0_CD, CR0_ET, CR0_NW, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE,
                               CR4_PCIDE, CR4_PGE, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP,
                               EFER_LMA, EFER_LME, EFER_NXE, MSR_IA32_EFER, MSR_IA32_PKRS,
                               RFLAGS_AC)
from refmodel import configure, outcome, pf

ALL = pks_emu.ALL_FEATURES


def cpu_of(features=ALL, levels=4, compat="sdm"):
    return pks_emu.Machine(paging_levels=levels, features=features, compat=compat).cpus[0]


# --- reset state ------------------------------------------------------------------

@pytest.mark.parametrize("levels", [4, 5])
def test_reset_state(levels):
    cpu = cpu_of(levels=levels)
    assert cpu.cr0 == CR0_PE | CR0_ET | CR0_PG          # ET is hardwired to 1 (SDM §2.5)
    assert cpu.cr4 == CR4_PAE | (CR4_LA57 if levels == 5 else 0)
    assert cpu.efer == EFER_LME | EFER_LMA
    assert cpu.cpl == 0
    assert cpu.rflags == 0x2
    assert cpu.rdmsr(MSR_IA32_PKRS) == 0        # PKRS=0 at RESET (docs/rules.md §1.9)
    assert cpu.pkru == 0
    assert cpu.paging_levels == levels


def test_every_cpu_of_a_machine_resets_alike():
    m = pks_emu.Machine(ncpus=3)
    assert [c.index for c in m.cpus] == [0, 1, 2]
    assert {(c.cr0, c.cr4, c.efer, c.cpl, c.pkrs) for c in m.cpus} == {
        (CR0_PE | CR0_ET | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA, 0, 0)}


# --- IA32_PKRS ----------------------------------------------------------------------

def test_wrmsr_pkrs_works_with_cr4_pks_clear():
    """Linux pks_setup() writes PKRS before setting CR4.PKS (V10 12/44)."""
    cpu = cpu_of()
    assert not cpu.cr4 & CR4_PKS
    cpu.wrmsr(MSR_IA32_PKRS, pks_emu.PKS_INIT_VALUE)
    assert cpu.rdmsr(MSR_IA32_PKRS) == 0x55555554
    assert cpu.pkrs == 0x55555554
    assert cpu.counters()["wrmsr_pkrs"] == 1


@pytest.mark.parametrize("cpl", [1, 2, 3])
def test_pkrs_msr_gp_above_cpl0(cpl):
    cpu = cpu_of()
    cpu.wrmsr(MSR_IA32_PKRS, 0x4)
    cpu.cpl = cpl
    with pytest.raises(pks_emu.GeneralProtectionFault, match="CPL"):
        cpu.wrmsr(MSR_IA32_PKRS, 0x8)
    with pytest.raises(pks_emu.GeneralProtectionFault, match="CPL"):
        cpu.rdmsr(MSR_IA32_PKRS)
    assert cpu.pkrs == 0x4


@pytest.mark.parametrize("value", [1 << 32, 1 << 63, 0xFFFF_FFFF_0000_0000, 0x1_5555_5554])
def test_pkrs_bits_63_32_reserved(value):
    cpu = cpu_of()
    cpu.wrmsr(MSR_IA32_PKRS, 0xC)
    with pytest.raises(pks_emu.GeneralProtectionFault, match="63:32"):
        cpu.wrmsr(MSR_IA32_PKRS, value)
    assert cpu.rdmsr(MSR_IA32_PKRS) == 0xC
    cpu.wrmsr(MSR_IA32_PKRS, 0xFFFF_FFFF)            # bit 31 is fine
    assert cpu.rdmsr(MSR_IA32_PKRS) == 0xFFFF_FFFF


def test_pkrs_msr_absent_without_pks_feature():
    cpu = cpu_of(ALL - {"pks"})
    with pytest.raises(pks_emu.GeneralProtectionFault, match="no PKS"):
        cpu.wrmsr(MSR_IA32_PKRS, 0)
    with pytest.raises(pks_emu.GeneralProtectionFault, match="no PKS"):
        cpu.rdmsr(MSR_IA32_PKRS)
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.cr4 = cpu.cr4 | CR4_PKS
    assert not cpu.cr4 & CR4_PKS


@pytest.mark.parametrize("msr", [0x6E0, 0x6E2, 0x1A0, 0xC0000081, 0xFFFFFFFF])
def test_unknown_msr_gp(msr):
    cpu = cpu_of()
    with pytest.raises(pks_emu.GeneralProtectionFault, match="not implemented"):
        cpu.rdmsr(msr)
    with pytest.raises(pks_emu.GeneralProtectionFault, match="not implemented"):
        cpu.wrmsr(msr, 0)


def test_msr_arguments_out_of_range_are_value_errors():
    cpu = cpu_of()
    with pytest.raises(ValueError, match="ECX"):
        cpu.wrmsr(1 << 32, 0)
    with pytest.raises(ValueError, match="64 bits"):
        cpu.wrmsr(MSR_IA32_PKRS, 1 << 64)
    with pytest.raises(ValueError, match="ECX"):
        cpu.rdmsr(-1)


# --- IA32_EFER ------------------------------------------------------------------------

def test_efer_nxe_through_wrmsr_and_property():
    cpu = cpu_of()
    cpu.wrmsr(MSR_IA32_EFER, cpu.rdmsr(MSR_IA32_EFER) | EFER_NXE)
    assert cpu.efer == EFER_LME | EFER_LMA | EFER_NXE
    cpu.efer = EFER_LME | EFER_LMA
    assert cpu.efer & EFER_NXE == 0


def test_efer_nxe_needs_nx_feature():
    cpu = cpu_of(ALL - {"nx"})
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.efer = cpu.efer | EFER_NXE
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.wrmsr(MSR_IA32_EFER, cpu.efer | EFER_NXE)
    assert not cpu.efer & EFER_NXE


def test_efer_lma_is_read_only_and_lme_cannot_change_with_paging():
    cpu = cpu_of()
    cpu.efer = EFER_LME                       # LMA cleared in the value: ignored
    assert cpu.efer & EFER_LMA
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.efer = EFER_LMA                   # LME 1->0 with CR0.PG=1
    assert cpu.efer == EFER_LME | EFER_LMA


@pytest.mark.parametrize("bit", [1, 12, 14, 15, 63])
def test_efer_reserved_bits(bit):
    cpu = cpu_of()
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.efer = cpu.efer | (1 << bit)
    assert cpu.efer == EFER_LME | EFER_LMA


# --- RDPKRU / WRPKRU ---------------------------------------------------------------------

def test_wrpkru_rdpkru_ud_when_pke_clear_before_gp():
    cpu = cpu_of()
    with pytest.raises(pks_emu.InvalidOpcode):
        cpu.wrpkru(0)
    with pytest.raises(pks_emu.InvalidOpcode):
        cpu.wrpkru(0, ecx=1, edx=1)           # #UD is checked before #GP
    with pytest.raises(pks_emu.InvalidOpcode):
        cpu.rdpkru()
    with pytest.raises(pks_emu.InvalidOpcode):
        cpu.rdpkru(ecx=5)


@pytest.mark.parametrize("ecx,edx", [(1, 0), (0, 1), (0x8000_0000, 0), (3, 7)])
def test_wrpkru_gp_for_ecx_edx(ecx, edx):
    cpu = cpu_of()
    cpu.cr4 = cpu.cr4 | CR4_PKE
    cpu.wrpkru(0xC)
    with pytest.raises(pks_emu.GeneralProtectionFault, match="ECX or EDX"):
        cpu.wrpkru(0x4, ecx=ecx, edx=edx)
    assert cpu.rdpkru() == 0xC


def test_rdpkru_gp_for_ecx():
    cpu = cpu_of()
    cpu.cr4 = cpu.cr4 | CR4_PKE
    with pytest.raises(pks_emu.GeneralProtectionFault, match="ECX"):
        cpu.rdpkru(ecx=1)


def test_wrpkru_ignores_high_halves_and_works_at_cpl3():
    cpu = cpu_of()
    cpu.cr4 = cpu.cr4 | CR4_PKE
    cpu.cpl = 3
    cpu.wrpkru(0xDEAD_0000_5555_5554, ecx=1 << 32, edx=0xFFFF_FFFF_0000_0000)
    assert cpu.rdpkru() == 0x5555_5554
    assert cpu.counters()["wrpkru"] == 1
    with pytest.raises(ValueError):
        cpu.wrpkru(1 << 64)


def test_pkru_absent_without_pku_feature():
    cpu = cpu_of(ALL - {"pku"})
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.cr4 = cpu.cr4 | CR4_PKE
    with pytest.raises(pks_emu.InvalidOpcode):
        cpu.wrpkru(0)


# --- MOV to CR4 ----------------------------------------------------------------------------

@pytest.mark.parametrize("feature,bit", [("smep", CR4_SMEP), ("smap", CR4_SMAP), ("pku", CR4_PKE),
                                         ("pks", CR4_PKS)],
                         ids=["SMEP", "SMAP", "PKE", "PKS"])
def test_cr4_bit_of_absent_feature_gp(feature, bit):
    cpu = cpu_of(ALL - {feature})
    before = cpu.cr4
    with pytest.raises(pks_emu.GeneralProtectionFault, match="CR4"):
        cpu.cr4 = before | bit
    assert cpu.cr4 == before
    present = cpu_of()
    present.cr4 = present.cr4 | bit
    assert present.cr4 & bit


def test_la57_cannot_change_in_long_mode():
    four = cpu_of(levels=4)
    with pytest.raises(pks_emu.GeneralProtectionFault):
        four.cr4 = four.cr4 | CR4_LA57
    five = cpu_of(levels=5)
    with pytest.raises(pks_emu.GeneralProtectionFault):
        five.cr4 = five.cr4 & ~CR4_LA57
    assert five.cr4 & CR4_LA57 and not four.cr4 & CR4_LA57


def test_cr4_la57_absent_feature():
    cpu = cpu_of(ALL - {"la57"})
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.cr4 = cpu.cr4 | CR4_LA57
    with pytest.raises(ValueError, match="la57"):
        pks_emu.Machine(paging_levels=5, features=ALL - {"la57"})


@pytest.mark.parametrize("value_fn", [
    pytest.param(lambda c: c & ~CR4_PAE, id="clear PAE in IA-32e mode"),
    pytest.param(lambda c: c | (1 << 25), id="reserved bit 25"),
    pytest.param(lambda c: c | (1 << 63), id="reserved bit 63"),
    pytest.param(lambda c: c | CR4_PCIDE, id="PCIDE (not modelled)"),
])
def test_cr4_gp(value_fn):
    cpu = cpu_of()
    before = cpu.cr4
    with pytest.raises(pks_emu.GeneralProtectionFault):
        cpu.cr4 = value_fn(before)
    assert cpu.cr4 == before


def test_cr4_all_key_bits_settable_together():
    cpu = cpu_of()
    cpu.cr4 = cpu.cr4 | CR4_PKE | CR4_PKS | CR4_SMEP | CR4_SMAP | CR4_PGE
    assert cpu.cr4 == CR4_PAE | CR4_PKE | CR4_PKS | CR4_SMEP | CR4_SMAP | CR4_PGE


# --- MOV to CR0 / CR3 ------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    pytest.param(CR0_PG, id="PG without PE"),
    pytest.param(CR0_PE, id="clear PG in long mode"),
    pytest.param(CR0_PE | CR0_PG | CR0_NW, id="NW without CD"),
    pytest.param(CR0_PE | CR0_PG | (1 << 32), id="bit 32"),
])
def test_cr0_gp(value):
    cpu = cpu_of()
    with pytest.raises(pks_emu.GeneralProtectionFault, match="CR0"):
        cpu.cr0 = value
    assert cpu.cr0 == CR0_PE | CR0_ET | CR0_PG          # ET is hardwired to 1 (SDM §2.5)


def test_cr0_wp_and_cd_nw():
    cpu = cpu_of()
    cpu.cr0 = CR0_PE | CR0_PG | CR0_WP
    assert cpu.cr0 & CR0_WP
    cpu.cr0 = CR0_PE | CR0_PG | CR0_CD | CR0_NW
    assert cpu.cr0 == CR0_PE | CR0_ET | CR0_PG | CR0_CD | CR0_NW


def test_cr3_above_maxphyaddr_gp():
    m = pks_emu.Machine(maxphyaddr=40)
    cpu = m.cpus[0]
    cpu.cr3 = (1 << 40) - 4096
    with pytest.raises(pks_emu.GeneralProtectionFault, match="MAXPHYADDR"):
        cpu.cr3 = 1 << 40
    assert cpu.cr3 == (1 << 40) - 4096


def test_rflags_and_cpl():
    cpu = cpu_of()
    cpu.rflags = RFLAGS_AC | (1 << 3) | (1 << 63)       # bits 3 and 63 read as 0
    assert cpu.rflags == RFLAGS_AC | 0x2
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="CPL"):
            cpu.cpl = bad


# --- CPUID ---------------------------------------------------------------------------------

def _leaf7(cpu):
    eax, ebx, ecx, edx = cpu.cpuid(7, 0)
    return ebx, ecx


def test_cpuid_leaf7_all_features():
    cpu = cpu_of(levels=5)
    ebx, ecx = _leaf7(cpu)
    assert ebx >> 7 & 1 and ebx >> 20 & 1                 # SMEP, SMAP
    assert ecx >> 3 & 1                                    # PKU
    assert not ecx >> 4 & 1                                # OSPKE: CR4.PKE=0
    assert ecx >> 16 & 1                                   # LA57
    assert ecx >> 31 & 1                                   # PKS
    cpu.cr4 = cpu.cr4 | CR4_PKE
    assert _leaf7(cpu)[1] >> 4 & 1                         # OSPKE mirrors CR4.PKE
    cpu.cr4 = cpu.cr4 & ~CR4_PKE
    assert not _leaf7(cpu)[1] >> 4 & 1
    assert cpu.cpuid(7, 1) == (0, 0, 0, 0)


@pytest.mark.parametrize("feature,reg,bit", [
    ("pku", 1, 3), ("pks", 1, 31), ("la57", 1, 16), ("smep", 0, 7), ("smap", 0, 20)])
def test_cpuid_leaf7_absent_feature(feature, reg, bit):
    ebx_ecx = _leaf7(cpu_of(ALL - {feature}))
    assert not ebx_ecx[reg] >> bit & 1
    assert _leaf7(cpu_of())[reg] >> bit & 1


def test_cpuid_extended_leaves():
    cpu = cpu_of()
    edx = cpu.cpuid(0x80000001)[3]
    assert edx >> 20 & 1 and edx >> 26 & 1 and edx >> 29 & 1      # NX, 1G pages, LM
    edx = cpu_of(ALL - {"nx", "1g"}).cpuid(0x80000001)[3]
    assert not edx >> 20 & 1 and not edx >> 26 & 1
    # EAX[15:8]: linear-address width the CPU supports (57 with LA57), EAX[7:0]: MAXPHYADDR
    assert cpu.cpuid(0x80000008)[0] & 0xFFFF == (57 << 8) | 52
    assert cpu_of(ALL - {"la57"}).cpuid(0x80000008)[0] & 0xFFFF == (48 << 8) | 52
    assert pks_emu.Machine(maxphyaddr=46).cpus[0].cpuid(0x80000008)[0] & 0xFF == 46


def test_machine_without_pks_never_applies_pkrs():
    m = pks_emu.Machine(features=ALL - {"pks"})
    a = m.address_space()
    a.map(0x200000, 0x3000, pkey=1)
    cpu = m.cpus[0]
    a.activate(cpu)
    configure(cpu, pke=True, pkru=0xFFFFFFFF, wp=True)    # PKRU only covers user pages
    assert outcome(cpu, 0x200000, "write") == "ok"
    cpu.cpl = 3
    assert outcome(cpu, 0x200000, "read") == pf("P|U")


def test_unknown_feature_and_bad_machine_arguments():
    with pytest.raises(ValueError, match="unknown feature 'pkz'"):
        pks_emu.Machine(features={"pku", "pkz"})
    with pytest.raises(ValueError, match="paging_levels"):
        pks_emu.Machine(paging_levels=3)
    with pytest.raises(ValueError, match="compat"):
        pks_emu.Machine(compat="bochs")
    with pytest.raises(ValueError, match="maxphyaddr"):
        pks_emu.Machine(maxphyaddr=53)
    with pytest.raises(ValueError, match="tlb_entries"):
        pks_emu.Machine(tlb_entries=1000)
    with pytest.raises(ValueError, match="ncpus"):
        pks_emu.Machine(ncpus=0)
    assert pks_emu.Machine(features=ALL - {"pks"}).cpus[0].features == ALL - {"pks"}


def test_cr0_et_is_hardwired_and_reserved_low_bits_read_as_zero():
    """SDM §2.5: ET is reserved and hardcoded to 1; reserved bits of CR0[31:0]
    are ignored (KVM and QEMU do the same); only bits 63:32 #GP."""
    cpu = pks_emu.Machine().cpus[0]
    cpu.cr0 = CR0_PE | CR0_PG | (1 << 10) | (1 << 20)
    assert cpu.cr0 == CR0_PE | CR0_ET | CR0_PG


@pytest.mark.parametrize("reg", ["cr0", "cr3", "cr4", "efer"])
def test_control_register_writes_fault_above_cpl0(reg):
    """MOV to CRn and WRMSR are privileged: #GP(0) at CPL > 0 (SDM Vol. 2B)."""
    cpu = pks_emu.Machine().cpus[0]
    before = getattr(cpu, reg)
    cpu.cpl = 3
    with pytest.raises(pks_emu.GeneralProtectionFault, match="CPL 3"):
        setattr(cpu, reg, before)
    cpu.cpl = 0
    setattr(cpu, reg, before)
    assert getattr(cpu, reg) == before
