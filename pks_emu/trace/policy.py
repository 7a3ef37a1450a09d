"""Address-space policies: how a user-space trace without page tables (a
Valgrind lackey trace) becomes a machine with page tables and keys.

A policy is a small TOML file (docs/trace-format.md#policies)::

    [registers]
    cpl = 3                      # CPL of the traced accesses
    pkru = { 3 = "read-only" }   # or an integer; keys not named are read/write
    pkrs = 0x55555554
    cr4 = ["pke", "pks", "smep", "smap"]

    [default]                    # pages outside every region
    map = "user"                 # "user", "supervisor" or "unmapped"
    writable = true
    executable = true
    pkey = 0

    [[region]]                   # first matching region wins
    name = "heap"
    start = 0x4a0c000
    end = 0x4c00000              # exclusive
    pkey = 3

Every page the trace touches is mapped before the first record (which is
what "mapped on first touch" amounts to for a replay: the first access to a
page misses the TLB either way), each to its own physical frame.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from ..constants import (PKS_INIT_VALUE, CR0_WP, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP, EFER_NXE, MSR_IA32_PKRS,
                         PKEY_DISABLE_ACCESS, PKEY_DISABLE_WRITE, pkey_update_pkval)
from ..errors import TraceFormatError
from ..machine import Machine

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_RIGHTS = {"rw": 0, "read-write": 0, "read-only": PKEY_DISABLE_WRITE, "ro": PKEY_DISABLE_WRITE,
           "no-access": PKEY_DISABLE_ACCESS, "none": PKEY_DISABLE_ACCESS}
_CR4 = {"pke": CR4_PKE, "pks": CR4_PKS, "smep": CR4_SMEP, "smap": CR4_SMAP}
_MAPS = ("user", "supervisor", "unmapped")

#: Data frames of policy-mapped pages start here (page tables come from the
#: top of physical memory, see Machine.alloc_frames).
DATA_BASE = 0x1000000


@dataclass
class PageRule:
    name: str = "default"
    start: int = 0
    end: int = 1 << 64
    map: str = "user"
    writable: bool = True
    executable: bool = True
    pkey: int = 0


@dataclass
class Policy:
    cpl: int = 3
    pkru: int = 0
    pkrs: int = PKS_INIT_VALUE
    cr4: tuple[str, ...] = ("pke", "pks")
    nxe: bool = True
    wp: bool = True
    paging_levels: int = 4
    default: PageRule = field(default_factory=PageRule)
    regions: list[PageRule] = field(default_factory=list)
    source: str = "<default policy>"

    def rule_for(self, page_va: int) -> PageRule:
        for r in self.regions:
            if r.start <= page_va < r.end:
                return r
        return self.default


def _is_int(v) -> bool:
    """A TOML integer (TOML booleans are Python bools, which are ints: not accepted)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _toml_type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def _table(where: str, v) -> dict:
    if not isinstance(v, dict):
        raise TraceFormatError(f"{where}: expected a table, got {_toml_type(v)} ({v!r})")
    return v


def _rights_value(where: str, value) -> int:
    if _is_int(value):
        if not 0 <= value < 1 << 32:
            raise TraceFormatError(f"{where} = {value:#x}: expected 0..0xffffffff (32 bits)")
        return value
    if isinstance(value, dict):
        reg = 0
        for k, v in value.items():
            try:
                key = int(k)
            except ValueError:
                raise TraceFormatError(f"{where}: key {k!r} is not a number 0..15") from None
            if not 0 <= key <= 15:
                raise TraceFormatError(f"{where}: key {key} out of range 0..15")
            if not isinstance(v, str) or v not in _RIGHTS:
                raise TraceFormatError(f"{where}: rights {v!r} for key {key}: expected one of {sorted(_RIGHTS)}")
            reg = pkey_update_pkval(reg, key, _RIGHTS[v])
        return reg
    raise TraceFormatError(f"{where} = {value!r}: expected an integer or a table of key = rights, "
                           f"got {_toml_type(value)}")


