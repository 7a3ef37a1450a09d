"""Naming instruction pointers: ``function+offset`` and, with DWARF line
tables, ``file:line`` (``pks-emu replay --symbols FILE[@BASE]``; docs/report.md).

Two kinds of symbol files:

* ELF files (executables, shared objects, detached debug files), read with
  pyelftools. A position-independent executable or shared object is named
  at its load base (``FILE@BASE``: the address its first loadable segment
  was mapped at). Function symbols come from ``.symtab``, else ``.dynsym``;
  a stripped file's detached debug file is used when one is installed
  (``/usr/lib/debug/.build-id/xx/yyyy.debug`` by build ID, or the
  ``.gnu_debuglink`` name), and its PLT stubs are named ``name@plt``
  (from the GOT slot each stub jumps through). DWARF line tables give
  ``file:line``, read lazily one compilation unit at a time.
* ``/proc/kallsyms``-format text (``ADDRESS TYPE NAME [MODULE]``, as also
  printed by ``nm``; ``#`` starts a comment line; plain, or compressed with
  gzip, xz or bzip2), for kernel traces: text
  symbols only, each one
  reaching up to the next symbol's address (kallsyms has no sizes); a module
  symbol is named ``function+offset [module]``.

IPs that no symbol covers stay unnamed (the report shows them in hex).
"""
from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field

from typing import Any

import numpy as np

from .errors import PksEmuError

#: How far past its start the last symbol of a kallsyms table (or module)
#: reaches, as there is no next symbol to bound it.
LAST_SYMBOL_REACH = 0x10000
DEBUG_DIRS = ("/usr/lib/debug",)
_KALLSYMS_TEXT = set("TtWw")
_KALLSYMS_LINE = re.compile(r"^([0-9a-fA-F]+)\s+(\S)\s+(\S+)(?:\s+\[(\S+)\])?\s*$")
_BIND_RANK = {"STB_GLOBAL": 0, "STB_WEAK": 1, "STB_GNU_UNIQUE": 1, "STB_LOCAL": 2}


def _open_text(path: str):
    """A text file, plain or gzip/xz/bzip2-compressed (by its first bytes)."""
    import bz2
    import gzip
    import lzma
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    if head.startswith(b"BZh"):
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``FILE[@BASE]`` -> (file, base or None). BASE is hex (``0x108000``) or
    decimal; a file name may itself contain ``@`` when no base follows."""
    path, sep, tail = spec.rpartition("@")
    if sep and path:
        try:
            return path, int(tail, 0)
        except ValueError:
            pass
    return spec, None


@dataclass
class _Table:
    """One symbol file's symbols, at run-time addresses."""

    path: str
    starts: list[int]
    ends: list[int]
    names: list[str]
    bias: int = 0
    lines: "_LineTable | None" = None


@dataclass
class _LineTable:
    """DWARF line rows of one ELF file, read one compilation unit at a time."""

    elf: object
    dwarf: Any
    aranges: Any
    ranges: list[tuple[int, int, int]] = field(default_factory=list)   # (lo, hi, cu offset)
    cus: dict[int, tuple[list[int], list[str | None]]] = field(default_factory=dict)
    whole: tuple[list[int], list[str | None]] | None = None

    def _rows(self, cu) -> tuple[list[int], list[str | None]]:
        prog = self.dwarf.line_program_for_CU(cu)
        if prog is None:
            return [], []
        hdr = prog.header
        files = hdr.file_entry
        one_based = hdr.version < 5
        names: dict[int, str | None] = {}

        def fname(i: int) -> str | None:
            if i not in names:
                k = i - 1 if one_based else i
                names[i] = (files[k].name.decode("utf-8", "replace")
                            if 0 <= k < len(files) else None)
            return names[i]
        rows = []
        for e in prog.get_entries():
            s = e.state
            if s is None:
                continue
            rows.append((s.address, None if s.end_sequence else f"{fname(s.file)}:{s.line}"))
        rows.sort(key=lambda r: (r[0], r[1] is not None))
        return [a for a, _ in rows], [w for _, w in rows]

    def _cu_rows(self, addr: int) -> tuple[list[int], list[str | None]]:
        off = None
        if self.aranges is not None:
            try:
                off = self.aranges.cu_offset_at_addr(addr)
            except Exception:   # pragma: no cover - malformed aranges
                off = None
        if off is None:
            if self.whole is None:
                addrs: list[int] = []
                where: list[str | None] = []
                merged: list = []
                for cu in self.dwarf.iter_CUs():
                    a, w = self._rows(cu)
                    merged.extend(zip(a, w))
                merged.sort(key=lambda r: (r[0], r[1] is not None))
                addrs = [a for a, _ in merged]
                where = [w for _, w in merged]
                self.whole = (addrs, where)
            return self.whole
        if off not in self.cus:
            self.cus[off] = self._rows(self.dwarf.get_CU_at(off))
        return self.cus[off]

    def lookup(self, addr: int) -> str | None:
        addrs, where = self._cu_rows(addr)
        i = bisect.bisect_right(addrs, addr) - 1
        return where[i] if i >= 0 else None


