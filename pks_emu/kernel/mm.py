"""Kernel page tables (``init_mm``) and a ``vmalloc`` that maps real pages.

One ``AddressSpace`` holds the kernel mappings and is loaded in CR3 on every
CPU, as the kernel half of every ``mm`` is shared. ``vmalloc(size, pkey)``
maps fresh frames with ``PAGE_KERNEL_PKEY(pkey)`` (V3+ ``pgtable_types.h``),
as the test module's ``__vmalloc_node_range(..., PAGE_KERNEL_PKEY(pkey), ...)``
does, with a guard page after each area like vmalloc.
"""
from __future__ import annotations

from ..constants import PAGE_KERNEL_PKEY, PAGE_SIZE, PAGE_SIZE_1G, PAGE_SIZE_2M, PTE_P, PTE_PS, PTE_XD, pte_pkey
from ._part import KernelPart

#: VMALLOC_START for 4-level and 5-level paging (Documentation/x86/x86_64/mm.rst)
VMALLOC_START = {4: 0xFFFFC90000000000, 5: 0xFFA0000000000000}
_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


class VmArea:
    """One vmalloc area: ``addr``, ``size``, ``pkey``, ``page_size``, the frames."""

    __slots__ = ("addr", "size", "pkey", "page_size", "frames")

    def __init__(self, addr: int, size: int, pkey: int, page_size: int, frames: list[int]):
        self.addr, self.size, self.pkey, self.page_size, self.frames = (
            addr, size, pkey, page_size, frames)

    def __repr__(self) -> str:
        return f"<vm_area {self.addr:#x}+{self.size:#x} pkey {self.pkey}>"


class MmMixin(KernelPart):
    """Kernel mappings and byte copies through the CPU core (part of Kernel)."""

    def _mm_init(self) -> None:
        self.init_mm = self.machine.address_space()
        self.init_mm.activate()
        self._vmalloc_next = VMALLOC_START[self.machine.paging_levels]
        self.vm_areas: dict[int, VmArea] = {}
        # __supported_pte_mask: without NX the XD bit would be reserved.
        self._pte_mask = ~0 if "nx" in self.machine.features else ~PTE_XD

    def vmalloc(self, size: int, pkey: int = 0, *, page_size: int = PAGE_SIZE) -> int:
        """Map ``size`` bytes (rounded up to ``page_size``) of fresh, zeroed
        frames with ``PAGE_KERNEL_PKEY(pkey)``; return the address.

        ``page_size`` 2 MiB maps large PDEs, whose key the fault path reads
        from the PDE itself (V7 12/18, V10 16/44). (1-GiB areas are not offered:
        the frame allocator would zero a whole GiB.)
        """
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"vmalloc size {size!r} must be a positive int")
        if page_size not in (PAGE_SIZE, PAGE_SIZE_2M):
            raise ValueError(f"page_size {page_size!r}: expected 4096 or 2 MiB (0x200000)")
        prot = PAGE_KERNEL_PKEY(pkey) & self._pte_mask  # validates pkey 0..15
        npages = -(-size // page_size)
        addr = -(-self._vmalloc_next // page_size) * page_size
        frames = []
        for i in range(npages):
            pa = self.machine.alloc_frames(page_size // PAGE_SIZE, align=page_size)
            self.init_mm.map(addr + i * page_size, pa, page_size, prot=prot)
            frames.append(pa)
        self._vmalloc_next = addr + npages * page_size + PAGE_SIZE  # guard page
        self.vm_areas[addr] = VmArea(addr, npages * page_size, pkey, page_size, frames)
        return addr

    def vfree(self, addr: int) -> None:
        """Unmap a vmalloc area and flush it from every CPU's TLB
        (``flush_tlb_kernel_range``). The frames are not reused."""
        area = self.vm_areas.pop(addr, None)
        if area is None:
            raise ValueError(f"vfree({addr:#x}): not the start of a vmalloc area")
        for va in range(area.addr, area.addr + area.size, area.page_size):
            self.init_mm.unmap(va)
            for cpu in self.machine.cpus:
                cpu.invlpg(va)

    def lookup_address(self, addr: int):
        """V7+ ``lookup_address()``: ``(entry, level)`` of the leaf, level 1 for a
        PTE, 2 for a 2-MiB PDE, 3 for a 1-GiB PDPTE; None if unmapped."""
        found = self.init_mm.lookup(addr)
        if found is None:
            return None
        _ea, entry, size = found
        return entry, {PAGE_SIZE: 1, PAGE_SIZE_2M: 2, PAGE_SIZE_1G: 3}[size]

    def follow_pte(self, addr: int) -> int | None:
        """V4-V6 test's ``follow_pte(&init_mm, addr)``: the 4-KiB PTE, or None
        (it fails for large mappings, as the kernel's does)."""
        found = self.lookup_address(addr)
        if found is None or found[1] != 1:
            return None
        return found[0]

    def walk_init_mm_key(self, address: int) -> int | None:
        """The key of the leaf mapping ``address`` in the kernel tables, read
        the way ``pks_handle_key_fault`` does (V10 16/44): the top entry must be
        present; below it a large entry is checked *before* present; the PTE
        is read without a present check. None when the walk stops early."""
        for level, _ea, e in self.init_mm.walk(address):
            if level == 1 or (level <= 3 and e & PTE_PS):
                return pte_pkey(e)
            if not e & PTE_P:
                return None
        return None

    # --- memcpy through the CPU --------------------------------------------------------
    def write_bytes(self, who, va: int, data: bytes) -> None:
        """``memcpy(va, data, len)`` by a task (or on a CPU): every page is
        checked by the CPU core with the running PKRS; a fault takes the
        kernel's fault path (a handled PK fault is retried)."""
        data = bytes(data)
        for off, chunk_va, n in _chunks(va, len(data)):
            pa = self.access(who, chunk_va, "write", size=n)
            self.machine.memory.write(pa, data[off:off + n])

    def read_bytes(self, who, va: int, n: int) -> bytes:
        """``memcpy(buf, va, n)`` by a task (or on a CPU); see ``write_bytes``."""
        out = bytearray()
        for _off, chunk_va, k in _chunks(va, n):
            pa = self.access(who, chunk_va, "read", size=k)
            out += self.machine.memory.read(pa, k)
        return bytes(out)


def _chunks(va: int, n: int):
    if n <= 0:
        raise ValueError(f"copy length {n} must be positive")
    off = 0
    while off < n:
        cur = va + off
        k = min(n - off, PAGE_SIZE - (cur & (PAGE_SIZE - 1)))
        yield off, cur, k
        off += k
