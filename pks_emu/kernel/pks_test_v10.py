"""The V9/V10 ``lib/pks/pks_test.c`` (V10 patches 37-44, docs/rules.md §2.13).

Each open fd is a session (``struct pks_session_data``); one test runs at a
time (``test_run_lock``). The fault callback of ``PKS_KEY_TEST`` (all keys
1..15 with ``PKS_TEST_ALL_KEYS``) acts on the context under test: it records
the fault and relaxes the interrupted context's aux slot. Commands:

===  =====================  ==================================================
"0"  CHECK_DEFAULTS         ``on_each_cpu``: MSR == ``PKS_INIT_VALUE``
"1"  RUN_SINGLE             the 4-row matrix on ``PKS_KEY_TEST``, ends NOACCESS
"2"  ARM_CTX_SWITCH         session ctx, ``pks_set_readwrite`` ("known state")
"3"  CHECK_CTX_SWITCH       MSR shows RW for the session's key
"4"  RUN_EXCEPTION          the four checks inside the handler + restore check
"5"  RUN_EXCEPTION_UPDATE   ``pks_update_exception`` makes the retry succeed
"6"  RUN_ALL_KEYS           only with ``PKS_TEST_ALL_KEYS``; else ``-ENOENT``
"9"  RUN_CRASH_TEST         first arms, second oopses
===  =====================  ==================================================
"""
from __future__ import annotations

import errno

from ..constants import NR_PKEYS, PKEY_ACCESS_MASK, PKEY_DISABLE_ACCESS, PKEY_DISABLE_WRITE, pte_pkey
from .api import update_pkey_val
from .debugfs import FileOperations
from .pks_test_common import NO_ACCESS, PKS_TEST_MEM_SIZE, RDWR, check_pkey_val

#: the V9/V10 matrix (read-only rows dropped with pks_mk_readonly)
PKEY_TEST_ARY_V10 = (
    (NO_ACCESS, True, True),
    (NO_ACCESS, False, True),
    (RDWR, True, False),
    (RDWR, False, False),
)

CHECK_DEFAULTS, RUN_SINGLE, ARM_CTX_SWITCH, CHECK_CTX_SWITCH = 0, 1, 2, 3
RUN_EXCEPTION, RUN_EXCEPTION_UPDATE, RUN_ALL_KEYS, RUN_CRASH_TEST = 4, 5, 6, 9


class TestCtxV10:
    """``struct pks_test_ctx`` (V10)."""

    def __init__(self, pkey: int, test_page: int) -> None:
        self.pkey = pkey
        self.pass_ = True
        self.data = b"DEADBEEF"
        self.test_page = test_page
        self.fault_seen = False
        self.validate_exp_handling = False
        self.validate_update_exp = False


class Session:
    """``struct pks_session_data``: allocated in open(), freed in release()."""

    def __init__(self) -> None:
        self.ctx: TestCtxV10 | None = None
        self.need_unlock = False
        self.crash_armed = False
        self.last_test_pass = False


