"""The machine a captured kernel trace replays on (docs/kernel-policies.md).

A capture has no page tables and no initial registers: the machine is the
one the PKS series' boot leaves (EFER.NXE, CR0.WP, CR4.PKE/PKS/SMEP/SMAP/PGE,
IA32_PKRS = the policy's value) with one kernel address space shared by all
CPUs, whose pages the compiled KernelMapper creates on first touch.
"""
from __future__ import annotations

import os

from .._core import KernelMapper
from ..errors import TraceFormatError
from ..machine import kernel_machine
from .kpolicy import (Kallsyms, KernelPolicy, closed_rights, load_kernel_policy, resolve,
                      window_ranges)

#: 4-KiB frames reserved for the page tables the mapper builds (4 GiB of
#: physical address space, at the top; untouched frames cost nothing)
TABLE_FRAMES = 1 << 20


def find_kallsyms(name: str, explicit, policy: KernelPolicy) -> str | None:
    """The kallsyms file: given, named by the policy, or TRACE.kallsyms."""
    if explicit is not None:
        return os.fspath(explicit)
    if policy.kallsyms is not None:
        return policy.kallsyms
    guess = name + ".kallsyms"
    return guess if os.path.isfile(guess) else None


def entry_text(syms: Kallsyms | None) -> tuple[int, int]:
    """[__entry_text_start, __entry_text_end): the interrupt and exception
    entry code (arch/x86/entry/entry_64.S), where windows are suspended."""
    if syms is None or "__entry_text_start" not in syms or "__entry_text_end" not in syms:
        return (0, 0)
    return (syms.addr["__entry_text_start"], syms.addr["__entry_text_end"])


def check_kernel_policy(policy, kallsyms, paging_levels: int) -> KernelPolicy:
    """Load ``policy`` and resolve its names as a replay would (with
    ``kallsyms``, a path or None, or the policy's own); raises what the replay
    would raise. For a capture to fail before it starts QEMU."""
    if not isinstance(policy, KernelPolicy):
        policy = load_kernel_policy(policy)
    path = os.fspath(kallsyms) if kallsyms is not None else policy.kallsyms
    resolve(policy, Kallsyms(path) if path is not None else None, paging_levels)
    return policy


def kernel_machine_for(name: str, header, policy, kallsyms, compat):
    """(machine, mapper, info) for the captured trace ``name``."""
    if not isinstance(policy, KernelPolicy):
        policy = load_kernel_policy(policy)
    path = find_kallsyms(name, kallsyms, policy)
    syms = Kallsyms(path) if path is not None else None
    resolve(policy, syms, header.paging_levels)
    if not 1 <= header.ncpus <= 255:
        raise TraceFormatError(f"{name}: header CPU count {header.ncpus}: expected 1..255")
    m, _aspace = kernel_machine(header.ncpus, header.paging_levels, compat=compat or header.compat,
                                pkrs=policy.pkrs)
    base = m.alloc_frames(TABLE_FRAMES)
    regions = [(r.start, r.end, r.by_pa, r.pkey, r.writable, r.executable) for r in policy.regions]
    windows = [(w.pkey, w.rights, closed_rights(policy, w.pkey)) for w in policy.windows]
    mapper = KernelMapper(header.ncpus, regions, (policy.default_pkey, True, True), (0, True, True),
                          (base, TABLE_FRAMES), windows, window_ranges(policy), nxe=True,
                          entry=entry_text(syms))
    info = {"policy": policy.source, "kallsyms": path, "pkrs": f"{policy.pkrs:#010x}",
            "regions": [{"name": r.name, "start": f"{r.start:#x}", "end": f"{r.end:#x}",
                         "physical": r.by_pa, "pkey": r.pkey} for r in policy.regions],
            "windows": [{"name": w.name, "functions": w.functions, "callees": w.callees,
                         "pkey": w.pkey, "rights": w.rights} for w in policy.windows]}
    return m, mapper, info


def mapper_info(mapper: KernelMapper, info: dict) -> dict:
    """The mapper's counters and each window's openings, for the result."""
    out = {"mapper": mapper.counters()}
    counts = mapper.window_counts()
    for w, n in zip(info.get("windows", []), counts):
        w["opened"] = n
    return out
