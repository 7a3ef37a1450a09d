"""Kernel policies: which kernel memory is under which key, for replaying a
kernel captured under QEMU (docs/kernel-policies.md).

A policy is a TOML file::

    [kernel]
    pkrs = { 3 = "read-only" }      # the PKRS the kernel runs with (keys not named: read/write)
    kallsyms = "boot.pkt2.kallsyms" # symbols for ranges by name (default: TRACE.kallsyms)

    [default]                       # pages outside every region
    pkey = 0

    [[region]]                      # first matching region wins
    name = "rodata"
    from = "__start_rodata"         # kallsyms names: from .. to (exclusive)
    to = "__end_rodata"
    pkey = 3

    [[region]]
    name = "pmem"
    phys_start = 0x40000000         # a physical range (every virtual alias of it)
    phys_end = 0x44000000
    pkey = 4

    [[window]]                      # the consumer opens its key inside these functions
    name = "pmem accessor"
    functions = ["pmem_do_write", "pmem_do_read"]
    callees = ["memcpy_flushcache", "__memcpy_flushcache"]   # and in these, called from them
    pkey = 4
    rights = "read-write"

Regions name ranges by virtual address (``start``/``end``), by physical
address (``phys_start``/``phys_end``), by kallsyms symbols (``from``/``to``,
or ``symbol`` for one object: its address to the next symbol's), by kernel
section (``section = "text" | "rodata" | "data" | "bss" | "init"``), by
module (``module = "nd_pmem"``: its lowest to its highest symbol, the last
one's size unknown and taken as 4 KiB), or by area (``area = "vmalloc" |
"direct-map" | "modules"`` for the x86-64 layout of the trace's paging depth).
Pages outside every region are supervisor pages with the default key in the
kernel half and user pages with key 0 in the lower half.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field

from ..constants import PKS_INIT_VALUE
from ..errors import TraceFormatError
from .policy import _RIGHTS, _rights_value, read_policy_toml

#: key rights by name: the same table as the lackey policies'
RIGHTS = _RIGHTS

#: kallsyms names that bound each kernel section (vmlinux.lds.h)
SECTIONS = {"text": ("_stext", "_etext"), "rodata": ("__start_rodata", "__end_rodata"),
            "data": ("_sdata", "_edata"), "bss": ("__bss_start", "__bss_stop"),
            "init": ("__init_begin", "__init_end")}

#: x86-64 kernel memory layout (Documentation/x86/x86_64/mm.rst), by paging depth
AREAS = {
    4: {"direct-map": (0xffff888000000000, 0xffffc88000000000),
        "vmalloc": (0xffffc90000000000, 0xffffe90000000000),
        "vmemmap": (0xffffea0000000000, 0xffffeb0000000000),
        "modules": (0xffffffffa0000000, 0xffffffffff000000)},
    5: {"direct-map": (0xff11000000000000, 0xff91000000000000),
        "vmalloc": (0xffa0000000000000, 0xffd2000000000000),
        "vmemmap": (0xffd4000000000000, 0xffd6000000000000),
        "modules": (0xffffffffa0000000, 0xffffffffff000000)},
}

_REGION_KEYS = {"name", "start", "end", "phys_start", "phys_end", "from", "to", "symbol", "section",
                "module", "area", "pkey", "writable", "executable"}
_WINDOW_KEYS = {"name", "functions", "callees", "pkey", "rights"}


@dataclass
class KernelRegion:
    name: str
    start: int
    end: int
    by_pa: bool
    pkey: int
    writable: bool = True
    executable: bool = True


@dataclass
class KernelWindow:
    name: str
    functions: list[str]
    callees: list[str]
    pkey: int
    rights: int
    #: resolved [lo, hi) ranges of the functions and of the callees
    function_ranges: list[tuple[int, int]] = field(default_factory=list)
    callee_ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class KernelPolicy:
    pkrs: int = PKS_INIT_VALUE
    default_pkey: int = 0
    kallsyms: str | None = None
    regions: list[KernelRegion] = field(default_factory=list)
    windows: list[KernelWindow] = field(default_factory=list)
    source: str = "<default kernel policy>"
    #: the raw tables, resolved once the symbols and the paging depth are known
    raw_regions: list[dict] = field(default_factory=list)
    raw_windows: list[dict] = field(default_factory=list)


class Kallsyms:
    """A /proc/kallsyms file: name -> address, and sorted addresses for sizes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.addr: dict[str, int] = {}
        self.module_of: dict[str, str] = {}
        self.modules: dict[str, list[int]] = {}
        pts: set[int] = set()
        try:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    parts = line.split()
                    if len(parts) < 3:
                        continue
                    try:
                        a = int(parts[0], 16)
                    except ValueError:
                        raise TraceFormatError(f"{path}: line {n}: not a kallsyms line: {line[:60]!r}") from None
                    name = parts[2].decode(errors="replace")
                    if a == 0:
                        continue
                    self.addr.setdefault(name, a)
                    pts.add(a)
                    if len(parts) >= 4 and parts[3].startswith(b"["):
                        mod = parts[3].strip(b"[]").decode(errors="replace")
                        self.module_of.setdefault(name, mod)
                        self.modules.setdefault(mod, []).append(a)
        except OSError as e:
            raise TraceFormatError(f"{path}: cannot read kallsyms: {e.strerror or e}") from None
        self.sorted = sorted(pts)

    def __contains__(self, name: str) -> bool:
        return name in self.addr

    def where(self, name: str, what: str) -> int:
        try:
            return self.addr[name]
        except KeyError:
            raise TraceFormatError(f"{what}: symbol {name!r} is not in {self.path}") from None

    def extent(self, name: str, what: str) -> tuple[int, int]:
        """[address, next symbol's address) of ``name``."""
        a = self.where(name, what)
        i = bisect.bisect_right(self.sorted, a)
        end = self.sorted[i] if i < len(self.sorted) else a + 4096
        return a, end


