"""The PMEM stray-write consumer, in miniature (V10 patches 25-36, docs/rules.md §2.12).

Pages of a ``dev_pagemap`` are mapped with ``PKS_KEY_PGMAP_PROTECTION``, whose
default is AD. Code that means to touch them opens a window with
``pks_set_readwrite`` (the kernel wraps it in ``kmap_local_page`` /
``pgmap_set_readwrite``-style calls) and closes it with ``pks_set_noaccess``.
A stray access outside a window faults; the boot/module parameter
``memremap.pks_fault_mode`` decides what happens:

* ``relaxed`` (default): ``WARN_ONCE``, drop the protection for the
  interrupted context (``pks_update_exception``) and let the access proceed;
* ``strict``: the callback declines, and the fault oopses.

Function names other than ``pgmap_pks_fault_callback`` and the parameter
are not confirmed (docs/rules.md §3, item 9).
"""
from __future__ import annotations

from contextlib import contextmanager

from .errors import PksApiError

FAULT_MODES = ("relaxed", "strict")


class PmemConsumer:
    """One protected ``dev_pagemap`` on a V10 kernel built with ``pmem=True``."""

    def __init__(self, kernel, fault_mode: str = "relaxed") -> None:
        if kernel.version.name != "v10":
            raise PksApiError("the PMEM consumer is modelled on the V10 API "
                              "(pks_update_exception); build the kernel with api='v10'")
        try:
            self.pkey = kernel.static_keys.PKS_KEY_PGMAP_PROTECTION
        except AttributeError:
            raise PksApiError("this kernel has no PKS_KEY_PGMAP_PROTECTION: build it with "
                              "Kernel(machine, api='v10', pmem=True)") from None
        self.kernel = kernel
        self.fault_mode = fault_mode
        #: stray accesses let through in relaxed mode
        self.relaxed_faults = 0
        kernel.set_fault_callback(self.pkey, self.pgmap_pks_fault_callback)

    @property
    def fault_mode(self) -> str:
        """``memremap.pks_fault_mode`` (writable at run time, like the module parameter)."""
        return self._fault_mode

    @fault_mode.setter
    def fault_mode(self, mode: str) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"pks_fault_mode {mode!r}: expected 'relaxed' or 'strict'")
        self._fault_mode = mode

    def memremap_pages(self, size: int) -> int:
        """Map ``size`` bytes of "persistent memory" under the PGMAP key."""
        return self.kernel.vmalloc(size, self.pkey)

    def pgmap_set_readwrite(self, *, cpu=None) -> None:
        self.kernel.pks_set_readwrite(self.pkey, cpu=cpu)

    def pgmap_set_noaccess(self, *, cpu=None) -> None:
        self.kernel.pks_set_noaccess(self.pkey, cpu=cpu)

    @contextmanager
    def kmap_local(self, task):
        """An access window for ``task`` (``kmap_local_page`` ... ``kunmap_local``)."""
        with self.kernel.on_cpu(task):
            self.pgmap_set_readwrite()
        try:
            yield
        finally:
            if task.state == "running":
                with self.kernel.on_cpu(task):
                    self.pgmap_set_noaccess()

    def pgmap_pks_fault_callback(self, regs, address: int, write: bool) -> bool:
        """The fault callback: relaxed lets the access through, strict declines."""
        if self._fault_mode == "strict":
            return False
        self.kernel.warn_once("pgmap_pks_fault_callback",
                              f"PKS fault in relaxed mode: {'write' if write else 'read'} "
                              f"at {address:#x}; protection dropped for this context")
        self.kernel.pks_update_exception(regs, self.pkey, 0)
        self.relaxed_faults += 1
        return True
