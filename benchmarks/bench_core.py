"""asv benchmarks of the compiled access check (issue 2).

* one ``cpu.access`` call from Python on a TLB hit (target <= 300 ns);
* ``pks_emu.access_batch`` over TLB hits (target >= 100 M accesses/s);
* ``pks_emu.access_batch`` where every access misses the TLB and walks all
  levels, 4 and 5 (target >= 20 M accesses/s), scanning the pages in order or
  in random order (which also defeats the data caches holding the tables).

Every access runs the full check: supervisor pages under a protection key
with CR4.PKS/PKE/SMEP/SMAP, CR0.WP and EFER.NXE on, and the key opened in
PKRS, so all of them are allowed. The ``track_`` figures are best-of-N rates
in the units shown; the ``track_*_walks_per_access`` pins say that the miss
benchmarks really miss (a change to the TLB that makes them hit shows there).
"""
from __future__ import annotations

import numpy as np

import pks_emu
from pks_emu.constants import MSR_IA32_PKRS, PKR_AD_KEY
from pks_emu.errors import PageFault

from .common import (BATCH_N, HIT_PAGES, LOOP, MISS_N, MISS_PAGES, PMEM_BASE, PMEM_KEY, PKRS_OPEN, SEED,
                     best_seconds, mapped_machine, ns_per_call, scan_addresses)


class SingleAccess:
    """One access from Python; the TLB already holds the page."""

    params = [[4, 5]]
    param_names = ["levels"]

    def setup(self, levels):
        self.m, self.cpu = mapped_machine(levels, HIT_PAGES)
        self.va = PMEM_BASE + 0x10
        self.cpu.access(self.va, "read")
        self.cpu.access(self.va, "write")   # sets D: later writes hit too
        self.access = self.cpu.access
        self.translate = self.cpu.translate

    # Each time_ runs LOOP (1000) calls: divide by 1000 for one call.
    def time_access_read(self, levels):
        access, va = self.access, self.va
        for _ in range(LOOP):
            access(va, "read")

    def time_access_write_int_kind(self, levels):
        access, va = self.access, self.va
        for _ in range(LOOP):
            access(va, 1)

    def time_translate_read(self, levels):
        translate, va = self.translate, self.va
        for _ in range(LOOP):
            translate(va, "read")

    def track_access_read_ns(self, levels):
        access, va = self.access, self.va
        return ns_per_call(lambda: access(va, "read"))

    track_access_read_ns.unit = "ns"

    def track_translate_read_ns(self, levels):
        translate, va = self.translate, self.va
        return ns_per_call(lambda: translate(va, "read"))

    track_translate_read_ns.unit = "ns"


class SingleAccessFault:
    """One access that faults with PK (PKRS denies the key): the cost of
    building and raising ``PageFault``, against ``translate`` that returns it."""

    def setup(self):
        self.m, self.cpu = mapped_machine(4, HIT_PAGES)
        self.va = PMEM_BASE + 0x10
        self.cpu.access(self.va, "read")
        self.cpu.wrmsr(MSR_IA32_PKRS, PKRS_OPEN | PKR_AD_KEY(PMEM_KEY))

    # LOOP (1000) calls each, as in SingleAccess.
    def time_access_raises(self):
        access, va = self.cpu.access, self.va
        for _ in range(LOOP):
            try:
                access(va, "read")
            except PageFault:
                pass

    def time_translate_returns_fault(self):
        translate, va = self.cpu.translate, self.va
        for _ in range(LOOP):
            translate(va, "read")

    def track_fault_error_code(self):
        # Pins the answer: P|PK (0x21), a supervisor read denied by PKRS.AD.
        return self.cpu.translate(self.va, "read").error_code

    track_fault_error_code.unit = "error code"


class BatchHit:
    """``access_batch`` over HIT_PAGES pages (all in the TLB), reads and writes."""

    params = [[4, 5]]
    param_names = ["levels"]
    timeout = 300

    def setup(self, levels):
        self.m, self.cpu = mapped_machine(levels, HIT_PAGES)
        self.va, self.kind = scan_addresses(BATCH_N, HIT_PAGES)
        pks_emu.access_batch(self.cpu, self.va, self.kind)     # fill the TLB, set A/D

    def time_batch(self, levels):
        pks_emu.access_batch(self.cpu, self.va, self.kind)

    def track_batch_maccess_per_s(self, levels):
        t = best_seconds(lambda: pks_emu.access_batch(self.cpu, self.va, self.kind))
        return len(self.va) / t / 1e6

    track_batch_maccess_per_s.unit = "M accesses/s"

    def track_batch_out_maccess_per_s(self, levels):
        # The same with output arrays reused from call to call (out=), as a
        # simulator checking chunk after chunk would: no fresh-page faults.
        out = (np.empty(len(self.va), np.uint64), np.empty(len(self.va), np.int32))
        t = best_seconds(lambda: pks_emu.access_batch(self.cpu, self.va, self.kind, out=out))
        return len(self.va) / t / 1e6

    track_batch_out_maccess_per_s.unit = "M accesses/s"

    def track_faults(self, levels):
        # Pins the answer: every access is allowed.
        _, err = pks_emu.access_batch(self.cpu, self.va, self.kind)
        return int(np.count_nonzero(err != -1))

    track_faults.unit = "faults"


