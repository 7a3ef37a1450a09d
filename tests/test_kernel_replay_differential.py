"""The Python kernel model and the compiled replay run the same kernel state.

Random sequences of forks, context switches, exception entries and exits
(nested, from user and kernel mode, NMIs included), exec and the consumer's
PKRS updates (V7: also pks_abandon_protections) go through the Python
``Kernel`` API on one machine and, as trace records, through the replay
engine on another. After every step both must hold the same IA32_PKRS and
per-CPU cache on every CPU, the same value for every task, and the same
number of MSR writes done and avoided.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pks_emu import Machine
from pks_emu._core import ReplayEngine, load_cpu_state
from pks_emu.kernel import Kernel
from pks_emu.trace.format import RECORD, RecordType

NCPUS = 2
MAX_TASKS = 256
OPS = ("fork", "switch", "entry", "nmi", "exit", "update", "exec", "abandon")


class Pair:
    """A booted Kernel and a replay engine started from the same state."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.k = Kernel(Machine(ncpus=NCPUS), api=api, pks_test=True)
        self.m = Machine(ncpus=NCPUS)
        for src, dst in zip(self.k.machine.cpus, self.m.cpus):
            assert load_cpu_state(dst, src.cr0, src.cr3, src.cr4, src.efer, src.rflags, 0,
                                  src.pkru, src.pkrs) is None
        self.engine = ReplayEngine(self.m, max_tasks=MAX_TASKS, pkrs_init=self.k.pkrs_init_value,
                                   api=api)
        self.engine.kernel.allowed_mask = self.k.pkrs_pkey_allowed_mask
        self.base = {n: self.k.counters()[n] for n in ("pkrs_writes", "pkrs_writes_avoided")}
        self.frames: dict[int, list] = {}
        self.index = 0
        self.created: list = []

    def record(self, type_: int, cpu: int, *, op: int = 0, flags: int = 0, addr: int = 0,
               value: int = 0) -> None:
        r = np.zeros(1, dtype=RECORD)
        r["type"], r["cpu"], r["op"], r["flags"] = type_, cpu, op, flags
        r["addr"], r["value"], r["cpl"] = addr, value, 0xFF
        status = self.engine.run(r.view(np.uint8).data, self.index)
        assert status == 0, f"record {self.index} ({RecordType.NAMES[type_]}): status {status}"
        self.index += 1

    def check(self, what: str) -> None:
        k, e = self.k, self.engine
        for i in range(NCPUS):
            assert k.machine.cpus[i].pkrs == self.m.cpus[i].pkrs, f"{what}: MSR of CPU {i}"
            assert k.pkrs_cache(i) == e.pkrs_caches()[i], f"{what}: pkrs_cache of CPU {i}"
        for t in self.created:
            assert t.thread.pkrs == e.task_pkrs(t.pid), f"{what}: value of task {t.pid}"
        c = k.counters()
        assert c["pkrs_writes"] - self.base["pkrs_writes"] == e.pkrs_writes, f"{what}: MSR writes"
        assert (c["pkrs_writes_avoided"] - self.base["pkrs_writes_avoided"]
                == e.pkrs_writes_avoided), f"{what}: writes avoided"

    def current(self, cpu: int):
        return self.k.current(cpu)

    def in_kernel(self, cpu: int):
        """A context manager that puts CPU ``cpu`` in the kernel (a syscall
        when its task is in user mode) for a consumer call."""
        import contextlib
        task = self.current(cpu)
        if self.k.machine.cpus[cpu].cpl == 3:
            return self.k.syscall(task)
        return contextlib.nullcontext()

    # --- the operations ------------------------------------------------------------
    def step(self, op: str, cpu: int, a: int, b: int) -> str | None:
        k = self.k
        task = self.current(cpu)
        if op == "fork":
            if len(self.created) >= MAX_TASKS - NCPUS - 1:
                return None
            fresh = bool(a & 1)
            if fresh:
                child = k.create_task(f"t{len(self.created)}", cpu, user=bool(b & 1))
            else:
                child = k.fork(task, cpu=cpu)
            self.created.append(child)
            self.record(RecordType.TASK_FORK, cpu, value=child.pid, flags=int(fresh))
        elif op == "switch":
            ready = [t for t in self.created if t.cpu == cpu and t.state == "runnable"]
            if not ready:
                return None
            nxt = ready[a % len(ready)]
            k.schedule(cpu, nxt)
            self.record(RecordType.CONTEXT_SWITCH, cpu, value=nxt.pid)
        elif op in ("entry", "nmi"):
            if len(task.frames) >= 6:
                return None
            from_user = self.k.machine.cpus[cpu].cpl == 3
            regs = k.irqentry_nmi_enter(cpu) if op == "nmi" else k.irqentry_enter(cpu)
            self.record(RecordType.EXCEPTION_ENTRY, cpu, value=2 if op == "nmi" else 32,
                        flags=int(from_user))
            assert regs.user_mode == from_user
        elif op == "exit":
            if not task.frames:
                return None
            regs = task.frames[-1]
            (k.irqentry_nmi_exit if regs.nmi else k.irqentry_exit)(regs)
            self.record(RecordType.EXCEPTION_EXIT, cpu)
        elif op == "update":
            prot = b % 3
            if self.api == "v10":
                pkey = a % k.static_keys.PKS_KEY_MAX
                with self.in_kernel(cpu):
                    k.pks_update_protection(pkey, prot, cpu=cpu)
            else:
                pkey = a % 16
                fn = {0: k.pks_mk_readwrite, 1: k.pks_mk_noaccess, 2: k.pks_mk_readonly}[prot]
                with self.in_kernel(cpu):
                    fn(pkey, cpu=cpu)
            self.record(RecordType.PKS_UPDATE, cpu, value=pkey, op=prot)
        elif op == "exec":
            if task not in self.created:
                return None
            k.exec(task)
            self.record(RecordType.TASK_EXEC, cpu, value=task.pid)
        elif op == "abandon":
            if self.api != "v7":
                return None
            pkey = a % 16
            with self.in_kernel(cpu):
                k.pks_abandon_protections(pkey, cpu=cpu)
            self.record(RecordType.PKS_ABANDON, cpu, value=pkey)
        return op


