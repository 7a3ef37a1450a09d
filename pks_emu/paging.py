"""Building page tables in a machine's memory, the way a kernel does.

``AddressSpace`` writes real IA-32e paging structures (SDM §4.5) into
``machine.memory``; CR3 points at its top-level table. It never touches a
TLB by itself: after changing a mapping that a CPU may have cached, call
``invalidate(va)`` (INVLPG on the CPUs running this address space) as a
kernel would, or observe the stale translation as hardware would.
"""
from __future__ import annotations

import operator

from typing import TYPE_CHECKING

import numpy as np

from ._core import is_canonical, walk_entries

from .constants import (PAGE_SIZE, PAGE_SIZE_1G, PAGE_SIZE_2M, PTE_G, PTE_P, PTE_PKEY_MASK,
                        PTE_PKEY_SHIFT, PTE_PS, PTE_RW, PTE_US, PTE_XD, _PAGE_PKEY)

if TYPE_CHECKING:
    from .machine import Machine

#: Flags of the non-leaf entries this builder creates: present, writable and
#: user, so that the leaf alone decides (as Linux's _PAGE_TABLE does). Edit
#: them through ``entry_address`` to test rights combined over levels.
TABLE_FLAGS = PTE_P | PTE_RW | PTE_US

_LEAF_LEVEL = {PAGE_SIZE: 1, PAGE_SIZE_2M: 2, PAGE_SIZE_1G: 3}
_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


def _need_int(name: str, v, *, allow_bool: bool = False) -> int:
    """``v`` as an int (Python or numpy integer); floats, strings and (unless
    ``allow_bool``) bools are refused with TypeError instead of truncated."""
    if isinstance(v, (bool, np.bool_)) and not allow_bool:
        raise TypeError(f"{name} must be an integer, not a bool ({v!r})")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(v).__name__} ({v!r})") from None


def _level_shift(level: int) -> int:
    return 12 + 9 * (level - 1)


