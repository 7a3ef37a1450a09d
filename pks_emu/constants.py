"""Architectural constants, defined once.

Bit positions follow the Intel SDM Vol. 3A (chapter 2 for control registers,
chapter 4 for paging, §4.7 for the page-fault error code) and the names the
Linux PKS series uses for them. ``pks_emu/_core.pxd`` mirrors the values the
compiled core needs; ``tests/test_constants.py`` checks the two agree.
"""
from __future__ import annotations

from enum import IntEnum


class AccessKind(IntEnum):
    """Kind of a memory access (the values are those of the batch and trace APIs)."""

    READ = 0
    WRITE = 1
    FETCH = 2

# --- CR0 (SDM §2.5) --------------------------------------------------------
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31

# --- CR4 (SDM §2.5) --------------------------------------------------------
CR4_VME = 1 << 0
CR4_PVI = 1 << 1
CR4_TSD = 1 << 2
CR4_DE = 1 << 3
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_MCE = 1 << 6
CR4_PGE = 1 << 7
CR4_PCE = 1 << 8
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_UMIP = 1 << 11
CR4_LA57 = 1 << 12
CR4_FSGSBASE = 1 << 16
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_PKS = 1 << 24

# --- IA32_EFER (SDM §2.2.1) ------------------------------------------------
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# --- RFLAGS ----------------------------------------------------------------
RFLAGS_FIXED = 1 << 1  # bit 1 always reads as 1
RFLAGS_AC = 1 << 18
#: the RFLAGS bits that exist in 64-bit mode (SDM §3.4.3, Figure 3-8); the others read as 0
RFLAGS_KNOWN = 0x3F7FD5

# --- MSRs ------------------------------------------------------------------
MSR_IA32_EFER = 0xC0000080
MSR_IA32_PKRS = 0x6E1

# --- Page-table entry bits (SDM §4.5, Linux pgtable_types.h) ---------------
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_XD = 1 << 63
PTE_PKEY_SHIFT = 59  # _PAGE_BIT_PKEY_BIT0
PTE_PKEY_MASK = 0xF << PTE_PKEY_SHIFT

PAGE_SIZE = 4096
PAGE_SIZE_2M = 2 << 20
PAGE_SIZE_1G = 1 << 30

# --- #PF error code (SDM §4.7, Linux trap_pf.h) ---------------------------
PF_P = 1 << 0
PF_W = 1 << 1
PF_U = 1 << 2
PF_RSVD = 1 << 3
PF_I = 1 << 4
PF_PK = 1 << 5
PF_SS = 1 << 6
PF_SGX = 1 << 15

# --- PKRU / PKRS layout (SDM §2.7, Linux pkeys_common.h) -------------------
PKR_AD_BIT = 0x1
PKR_WD_BIT = 0x2
PKR_BITS_PER_PKEY = 2
PKEY_DISABLE_ACCESS = 0x1
PKEY_DISABLE_WRITE = 0x2
PKEY_ACCESS_MASK = 0x3
PKEY_READ_WRITE = 0x0
NR_PKEYS = 16

#: Linux's default for both PKRS and PKRU: key 0 read/write, keys 1..15 AD.
PKS_INIT_VALUE = 0x55555554
PKS_ALL_AD = 0x55555555

# --- Exception vectors -----------------------------------------------------
VEC_UD = 6
VEC_GP = 13
VEC_PF = 14

# --- Feature names ---------------------------------------------------------
ALL_FEATURES: frozenset[str] = frozenset({"pku", "pks", "smep", "smap", "nx", "1g", "la57"})

#: Linux PAGE_KERNEL (__PAGE_KERNEL): present, writable, dirty, accessed, global, NX.
PAGE_KERNEL = PTE_P | PTE_RW | PTE_A | PTE_D | PTE_G | PTE_XD


def PKR_AD_KEY(pkey: int) -> int:
    """The AD bit of ``pkey`` in a PKRU/PKRS value."""
    return PKR_AD_BIT << (pkey * PKR_BITS_PER_PKEY)


def PKR_WD_KEY(pkey: int) -> int:
    """The WD bit of ``pkey`` in a PKRU/PKRS value."""
    return PKR_WD_BIT << (pkey * PKR_BITS_PER_PKEY)


def _PAGE_PKEY(pkey: int) -> int:
    """PTE bits carrying ``pkey`` (Linux ``_PAGE_PKEY``)."""
    if not 0 <= pkey < NR_PKEYS:
        raise ValueError(f"pkey {pkey!r} out of range: expected 0..15")
    return pkey << PTE_PKEY_SHIFT


def PAGE_KERNEL_PKEY(pkey: int) -> int:
    """Leaf-entry flags of a kernel mapping with ``pkey`` (Linux V3+ ``PAGE_KERNEL_PKEY``)."""
    return PAGE_KERNEL | _PAGE_PKEY(pkey)


def pte_pkey(entry: int) -> int:
    """The protection key in bits 62:59 of a leaf entry (Linux ``pte_flags_pkey``)."""
    return (entry & PTE_PKEY_MASK) >> PTE_PKEY_SHIFT


def pkey_update_pkval(pkval: int, pkey: int, accessbits: int) -> int:
    """Set ``pkey``'s two rights bits in ``pkval`` (Linux V8-V10 ``pkey_update_pkval``).

    As in the kernel, out-of-range access bits are masked to the low two bits.
    """
    shift = pkey * PKR_BITS_PER_PKEY
    accessbits &= PKEY_ACCESS_MASK
    return (pkval & ~(PKEY_ACCESS_MASK << shift)) | (accessbits << shift)


def pf_error_code_str(error_code: int) -> str:
    """Readable form of a #PF error code, e.g. ``'P|W|PK'`` (``'0'`` for none)."""
    names = [("P", PF_P), ("W", PF_W), ("U", PF_U), ("RSVD", PF_RSVD), ("I", PF_I),
             ("PK", PF_PK), ("SS", PF_SS), ("SGX", PF_SGX)]
    parts = [n for n, b in names if error_code & b]
    return "|".join(parts) if parts else "0"
