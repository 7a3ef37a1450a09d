"""asv benchmarks of the key registers from Python: WRMSR/RDMSR of
IA32_PKRS, WRPKRU/RDPKRU, and the first access after a WRMSR.

``compat="qemu"`` flushes the TLB on WRMSR of IA32_PKRS and on WRPKRU, as
QEMU 7.2 does; the SDM needs no flush (keys are read on every access), so
``time_wrmsr_then_access`` shows what that flush costs: in qemu mode the
access after it walks the tables again.
"""
from __future__ import annotations

from pks_emu.constants import MSR_IA32_PKRS, PKR_WD_KEY

from .common import HIT_PAGES, LOOP, PKRS_OPEN, PMEM_BASE, PMEM_KEY, mapped_machine, ns_per_call


class KeyRegisters:
    params = [["sdm", "qemu"]]
    param_names = ["compat"]

    def setup(self, compat):
        self.m, self.cpu = mapped_machine(4, HIT_PAGES, compat)
        self.va = PMEM_BASE + 0x40
        self.cpu.access(self.va, "read")
        self.closed = PKRS_OPEN | PKR_WD_KEY(PMEM_KEY)

    # Each time_ runs LOOP (1000) instructions: divide by 1000 for one.
    def time_wrmsr_pkrs(self, compat):
        wrmsr = self.cpu.wrmsr
        for _ in range(LOOP):
            wrmsr(MSR_IA32_PKRS, PKRS_OPEN)

    def time_rdmsr_pkrs(self, compat):
        rdmsr = self.cpu.rdmsr
        for _ in range(LOOP):
            rdmsr(MSR_IA32_PKRS)

    def time_wrpkru(self, compat):
        wrpkru = self.cpu.wrpkru
        for _ in range(LOOP):
            wrpkru(0x55555554)

    def time_rdpkru(self, compat):
        rdpkru = self.cpu.rdpkru
        for _ in range(LOOP):
            rdpkru()

    def time_wrmsr_then_access(self, compat):
        wrmsr, access, va = self.cpu.wrmsr, self.cpu.access, self.va
        for _ in range(LOOP):
            wrmsr(MSR_IA32_PKRS, PKRS_OPEN)
            access(va, "read")

    def track_wrmsr_pkrs_ns(self, compat):
        wrmsr, v = self.cpu.wrmsr, PKRS_OPEN
        return ns_per_call(lambda: wrmsr(MSR_IA32_PKRS, v))

    track_wrmsr_pkrs_ns.unit = "ns"

    def track_rdmsr_pkrs_ns(self, compat):
        rdmsr = self.cpu.rdmsr
        return ns_per_call(lambda: rdmsr(MSR_IA32_PKRS))

    track_rdmsr_pkrs_ns.unit = "ns"

    def track_wrpkru_ns(self, compat):
        wrpkru = self.cpu.wrpkru
        return ns_per_call(lambda: wrpkru(0x55555554))

    track_wrpkru_ns.unit = "ns"

    def track_tlb_flushes_per_wrmsr(self, compat):
        # Pins the TLB rule: 0 in sdm mode, 1 in qemu mode.
        self.cpu.reset_counters()
        for _ in range(10):
            self.cpu.wrmsr(MSR_IA32_PKRS, self.closed)
            self.cpu.wrmsr(MSR_IA32_PKRS, PKRS_OPEN)
        return self.cpu.counters()["tlb_flushes"] / 20

    track_tlb_flushes_per_wrmsr.unit = "flushes/WRMSR"
