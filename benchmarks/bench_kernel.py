"""asv benchmarks of the emulated kernel (pks_emu.kernel).

* context switches per second, with the per-CPU pkrs_cache hit (both tasks
  hold the same PKRS: no WRMSR) and missed (different PKRS: one WRMSR each);
* exception enter/exit pairs per second (save to the aux slot, default,
  restore), kernel-mode and nested;
* pks_mk_* / pks_set_* calls per second.

Each time_ function runs ``N`` operations; operations per second = N / time.
"""
from __future__ import annotations

import pks_emu
from pks_emu.kernel import Kernel

N = 1000


class ContextSwitch:
    params = [["v6", "v10"], ["same_pkrs", "different_pkrs"]]
    param_names = ["api", "case"]

    def setup(self, api, case):
        self.k = Kernel(pks_emu.Machine(ncpus=1), api=api)
        self.a = self.k.create_task("a", 0)
        self.b = self.k.create_task("b", 0)
        if case == "different_pkrs":
            self.b.thread.pkrs ^= 0x3 << 2  # key 1 RW in b only
        self.k.schedule(0, self.a)

    def time_switch(self, api, case):
        k, a, b = self.k, self.a, self.b
        for _ in range(N // 2):
            k.schedule(0, b)
            k.schedule(0, a)


class ExceptionEntry:
    params = [["v6", "v7", "v10"]]
    param_names = ["api"]

    def setup(self, api):
        self.k = Kernel(pks_emu.Machine(ncpus=1), api=api)
        t = self.k.create_task("t", 0)
        self.k.schedule(0, t)
        t.thread.pkrs ^= 0x3 << 2  # the interrupted value differs from the default
        self.k.schedule(0, self.k.percpu[0].idle)
        self.k.schedule(0, t)

    def time_enter_exit(self, api):
        k = self.k
        for _ in range(N):
            k.irqentry_exit(k.irqentry_enter(0))

    def time_nested_depth4(self, api):
        k = self.k
        for _ in range(N // 4):
            r1 = k.irqentry_enter(0)
            r2 = k.irqentry_enter(0)
            r3 = k.irqentry_nmi_enter(0)
            r4 = k.irqentry_enter(0)
            k.irqentry_exit(r4)
            k.irqentry_nmi_exit(r3)
            k.irqentry_exit(r2)
            k.irqentry_exit(r1)


class PksSetters:
    params = [["v6", "v7", "v10"]]
    param_names = ["api"]

    def setup(self, api):
        self.k = Kernel(pks_emu.Machine(ncpus=1), api=api)
        if api == "v10":
            key = self.k.PKS_KEY_TEST
            self.rw = lambda: self.k.pks_set_readwrite(key)
            self.na = lambda: self.k.pks_set_noaccess(key)
        else:
            key = self.k.pks_key_alloc("bench") if api == "v6" else self.k.PKS_KEY_PKS_TEST
            self.rw = lambda: self.k.pks_mk_readwrite(key)
            self.na = lambda: self.k.pks_mk_noaccess(key)

    def time_readwrite_noaccess_pairs(self, api):
        rw, na = self.rw, self.na
        for _ in range(N // 2):
            rw()
            na()

    def time_same_value_repeated(self, api):
        na = self.na
        for _ in range(N):
            na()  # cache hit: no WRMSR


class PkFault:
    """A PK fault handled by a V10 callback (pks_update_exception), then retried."""

    def setup(self):
        self.k = Kernel(pks_emu.Machine(ncpus=1), api="v10")
        self.key = self.k.PKS_KEY_TEST
        self.page = self.k.vmalloc(4096, self.key)
        self.k.set_fault_callback(self.key, self._cb)

    def _cb(self, regs, address, write):
        self.k.pks_update_exception(regs, self.key, 0)
        return True

    def time_fault_and_retry(self):
        k, key, page = self.k, self.key, self.page
        for _ in range(N // 10):
            k.pks_set_noaccess(key)
            k.access(0, page, "write")