class BatchMiss:
    """``access_batch`` where every access misses the TLB and walks all levels."""

    params = [[4, 5], ["sequential", "random"]]
    param_names = ["levels", "order"]
    timeout = 300

    def setup(self, levels, order):
        self.m, self.cpu = mapped_machine(levels, MISS_PAGES)
        self.va, self.kind = scan_addresses(MISS_N, MISS_PAGES, order=order)
        # One pass first: sets every A/D bit, so the timed passes do the
        # same work each time.
        pks_emu.access_batch(self.cpu, self.va, self.kind)

    def time_batch(self, levels, order):
        pks_emu.access_batch(self.cpu, self.va, self.kind)

    def track_batch_maccess_per_s(self, levels, order):
        t = best_seconds(lambda: pks_emu.access_batch(self.cpu, self.va, self.kind))
        return len(self.va) / t / 1e6

    track_batch_maccess_per_s.unit = "M accesses/s"

    def track_walks_per_access(self, levels, order):
        # Pins the workload: ~1.0 means every access walked the tables.
        self.cpu.reset_counters()
        pks_emu.access_batch(self.cpu, self.va, self.kind)
        return self.cpu.counters()["walks"] / len(self.va)

    track_walks_per_access.unit = "walks/access"


class BatchMissCaches:
    """Random-order misses (issue 11) with the paging-structure caches on and
    off: with them, a walk that hits the PDE cache reads only the PTE."""

    params = [[4, 5], [True, False]]
    param_names = ["levels", "caches"]
    timeout = 300

    def setup(self, levels, caches):
        self.m, self.cpu = mapped_machine(levels, MISS_PAGES)
        self.cpu.paging_structure_caches = caches
        self.va, self.kind = scan_addresses(MISS_N, MISS_PAGES, order="random")
        pks_emu.access_batch(self.cpu, self.va, self.kind)     # sets every A/D bit

    def track_batch_maccess_per_s(self, levels, caches):
        t = best_seconds(lambda: pks_emu.access_batch(self.cpu, self.va, self.kind))
        return len(self.va) / t / 1e6

    track_batch_maccess_per_s.unit = "M accesses/s"

    def track_upper_levels_read_per_walk(self, levels, caches):
        # Pins the model: entries above the PTE read per walk (levels - 1
        # without the caches; about 0 with them, where every walk hits the PDE cache).
        self.cpu.reset_counters()
        pks_emu.access_batch(self.cpu, self.va, self.kind)
        c = self.cpu.counters()
        skipped = (c["pde_cache_hits"] * (levels - 1) + c["pdpte_cache_hits"] * (levels - 2)
                   + c["pml4e_cache_hits"] * (levels - 3) + c["pml5e_cache_hits"] * (levels - 4))
        return (c["walks"] * (levels - 1) - skipped) / c["walks"]

    track_upper_levels_read_per_walk.unit = "entries/walk"


class FaultStorm:
    """``access_batch`` over 64 pages, page i under key i % 16, PKRS
    access-disabling 13 of the 16 keys (issue 11): about 13/16 of the accesses
    fault, and a fault caches nothing, so each of them walks again."""

    timeout = 300

    def setup(self):
        m = pks_emu.Machine()
        a = m.address_space()
        for p in range(64):
            a.map(PMEM_BASE + p * 4096, 0x100000000 + p * 4096, pkey=p % 16, nx=True)
        cpu = m.cpus[0]
        cpu.cr4 |= 1 << 24
        cpu.wrmsr(MSR_IA32_PKRS, sum(1 << (2 * k) for k in range(3, 16)))
        a.activate()
        self.m, self.cpu = m, cpu
        rng = np.random.default_rng(SEED)
        n = BATCH_N // 2
        self.va = (np.uint64(PMEM_BASE) + rng.integers(0, 64, n).astype(np.uint64) * np.uint64(4096)
                   + rng.integers(0, 512, n).astype(np.uint64) * np.uint64(8))
        self.kind = rng.integers(0, 2, n).astype(np.uint8)
        self.out = (np.empty(n, np.uint64), np.empty(n, np.int32))
        pks_emu.access_batch(self.cpu, self.va, self.kind, out=self.out)

    def track_maccess_per_s(self):
        t = best_seconds(lambda: pks_emu.access_batch(self.cpu, self.va, self.kind, out=self.out))
        return len(self.va) / t / 1e6

    track_maccess_per_s.unit = "M accesses/s"

    def track_fault_fraction(self):
        # Pins the workload: 13/16 of the pages deny (about 0.81).
        _, err = pks_emu.access_batch(self.cpu, self.va, self.kind, out=self.out)
        return float(np.count_nonzero(err >= 0)) / len(err)

    track_fault_fraction.unit = "faults/access"
