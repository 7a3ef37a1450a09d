"""The constants the compiled core uses (``PKS_*`` in pks_emu/_core.pxd) agree
with pks_emu/constants.py, and both have the architectural values (SDM Vol. 3A,
Linux PKS series; docs/rules.md §1)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import pks_emu
from pks_emu import constants as C

PXD = Path(pks_emu.__file__).with_name("_core.pxd")


def _c_value(expr: str) -> int:
    """Evaluate the tiny C subset used in the #defines: (1ULL << n), 0x6E1U, (1U << n)."""
    py = re.sub(r"(?<=[0-9A-Fa-f])(ULL|UL|U|LL|L)\b", "", expr)
    if not re.fullmatch(r"[0-9a-fA-FxX()<>| ]+", py):
        raise ValueError(f"unexpected C expression {expr!r} in {PXD}")
    return eval(py, {"__builtins__": {}})  # noqa: S307 - checked to be arithmetic only


def _defines() -> dict[str, int]:
    out = {}
    for line in PXD.read_text().splitlines():
        m = re.match(r"\s*#define\s+(PKS_\w+)\s+(.+?)\s*$", line)
        if m:
            out[m.group(1)] = _c_value(m.group(2))
    return out


def _enum() -> dict[str, int]:
    """The ``cdef enum`` members of _core.pxd (access kinds, results, features)."""
    text = PXD.read_text()
    block = re.search(r"cdef enum:\n((?:[ \t]+.*\n|\n)+)", text).group(1)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(PKS_\w+)\s*=\s*(-?\d+)", block)}


DEFINES = _defines()
ENUM = _enum()

# pxd name -> constants.py name
PAIRS = {
    "PKS_CR0_PE": "CR0_PE", "PKS_CR0_ET": "CR0_ET", "PKS_CR0_WP": "CR0_WP", "PKS_CR0_NW": "CR0_NW",
    "PKS_CR0_CD": "CR0_CD", "PKS_CR0_PG": "CR0_PG",
    "PKS_CR4_PSE": "CR4_PSE", "PKS_CR4_PAE": "CR4_PAE", "PKS_CR4_PGE": "CR4_PGE",
    "PKS_CR4_LA57": "CR4_LA57", "PKS_CR4_PCIDE": "CR4_PCIDE", "PKS_CR4_SMEP": "CR4_SMEP",
    "PKS_CR4_SMAP": "CR4_SMAP", "PKS_CR4_PKE": "CR4_PKE", "PKS_CR4_PKS": "CR4_PKS",
    "PKS_EFER_SCE": "EFER_SCE", "PKS_EFER_LME": "EFER_LME", "PKS_EFER_LMA": "EFER_LMA",
    "PKS_EFER_NXE": "EFER_NXE", "PKS_RFLAGS_AC": "RFLAGS_AC",
    "PKS_RFLAGS_FIXED": "RFLAGS_FIXED", "PKS_RFLAGS_KNOWN": "RFLAGS_KNOWN", "PKS_INIT_VALUE": "PKS_INIT_VALUE",
    "PKS_MSR_IA32_EFER": "MSR_IA32_EFER", "PKS_MSR_IA32_PKRS": "MSR_IA32_PKRS",
    "PKS_PTE_P": "PTE_P", "PKS_PTE_RW": "PTE_RW", "PKS_PTE_US": "PTE_US", "PKS_PTE_A": "PTE_A",
    "PKS_PTE_D": "PTE_D", "PKS_PTE_PS": "PTE_PS", "PKS_PTE_G": "PTE_G", "PKS_PTE_XD": "PTE_XD",
    "PKS_PTE_PKEY_SHIFT": "PTE_PKEY_SHIFT",
    "PKS_PF_P": "PF_P", "PKS_PF_W": "PF_W", "PKS_PF_U": "PF_U", "PKS_PF_RSVD": "PF_RSVD",
    "PKS_PF_I": "PF_I", "PKS_PF_PK": "PF_PK",
}


def test_every_define_of_the_pxd_is_checked():
    assert DEFINES, f"no #define found in {PXD}"
    assert set(DEFINES) == set(PAIRS), "a PKS_* #define was added or removed: update PAIRS"


@pytest.mark.parametrize("pxd_name,py_name", sorted(PAIRS.items()))
def test_pxd_define_matches_constants_py(pxd_name, py_name):
    assert DEFINES[pxd_name] == getattr(C, py_name), f"{pxd_name} in _core.pxd != constants.{py_name}"


def test_enum_matches_python_side():
    assert (ENUM["PKS_READ"], ENUM["PKS_WRITE"], ENUM["PKS_FETCH"]) == (
        C.AccessKind.READ, C.AccessKind.WRITE, C.AccessKind.FETCH)
    assert (ENUM["PKS_OK"], ENUM["PKS_GP"]) == (-1, -2)     # the access_batch error-code convention
    feats = {"pku": "PKS_FEAT_PKU", "pks": "PKS_FEAT_PKS", "smep": "PKS_FEAT_SMEP",
             "smap": "PKS_FEAT_SMAP", "nx": "PKS_FEAT_NX", "1g": "PKS_FEAT_1G",
             "la57": "PKS_FEAT_LA57"}
    assert set(feats) == set(C.ALL_FEATURES)
    bits = [ENUM[v] for v in feats.values()]
    assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits)