def _rule(where: str, d, base: PageRule) -> PageRule:
    d = _table(where, d)
    known = {"name", "start", "end", "map", "writable", "executable", "pkey"}
    extra = set(d) - known
    if extra:
        raise TraceFormatError(f"{where}: unknown setting(s) {sorted(extra)}; expected {sorted(known)}")
    if "name" in d and not isinstance(d["name"], str):
        raise TraceFormatError(f"{where}: name = {d['name']!r}: expected a string")
    r = PageRule(name=str(d.get("name", base.name)), start=d.get("start", base.start),
                 end=d.get("end", base.end), map=d.get("map", base.map),
                 writable=d.get("writable", base.writable),
                 executable=d.get("executable", base.executable), pkey=d.get("pkey", base.pkey))
    if not isinstance(r.map, str) or r.map not in _MAPS:
        raise TraceFormatError(f"{where}: map = {r.map!r}: expected one of {list(_MAPS)}")
    if not _is_int(r.pkey) or not 0 <= r.pkey <= 15:
        raise TraceFormatError(f"{where}: pkey = {r.pkey!r}: expected an integer 0..15")
    for name in ("start", "end"):
        v = getattr(r, name)
        if not _is_int(v) or not 0 <= v <= 1 << 64:
            raise TraceFormatError(f"{where}: {name} = {v!r}: expected an address (an integer 0..2**64)")
    if r.start >= r.end:
        raise TraceFormatError(f"{where}: start {r.start:#x} is not below end {r.end:#x}")
    for name in ("writable", "executable"):
        if not isinstance(getattr(r, name), bool):
            raise TraceFormatError(f"{where}: {name} = {getattr(r, name)!r}: expected true or false")
    return r


def read_policy_toml(path: str) -> dict:
    """The TOML document of a policy file (lackey or kernel), or a
    TraceFormatError naming the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read policy: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TraceFormatError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"{path}: not valid TOML: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_policy(path: str | os.PathLike | None) -> Policy:
    """Read a policy file; None gives the default policy (everything a plain user page).

    Every error is a :class:`~pks_emu.errors.TraceFormatError` naming the
    file, the section and key, the value and what was expected.
    """
    if path is None:
        return Policy()
    path = os.fspath(path)
    doc = read_policy_toml(path)
    extra = set(doc) - {"registers", "default", "region", "machine"}
    if extra:
        raise TraceFormatError(f"{path}: unknown section(s) {sorted(extra)}; "
                               "expected [registers], [machine], [default], [[region]]")
    p = Policy(source=path)
    regs = _table(f"{path}: [registers]", doc.get("registers", {}))
    bad = set(regs) - {"cpl", "pkru", "pkrs", "cr4", "nxe", "wp"}
    if bad:
        raise TraceFormatError(f"{path}: [registers]: unknown setting(s) {sorted(bad)}")
    p.cpl = regs.get("cpl", p.cpl)
    if not _is_int(p.cpl) or p.cpl not in (0, 1, 2, 3):
        raise TraceFormatError(f"{path}: [registers] cpl = {p.cpl!r}: expected an integer 0..3")
    p.pkru = _rights_value(f"{path}: [registers] pkru", regs.get("pkru", p.pkru))
    p.pkrs = _rights_value(f"{path}: [registers] pkrs", regs.get("pkrs", p.pkrs))
    cr4 = regs.get("cr4", list(p.cr4))
    if not isinstance(cr4, list) or any(not isinstance(c, str) or c not in _CR4 for c in cr4):
        raise TraceFormatError(f"{path}: [registers] cr4 = {cr4!r}: expected a list of {sorted(_CR4)}")
    p.cr4 = tuple(cr4)
    for name in ("nxe", "wp"):
        v = regs.get(name, getattr(p, name))
        if not isinstance(v, bool):
            raise TraceFormatError(f"{path}: [registers] {name} = {v!r}: expected true or false "
                                   f"(a TOML boolean), got {_toml_type(v)}")
        setattr(p, name, v)
    mach = _table(f"{path}: [machine]", doc.get("machine", {}))
    bad = set(mach) - {"paging_levels"}
    if bad:
        # A lackey trace is one stream of accesses, replayed on CPU 0 of a
        # one-CPU machine: a CPU count (or anything else) would be ignored.
        raise TraceFormatError(f"{path}: [machine]: unknown or unsupported setting(s) {sorted(bad)}; "
                               "only paging_levels is supported (a lackey trace replays on one CPU)")
    p.paging_levels = mach.get("paging_levels", 4)
    if not _is_int(p.paging_levels) or p.paging_levels not in (4, 5):
        raise TraceFormatError(f"{path}: [machine] paging_levels = {p.paging_levels!r}: expected 4 or 5")
    p.default = _rule(f"{path}: [default]", doc.get("default", {}), PageRule())
    regions = doc.get("region", [])
    if not isinstance(regions, list):
        raise TraceFormatError(f"{path}: region must be an array of tables ([[region]])")
    for i, r in enumerate(regions):
        where = f"{path}: region {i + 1}"
        r = _table(where, r)
        if "start" not in r or "end" not in r:
            raise TraceFormatError(f"{where}: start and end are required")
        name = r.get("name", "unnamed")
        p.regions.append(_rule(f"{where} ({name})", r,
                               PageRule(name=f"region {i + 1}", map=p.default.map,
                                        writable=p.default.writable,
                                        executable=p.default.executable, pkey=p.default.pkey)))
    return p


def _canonical(page: int, bits: int) -> bool:
    top = (page << 12) >> (bits - 1)
    return top in (0, (1 << (65 - bits)) - 1)


class PolicyMapper:
    """Maps pages into a policy machine's address space as a trace reaches
    them: ``map_pages(pages)`` maps those of ``pages`` (page numbers,
    va >> 12) not mapped yet, as the policy says. Mapping a page before its
    first access is all "mapped on first touch" means for a replay (that
    access misses the TLB either way), so mapping chunk by chunk gives the
    results of mapping the whole trace first."""

    def __init__(self, policy: Policy, aspace) -> None:
        self.policy = policy
        self.aspace = aspace
        self.bits = 57 if policy.paging_levels == 5 else 48
        self.next_pa = DATA_BASE
        self.mapped = np.empty(0, dtype=np.uint64)
        # Pages given to map_new_pages, merged into ``mapped`` when map_pages needs it.
        self._new: list[np.ndarray] = []
        self.stats = {"pages_mapped": 0, "pages_unmapped": 0}

    def map_pages(self, pages: np.ndarray) -> None:
        if self._new:
            self.mapped = np.union1d(self.mapped, np.concatenate(self._new))
            self._new = []
        pages = np.setdiff1d(np.asarray(pages, dtype=np.uint64), self.mapped, assume_unique=False)
        if not len(pages):
            return
        self.mapped = np.union1d(self.mapped, pages)
        self._map(pages)

    def map_new_pages(self, pages: np.ndarray) -> None:
        """:meth:`map_pages` for sorted pages known to be new (the scanner's
        page set finds them): no set operations, which would cost more than
        the mapping (np.unique also imports numpy.ma, 50 ms of start-up)."""
        if len(pages):
            self._new.append(pages)
            self._map(pages)

    def _map(self, pages: np.ndarray) -> None:
        policy, stats = self.policy, self.stats
        # Group runs of consecutive pages under the same rule: map_range fills
        # whole page-table pages at once.
        i = 0
        n = len(pages)
        while i < n:
            va = int(pages[i]) << 12
            rule = policy.rule_for(va)
            canonical = _canonical(int(pages[i]), self.bits)
            j = i + 1
            # A run stops where the rule changes and where canonical space ends
            # (an access that crosses 0x7fff_ffff_ffff touches a non-canonical page).
            while (j < n and int(pages[j]) == int(pages[j - 1]) + 1
                   and policy.rule_for(int(pages[j]) << 12) is rule
                   and _canonical(int(pages[j]), self.bits) == canonical):
                j += 1
            if rule.map == "unmapped" or not canonical:
                stats["pages_unmapped"] += j - i
            else:
                length = (j - i) << 12
                self.aspace.map_range(va, self.next_pa, length, writable=rule.writable,
                                      user=rule.map == "user", nx=not rule.executable,
                                      pkey=rule.pkey)
                self.next_pa += length
                stats["pages_mapped"] += j - i
            i = j


def touched(va: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Page numbers the accesses touch (both pages of one that crosses)."""
    first = va >> np.uint64(12)
    last = (va + size.astype(np.uint64) - np.uint64(1)) >> np.uint64(12)
    return np.union1d(np.unique(first), np.unique(last))


