"""The kernel side of the Linux PKS series, emulated over the CPU core.

``Kernel(machine, api="v6" | "v7" | "v10")`` boots a kernel on a
``pks_emu.Machine``: it writes the default PKRS and sets CR4.PKS on every
CPU, keeps a per-CPU ``pkrs_cache``, runs tasks with their own saved PKRS,
saves and restores PKRS around exceptions, handles PK faults on kernel
addresses through per-key callbacks, and carries the series' own test
module (``pks_emu.kernel.pks_test``) behind ``/sys/kernel/debug/x86/run_pks``.
See ``docs/kernel-*.md``.
"""
from __future__ import annotations

from .boot import Kernel
from .entry import PtRegs, PtRegsAuxiliary
from .errors import (FaultLoopError, KernelOops, KernelStateError, PksApiError,
                     SegmentationFault)
from .keys import INIT_PKRS_VALUE, KeyAllocator, StaticKeys
from .pks_test_common import RUN_PKS
from .pmem import PmemConsumer
from .sched import PerCpu, Task, Thread
from .versions import V6, V7, V10, ApiVersion, parse_api

__all__ = [
    "ApiVersion", "FaultLoopError", "INIT_PKRS_VALUE", "Kernel", "KernelOops",
    "KernelStateError", "KeyAllocator", "PerCpu", "PksApiError", "PmemConsumer", "PtRegs",
    "PtRegsAuxiliary", "RUN_PKS", "SegmentationFault", "StaticKeys", "Task", "Thread", "V6",
    "V7", "V10", "parse_api",
]
