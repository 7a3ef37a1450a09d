"""The machine: physical memory shared by one or more CPUs."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from ._core import CPU, PhysicalMemory, feature_bits
from .memory import FrameAllocator
from .constants import (ALL_FEATURES, CR0_WP, CR4_PGE, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP,
                        EFER_NXE, MSR_IA32_PKRS, PAGE_SIZE, PKS_INIT_VALUE)

if TYPE_CHECKING:
    from .paging import AddressSpace


class Machine:
    """An x86-64 machine in long mode at CPL 0, with sparse physical memory.

    ``features`` is a set of names among ``ALL_FEATURES`` (``"pku"``,
    ``"pks"``, ``"smep"``, ``"smap"``, ``"nx"``, ``"1g"``, ``"la57"``); a
    feature that is absent makes its CR4 bit, MSR or PTE encoding fault as on
    a CPU without it. ``compat="qemu"`` reproduces QEMU 7.2 TCG where it
    differs from the SDM (see docs/semantics.md).

    ``maxphyaddr`` (CPUID.80000008H:EAX[7:0]) bounds physical addresses in
    paging entries and CR3; ``tlb_entries`` sizes each CPU's direct-mapped TLB.
    """

    def __init__(self, paging_levels: int = 4, ncpus: int = 1,
                 features: Iterable[str] = ALL_FEATURES, compat: str = "sdm", *,
                 maxphyaddr: int = 52, tlb_entries: int = 1024) -> None:
        for name, v in (("ncpus", ncpus), ("paging_levels", paging_levels),
                         ("maxphyaddr", maxphyaddr), ("tlb_entries", tlb_entries)):
            # a bool or a float would be taken as a number (Machine(ncpus=True), 4.0-level paging)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {type(v).__name__} ({v!r})")
        ncpus, paging_levels = int(ncpus), int(paging_levels)
        maxphyaddr, tlb_entries = int(maxphyaddr), int(tlb_entries)
        if not 1 <= ncpus <= 256:
            raise ValueError(f"ncpus {ncpus!r} out of range: expected 1..256")
        if not isinstance(compat, str):
            raise TypeError(f"compat must be 'sdm' or 'qemu', got {type(compat).__name__}")
        if features is None or isinstance(features, str):
            raise TypeError(f"features must be an iterable of feature names (e.g. {{'pks', 'pku'}}), "
                            f"got {features!r}")
        features = frozenset(features)
        feature_bits(features)  # rejects unknown names with a clear message
        self.features = features
        self.paging_levels = paging_levels
        self.compat = compat
        self.maxphyaddr = maxphyaddr
        self.memory = PhysicalMemory()
        self.cpus: tuple[CPU, ...] = tuple(
            CPU(self.memory, i, features=features, compat=compat, paging_levels=paging_levels,
                maxphyaddr=maxphyaddr, tlb_entries=tlb_entries, machine=self)
            for i in range(ncpus))
        #: the allocator of page-table frames, beside the memory it carves
        self.frames = FrameAllocator(self.memory, maxphyaddr)

    @property
    def ncpus(self) -> int:
        return len(self.cpus)

    def alloc_frames(self, count: int = 1, align: int = PAGE_SIZE) -> int:
        """Allocate ``count`` zeroed, contiguous 4-KiB frames; return the first address."""
        return self.frames.alloc(count, align)

    def address_space(self) -> AddressSpace:
        """A new, empty set of page tables in this machine's memory."""
        from .paging import AddressSpace
        return AddressSpace(self)

    def flush_tlb_all(self) -> None:
        for cpu in self.cpus:
            cpu.flush_tlb()

    def counters(self) -> dict[str, int]:
        """Counters summed over all CPUs."""
        total: dict[str, int] = {}
        for cpu in self.cpus:
            for k, v in cpu.counters().items():
                total[k] = total.get(k, 0) + v
        return total

    def __repr__(self) -> str:
        return (f"<pks_emu.Machine {self.paging_levels}-level, {self.ncpus} CPU(s), "
                f"features={sorted(self.features)}, compat={self.compat!r}>")



def kernel_machine(ncpus: int = 1, paging_levels: int = 4, *, compat: str = "sdm",
                   pkrs: int = PKS_INIT_VALUE) -> tuple[Machine, AddressSpace]:
    """A machine set up as a kernel with the PKS series leaves it after boot,
    with an empty kernel address space active on every CPU: EFER.NXE, CR0.WP,
    CR4.PGE/PKE/PKS/SMEP/SMAP, and IA32_PKRS = ``pkrs`` (PKS_INIT_VALUE:
    pks_setup, V10 12/44). The one place the generators, ``pks-emu bench``
    and the asv suite bring a machine up."""
    m = Machine(paging_levels=paging_levels, ncpus=ncpus, compat=compat)
    aspace = m.address_space()
    for cpu in m.cpus:
        cpu.efer = cpu.efer | EFER_NXE
        cpu.cr0 = cpu.cr0 | CR0_WP
        cpu.cr4 = cpu.cr4 | CR4_PGE | CR4_PKE | CR4_PKS | CR4_SMEP | CR4_SMAP
        cpu.wrmsr(MSR_IA32_PKRS, pkrs)
    aspace.activate()
    return m, aspace