# --- golden values ----------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("PKS_INIT_VALUE", 0x55555554),
    ("PKS_ALL_AD", 0x55555555),
    ("MSR_IA32_PKRS", 0x6E1),
    ("MSR_IA32_EFER", 0xC0000080),
    ("CR4_PKS", 1 << 24),
    ("CR4_PKE", 1 << 22),
    ("CR4_SMAP", 1 << 21),
    ("CR4_SMEP", 1 << 20),
    ("CR4_LA57", 1 << 12),
    ("CR4_PGE", 1 << 7),
    ("CR0_WP", 1 << 16),
    ("EFER_NXE", 1 << 11),
    ("EFER_LMA", 1 << 10),
    ("RFLAGS_AC", 1 << 18),
    ("PF_P", 1 << 0), ("PF_W", 1 << 1), ("PF_U", 1 << 2), ("PF_RSVD", 1 << 3),
    ("PF_I", 1 << 4), ("PF_PK", 1 << 5), ("PF_SGX", 1 << 15),
    ("PTE_PKEY_SHIFT", 59),
    ("PTE_PKEY_MASK", 0x7800_0000_0000_0000),
    ("PTE_XD", 1 << 63),
    ("PKR_AD_BIT", 1), ("PKR_WD_BIT", 2),
    ("PKEY_DISABLE_ACCESS", 1), ("PKEY_DISABLE_WRITE", 2), ("PKEY_READ_WRITE", 0),
])
def test_golden_value(name, value):
    assert getattr(C, name) == value


def test_golden_values_in_the_pxd():
    assert DEFINES["PKS_MSR_IA32_PKRS"] == 0x6E1
    assert DEFINES["PKS_CR4_PKS"] == 1 << 24
    assert DEFINES["PKS_CR4_PKE"] == 1 << 22
    assert DEFINES["PKS_PF_PK"] == 1 << 5
    assert DEFINES["PKS_PTE_PKEY_SHIFT"] == 59


@pytest.mark.parametrize("k", range(16))
def test_page_pkey_and_pte_pkey(k):
    assert pks_emu._PAGE_PKEY(k) == k << 59
    assert pks_emu.pte_pkey(pks_emu._PAGE_PKEY(k) | 0x8000_0000_0000_0FFF) == k
    assert pks_emu.PAGE_KERNEL_PKEY(k) == C.PAGE_KERNEL | (k << 59)
    assert pks_emu.PKR_AD_KEY(k) == 1 << (2 * k)
    assert pks_emu.PKR_WD_KEY(k) == 2 << (2 * k)


def test_page_kernel_and_pkey_helpers():
    assert C.PAGE_KERNEL == C.PTE_P | C.PTE_RW | C.PTE_A | C.PTE_D | C.PTE_G | C.PTE_XD
    for bad in (-1, 16):
        with pytest.raises(ValueError, match="pkey"):
            pks_emu._PAGE_PKEY(bad)
    # pkey_update_pkval (V8-V10): clears the key's two bits, then ORs the masked access bits
    assert pks_emu.pkey_update_pkval(0x55555554, 1, 0) == 0x55555550
    assert pks_emu.pkey_update_pkval(0, 15, C.PKEY_DISABLE_WRITE) == 2 << 30
    assert pks_emu.pkey_update_pkval(0xFFFFFFFF, 3, 0x7) == 0xFFFFFFFF
    assert pks_emu.pkey_update_pkval(0, 3, 0x4) == 0           # out-of-range bits masked
    assert pks_emu.pf_error_code_str(0x21) == "P|PK"
    assert pks_emu.pf_error_code_str(0) == "0"


def test_core_uses_the_same_values():
    """The values reach the compiled code: the error code of a PK fault is PF_P|PF_PK
    and the key comes from bits 62:59."""
    m = pks_emu.Machine()
    a = m.address_space()
    a.map(0x1000, 0x2000, prot=pks_emu.PAGE_KERNEL_PKEY(13))
    a.activate()
    cpu = m.cpus[0]
    cpu.efer = cpu.efer | C.EFER_NXE          # PAGE_KERNEL has XD, reserved without NXE
    cpu.wrmsr(C.MSR_IA32_PKRS, pks_emu.PKR_AD_KEY(13))
    cpu.cr4 = cpu.cr4 | C.CR4_PKS
    with pytest.raises(pks_emu.PageFault) as ei:
        cpu.access(0x1000, C.AccessKind.READ)
    assert ei.value.error_code == C.PF_P | C.PF_PK
    assert ei.value.pkey == 13
