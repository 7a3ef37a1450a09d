"""A plain-Python replay of a native trace through the public CPU API, with
the V10 context-switch and exception rules (docs/rules.md §2.6, §2.7, §2.8) written
out, to check the compiled replay loop against."""
from __future__ import annotations

import numpy as np

from pks_emu.constants import MSR_IA32_PKRS
from pks_emu.errors import GeneralProtectionFault, InvalidOpcode
from pks_emu.trace.format import KEEP_CPL, RECORD, RecordType, read_header
from pks_emu.trace.replay import machine_from_header


def python_replay(path: str):
    h = read_header(path)
    m = machine_from_header(path, h)
    with open(path, "rb") as f:
        data = f.read()
    recs = np.frombuffer(data, dtype=RECORD, count=h.record_count, offset=h.records_offset)
    current = [None] * h.ncpus
    cache = [c.pkrs for c in m.cpus]
    # before its first switch a CPU runs a boot task of its own, keyed
    # ("boot", cpu), whose value starts as the CPU's initial IA32_PKRS
    task_pkrs: dict = {("boot", c): v for c, v in enumerate(cache)}

    def task(c):
        return current[c] if current[c] is not None else ("boot", c)
    # Exception frames live on the task's kernel stack (a task switched in
    # inside a handler has its own).
    aux: dict = {}

    def stack(c):
        return aux.setdefault(task(c), [])
    faults = []
    k = {"context_switches": 0, "pkrs_writes": 0, "pkrs_writes_avoided": 0, "exceptions": 0,
         "max_exception_depth": 0}

    def pkrs_of(t):
        return task_pkrs.get(t, h.pkrs_init)

    def write_cached(i, value):
        cpu = m.cpus[i]
        if "pks" not in h.features:
            return
        if cache[i] == value:
            k["pkrs_writes_avoided"] += 1
            return
        cache[i] = value
        cpl = cpu.cpl
        cpu.cpl = 0                      # the kernel writes the MSR at CPL 0
        cpu.wrmsr(MSR_IA32_PKRS, value)
        cpu.cpl = cpl
        k["pkrs_writes"] += 1

    def insn(i, c, fn, address):
        try:
            fn()
            return True
        except GeneralProtectionFault:
            faults.append((i, address, 0, c, 13, -1, 255))
        except InvalidOpcode:
            faults.append((i, address, 0, c, 6, -1, 255))
        return False

    for i, r in enumerate(recs):
        t, c = int(r["type"]), int(r["cpu"])
        cpu = m.cpus[c]
        addr, value = int(r["addr"]), int(r["value"])
        if t == RecordType.ACCESS:
            if int(r["cpl"]) != KEEP_CPL:
                cpu.cpl = int(r["cpl"])
            tr = cpu.translate(addr, int(r["op"]), int(r["size"]), bool(r["flags"] & 1))
            if not tr.ok:
                pkey = -1 if tr.pkey is None or tr.vector == 13 else tr.pkey
                faults.append((i, tr.address, tr.error_code, c, tr.vector, pkey, int(r["op"])))
        elif t == RecordType.WRMSR:
            if insn(i, c, lambda: cpu.wrmsr(addr, value), addr) and addr == MSR_IA32_PKRS:
                cache[c] = value
                task_pkrs[task(c)] = value
        elif t == RecordType.RDMSR:
            insn(i, c, lambda: cpu.rdmsr(addr), addr)
        elif t == RecordType.WRPKRU:
            insn(i, c, lambda: cpu.wrpkru(value, addr & 0xFFFFFFFF, addr >> 32), 0)
        elif t == RecordType.MOV_CR:
            reg = {0: "cr0", 3: "cr3", 4: "cr4"}[int(r["op"])]
            insn(i, c, lambda: setattr(cpu, reg, value), value)
        elif t == RecordType.INVLPG:
            cpu.invlpg(addr)
        elif t == RecordType.PTE_WRITE:
            m.memory.write_u64(addr, value)
        elif t == RecordType.CONTEXT_SWITCH:
            k["context_switches"] += 1
            if addr:
                insn(i, c, lambda: setattr(cpu, "cr3", addr), addr)
            current[c] = value
            write_cached(c, pkrs_of(value))
        elif t == RecordType.EXCEPTION_ENTRY:
            k["exceptions"] += 1
            # V10 pks_save_pt_regs: the thread's value, which the handler's
            # PKS_INIT_VALUE does not change (V10 21/44)
            saved = pkrs_of(task(c))
            stack(c).append((saved, cpu.cpl))
            k["max_exception_depth"] = max(k["max_exception_depth"], len(stack(c)))
            cpu.cpl = 0
            write_cached(c, h.pkrs_init)
        elif t == RecordType.EXCEPTION_EXIT:
            saved, cpl = stack(c).pop()
            task_pkrs[task(c)] = saved
            write_cached(c, saved)
            cpu.cpl = cpl
        elif t == RecordType.SET_RFLAGS:
            cpu.rflags = value
    return faults, k
