"""The consumer API, per version (docs/rules.md §2.2).

=============  ==========================================================
V4-V6          ``pks_key_alloc(name)``, ``pks_key_free(key)``,
               ``pks_mk_noaccess/readonly/readwrite(key)``
V7             ``pks_mk_noaccess/readonly/readwrite(key)``,
               ``pks_abandon_protections(key)``, ``pks_enabled()``
V9/V10         ``pks_set_readwrite/noaccess(key)``,
               ``pks_update_protection(key, prot)``,
               ``pks_update_exception(regs, key, prot)``, ``pks_available()``
=============  ==========================================================

Every setter changes the *current* task's thread value and then writes the
MSR through the per-CPU cache; it never touches other tasks (the root of the
V6 free/re-allocate flaw, examples/kernel_v6_free_realloc.py). Calling a
function the selected version lacks raises ``PksApiError``. Functions take an
optional ``cpu=`` (default ``kernel.this_cpu``) to say whose ``current`` runs.
"""
from __future__ import annotations

import errno
import functools
import os

from ..constants import NR_PKEYS, PKEY_ACCESS_MASK, PKEY_DISABLE_ACCESS, PKEY_DISABLE_WRITE
from .errors import PksApiError
from .keys import INIT_PKRS_VALUE
from ._part import KernelPart


def update_pkey_val(pk_reg: int, pkey: int, flags: int) -> int:
    """V4-V7 ``update_pkey_val`` = V8+ ``pkey_update_pkval`` on a u32."""
    shift = 2 * pkey
    return ((pk_reg & ~(PKEY_ACCESS_MASK << shift)) | ((flags & PKEY_ACCESS_MASK) << shift)) \
        & 0xFFFFFFFF


