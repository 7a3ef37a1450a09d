"""Physical memory's frame allocator: the frames a machine hands out for page
tables (``Machine.alloc_frames``, ``AddressSpace``, the kernel mapper)."""
from __future__ import annotations

from ._core import PhysicalMemory
from .constants import PAGE_SIZE


class FrameAllocator:
    """Hands out zeroed, contiguous 4-KiB frames of ``memory``, growing down
    from the top of the physical address space (2**maxphyaddr), away from the
    low addresses users pick for their own data; never below 4 GiB."""

    def __init__(self, memory: PhysicalMemory, maxphyaddr: int) -> None:
        self.memory = memory
        self._next_free = 1 << maxphyaddr
        self._frames_allocated = 0

    @property
    def allocated(self) -> int:
        """Frames handed out so far."""
        return self._frames_allocated

    def alloc(self, count: int = 1, align: int = PAGE_SIZE) -> int:
        """Allocate ``count`` zeroed, contiguous 4-KiB frames; return the first address."""
        if count < 1:
            raise ValueError(f"frame count {count} must be at least 1")
        if align < PAGE_SIZE or align & (align - 1):
            raise ValueError(f"alignment {align:#x} must be a power of two of at least 4 KiB")
        base = (self._next_free - count * PAGE_SIZE) & ~(align - 1)
        if base < (1 << 32):
            raise MemoryError("the frame allocator ran into the low 4 GiB of physical memory")
        self._next_free = base
        self._frames_allocated += count
        # Untouched frames already read as zero; clear only frames someone
        # wrote to (so a 1-GiB allocation costs nothing until used).
        if count <= 64:
            touched = [base + i * PAGE_SIZE for i in range(count)
                       if self.memory.is_allocated(base + i * PAGE_SIZE)]
        else:
            touched = [pa for pa in self.memory.frame_addresses()
                       if base <= pa < base + count * PAGE_SIZE]
        for pa in touched:
            self.memory.write(pa, bytes(PAGE_SIZE))
        return base