def policy_machine(policy: Policy, compat: str = "sdm") -> tuple[Machine, PolicyMapper]:
    """A machine with the policy's registers in force and an empty address
    space, and the mapper that fills it."""
    m = Machine(paging_levels=policy.paging_levels, compat=compat)
    aspace = m.address_space()
    cpu = m.cpus[0]
    aspace.activate()
    cpu.efer = cpu.efer | (EFER_NXE if policy.nxe else 0)
    cpu.cr0 = (cpu.cr0 | CR0_WP) if policy.wp else (cpu.cr0 & ~CR0_WP)
    cr4 = cpu.cr4
    for name in policy.cr4:
        cr4 |= _CR4[name]
    cpu.cr4 = cr4
    if policy.pkrs:
        cpu.wrmsr(MSR_IA32_PKRS, policy.pkrs)
    if cr4 & CR4_PKE:
        cpu.wrpkru(policy.pkru)
    elif policy.pkru:
        raise TraceFormatError(f"{policy.source}: pkru is set but cr4 does not include 'pke'")
    cpu.cpl = policy.cpl
    return m, PolicyMapper(policy, aspace)


def build_machine(policy: Policy, pages: np.ndarray) -> tuple[Machine, dict[str, int]]:
    """A machine whose page tables map ``pages`` (sorted unique page numbers,
    va >> 12) as the policy says, with the policy's registers in force."""
    m, mapper = policy_machine(policy)
    mapper.map_pages(pages)
    return m, mapper.stats