class PksTestV10:
    """The V9/V10 test module of one kernel."""

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.g_ctx_under_test: TestCtxV10 | None = None
        self.test_run_lock: Session | None = None
        self.fops = _FopsV10(self)
        keys = kernel.static_keys
        if keys.all_keys:
            for key in range(1, NR_PKEYS):
                kernel.set_fault_callback(key, self.pks_test_fault_callback)
        else:
            kernel.set_fault_callback(keys.PKS_KEY_TEST, self.pks_test_fault_callback)

    def log(self, level: str, msg: str) -> None:
        self.k.log(level, f"pks_test: {msg}")

    # --- checks -------------------------------------------------------------------------
    def check_pkrs(self, pkey: int, expected: int) -> bool:
        """Both the per-CPU cache and RDMSR must show ``expected`` for ``pkey``."""
        ok = check_pkey_val(self.k.pkrs_cache(), pkey, expected)
        if not ok:
            self.log("err", f"pkrs_cache {self.k.pkrs_cache():#x}: key {pkey} not {expected:#x}")
        msr = self.k.rdmsr_pkrs()
        if not check_pkey_val(msr, pkey, expected):
            self.log("err", f"MSR {msr:#x}: key {pkey} not {expected:#x}")
            ok = False
        return ok

    def validate_exception(self, ctx: TestCtxV10, thread_pkrs: int) -> None:
        k = self.k
        pkey = ctx.pkey
        if not check_pkey_val(thread_pkrs, pkey, PKEY_DISABLE_WRITE):
            self.log("err", f"Invalid thread pkrs saved {thread_pkrs:#x}")
            ctx.pass_ = False
        if not self.check_pkrs(pkey, PKEY_DISABLE_ACCESS):
            self.log("err", "Exception default value not set")
            ctx.pass_ = False
        k.pks_set_readwrite(pkey)
        if not self.check_pkrs(pkey, 0):
            self.log("err", "Exception value not updated to RW")
            ctx.pass_ = False
        k.pks_set_noaccess(pkey)
        if not self.check_pkrs(pkey, PKEY_DISABLE_ACCESS):
            self.log("err", "Exception value not updated to AD")
            ctx.pass_ = False

    def pks_test_fault_callback(self, regs, address: int, write: bool) -> bool:
        ctx = self.g_ctx_under_test
        if ctx is None:
            return False
        if ctx.validate_update_exp:
            self.k.pks_update_exception(regs, ctx.pkey, 0)
            ctx.fault_seen = True
            return True
        if ctx.validate_exp_handling:
            self.validate_exception(ctx, regs.aux.pkrs)
            ctx.validate_exp_handling = False
        regs.aux.pkrs = update_pkey_val(regs.aux.pkrs, ctx.pkey, 0)
        ctx.fault_seen = True
        return True

    # --- contexts -------------------------------------------------------------------------
    def alloc_ctx(self, pkey: int) -> TestCtxV10:
        return TestCtxV10(pkey, self.k.vmalloc(PKS_TEST_MEM_SIZE, pkey))

    def free_ctx(self, ctx: TestCtxV10 | None) -> None:
        if ctx is not None:
            self.k.vfree(ctx.test_page)

    def set_ctx_data(self, sd: Session, ctx: TestCtxV10) -> None:
        self.free_ctx(sd.ctx)
        sd.ctx = ctx

    def _memcpy(self, ctx: TestCtxV10, write: bool) -> None:
        k = self.k
        if write:
            k.write_bytes(k.this_cpu, ctx.test_page, ctx.data[:8])
        else:
            ctx.data = k.read_bytes(k.this_cpu, ctx.test_page, 8) + ctx.data[8:]

    # --- tests ----------------------------------------------------------------------------
    def check_defaults(self) -> bool:
        init = self.k.PKS_INIT_VALUE

        def check_pkey_settings(cpu: int) -> bool:
            msr = self.k.rdmsr_pkrs(cpu)
            if msr != init:
                self.log("err", f"cpu {cpu} value incorrect : {msr:#x} expected {init:#x}")
                return False
            return True
        return all(self.k.on_each_cpu(check_pkey_settings))

    def test_ctx(self, ctx: TestCtxV10) -> bool:
        k = self.k
        found = k.lookup_address(ctx.test_page)
        if found is None:
            self.log("err", "Failed to walk table???")
            return False
        pkey = pte_pkey(found[0])
        if pkey != ctx.pkey:
            self.log("err", f"invalid pkey found: {pkey}, test_pkey: {ctx.pkey}")
            return False
        for mode, write, expect in PKEY_TEST_ARY_V10:
            (k.pks_set_noaccess if mode == NO_ACCESS else k.pks_set_readwrite)(ctx.pkey)
            ctx.fault_seen = False
            self.g_ctx_under_test = ctx
            self._memcpy(ctx, write)
            if ctx.fault_seen != expect:
                self.log("err", f"pkey test FAILED: mode {mode}; write {write}; "
                                f"fault seen {ctx.fault_seen} expected {expect}")
                ctx.pass_ = False
        k.pks_set_noaccess(ctx.pkey)
        self.g_ctx_under_test = None
        return ctx.pass_

    def run_single(self) -> bool:
        ctx = self.alloc_ctx(self.k.PKS_KEY_TEST)
        try:
            return self.test_ctx(ctx)
        finally:
            self.free_ctx(ctx)

    def arm_ctx_switch(self, sd: Session) -> bool:
        ctx = self.alloc_ctx(self.k.PKS_KEY_TEST)
        self.set_ctx_data(sd, ctx)
        self.k.pks_set_readwrite(ctx.pkey)  # a known state
        return True

    def check_ctx_switch(self, sd: Session) -> bool:
        if sd.ctx is None:
            self.log("err", "No Context switch configured")
            return False
        reg = self.k.rdmsr_pkrs()
        if (reg >> 2 * sd.ctx.pkey) & PKEY_ACCESS_MASK != 0:
            self.log("err", f"Context switch check failed: pkey {sd.ctx.pkey} reg {reg:#x}")
            return False
        return True

    def run_exception_test(self) -> bool:
        k = self.k
        ctx = self.alloc_ctx(k.PKS_KEY_TEST)
        try:
            k.pks_update_protection(ctx.pkey, PKEY_DISABLE_WRITE)
            ctx.validate_exp_handling = True
            self.g_ctx_under_test = ctx
            self._memcpy(ctx, write=True)
            self.g_ctx_under_test = None
            if not ctx.fault_seen:
                self.log("err", "Failed to see the callback")
                ctx.pass_ = False
            # The handler set AD, the callback set RW in the aux slot: the
            # restored value must be RW.
            if not self.check_pkrs(ctx.pkey, 0):
                self.log("err", "Failed to restore the interrupted value")
                ctx.pass_ = False
            return ctx.pass_
        finally:
            self.free_ctx(ctx)

    def run_exception_update(self) -> bool:
        k = self.k
        ctx = self.alloc_ctx(k.PKS_KEY_TEST)
        try:
            ctx.validate_update_exp = True
            k.pks_set_noaccess(ctx.pkey)
            self.g_ctx_under_test = ctx
            self._memcpy(ctx, write=True)
            if not ctx.fault_seen:
                self.log("err", "Failed to see the callback")
                ctx.pass_ = False
            ctx.validate_update_exp = False
            ctx.fault_seen = False
            self._memcpy(ctx, write=True)
            self.g_ctx_under_test = None
            if ctx.fault_seen:
                self.log("err", "pks_update_exception() did not reach the interrupted context")
                ctx.pass_ = False
            return ctx.pass_
        finally:
            self.free_ctx(ctx)

    def run_all_keys(self) -> bool:
        ctxs = [self.alloc_ctx(i) for i in range(1, NR_PKEYS)]
        passed = True
        try:
            for ctx in ctxs:
                passed = self.test_ctx(ctx) and passed
        finally:
            for ctx in ctxs:
                self.free_ctx(ctx)
        return passed

    def crash_it(self, sd: Session) -> None:
        sd.need_unlock = True
        ctx = self.alloc_ctx(self.k.PKS_KEY_TEST)  # the page is AD by default
        self.g_ctx_under_test = None
        self._memcpy(ctx, write=True)  # oopses: KernelOops
        self.log("err", "ERROR: Should never get here...")
        self.free_ctx(ctx)


