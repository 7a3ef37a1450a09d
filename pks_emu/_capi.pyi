"""Stubs of the compiled C-ABI module (pks_emu/_capi.pyx)."""
from typing import Any

import numpy as np
import numpy.typing as npt

PKS_EMU_C_API: Any  # a PyCapsule named CAPSULE_NAME
ABI_VERSION: int
API_VERSION: int
CAPSULE_NAME: str
TABLE_SIZE: int

def cpu_handle(cpu: Any) -> int: ...
def frame_address(memory: Any, pa: int, create: bool = ...) -> int: ...
def last_fault(cpu: Any) -> tuple[int, int | None]: ...
def _run_until_fault(cpu: Any, va: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint8],
                     size: npt.NDArray[np.uint16], implicit: npt.NDArray[np.uint8], start: int,
                     pa_out: npt.NDArray[np.uint64], err_out: npt.NDArray[np.int32]) -> int: ...