class Symbolizer:
    """Names IPs from ELF and kallsyms-format files (module docstring)."""

    def __init__(self, specs: list[str] | tuple[str, ...] = ()):
        self._tables: list[_Table] = []
        self._built: tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[int]] | None = None
        self.files: list[str] = []
        self._open: list = []          # files that lazy DWARF reading still needs
        for spec in specs:
            self.add(spec)

    def close(self) -> None:
        """Close the ELF files kept open for their line tables (lookups after
        this give no ``file:line``)."""
        for f in self._open:
            f.close()
        self._open.clear()
        for t in self._tables:
            t.lines = None

    def __enter__(self) -> "Symbolizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:   # pragma: no cover - interpreter shutdown
            pass

    # --- loading ----------------------------------------------------------

    def add(self, spec: str) -> None:
        """Add ``FILE[@BASE]``: an ELF file or a kallsyms-format text file."""
        path, base = parse_spec(spec)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise PksEmuError(f"--symbols {path}: cannot read: {e.strerror or e}") from None
        if magic == b"\x7fELF":
            self.add_elf(path, base)
        else:
            self.add_kallsyms(path, base or 0)

    def add_elf(self, path: str | os.PathLike, base: int | None = None, *,
                debug_dirs: tuple[str, ...] = DEBUG_DIRS) -> None:
        """Add an ELF file's function symbols. ``base``: where a PIE or shared
        object's first loadable segment was mapped (None: at its link
        address, as for a non-PIE executable)."""
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        path = os.fspath(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise PksEmuError(f"--symbols {path}: cannot read: {e.strerror or e}") from None
        opened = [f]
        try:
            elf = ELFFile(f)
            keep = self._load_elf(elf, path, base, debug_dirs, opened)
        except ELFError as e:
            keep = False
            raise PksEmuError(f"--symbols {path}: not a readable ELF file: {e}") from None
        finally:
            if not keep:
                for o in opened:
                    o.close()
        if keep:
            self._open.extend(opened)

    def _load_elf(self, elf, path: str, base: int | None, debug_dirs: tuple[str, ...], opened: list) -> bool:
        # True when the table reads DWARF lazily (the files stay open).
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        link_base = min((s["p_vaddr"] for s in loads), default=0) & ~0xFFF
        if base is not None and elf["e_type"] == "ET_EXEC" and base != link_base:
            raise PksEmuError(f"--symbols {path}@{base:#x}: a non-PIE executable (ET_EXEC) runs at its "
                              f"link address {link_base:#x}; give no base")
        bias = 0 if base is None else base - link_base
        symelf, dbg = elf, None
        if not self._has_functions(elf, ".symtab"):
            dbg = self._debug_file(elf, path, debug_dirs, opened)
            if dbg is not None:
                symelf = dbg
        syms = self._functions(symelf, ".symtab") or self._functions(elf, ".dynsym")
        syms.extend(self._plt(elf, {a: n for a, _, n, _ in syms}))
        lines = None
        dwelf = dbg if dbg is not None and dbg.has_dwarf_info() else elf
        if dwelf.has_dwarf_info():
            try:
                dwarf = dwelf.get_dwarf_info()
                if dwarf.has_debug_info:
                    lines = _LineTable(dwelf, dwarf, dwarf.get_aranges())
            except Exception:   # pragma: no cover - DWARF pyelftools cannot read
                lines = None
        self._add_table(path, syms, bias, lines, infer_sizes=True)
        return lines is not None

    @staticmethod
    def _has_functions(elf, name: str) -> bool:
        sec = elf.get_section_by_name(name)
        if sec is None or not hasattr(sec, "iter_symbols"):
            return False
        return any(s["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and s["st_shndx"] != "SHN_UNDEF"
                   for s in sec.iter_symbols())

    @staticmethod
    def _functions(elf, name: str) -> list[tuple[int, int, str, tuple]]:
        sec = elf.get_section_by_name(name)
        out: list[tuple[int, int, str, tuple]] = []
        if sec is None or not hasattr(sec, "iter_symbols"):
            return out
        for s in sec.iter_symbols():
            info = s["st_info"]
            if info["type"] not in ("STT_FUNC", "STT_GNU_IFUNC") or s["st_shndx"] == "SHN_UNDEF":
                continue
            if not s.name or not s["st_value"]:
                continue
            nm = s.name.split("@")[0] if "@@" in s.name else s.name
            rank = (_BIND_RANK.get(info["bind"], 3), len(nm) - len(nm.lstrip("_")), nm)
            out.append((s["st_value"], s["st_size"], nm, rank))
        return out

    @staticmethod
    def _plt(elf, functions: dict[int, str]) -> list[tuple[int, int, str, tuple]]:
        """``name@plt`` for each PLT stub: the GOT slot its ``jmp *disp(%rip)``
        reads, matched with the relocation that fills that slot (for an
        IRELATIVE one, the name of the IFUNC resolver it calls, else
        ``*ABS*+0x...`` as objdump prints it)."""
        slots: dict[int, str] = {}
        dynsym = elf.get_section_by_name(".dynsym")
        for relname in (".rela.plt", ".rela.dyn"):
            rel = elf.get_section_by_name(relname)
            if rel is None or dynsym is None or not hasattr(rel, "iter_relocations"):
                continue
            for r in rel.iter_relocations():
                if r["r_info_sym"]:
                    sym = dynsym.get_symbol(r["r_info_sym"])
                    if sym is not None and sym.name:
                        slots[r["r_offset"]] = sym.name
                elif r["r_info_type"] == 37 and r.is_RELA():      # R_X86_64_IRELATIVE
                    slots[r["r_offset"]] = functions.get(r["r_addend"], f"*ABS*+{r['r_addend']:#x}")
        out: list[tuple[int, int, str, tuple]] = []
        if not slots:
            return out
        for secname in (".plt", ".plt.sec", ".plt.got"):
            sec = elf.get_section_by_name(secname)
            if sec is None or sec["sh_size"] == 0:
                continue
            data, addr = sec.data(), sec["sh_addr"]
            step = 8 if secname == ".plt.got" and sec["sh_size"] % 16 else 16
            for off in range(0, len(data) - step + 1, step):
                stub = data[off:off + step]
                k = stub.find(b"\xff\x25")          # jmp *disp32(%rip)
                if k < 0 or k + 6 > len(stub):
                    continue
                disp = int.from_bytes(stub[k + 2:k + 6], "little", signed=True)
                name = slots.get(addr + off + k + 6 + disp)
                if name:
                    out.append((addr + off, step, name + "@plt", (0, 0, name)))
        return out

    @staticmethod
    def _debug_file(elf, path: str, debug_dirs: tuple[str, ...], opened: list):
        """The installed detached debug file of a stripped ELF, or None."""
        from elftools.elf.elffile import ELFFile
        candidates = []
        for sec in elf.iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        bid = note["n_desc"]
                        candidates += [os.path.join(d, ".build-id", bid[:2], bid[2:] + ".debug")
                                       for d in debug_dirs]
        link = elf.get_section_by_name(".gnu_debuglink")
        if link is not None:
            name = link.data().split(b"\0", 1)[0].decode("utf-8", "replace")
            here = os.path.dirname(os.path.abspath(path))
            candidates += [os.path.join(here, name), os.path.join(here, ".debug", name)]
            candidates += [os.path.join(d, here.lstrip("/"), name) for d in debug_dirs]
        for c in candidates:
            if os.path.isfile(c) and os.path.abspath(c) != os.path.abspath(path):
                fd = open(c, "rb")
                opened.append(fd)
                try:
                    return ELFFile(fd)
                except Exception:   # pragma: no cover - not an ELF file after all
                    continue
        return None

    def add_kallsyms(self, path: str | os.PathLike, base: int = 0) -> None:
        """Add a ``/proc/kallsyms``-format file (``nm`` output too): text
        symbols, sizes up to the next symbol; ``base`` is added to every
        address."""
        path = os.fspath(path)
        by_module: dict[str | None, list[tuple[int, int, str, tuple]]] = {}
        bounds: dict[str | None, list[int]] = {}     # every symbol's address bounds the one before
        n_lines = zero = 0
        try:
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip() or line.startswith("#"):
                        continue
                    m = _KALLSYMS_LINE.match(line)
                    if m is None:
                        if n_lines == 0 and lineno > 20:
                            break
                        raise PksEmuError(f"--symbols {path}:{lineno}: expected 'ADDRESS TYPE NAME [MODULE]', "
                                          f"got {line.strip()[:80]!r}")
                    n_lines += 1
                    addr, typ, name, mod = int(m.group(1), 16), m.group(2), m.group(3), m.group(4)
                    if addr == 0:
                        zero += 1
                        continue
                    bounds.setdefault(mod, []).append(addr + base)
                    if typ not in _KALLSYMS_TEXT:
                        continue
                    shown = f"{name}\0{mod}" if mod else name     # NUL: the module follows
                    rank = (0 if typ in "Tt" else 1, len(name) - len(name.lstrip("_")), name)
                    by_module.setdefault(mod, []).append((addr + base, 0, shown, rank))
        except OSError as e:
            raise PksEmuError(f"--symbols {path}: cannot read: {e.strerror or e}") from None
        if n_lines and zero and not by_module:
            raise PksEmuError(f"--symbols {path}: every address is 0 (kptr_restrict): "
                              "read /proc/kallsyms as root")
        if not n_lines:
            raise PksEmuError(f"--symbols {path}: neither an ELF file nor kallsyms-format text")
        syms: list[tuple[int, int, str, tuple]] = []
        for mod, mod_syms in by_module.items():
            edges = sorted(set(bounds[mod]))
            for a, _, n, r in mod_syms:
                i = bisect.bisect_right(edges, a)
                syms.append((a, (edges[i] if i < len(edges) else a + LAST_SYMBOL_REACH) - a, n, r))
        self._add_table(path, syms, 0, None, infer_sizes=False)

    def _add_table(self, path: str, syms: list[tuple[int, int, str, tuple]], bias: int,
                   lines: _LineTable | None, *, infer_sizes: bool) -> None:
        # One name per address (the best-ranked alias); size-0 symbols reach
        # the next symbol (ELF assembly functions often have no size).
        best: dict[int, tuple[int, str, tuple]] = {}
        for addr, size, name, rank in syms:
            old = best.get(addr)
            if old is None or rank < old[2] or (rank == old[2] and size > old[0]):
                best[addr] = (max(size, old[0]) if old else size, name, rank)
        addrs = sorted(best)
        starts, ends, names = [], [], []
        for i, a in enumerate(addrs):
            size, name, _ = best[a]
            if size == 0 and infer_sizes:
                size = (addrs[i + 1] - a) if i + 1 < len(addrs) else LAST_SYMBOL_REACH
            if size == 0:
                continue
            starts.append(a + bias)
            ends.append(a + bias + size)
            names.append(name)
        self._tables.append(_Table(path, starts, ends, names, bias, lines))
        self.files.append(path)
        self._built = None

    # --- lookups ----------------------------------------------------------

    def _build(self):
        if self._built is None:
            rows = sorted((s, e, n, t) for t, tab in enumerate(self._tables)
                          for s, e, n in zip(tab.starts, tab.ends, tab.names))
            self._built = (np.array([r[0] for r in rows], dtype=np.uint64),
                           np.array([r[1] for r in rows], dtype=np.uint64),
                           np.array([r[3] for r in rows], dtype=np.int32),
                           [r[2] for r in rows], [r[0] for r in rows])
        return self._built

    def __len__(self) -> int:
        return sum(len(t.names) for t in self._tables)

    def _index(self, ips: np.ndarray) -> np.ndarray:
        """Index of the symbol covering each IP, or -1."""
        starts, ends, _, _, _ = self._build()
        if not len(starts):
            return np.full(len(ips), -1, np.int64)
        idx = np.searchsorted(starts, ips, side="right").astype(np.int64) - 1
        ok = idx >= 0
        hit = np.zeros(len(ips), bool)
        hit[ok] = ips[ok] < ends[idx[ok]]
        # A symbol nested in a bigger one that ends first: look a few back.
        for back in range(1, 4):
            miss = ~hit & (idx - back >= 0)
            if not miss.any():
                break
            j = idx[miss] - back
            inside = ips[miss] < ends[j]
            sel = np.flatnonzero(miss)[inside]
            idx[sel] = j[inside]
            hit[sel] = True
        return np.where(hit, idx, -1)

    def lookup(self, ip: int) -> tuple[str | None, str | None]:
        """``(function+offset or None, file:line or None)`` for one IP."""
        syms, srcs = self.lookup_many(np.array([ip], dtype=np.uint64))
        return syms[0], srcs[0]

    def lookup_many(self, ips) -> tuple[list[str | None], list[str | None]]:
        """``lookup`` for many IPs at once (vectorized): two lists."""
        ips = np.asarray(ips, dtype=np.uint64).reshape(-1)
        uniq, inverse = np.unique(ips, return_inverse=True)
        idx = self._index(uniq)
        starts, _, table_of, names, _ = self._build()
        usyms: list[str | None] = [None] * len(uniq)
        usrcs: list[str | None] = [None] * len(uniq)
        for k in np.flatnonzero(idx >= 0):
            i = int(idx[k])
            ip = int(uniq[k])
            name, _, mod = names[i].partition("\0")
            usyms[k] = f"{name}+{ip - int(starts[i]):#x}" + (f" [{mod}]" if mod else "")
            tab = self._tables[int(table_of[i])]
            if tab.lines is not None:
                try:
                    usrcs[k] = tab.lines.lookup(ip - tab.bias)
                except Exception:   # pragma: no cover - DWARF pyelftools cannot read
                    usrcs[k] = None
        inv = inverse.reshape(-1)
        return [usyms[i] for i in inv], [usrcs[i] for i in inv]

    def write_kallsyms(self, path: str | os.PathLike, module: str | None = None) -> int:
        """Write the symbols loaded so far as kallsyms-format text (run-time
        addresses; ``module`` tags every symbol that has no module of its
        own). Returns the line count."""
        starts, ends, _, names, _ = self._build()
        tmp = os.fspath(path) + ".tmp"
        n = 0
        with open(tmp, "w") as f:
            rows = list(zip(starts.tolist(), ends.tolist(), names))
            for i, (s, e, full) in enumerate(rows):
                name, _, mod = full.partition("\0")
                mod = mod or module
                tag = f"\t[{mod}]" if mod else ""
                f.write(f"{s:016x} t {name}{tag}\n")
                n += 1
                if i + 1 == len(rows) or rows[i + 1][0] > e:
                    # Where a symbol ends before the next one starts, a
                    # non-text line ("?" type) bounds it.
                    f.write(f"{e:016x} ? .end{tag}\n")
                    n += 1
        os.replace(tmp, path)
        return n