def _int(where: str, key: str, v, lo: int = 0, hi: int = 1 << 64) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise TraceFormatError(f"{where}: {key} = {v!r}: expected an integer {lo:#x}..{hi:#x}")
    return v


def _bool(where: str, key: str, v) -> bool:
    if not isinstance(v, bool):
        raise TraceFormatError(f"{where}: {key} = {v!r}: expected true or false")
    return v


def _rights(where: str, key: str, v) -> int:
    if isinstance(v, str) and v in RIGHTS:
        return RIGHTS[v]
    raise TraceFormatError(f"{where}: {key} = {v!r}: expected one of {sorted(RIGHTS)}")


def load_kernel_policy(path: str | os.PathLike | None) -> KernelPolicy:
    """Read a kernel policy (None: no keys anywhere, PKRS = PKS_INIT_VALUE)."""
    if path is None:
        return KernelPolicy()
    path = os.fspath(path)
    doc = read_policy_toml(path)
    if not isinstance(doc, dict):  # pragma: no cover - tomllib returns a table
        raise TraceFormatError(f"{path}: expected a TOML table")
    extra = set(doc) - {"kernel", "default", "region", "window"}
    if extra:
        raise TraceFormatError(f"{path}: unknown section(s) {sorted(extra)} in a kernel policy "
                               "(expected [kernel], [default], [[region]], [[window]])")
    p = KernelPolicy(source=path)
    k = doc.get("kernel", {})
    bad = set(k) - {"pkrs", "kallsyms"}
    if bad:
        raise TraceFormatError(f"{path}: [kernel]: unknown setting(s) {sorted(bad)}")
    if "pkrs" in k:
        p.pkrs = _rights_value(f"{path}: [kernel] pkrs", k["pkrs"])
    if "kallsyms" in k:
        if not isinstance(k["kallsyms"], str):
            raise TraceFormatError(f"{path}: [kernel] kallsyms = {k['kallsyms']!r}: expected a path")
        p.kallsyms = os.path.join(os.path.dirname(os.path.abspath(path)), k["kallsyms"])
    d = doc.get("default", {})
    bad = set(d) - {"pkey"}
    if bad:
        raise TraceFormatError(f"{path}: [default]: unknown setting(s) {sorted(bad)}")
    p.default_pkey = _int(f"{path}: [default]", "pkey", d.get("pkey", 0), 0, 15)
    for kind, known, store in (("region", _REGION_KEYS, p.raw_regions),
                               ("window", _WINDOW_KEYS, p.raw_windows)):
        items = doc.get(kind, [])
        if not isinstance(items, list):
            raise TraceFormatError(f"{path}: {kind} must be an array of tables ([[{kind}]])")
        for i, r in enumerate(items):
            bad = set(r) - known
            if bad:
                raise TraceFormatError(f"{path}: {kind} {i + 1}: unknown setting(s) {sorted(bad)}; "
                                       f"expected {sorted(known)}")
            store.append(r)
    return p