steps = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, NCPUS - 1),
                           st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=80)


@pytest.mark.parametrize("api", ["v6", "v7", "v10"])
@settings(max_examples=60, deadline=None)
@given(ops=steps)
def test_python_kernel_and_replay_agree_at_every_step(api, ops):
    p = Pair(api)
    p.check("after boot")
    for n, (op, cpu, a, b) in enumerate(ops):
        if p.step(op, cpu, a, b) is not None:
            p.check(f"step {n} ({op} on CPU {cpu})")


@pytest.mark.parametrize("api", ["v6", "v7", "v10"])
def test_a_long_fixed_sequence_exercises_every_operation(api):
    # Deterministic companion of the property: every operation happens,
    # including entries from user mode and nesting three deep.
    p = Pair(api)
    seq = [("fork", 0, 1, 1), ("fork", 1, 0, 0), ("switch", 0, 0, 0), ("switch", 1, 0, 0),
           ("update", 0, 1, 1), ("entry", 0, 0, 0), ("update", 0, 1, 0), ("nmi", 0, 0, 0),
           ("entry", 0, 0, 0), ("exit", 0, 0, 0), ("exit", 0, 0, 0), ("exit", 0, 0, 0),
           ("fork", 0, 0, 0), ("exec", 0, 0, 0), ("abandon", 1, 1, 0), ("entry", 1, 0, 0),
           ("switch", 0, 1, 0), ("exit", 1, 0, 0), ("update", 1, 2, 2)]
    done = [op for op, cpu, a, b in seq if p.step(op, cpu, a, b)]
    p.check("end")
    assert {"fork", "switch", "entry", "nmi", "exit", "update", "exec"} <= set(done)
    # The first task was created in user mode: its entry came from CPL 3.
    assert p.engine.kernel.counters(0)["exceptions"] >= 2
    assert p.engine.pkrs_writes > 0
