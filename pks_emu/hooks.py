"""Fault callbacks for the batch API.

``access_batch(cpu, va, kind, ..., on_fault=callback)`` checks the accesses
in order, like ``pks_emu.access_batch``, but stops at each fault and calls
``callback(index, exc)`` with the exception ``CPU.access`` would raise
(``PageFault`` with CR2, error code and key, or ``GeneralProtectionFault``).
The callback decides what happens next:

* return ``None`` (or anything but ``RETRY``): the fault is recorded in the
  result and the batch goes on with the next access, exactly as without a
  callback;
* return ``RETRY``: the same access is checked again (the callback changed
  the state that made it fault: opened a key with ``cpu.wrmsr``/``wrpkru``,
  mapped the page...), at most ``max_retries`` times in a row;
* raise: the batch stops and the exception propagates.

The loop between faults runs compiled and without the GIL
(``pks_emu._hooks``), so a batch with few faults costs about what
``pks_emu.access_batch`` costs. ``FaultLog`` is a ready-made callback that
collects the faults.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import _hooks
from ._core import access_batch as _access_batch
from .errors import CPUException, GeneralProtectionFault, PageFault

#: Return this from ``on_fault`` to check the faulting access again.
RETRY = "retry"

OnFault = Callable[[int, CPUException], Any]


class FaultLog(list):
    """An ``on_fault`` callback that records ``(index, exception)`` pairs and
    lets the batch continue."""

    def __call__(self, index: int, exc: CPUException) -> None:
        self.append((index, exc))


def _fault_exception(cpu: Any, code: int, va: int) -> CPUException:
    if code == -2:
        return GeneralProtectionFault(f"non-canonical address {va:#x}")
    address, pkey = _hooks.last_fault(cpu)
    return PageFault(address, code, pkey=pkey, cpu=cpu.index)


def _array(name: str, value: Any, n: int, dtype: Any) -> np.ndarray:
    try:
        arr = np.broadcast_to(np.asarray(value), (n,))
    except ValueError:
        raise ValueError(f"{name} has shape {np.shape(value)}: expected a scalar or {n} values") from None
    if arr.size and (np.any(arr < 0) or np.any(arr > np.iinfo(dtype).max)):
        bad = int(np.argmax((arr < 0) | (arr > np.iinfo(dtype).max)))
        raise ValueError(f"{name}[{bad}] = {arr[bad]} does not fit in {np.dtype(dtype).name}")
    return np.ascontiguousarray(arr, dtype=dtype)


def access_batch(cpu: Any, va: Any, kind: Any, size: Any = 1, implicit: Any = False, *,
                 on_fault: OnFault | None = None,
                 max_retries: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``pks_emu.access_batch`` with an ``on_fault`` callback (see the module doc).

    Returns ``(pa, error_code)`` as ``pks_emu.access_batch``: uint64 physical
    addresses (0 where the access faulted) and int32 codes (-1 allowed, -2
    #GP, else the #PF error code); an access retried to success counts as
    allowed.
    """
    if on_fault is None:
        return _access_batch(cpu, va, kind, size, implicit)
    if not callable(on_fault):
        raise TypeError(f"on_fault must be callable, got {type(on_fault).__name__}")
    if max_retries < 0:
        raise ValueError(f"max_retries {max_retries} must be >= 0")
    vas = np.ascontiguousarray(va, dtype=np.uint64)
    if vas.ndim != 1:
        raise ValueError(f"va has shape {vas.shape}: expected a 1-D array of addresses")
    n = vas.shape[0]
    if isinstance(kind, str):
        kind = {"read": 0, "write": 1, "fetch": 2, "r": 0, "w": 1, "x": 2}.get(kind, kind)
        if isinstance(kind, str):
            raise ValueError(f"access kind {kind!r} not understood: expected 'read', 'write' or 'fetch'")
    kinds = _array("kind", kind, n, np.uint8)
    if n and int(kinds.max()) > 2:
        bad = int(np.argmax(kinds > 2))
        raise ValueError(f"kind[{bad}] = {int(kinds[bad])}: expected 0 (read), 1 (write) or 2 (fetch)")
    sizes = _array("size", size, n, np.uint16)
    if n and (int(sizes.min()) == 0 or int(sizes.max()) > 4096):
        bad = int(np.argmax((sizes == 0) | (sizes > 4096)))
        raise ValueError(f"size[{bad}] = {int(sizes[bad])}: expected 1..4096")
    impl = _array("implicit", np.asarray(implicit).astype(np.uint8), n, np.uint8)
    pa = np.zeros(n, dtype=np.uint64)
    err = np.full(n, -1, dtype=np.int32)
    i = 0
    retries = 0
    while i < n:
        j = _hooks._run_until_fault(cpu, vas, kinds, sizes, impl, i, pa, err)
        if j >= n:
            break
        exc = _fault_exception(cpu, int(err[j]), int(vas[j]))
        if on_fault(j, exc) == RETRY:
            retries += 1
            if retries > max_retries:
                raise RuntimeError(
                    f"access {j} at {int(vas[j]):#x}: on_fault returned RETRY {max_retries} times "
                    f"and the access still faults ({exc})")
            i = j
        else:
            retries = 0
            i = j + 1
    return pa, err


__all__ = ["RETRY", "FaultLog", "access_batch"]
