"""``pks-emu selftest``: the series' user-space test programs against the
emulated kernel, through ``/sys/kernel/debug/x86/run_pks``.

* ``--api v10`` (default list: check_defaults single context_switch
  exception exception_update run_all; ``create_fault`` only when named) is
  ``tools/testing/selftests/x86/test_pks.c`` of V9/V10 (docs/rules.md §2.13): each test
  opens the file, writes its number, reads ``PASS``/``FAIL``; a missing file
  or ``-ENOENT`` is ``[SKIP] Test not supported``.
* ``--api v6``/``v7`` run the V4-V7 commands (docs/rules.md §2.13) under names:
  run ("0"), context_switch (the V4-V6 ``test_pks.c`` fork flow), run_all
  ("3"; the kernel only logs its result, so it is read from the log),
  abandon ("6", V7), and crash ("9" twice) only when named.

Every test runs in a fresh user process pinned to ``--cpu``. Exit status 1
if any test failed or a name is unknown, else 0.
"""
from __future__ import annotations

import errno

from ..constants import ALL_FEATURES, PF_PK
from ..errors import PksEmuError
from .boot import Kernel
from .errors import KernelOops
from .pks_test_common import RUN_PKS

PASS, FAIL, SKIP = "OK", "FAIL", "SKIP"


def parse_features(spec: str | None) -> frozenset[str]:
    """``None`` -> all; ``"-pks,+x"`` -> changes to all; ``"pku,nx"`` -> exactly those."""
    if spec is None:
        return ALL_FEATURES
    items = [s.strip() for s in spec.split(",") if s.strip()]
    signed = [i[0] in "+-" for i in items]
    if any(signed) and not all(signed):
        raise PksEmuError(f"--features {spec!r}: either all items are changes (+name/-name) "
                          f"or none is")
    feats = set(ALL_FEATURES) if items and all(signed) else set()
    for item in items:
        name = item.lstrip("+-")
        if name not in ALL_FEATURES:
            raise PksEmuError(f"--features {spec!r}: unknown feature {name!r}, expected some "
                              f"of {sorted(ALL_FEATURES)}")
        if item.startswith("-"):
            feats.discard(name)
        else:
            feats.add(name)
    return frozenset(feats)


class Runner:
    """The user-space side: processes doing open/write/read on run_pks."""

    def __init__(self, kernel: Kernel, cpu: int, debug: bool = False, out=print) -> None:
        self.k = kernel
        self.cpu = min(max(cpu, 0), kernel.machine.ncpus - 1)
        self.debug = debug
        self.out = out

    # --- processes ------------------------------------------------------------------------
    def spawn(self, name: str = "test_pks"):
        t = self.k.create_task(name, self.cpu, user=True)
        self.k.schedule(self.cpu, t)
        return t

    def finish(self, task) -> None:
        self.k.exit_task(task)

    def do_simple_test(self, cmd: str) -> int:
        """0 for PASS, -EFAULT for FAIL, -ENOENT (or another errno) for SKIP."""
        task = self.spawn()
        try:
            try:
                f = self.k.open(task, RUN_PKS)
            except FileNotFoundError:
                return -errno.ENOENT
            r = f.write(task, cmd)
            if r < 0:
                return r
            result = f.read(task, 16)
            return 0 if result[:4] == b"PASS" else -errno.EFAULT
        finally:
            self.finish(task)

    # --- V10 context switch (41/44) -------------------------------------------------------
    def context_switch_v10(self) -> int:
        k = self.k
        parent = self.spawn()
        try:
            f = k.open(parent, RUN_PKS)
        except FileNotFoundError:
            self.finish(parent)
            return -errno.ENOENT
        child = k.fork(parent, "test_pks(child)")
        # parent blocks on setup_done: the child runs
        k.schedule(self.cpu, child)
        r = f.write(child, "1")
        r2 = f.write(child, "2") if r >= 0 else r
        # child blocks on switch_done: the parent runs
        k.schedule(self.cpu, parent)
        f.close(parent)
        f2 = k.open(parent, RUN_PKS)
        f2.write(parent, "1")  # the same key, ending NOACCESS in the parent's thread
        # parent blocks on the result: the child runs again
        k.schedule(self.cpu, child)
        if r2 < 0:
            res = "S" if r2 == -errno.ENOENT else "F"
        else:
            r3 = f.write(child, "3")
            if r3 == -errno.ENOENT:
                res = "S"
            else:
                res = "P" if f.read(child, 16)[:4] == b"PASS" else "F"
        self.finish(child)
        k.schedule(self.cpu, parent)
        f2.close(parent)
        self.finish(parent)
        return {"P": 0, "S": -errno.ENOENT, "F": -errno.EFAULT}[res]

    # --- V4-V6 context switch (test_pks.c, docs/rules.md §2.13) --------------------------------
    def context_switch_v6(self) -> int:
        k = self.k
        parent = self.spawn()
        child = k.fork(parent, "test_pks(child)")
        k.schedule(self.cpu, child)
        try:
            fc = k.open(child, RUN_PKS)
        except FileNotFoundError:
            self.finish(child)
            self.finish(parent)
            return -errno.ENOENT
        fc.write(child, "0")
        fc.write(child, "1")  # arm: the child's key RW
        k.schedule(self.cpu, parent)
        fp = k.open(parent, RUN_PKS)  # its own fd: another key
        fp.write(parent, "0")
        k.schedule(self.cpu, child)
        fc.write(child, "2")  # check after the switch back
        result = fc.read(child, 16)
        self.finish(child)
        k.schedule(self.cpu, parent)
        self.finish(parent)
        # (The C program's strncmp on a non-terminated buffer never matches,
        # so its exit code ignores the result, docs/rules.md §2.13; the result is used here.)
        return 0 if result[:4] == b"PASS" else -errno.EFAULT

    def run_all_v6(self) -> int:
        start = len(self.k.dmesg)
        r = self.do_simple_test("3")
        if r == -errno.ENOENT:
            return r
        # The result of run_all is only logged by the kernel (docs/rules.md §2.13).
        for _lvl, msg in self.k.dmesg[start:]:
            if msg.startswith("pks_test: run_all:"):
                return 0 if msg.endswith("PASS") else -errno.EFAULT
        return -errno.EFAULT

    def crash(self, cmd: str = "9") -> int:
        """Write "9" twice; the expected outcome is an oops on the test key
        that kills the writing process."""
        task = self.spawn()
        try:
            f = self.k.open(task, RUN_PKS)
        except FileNotFoundError:
            self.finish(task)
            return -errno.ENOENT
        f.write(task, cmd)
        try:
            f.write(task, cmd)
        except KernelOops as oops:
            for line in oops.report().splitlines():
                self.out(line)
            self.out("Killed")
            return 0 if oops.error_code & PF_PK and task.state == "dead" else -errno.EFAULT
        self.finish(task)
        self.out("the crash test returned: no oops")
        return -errno.EFAULT


def test_table(api: str):
    """(name, how) of the default run, and the special tests run only by name."""
    if api == "v10":
        default = [("check_defaults", "0"), ("single", "1"), ("context_switch", "ctx10"),
                   ("exception", "4"), ("exception_update", "5"), ("run_all", "6")]
        special = [("create_fault", "crash")]
    else:
        default = [("run", "0"), ("context_switch", "ctx6"), ("run_all", "all6")]
        if api == "v7":
            default.append(("abandon", "6"))
        special = [("crash", "crash")]
    return default, special