class AddressSpace:
    """Page tables for one address space, allocated in ``machine.memory``."""

    def __init__(self, machine: Machine, cr3: int | None = None) -> None:
        if getattr(machine, "memory", None) is None or getattr(machine, "paging_levels", None) is None:
            raise TypeError(f"AddressSpace needs a pks_emu.Machine, got {type(machine).__name__}")
        if cr3 is not None:
            cr3 = _need_int("cr3", cr3)
        self.machine = machine
        self.memory = machine.memory
        self.levels = machine.paging_levels
        self.cr3 = machine.alloc_frames(1) if cr3 is None else cr3

    # --- helpers -------------------------------------------------------------
    def _check_va(self, va: int, size: int) -> None:
        va = _need_int("va", va)
        if va < 0 or va >= 1 << 64 or not is_canonical(va, self.levels):
            raise ValueError(f"virtual address {va:#x} is not canonical for {self.levels}-level paging")
        if va % size:
            raise ValueError(f"virtual address {va:#x} is not aligned to the page size {size:#x}")

    def _index(self, va: int, level: int) -> int:
        return (va >> _level_shift(level)) & 511

    def _table_for(self, va: int, leaf_level: int, create: bool) -> int | None:
        """Address of the table at ``leaf_level`` holding ``va``'s entry."""
        table = self.cr3 & _ADDR_MASK
        for level in range(self.levels, leaf_level, -1):
            ea = table + 8 * self._index(va, level)
            e = self.memory.read_u64(ea)
            if not e & PTE_P:
                if not create:
                    return None
                new = self.machine.alloc_frames(1)
                self.memory.write_u64(ea, new | TABLE_FLAGS)
                table = new
                continue
            if e & PTE_PS and level <= 3:
                size = 1 << _level_shift(level)
                raise ValueError(f"{va:#x} lies in a {_size_name(size)} page mapped at level {level}")
            table = e & _ADDR_MASK
        return table

    # --- queries -------------------------------------------------------------
    def walk(self, va: int) -> list[tuple[int, int, int]]:
        """``(level, entry_address, entry)`` of each entry the walk of ``va``
        reads, top level first (the compiled walk, as ``CPU.walk``)."""
        return walk_entries(self.memory, self.cr3, self.levels, va & ((1 << 64) - 1),
                            self.machine.maxphyaddr)

    def entry_address(self, va: int, level: int) -> int | None:
        """Physical address of the entry for ``va`` at ``level`` (5 = PML5E ...
        1 = PTE), or None if a table on the way is missing."""
        if not 1 <= level <= self.levels:
            raise ValueError(f"level {level} out of range: expected 1..{self.levels}")
        for lv, ea, e in self.walk(va):
            if lv == level:
                return ea
        return None

    def lookup(self, va: int) -> tuple[int, int, int] | None:
        """``(entry_address, entry, page_size)`` of the leaf mapping ``va``, or None."""
        entries = self.walk(va)
        level, ea, e = entries[-1]
        if not e & PTE_P:
            return None
        return ea, e, 1 << _level_shift(level)

    # --- changes -------------------------------------------------------------
    def map(self, va: int, pa: int, size: int = PAGE_SIZE, *, writable: bool = True,
            user: bool = False, nx: bool = False, pkey: int = 0, global_: bool = False,
            prot: int | None = None) -> None:
        """Map ``size`` bytes (4 KiB, 2 MiB or 1 GiB) at ``va`` to ``pa``.

        ``prot`` gives the raw leaf flags (e.g. ``PAGE_KERNEL_PKEY(3)``) and
        overrides the keyword flags; the PS bit is added for large pages.
        """
        va, pa, size = _need_int("va", va), _need_int("pa", pa), _need_int("size", size)
        pkey = _need_int("pkey", pkey)
        if prot is not None:
            prot = _need_int("prot", prot)
        if size not in _LEAF_LEVEL:
            raise ValueError(f"page size {size:#x} not supported: expected 4 KiB, 2 MiB or 1 GiB")
        self._check_va(va, size)
        if not 0 <= pa < 1 << 52 or pa % size:
            raise ValueError(f"physical address {pa:#x} must be below 2**52 and aligned to {size:#x}")
        level = _LEAF_LEVEL[size]
        if prot is None:
            flags = PTE_P | (PTE_RW if writable else 0) | (PTE_US if user else 0)
            flags |= (PTE_XD if nx else 0) | (PTE_G if global_ else 0) | _PAGE_PKEY(pkey)
        else:
            if not 0 <= prot < 1 << 64:
                raise ValueError(f"prot {prot:#x} does not fit in 64 bits")
            flags = prot & ~_ADDR_MASK
        if level > 1:
            flags |= PTE_PS
        table = self._table_for(va, level, create=True)
        assert table is not None
        ea = table + 8 * self._index(va, level)
        old = self.memory.read_u64(ea)
        if old & PTE_P and level > 1 and not old & PTE_PS:
            raise ValueError(f"{va:#x}: a page table already covers this {_size_name(size)} range; unmap it first")
        self.memory.write_u64(ea, pa | flags)

    def map_range(self, va: int, pa: int, length: int, **flags) -> None:
        """Map ``length`` bytes of 4-KiB pages, ``va -> pa`` contiguously.

        Fills whole page-table pages at once, so millions of pages map fast.
        Takes the keyword flags of ``map`` (not ``prot``).
        """
        va, pa, length = _need_int("va", va), _need_int("pa", pa), _need_int("length", length)
        if "pkey" in flags:
            flags["pkey"] = _need_int("pkey", flags["pkey"])
        if length % PAGE_SIZE or length <= 0:
            raise ValueError(f"length {length:#x} must be a positive multiple of 4 KiB")
        self._check_va(va, PAGE_SIZE)
        self._check_va(va + length - PAGE_SIZE, PAGE_SIZE)
        if not 0 <= pa or pa + length > 1 << 52 or pa % PAGE_SIZE:
            raise ValueError(f"physical range {pa:#x}+{length:#x} must be 4-KiB aligned and below 2**52")
        bits = PTE_P | (PTE_RW if flags.pop("writable", True) else 0)
        bits |= PTE_US if flags.pop("user", False) else 0
        bits |= PTE_XD if flags.pop("nx", False) else 0
        bits |= PTE_G if flags.pop("global_", False) else 0
        bits |= _PAGE_PKEY(flags.pop("pkey", 0))
        if flags:
            raise TypeError(f"map_range() got unexpected keyword arguments {sorted(flags)}")
        done = 0
        while done < length:
            cur = va + done
            first = (cur >> 12) & 511
            count = min(512 - first, (length - done) // PAGE_SIZE)
            table = self._table_for(cur, 1, create=True)
            assert table is not None
            entries = np.frombuffer(self.memory.read(table, PAGE_SIZE), dtype="<u8").copy()
            frames = (pa + done + PAGE_SIZE * np.arange(count, dtype=np.uint64)).astype(np.uint64)
            entries[first:first + count] = frames | np.uint64(bits)
            self.memory.write(table, entries.tobytes())
            done += count * PAGE_SIZE

    def unmap(self, va: int) -> int:
        """Clear the leaf entry mapping ``va``; return the old entry (0 if unmapped)."""
        found = self.lookup(va)
        if found is None:
            return 0
        ea, e, _ = found
        self.memory.write_u64(ea, 0)
        return e

    def protect(self, va: int, *, writable: bool | None = None, user: bool | None = None,
                nx: bool | None = None, pkey: int | None = None,
                global_: bool | None = None) -> int:
        """Change flags of the leaf mapping ``va``; return the old entry."""
        found = self.lookup(va)
        if found is None:
            raise ValueError(f"{va:#x} is not mapped")
        ea, e, _ = found
        new = e
        for flag, bit in ((writable, PTE_RW), (user, PTE_US), (nx, PTE_XD), (global_, PTE_G)):
            if flag is not None:
                new = (new | bit) if flag else (new & ~bit)
        if pkey is not None:
            new = (new & ~PTE_PKEY_MASK) | _PAGE_PKEY(_need_int("pkey", pkey))
        self.memory.write_u64(ea, new)
        return e

    def set_pkey(self, va: int, pkey: int) -> int:
        """Put ``pkey`` in bits 62:59 of the leaf mapping ``va``; return the old entry."""
        return self.protect(va, pkey=pkey)

    def pkey_of(self, va: int) -> int | None:
        found = self.lookup(va)
        return None if found is None else (found[1] & PTE_PKEY_MASK) >> PTE_PKEY_SHIFT

    # --- CPUs ------------------------------------------------------------------
    def activate(self, cpu=None) -> None:
        """MOV to CR3 on ``cpu`` (a CPU or index), or on every CPU if None."""
        for c in self._cpus(cpu):
            c.cr3 = self.cr3

    def invalidate(self, va: int) -> None:
        """INVLPG ``va`` on every CPU whose CR3 points at this address space."""
        for c in self.machine.cpus:
            if c.cr3 & _ADDR_MASK == self.cr3 & _ADDR_MASK:
                c.invlpg(va)

    def _cpus(self, cpu):
        if cpu is None:
            return self.machine.cpus
        if isinstance(cpu, int):
            return (self.machine.cpus[cpu],)
        return (cpu,)

    def __repr__(self) -> str:
        return f"<pks_emu.AddressSpace cr3={self.cr3:#x} {self.levels}-level>"


def _size_name(size: int) -> str:
    return {PAGE_SIZE: "4 KiB", PAGE_SIZE_2M: "2 MiB", PAGE_SIZE_1G: "1 GiB"}.get(size, hex(size))