def resolve(policy: KernelPolicy, kallsyms: Kallsyms | None, paging_levels: int) -> KernelPolicy:
    """Turn the policy's names into address ranges (symbols need ``kallsyms``)."""
    src = policy.source
    policy.regions = []
    for i, r in enumerate(policy.raw_regions):
        where = f"{src}: region {i + 1} ({r.get('name', 'unnamed')})"
        ways = [k for k in ("start", "phys_start", "from", "symbol", "section", "module", "area") if k in r]
        if len(ways) != 1:
            raise TraceFormatError(f"{where}: give exactly one of start/end, phys_start/phys_end, "
                                   "from/to, symbol, section, module, area")
        way = ways[0]
        by_pa = False
        needs_syms = way in ("from", "symbol", "section", "module")
        if needs_syms and kallsyms is None:
            raise TraceFormatError(f"{where}: names symbols, but no kallsyms file was given "
                                   "([kernel] kallsyms, or --kallsyms)")
        if way == "start":
            start = _int(where, "start", r["start"])
            end = _int(where, "end", r.get("end"))
        elif way == "phys_start":
            start = _int(where, "phys_start", r["phys_start"], 0, 1 << 52)
            end = _int(where, "phys_end", r.get("phys_end"), 0, 1 << 52)
            by_pa = True
        elif way == "from":
            assert kallsyms is not None
            if not isinstance(r["from"], str) or not isinstance(r.get("to"), str):
                raise TraceFormatError(f"{where}: from and to are symbol names")
            start, end = kallsyms.where(r["from"], where), kallsyms.where(r["to"], where)
        elif way == "symbol":
            assert kallsyms is not None
            start, end = kallsyms.extent(str(r["symbol"]), where)
        elif way == "section":
            assert kallsyms is not None
            if r["section"] not in SECTIONS:
                raise TraceFormatError(f"{where}: section = {r['section']!r}: expected one of {sorted(SECTIONS)}")
            a, b = SECTIONS[r["section"]]
            start, end = kallsyms.where(a, where), kallsyms.where(b, where)
        elif way == "module":
            assert kallsyms is not None
            addrs = kallsyms.modules.get(str(r["module"]))
            if not addrs:
                raise TraceFormatError(f"{where}: module {r['module']!r} has no symbols in {kallsyms.path}")
            start, end = min(addrs), max(addrs) + 4096
        else:
            if r["area"] not in AREAS[paging_levels]:
                raise TraceFormatError(f"{where}: area = {r['area']!r}: expected one of {sorted(AREAS[paging_levels])}")
            start, end = AREAS[paging_levels][r["area"]]
        if not start < end:
            raise TraceFormatError(f"{where}: the range [{start:#x}, {end:#x}) is empty")
        policy.regions.append(KernelRegion(
            name=str(r.get("name", f"region {i + 1}")), start=start, end=end, by_pa=by_pa,
            pkey=_int(where, "pkey", r.get("pkey", 0), 0, 15),
            writable=_bool(where, "writable", r.get("writable", True)),
            executable=_bool(where, "executable", r.get("executable", True))))
    policy.windows = []
    for i, w in enumerate(policy.raw_windows):
        where = f"{src}: window {i + 1} ({w.get('name', 'unnamed')})"
        if kallsyms is None:
            raise TraceFormatError(f"{where}: windows name functions, but no kallsyms file was given")
        funcs = w.get("functions")
        callees = w.get("callees", [])
        for key, v in (("functions", funcs), ("callees", callees)):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise TraceFormatError(f"{where}: {key} must be a list of function names")
        if not funcs:
            raise TraceFormatError(f"{where}: functions is empty")
        win = KernelWindow(name=str(w.get("name", f"window {i + 1}")), functions=funcs,
                           callees=callees, pkey=_int(where, "pkey", w.get("pkey"), 0, 15),
                           rights=_rights(where, "rights", w.get("rights", "read-write")))
        win.function_ranges = [kallsyms.extent(f, where) for f in funcs]
        win.callee_ranges = [kallsyms.extent(f, where) for f in callees if f in kallsyms]
        policy.windows.append(win)
    return policy


def window_ranges(policy: KernelPolicy) -> list[tuple[int, int, int, int]]:
    """The mapper's sorted, disjoint (lo, hi, window, callee_mask) table."""
    points: dict[tuple[int, int], list[int]] = {}
    for w_index, w in enumerate(policy.windows):
        for lo, hi in w.function_ranges:
            e = points.setdefault((lo, hi), [-1, 0])
            if e[0] not in (-1, w_index):
                raise TraceFormatError(f"{policy.source}: function at {lo:#x} is in two windows")
            e[0] = w_index
        for lo, hi in w.callee_ranges:
            points.setdefault((lo, hi), [-1, 0])[1] |= 1 << w_index
    out: list[tuple[int, int, int, int]] = []
    for (lo, hi), (window, mask) in sorted(points.items()):
        if out and lo < out[-1][1]:
            raise TraceFormatError(f"{policy.source}: window functions overlap at {lo:#x}")
        out.append((lo, hi, window, mask))
    return out


def closed_rights(policy: KernelPolicy, pkey: int) -> int:
    """A key's rights in the PKRS the kernel runs with (outside any window)."""
    return (policy.pkrs >> (2 * pkey)) & 3
