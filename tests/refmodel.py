"""A small pure-Python reference model of the pks_emu access check.

Written from docs/rules.md §1 (the access check §1.6, precedence §1.7,
the error code §1.8; the tables of docs/semantics.md) and the SDM Vol. 3A chapter 4, not
from the Cython code, so that the property tests compare two independent
readings of the rules. It is deliberately slow and plain.

The model has no TLB: every access walks the tables in memory. Callers that
compare it with the compiled core must flush the core's TLB whenever a change
would make a cached translation differ from a fresh walk (a page-table edit,
and in compat="qemu" a CR4.PKE/PKS or EFER.NXE change, which QEMU does not
flush).

Entry points:

* ``translate(read_u64, regs, va, kind, implicit)``: one access within one
  4-KiB page; returns a ``Result`` and the list of Accessed/Dirty updates the
  access makes (``(entry_address, bits)``), without applying them.
* ``access(memory, regs, va, kind, size, implicit)``: a full access of
  ``size`` bytes (canonical check, page-crossing), applying the A/D updates to
  ``memory`` (anything with ``read_u64``/``write_u64``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

# Bit positions, spelled out here rather than imported, so that a wrong value
# in pks_emu.constants cannot hide in both sides of a comparison.
CR0_WP = 1 << 16
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_PKS = 1 << 24
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_AC = 1 << 18

P, RW, US, A, D, PS, XD = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7, 1 << 63

PF_P, PF_W, PF_U, PF_RSVD, PF_I, PF_PK = 1, 2, 4, 8, 16, 32

READ, WRITE, FETCH = 0, 1, 2
KINDS = {"read": READ, "write": WRITE, "fetch": FETCH}

LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


@dataclass(frozen=True)
class Regs:
    """The register state an access depends on."""

    cr3: int = 0
    cr0: int = 0x80000011          # PE|ET|PG (the reset value of a Machine; ET is hardwired)
    cr4: int = 1 << 5              # PAE
    efer: int = (1 << 8) | EFER_LMA
    rflags: int = 2
    cpl: int = 0
    pkru: int = 0
    pkrs: int = 0
    features: frozenset = frozenset({"pku", "pks", "smep", "smap", "nx", "1g", "la57"})
    maxphyaddr: int = 52
    compat: str = "sdm"

    @property
    def levels(self) -> int:
        return 5 if self.cr4 & CR4_LA57 else 4

    def with_(self, **kw) -> Regs:
        return replace(self, **kw)

    @classmethod
    def of_cpu(cls, cpu) -> Regs:
        """Snapshot of a ``pks_emu.CPU``."""
        return cls(cr3=cpu.cr3, cr0=cpu.cr0, cr4=cpu.cr4, efer=cpu.efer, rflags=cpu.rflags,
                   cpl=cpu.cpl, pkru=cpu.pkru, pkrs=cpu.pkrs, features=frozenset(cpu.features),
                   maxphyaddr=cpu.maxphyaddr, compat=cpu.compat)


@dataclass(frozen=True)
class Result:
    """``ok`` with ``pa``; or ``vector`` 14 with ``error_code`` and ``address``; or 13 (#GP)."""

    ok: bool
    pa: int | None = None
    pkey: int | None = None
    vector: int | None = None
    error_code: int | None = None
    address: int | None = None

    @classmethod
    def page_fault(cls, address: int, error_code: int, pkey: int | None = None) -> Result:
        return cls(False, vector=14, error_code=error_code, address=address, pkey=pkey)


@dataclass
class Walk:
    """What the walk found: the leaf and the rights combined over all levels."""

    leaf: int
    leaf_address: int
    leaf_level: int
    user_page: bool       # U/S=1 at every level (SDM §4.6.1 "user-mode address")
    rw_all: bool          # R/W=1 at every level
    xd_any: bool          # XD=1 at some level
    pa: int
    updates: list = field(default_factory=list)


class Memory(Protocol):
    def read_u64(self, pa: int) -> int: ...
    def write_u64(self, pa: int, value: int) -> None: ...


class DictMemory:
    """Sparse 64-bit-word memory for the model (absent words read as 0)."""

    def __init__(self, words: dict[int, int] | None = None) -> None:
        self.words = dict(words or {})

    def read_u64(self, pa: int) -> int:
        assert pa % 8 == 0
        return self.words.get(pa, 0)

    def write_u64(self, pa: int, value: int) -> None:
        assert pa % 8 == 0
        self.words[pa] = value


# --- reserved bits (SDM §4.5, tables 4-15 to 4-20) --------------------------

def reserved_bits(regs: Regs, level: int, entry: int) -> int:
    """Bits of ``entry`` at ``level`` that must be 0."""
    mask = ((1 << 52) - 1) & ~((1 << regs.maxphyaddr) - 1)   # bits 51:MAXPHYADDR
    if not regs.efer & EFER_NXE:
        mask |= XD                                            # XD is reserved without NXE
    if level >= 4:
        mask |= PS                                            # PML5E/PML4E have no PS
    elif level == 3 and entry & PS:
        has_1g = "1g" in regs.features or regs.compat == "qemu"   # QEMU always builds 1G pages
        mask |= _bits(29, 13) if has_1g else PS
    elif level == 2 and entry & PS:
        mask |= _bits(20, 13)
    return mask


def _bits(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


# --- error code (docs/rules.md §1.8) ------------------------------------------------------

def user_mode(regs: Regs, implicit: bool) -> bool:
    """SDM §4.6.1: CPL 3 accesses are user-mode unless implicit."""
    return regs.cpl == 3 and not implicit


def error_code(regs: Regs, kind: int, implicit: bool, *, present: bool, rsvd: bool = False,
               pk: bool = False) -> int:
    code = 0
    if present:
        code |= PF_P
    if rsvd:
        code |= PF_RSVD
        if regs.compat == "qemu":
            code &= ~PF_P          # QEMU 7.2 reports RSVD without P
    if pk:
        code |= PF_PK
    if kind == WRITE:
        code |= PF_W
    if user_mode(regs, implicit):   # U/S describes the access, not the page
        code |= PF_U
    if kind == FETCH and (regs.cr4 & CR4_SMEP or regs.efer & EFER_NXE):
        code |= PF_I               # I/D only if SMEP, or NXE with PAE-type paging
    return code


# --- the walk (SDM §4.5, A flags §4.8) --------------------------------------

def walk(read_u64: Callable[[int], int], regs: Regs, va: int, kind: int, implicit: bool):
    """Walk the tables; return a ``Walk`` or ``(error_code, updates)`` for P=0/RSVD."""
    table = regs.cr3 & ((1 << regs.maxphyaddr) - 1) & ~0xFFF
    frame_mask = ((1 << regs.maxphyaddr) - 1) & ~0xFFF
    user_page, rw_all, xd_any = True, True, False
    updates = []
    for level in range(regs.levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        ea = table + 8 * ((va >> shift) & 511)
        e = read_u64(ea)
        if not e & P:
            return error_code(regs, kind, implicit, present=False), updates
        if e & reserved_bits(regs, level, e):
            return error_code(regs, kind, implicit, present=True, rsvd=True), updates
        user_page &= bool(e & US)
        rw_all &= bool(e & RW)
        xd_any |= bool(e & XD)
        is_leaf = level == 1 or (level <= 3 and e & PS)
        if is_leaf:
            size_mask = (1 << shift) - 1
            pa = (e & frame_mask & ~size_mask) | (va & size_mask)
            if regs.compat == "qemu" and level == 3:
                # QEMU 7.2 sets A in a PDPTE before looking at PS, so a 1-GiB
                # leaf gets A even if the access then faults.
                updates.append((ea, A))
            return Walk(e, ea, level, user_page, rw_all, xd_any, pa, updates)
        # A non-leaf entry that passed its checks is "used" (SDM §4.8): A=1,
        # even if a lower level or the rights check then faults.
        updates.append((ea, A))
        table = e & frame_mask
    raise AssertionError("unreachable")


# --- decision tables (docs/rules.md §1.6) -------------------------------------------------

def key_rule_denies(regs: Regs, w: Walk, kind: int, implicit: bool) -> bool:
    """The key rule of docs/rules.md §1.5, §1.6: register chosen by the address type."""
    if kind == FETCH or not regs.efer & EFER_LMA:
        return False                                   # fetches ignore keys; no keys outside IA-32e
    key = (w.leaf >> 59) & 0xF
    if w.user_page:
        pkr = regs.pkru if regs.cr4 & CR4_PKE else 0
    else:
        pkr = regs.pkrs & 0xFFFFFFFF if regs.cr4 & CR4_PKS else 0
    ad = (pkr >> (2 * key)) & 1
    wd = (pkr >> (2 * key + 1)) & 1
    if ad:
        return True
    return kind == WRITE and bool(wd) and (user_mode(regs, implicit) or bool(regs.cr0 & CR0_WP))


def paging_rule_allows(regs: Regs, w: Walk, kind: int, implicit: bool) -> bool:
    """The paging rule of §2.6 (SDM §4.6.1), without keys."""
    user = user_mode(regs, implicit)
    wp = bool(regs.cr0 & CR0_WP)
    smap = bool(regs.cr4 & CR4_SMAP)
    ac = bool(regs.rflags & RFLAGS_AC)
    if kind == FETCH:
        if regs.efer & EFER_NXE and w.xd_any:
            return False
        if user:
            return w.user_page                          # U SP: never
        return not (w.user_page and regs.cr4 & CR4_SMEP)
    if user:
        if not w.user_page:
            return False                                # U SP: never
        return kind == READ or w.rw_all                 # U UP: writes need RW_all
    if w.user_page and smap:
        if implicit:
            # Si UP with SMAP: never. QEMU 7.2 picks its SMAP MMU index from
            # CPL<3 and AC even for implicit accesses.
            smap_blocks = not (regs.compat == "qemu" and regs.cpl < 3 and ac)
        else:
            smap_blocks = not ac                        # Se UP with SMAP: only with AC=1
        if smap_blocks:
            return False
    if kind == WRITE and wp:
        return w.rw_all                                 # supervisor writes: WP=1 -> RW_all
    return True


def translate(read_u64: Callable[[int], int], regs: Regs, va: int, kind: int | str,
              implicit: bool = False) -> tuple[Result, list]:
    """One access inside one 4-KiB page (``va`` canonical); ``(Result, A/D updates)``."""
    kind = KINDS.get(kind, kind)
    w = walk(read_u64, regs, va, kind, implicit)
    if not isinstance(w, Walk):
        code, updates = w
        return Result.page_fault(va, code), updates
    pkey = (w.leaf >> 59) & 0xF
    pk = key_rule_denies(regs, w, kind, implicit)
    allowed = paging_rule_allows(regs, w, kind, implicit)
    if pk and regs.compat == "qemu" and user_mode(regs, implicit) and not w.user_page:
        pk = False     # QEMU 7.2 returns from the U/S check before looking at the key
    if pk or not allowed:
        return Result.page_fault(va, error_code(regs, kind, implicit, present=True, pk=pk),
                                 pkey), w.updates
    # Allowed: the leaf is used (A) and, for a write, dirtied (D), SDM §4.8.
    return Result(True, pa=w.pa, pkey=pkey), w.updates + [(w.leaf_address, A | (D if kind == WRITE else 0))]


def canonical(regs: Regs, va: int) -> bool:
    bits = 57 if regs.levels == 5 else 48
    top = va >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def apply_updates(memory: Memory, updates) -> None:
    for ea, bits in updates:
        memory.write_u64(ea, memory.read_u64(ea) | bits)


def access(memory: Memory, regs: Regs, va: int, kind: int | str, size: int = 1,
           implicit: bool = False) -> Result:
    """An access of ``size`` bytes: #GP unless both ends are canonical, then
    each 4-KiB page in order; a fault on the second page reports its first byte."""
    kind = KINDS.get(kind, kind)
    last = va + size - 1
    if last >= 1 << 64 or not canonical(regs, va) or not canonical(regs, last):
        return Result(False, vector=13, error_code=0, address=va)
    first, updates = translate(memory.read_u64, regs, va, kind, implicit)
    apply_updates(memory, updates)
    if not first.ok or (va >> 12) == (last >> 12):
        return first
    page2 = last & ~0xFFF
    second, updates = translate(memory.read_u64, regs, page2, kind, implicit)
    apply_updates(memory, updates)
    if not second.ok:
        return second
    return first


# --- test harness helpers (not part of the model) ---------------------------

def configure(cpu, *, cpl: int = 0, wp: bool = False, smep: bool = False, smap: bool = False,
              pke: bool = False, pks: bool = False, nxe: bool = False, ac: bool = False,
              pge: bool = False, pkru: int = 0, pkrs: int = 0) -> None:
    """Put ``cpu`` in the given state through its architectural interfaces.

    PKRU is written with WRPKRU (so CR4.PKE is 1 meanwhile) and PKRS with
    WRMSR at CPL 0; CR4 gets its final value afterwards, so a test can hold a
    PKRU value that CR4.PKE=0 then ignores.
    """
    cpu.cpl = 0
    base_cr4 = cpu.cr4 & ((1 << 5) | CR4_LA57)
    if "pku" in cpu.features:
        cpu.cr4 = base_cr4 | CR4_PKE
        cpu.wrpkru(pkru)
    elif pkru:
        raise ValueError("pkru needs the 'pku' feature")
    if "pks" in cpu.features:
        cpu.wrmsr(0x6E1, pkrs)
    elif pkrs:
        raise ValueError("pkrs needs the 'pks' feature")
    cpu.efer = (cpu.efer & ~EFER_NXE) | (EFER_NXE if nxe else 0)
    cpu.cr0 = (cpu.cr0 & ~CR0_WP) | (CR0_WP if wp else 0)
    cpu.cr4 = (base_cr4 | (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0)
               | (CR4_PKE if pke else 0) | (CR4_PKS if pks else 0) | ((1 << 7) if pge else 0))
    cpu.rflags = 2 | (RFLAGS_AC if ac else 0)
    cpu.cpl = cpl


def outcome(cpu, va: int, kind: str, *, size: int = 8, implicit: bool = False):
    """``'ok'``, ``'#GP'`` or the #PF error code of an access, via ``translate``."""
    t = cpu.translate(va, kind, size=size, implicit=implicit)
    if t.ok:
        return "ok"
    if t.vector == 13:
        return "#GP"
    return t.error_code


def pf(names: str) -> int:
    """Error code from names: ``pf('P|W|PK')``."""
    bits = {"P": PF_P, "W": PF_W, "U": PF_U, "RSVD": PF_RSVD, "I": PF_I, "PK": PF_PK}
    code = 0
    for n in names.split("|"):
        if n:
            code |= bits[n]
    return code
