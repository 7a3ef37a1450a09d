from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

def last_fault(cpu: Any) -> tuple[int, int | None]: ...
def _run_until_fault(cpu: Any, va: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint8],
                     size: npt.NDArray[np.uint16], implicit: npt.NDArray[np.uint8], start: int,
                     pa_out: npt.NDArray[np.uint64], err_out: npt.NDArray[np.int32]) -> int: ...
