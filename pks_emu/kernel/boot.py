"""The emulated kernel: boot (``setup_pks``/``pks_setup`` on every CPU), the
log, counters, and the composition of the domain modules."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from ..constants import (CR0_WP, CR4_PKS, CR4_SMAP, CR4_SMEP, EFER_NXE, MSR_IA32_PKRS,
                         PKEY_DISABLE_ACCESS)
from .._core import KernelState
from .api import ApiMixin
from .debugfs import DebugfsMixin
from .entry import EntryMixin
from .errors import PksApiError
from .fault import FaultMixin
from .keys import INIT_PKRS_VALUE, PKRS_ALLOWED_MASK_DEFAULT, KeyAllocator, StaticKeys, consumers_for
from .mm import MmMixin
from .pks_test_common import RUN_PKS
from .sched import PerCpu, SchedMixin
from .versions import parse_api

LOG_LEVELS = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")


class Kernel(ApiMixin, SchedMixin, EntryMixin, FaultMixin, MmMixin, DebugfsMixin):
    """A Linux kernel with the PKS series, as plain Python over ``machine``.

    ``api``: ``"v6"`` (default; V4-V6 dynamic allocator), ``"v7"`` or ``"v10"``.
    Config (the Kconfig options of docs/rules.md §2.11):

    * ``pks_test`` — ``CONFIG_PKS_TEST``: load the ported ``lib/pks/pks_test.c``
      (``kernel.pks_test``) and its debugfs file; in V7/V10 it owns a key;
    * ``pmem`` — ``CONFIG_DEVMAP_ACCESS_PROTECTION`` (V7/V10): the PMEM key and,
      on V10, the consumer ``kernel.pmem`` with ``pmem_fault_mode``;
    * ``pks_test_all_keys`` — ``CONFIG_PKS_TEST_ALL_KEYS`` (V10): keys 1..15 all
      belong to the test, ``PKS_INIT_VALUE`` becomes 0x4;
    * ``consumers`` — extra ``(NAME, default)`` static keys (V7/V10), default 0
      (RW) or ``PKEY_DISABLE_ACCESS``.

    A V7 or V10 kernel with no consumer has ``ARCH_ENABLE_SUPERVISOR_PKEYS``
    off: PKS stays disabled even on a PKS CPU. V7 refuses ``pks_test`` with
    ``pmem`` (its Kconfig: PKS_TEST depends on !GENERAL_PKS_USER); with the
    test module every key 1..15 starts AD, whatever other consumers declare.
    """

    def __init__(self, machine, api: str = "v6", *, pks_test: bool = True, pmem: bool = False,
                 pks_test_all_keys: bool = False, consumers: Sequence[tuple[str, int]] = (),
                 pmem_fault_mode: str = "relaxed") -> None:
        if getattr(machine, "cpus", None) is None:
            raise TypeError(f"Kernel needs a pks_emu.Machine, got {type(machine).__name__}")
        if machine.paging_levels not in (4, 5):
            raise ValueError("the kernel needs 4- or 5-level paging (keys exist only in IA-32e mode)")
        self.machine = machine
        self.version = parse_api(api)
        v = self.version.name
        if v == "v6" and (pmem or pks_test_all_keys or consumers):
            raise ValueError("V4-V6 have no static keys: pmem, pks_test_all_keys and consumers "
                             "need api='v7' or 'v10' (V6 consumers call pks_key_alloc)")
        if v == "v7" and pks_test_all_keys:
            raise ValueError("PKS_TEST_ALL_KEYS is a V9/V10 option")
        if not isinstance(pmem_fault_mode, str):
            raise TypeError(f"pmem_fault_mode must be a str, got {type(pmem_fault_mode).__name__}")
        for name, flag in (("pks_test", pks_test), ("pmem", pmem),
                           ("pks_test_all_keys", pks_test_all_keys)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.config = {"pks_test": pks_test, "pmem": pmem, "pks_test_all_keys": pks_test_all_keys,
                       "consumers": tuple(consumers), "pmem_fault_mode": pmem_fault_mode}
        self.dmesg: list[tuple[str, str]] = []
        self._warned: set[str] = set()
        self.warnings = 0
        self.oopses: list = []
        self.tasks: dict = {}
        self._pid_counter = itertools.count(0)
        self._this_cpu = 0
        self.debugfs: dict = {}
        self.pks_key_callbacks: dict = {}
        #: V4-V7 fault-path hook set by the test module (``pks_test_callback``)
        self.pks_test_callback = None
        #: the PKS state shared with the compiled replay: per-CPU cache, each
        #: task's value and exception frames, the version's rules
        self.kstate = KernelState(machine, v, init_value=INIT_PKRS_VALUE, pks_active=False)
        #: V7 global abandon mask
        self.pkrs_pkey_allowed_mask = PKRS_ALLOWED_MASK_DEFAULT

        # X86_FEATURE_PKS: CPUID.(EAX=7,ECX=0):ECX[31]
        self.pks_supported = bool(machine.cpus[0].cpuid(7, 0)[2] >> 31 & 1)
        self.key_allocator: KeyAllocator | None
        self.static_keys: StaticKeys | None
        if self.version.dynamic_keys:
            self.key_allocator = KeyAllocator()
            self.static_keys = None
            self.pkrs_init_value = INIT_PKRS_VALUE
            configured = True
        else:
            self.key_allocator = None
            self.static_keys = StaticKeys(v, consumers_for(
                v, pks_test=pks_test, pmem=pmem, all_keys=pks_test_all_keys,
                extra=tuple(consumers)), all_keys=pks_test_all_keys, pks_test=pks_test)
            self.pkrs_init_value = self.static_keys.init_value
            # ARCH_ENABLE_SUPERVISOR_PKEYS: V7 "def_bool y, depends on PKS_TEST
            # || GENERAL_PKS_USER" (V7 05/18); V10 selected by a consumer. No
            # consumer at all: PKS stays off in both.
            configured = bool(self.static_keys.consumers)
        #: cpu_feature_enabled(X86_FEATURE_PKS): the CPU has it and the config enables it
        self.pks_active = self.pks_supported and configured

        self.percpu = [PerCpu(i, c, self.kstate) for i, c in enumerate(machine.cpus)]
        self._mm_init()
        for pc in self.percpu:
            self._cpu_init(pc)
        # INIT_THREAD: V4-V6 INIT_PKRS_VALUE, V7 0 ("early tasks get full
        # access" until the initcall), V10 PKS_INIT_VALUE. Idle tasks of the
        # other CPUs are forked from it.
        init_value = 0 if v == "v7" else self.pkrs_init_value
        for pc in self.percpu:
            idle = self._new_task(f"swapper/{pc.index}", pc.index, init_value, False)
            pc.idle = idle
            self._switch_to(pc, None, idle)
        self.init_task = self.percpu[0].idle

        self.pks_test: Any = None
        if pks_test:
            self.pks_test = self._load_pks_test()
        self.pmem: Any = None
        if pmem and v == "v10":
            from .pmem import PmemConsumer
            self.pmem = PmemConsumer(self, pmem_fault_mode)

    def _load_pks_test(self):
        """late_initcall(pks_test_init): build the module for the kernel's version;
        create the debugfs file only if PKS is enabled (docs/rules.md §2.13)."""
        if self.version.name == "v10":
            from .pks_test_v10 import PksTestV10
            mod = PksTestV10(self)
        else:
            from .pks_test import PksTestV6
            mod = PksTestV6(self)
        if self.pks_active:
            self.debugfs_create_file(RUN_PKS, mod.fops)
        return mod

    def _cpu_init(self, pc: PerCpu) -> None:
        """What ``identify_cpu`` does for paging, then ``setup_pks``/``pks_setup``."""
        c = pc.cpu
        feats = self.machine.features
        if "nx" in feats:
            c.efer = c.efer | EFER_NXE
        c.cr0 = c.cr0 | CR0_WP
        if "smep" in feats:
            c.cr4 = c.cr4 | CR4_SMEP
        if "smap" in feats:
            c.cr4 = c.cr4 | CR4_SMAP
        if not self.pks_active:
            return
        if self.version.unconditional_boot_wrmsr:
            # V8+ pks_setup(): the cache starts at 0, so write the MSR once
            # unconditionally ("If the PKS_INIT_VALUE is 0 then pks_write_pkrs()
            # will fail to initialize the MSR", V10 12/44).
            c.wrmsr(MSR_IA32_PKRS, self.pkrs_init_value)
            pc.counters["pkrs_writes"] += 1
        self.write_pkrs(self.pkrs_init_value, pc.index)
        c.cr4 = c.cr4 | CR4_PKS

    # --- log and counters ------------------------------------------------------------------
    def log(self, level: str, msg: str) -> None:
        """printk: append to ``kernel.dmesg`` as ``(level, text)``."""
        if level not in LOG_LEVELS:
            raise ValueError(f"log level {level!r}: expected one of {LOG_LEVELS}")
        self.dmesg.append((level, msg))

    def warn_once(self, site: str, msg: str) -> bool:
        """WARN_ON_ONCE / WARN_ONCE: log once per ``site``; True the first time."""
        if site in self._warned:
            return False
        self._warned.add(site)
        self.warnings += 1
        self.log("warn", f"WARNING: CPU: {self._this_cpu} at {site}: {msg}")
        return True

    def dmesg_text(self, since: int = 0) -> str:
        """The log from record ``since`` on, one line per record."""
        return "\n".join(f"[{lvl}] {msg}" for lvl, msg in self.dmesg[since:])

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs: ``pkrs_writes`` (WRMSRs issued),
        ``pkrs_writes_avoided`` (cache hits), ``context_switches``,
        ``exceptions``, ``nmis``, ``pk_faults``, ``oopses``, ``warnings``."""
        total = dict.fromkeys(PerCpu.COUNTERS, 0)
        for pc in self.percpu:
            for k, n in pc.counters.items():
                total[k] += n
        total["warnings"] = self.warnings
        return total

    def pkrs_cache(self, cpu=None) -> int:
        """The per-CPU ``pkrs_cache`` of ``cpu`` (default this CPU)."""
        return self.percpu[self._cpu_index(cpu)].pkrs_cache

    def rdmsr_pkrs(self, cpu=None) -> int:
        """``rdmsrl(MSR_IA32_PKRS)`` on ``cpu`` (default this CPU)."""
        return self.percpu[self._cpu_index(cpu)].msr

    def on_each_cpu(self, func, *, wait: bool = True) -> list:
        """``on_each_cpu(func, info, wait)``: ``func(cpu)`` runs directly on this
        CPU and from a CALL_FUNCTION IPI (an interrupt: exception entry and
        exit) on every other CPU. Returns the results in CPU order."""
        here = self._this_cpu
        out = []
        for pc in self.percpu:
            if pc.index == here:
                out.append(func(here))
            else:
                with self.exception(pc.index, vector=0xFB):
                    out.append(func(pc.index))
        return out

    # --- names by version ----------------------------------------------------------------
    def __getattr__(self, name: str):
        # PKS_KEY_* constants live on the static key table (V7+).
        if name.startswith("PKS_KEY_"):
            keys = self.__dict__.get("static_keys")
            if keys is None:
                raise PksApiError(f"{name}: V4-V6 have no static keys; use pks_key_alloc()")
            try:
                return getattr(keys, name)
            except AttributeError:
                raise PksApiError(f"{name} is not defined in this {self.version.name} "
                                  f"configuration: {keys!r}") from None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return (f"<pks_emu.kernel.Kernel {self.version.name} on {self.machine.ncpus} CPU(s), "
                f"PKS {'on' if self.pks_active else 'off'}, init {self.pkrs_init_value:#010x}>")


__all__ = ["Kernel", "PKEY_DISABLE_ACCESS"]