class _FopsV10(FileOperations):
    def __init__(self, mod: PksTestV10) -> None:
        self.m = mod

    def open(self, file) -> int:
        file.private_data = Session()
        return 0

    def read(self, file, count: int) -> bytes:
        sd = file.private_data
        return (b"PASS\n" if sd.last_test_pass else b"FAIL\n")[:count]

    def write(self, file, buf: bytes) -> int:
        m = self.m
        sd: Session = file.private_data
        if not buf:
            return -errno.EFAULT
        c = buf[:1]
        if not c.isdigit():  # kstrtol of the one character read
            return -errno.EINVAL
        test_num = int(c)
        if m.test_run_lock is not None:
            return -errno.EBUSY
        m.test_run_lock = sd
        if test_num != RUN_CRASH_TEST:
            sd.crash_armed = False
        try:
            if test_num == CHECK_DEFAULTS:
                sd.last_test_pass = m.check_defaults()
            elif test_num == RUN_SINGLE:
                sd.last_test_pass = m.run_single()
            elif test_num == ARM_CTX_SWITCH:
                sd.last_test_pass = m.arm_ctx_switch(sd)
            elif test_num == CHECK_CTX_SWITCH:
                sd.last_test_pass = m.check_ctx_switch(sd)
            elif test_num == RUN_EXCEPTION:
                sd.last_test_pass = m.run_exception_test()
            elif test_num == RUN_EXCEPTION_UPDATE:
                sd.last_test_pass = m.run_exception_update()
            elif test_num == RUN_ALL_KEYS and m.k.static_keys.all_keys:
                sd.last_test_pass = m.run_all_keys()
            elif test_num == RUN_CRASH_TEST:
                if not sd.crash_armed:
                    m.log("warn", "CAUTION: The crash test will cause an oops.")
                    m.log("warn", "         Specify 9 a second time to run")
                    sd.crash_armed = True
                    sd.last_test_pass = True
                else:
                    m.crash_it(sd)
            else:
                sd.last_test_pass = False
                return -errno.ENOENT
        finally:
            # A test that faulted out leaves the lock to release() (need_unlock).
            if not sd.need_unlock:
                m.test_run_lock = None
        return len(buf)

    def release(self, file) -> int:
        m = self.m
        sd: Session = file.private_data
        if sd.need_unlock and m.test_run_lock is sd:
            m.test_run_lock = None
        m.free_ctx(sd.ctx)
        sd.ctx = None
        return 0