def since(*versions: str):
    """Restrict a kernel function to the versions that have it."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            if self.version.name not in versions:
                raise PksApiError(f"{fn.__name__}() does not exist in the {self.version.name} "
                                  f"API (it is in {', '.join(versions)}); "
                                  f"see docs/kernel-api.md for the table by version")
            return fn(self, *args, **kwargs)
        wrapper.api_versions = versions  # type: ignore[attr-defined]
        return wrapper
    return deco


def _check_key(pkey, fn: str) -> int:
    if isinstance(pkey, bool) or not isinstance(pkey, int):
        raise TypeError(f"{fn}: pkey must be an int, got {type(pkey).__name__}")
    if not 0 <= pkey < NR_PKEYS:
        # The V4-V7 kernel has no range check here: a shift past bit 31 is
        # undefined behaviour in C. Refuse it rather than invent a result.
        raise ValueError(f"{fn}: pkey {pkey} out of range: expected 0..15")
    return pkey


class ApiMixin(KernelPart):
    """Consumer API of the PKS series (part of Kernel)."""

    # --- values the versions disagree on ----------------------------------------------
    def pks_new_task_value(self) -> int:
        """Thread value of a new task: V4-V6 ``INIT_PKRS_VALUE``, V7
        ``pks_init_task()`` = ``pkrs_init_value & pkrs_pkey_allowed_mask``,
        V10 ``PKS_INIT_VALUE``."""
        return self.kstate.py_new_task_value()

    def pks_sched_in(self, task, cpu: int) -> None:
        """The switch-in hook: V4-V6 ``pks_sched_in``, V7 ``pkrs_write_current``,
        V10 ``x86_pkrs_load``."""
        self.kstate.py_sched_in(cpu, task.pid)

    def _pks_update_current(self, pkey: int, prot: int, cpu) -> None:
        # The current task's value with the key's bits replaced (V7: then
        # ANDed with the allowed mask), written through the per-CPU cache.
        self.kstate.py_update_current(self._cpu_index(cpu), pkey, prot)

    # --- V4-V6 allocator ----------------------------------------------------------------
    @since("v6")
    def pks_key_alloc(self, name: str) -> int:
        """V4-V6: lowest free key 1..15, ``-EOPNOTSUPP`` without PKS, ``-ENOSPC`` when full.

        The caller can rely on the key being access-disabled for everyone, as
        the V3 doc promises ("pks_mk_noaccess() for all keys not currently
        allocated") — which ``pks_key_free``'s flaw breaks.
        """
        return self.key_allocator.alloc(name, self.pks_active, self.log)

    @since("v6")
    def pks_key_free(self, pkey: int) -> None:
        """V4-V6: ``pks_mk_noaccess(pkey)`` for the *calling* task only, then
        release the key. Key 0 and out-of-range keys log
        ``Invalid PKey value`` and do nothing. No feature check (as in V6)."""
        if isinstance(pkey, bool) or not isinstance(pkey, int) or pkey <= 0 or pkey >= NR_PKEYS:
            self.log("err", f"Invalid PKey value: {pkey}")
            return
        # Known flaw (why V6 was withdrawn): other tasks keep their rights.
        self._pks_update_current(pkey, PKEY_DISABLE_ACCESS, None)
        self.key_allocator.free(pkey)

    def alloc_key(self, name: str) -> int:
        """Pythonic ``pks_key_alloc``: the key, or ``OSError`` with the errno."""
        r = self.pks_key_alloc(name)
        if r < 0:
            raise OSError(-r, f"pks_key_alloc({name!r}): {os.strerror(-r)}")
        return r

    def free_key(self, pkey: int) -> None:
        """Pythonic ``pks_key_free``: ``OSError(EINVAL)`` for a key it would refuse."""
        if isinstance(pkey, bool) or not isinstance(pkey, int) or not 0 < pkey < NR_PKEYS:
            raise OSError(errno.EINVAL, f"pks_key_free({pkey!r}): key must be 1..15")
        self.pks_key_free(pkey)

    # --- V4-V7 setters ------------------------------------------------------------------
    @since("v6", "v7")
    def pks_mk_noaccess(self, pkey: int, *, cpu=None) -> None:
        """V4-V7: AD for ``pkey`` in the current task."""
        self._pks_update_current(_check_key(pkey, "pks_mk_noaccess"), PKEY_DISABLE_ACCESS, cpu)

    @since("v6", "v7")
    def pks_mk_readonly(self, pkey: int, *, cpu=None) -> None:
        """V4-V7 (dropped in V8 "as that patch is not needed for PMEM"): WD."""
        self._pks_update_current(_check_key(pkey, "pks_mk_readonly"), PKEY_DISABLE_WRITE, cpu)

    @since("v6", "v7")
    def pks_mk_readwrite(self, pkey: int, *, cpu=None) -> None:
        """V4-V7: clear AD and WD for ``pkey`` in the current task."""
        self._pks_update_current(_check_key(pkey, "pks_mk_readwrite"), 0, cpu)

    # --- V7 abandon ---------------------------------------------------------------------
    @since("v7")
    def pks_enabled(self) -> bool:
        """V7: whether PKS is usable."""
        return self.pks_active

    @since("v7")
    def pks_abandon_protections(self, pkey: int, *, cpu=None) -> None:
        """V7: clear ``pkey`` in the global allowed mask (no way back), then
        give the current task RW. Other tasks lose the protection at their next
        switch-in, exception entry, or PK fault (``handle_abandoned_pks_value``)."""
        _check_key(pkey, "pks_abandon_protections")
        self.pkrs_pkey_allowed_mask &= ~(PKEY_ACCESS_MASK << 2 * pkey) & 0xFFFFFFFF
        self._pks_update_current(pkey, 0, cpu)

    # --- V9/V10 ------------------------------------------------------------------------
    @since("v10")
    def pks_available(self) -> bool:
        """V8+: ``cpu_feature_enabled(X86_FEATURE_PKS)``."""
        return self.pks_active

    @since("v10")
    def pks_update_protection(self, pkey: int, protection: int, *, cpu=None) -> None:
        """V10 (exported, "Do not call this directly"): silently nothing without
        PKS; ``WARN_ON_ONCE`` and return for ``pkey >= PKS_KEY_MAX``;
        out-of-range bits ``WARN_ON_ONCE`` and are masked to two bits."""
        if not self.pks_active:
            return
        if isinstance(pkey, bool) or not isinstance(pkey, int) or pkey < 0:
            raise TypeError(f"pks_update_protection: pkey must be a u8, got {pkey!r}")
        if pkey >= self.static_keys.PKS_KEY_MAX:
            self.warn_once("pks_update_protection",
                           f"pks_update_protection: pkey {pkey} >= PKS_KEY_MAX "
                           f"({self.static_keys.PKS_KEY_MAX})")
            return
        if protection & ~PKEY_ACCESS_MASK:
            self.warn_once("pkey_update_pkval",
                           f"pkey_update_pkval: access bits {protection:#x} out of range")
        self._pks_update_current(pkey, protection, cpu)

    @since("v10")
    def pks_set_readwrite(self, pkey: int, *, cpu=None) -> None:
        """V9/V10 static inline: ``pks_update_protection(pkey, PKEY_READ_WRITE)``."""
        self.pks_update_protection(pkey, 0, cpu=cpu)

    @since("v10")
    def pks_set_noaccess(self, pkey: int, *, cpu=None) -> None:
        """V9/V10 static inline: ``pks_update_protection(pkey, PKEY_DISABLE_ACCESS)``."""
        self.pks_update_protection(pkey, PKEY_DISABLE_ACCESS, cpu=cpu)

    @since("v10")
    def pks_update_exception(self, regs, pkey: int, protection: int) -> None:
        """V8+: change ``pkey`` both for the handler (current) and for the
        interrupted context (``regs``'s aux slot), so the change survives the
        exception exit. ``regs`` must be a frame of the task running here."""
        if not self.pks_active:
            return
        self._check_frame(regs)
        with self.on_cpu(regs.task.cpu):
            self.pks_update_protection(pkey, protection)
        if pkey < self.static_keys.PKS_KEY_MAX and regs.aux.pkrs is not None:
            regs.aux.pkrs = update_pkey_val(regs.aux.pkrs, pkey, protection)

    # --- names that only exist in some versions -------------------------------------------
    @property
    def INIT_PKRS_VALUE(self) -> int:
        """V4-V6 name of the default."""
        if self.version.name != "v6":
            raise PksApiError("INIT_PKRS_VALUE is the V4-V6 name; use pkrs_init_value (V7) "
                              "or PKS_INIT_VALUE (V8+)")
        return INIT_PKRS_VALUE

    @property
    def PKS_INIT_VALUE(self) -> int:
        """V8+ name of the default (computed from the key assignment)."""
        if self.version.name != "v10":
            raise PksApiError("PKS_INIT_VALUE is the V8+ name; use INIT_PKRS_VALUE (V4-V6) "
                              "or pkrs_init_value (V7)")
        return self.pkrs_init_value
