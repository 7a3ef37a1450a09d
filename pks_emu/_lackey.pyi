"""Type stub of the compiled lackey scanner (``pks_emu/_lackey.pyx``)."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

ST_DONE: int
ST_FULL: int
ST_BAD: int

WHY_PREFIX: int
WHY_ADDR: int
WHY_COMMA: int
WHY_SIZE: int
WHY_SIZE_RANGE: int
WHY_TRAILING: int
WHY_SB: int

def scan_block(
    buf: bytes | bytearray | memoryview | Any,
    pos: int,
    limit: int,
    va: npt.NDArray[np.uint64],
    size: npt.NDArray[np.uint16],
    kind: npt.NDArray[np.uint8],
    n: int,
    stop_on_bad: bool,
) -> tuple[int, int, int, int, int, int, int, int, int]: ...

def scan_block_ip(
    buf: bytes | bytearray | memoryview | Any,
    pos: int,
    limit: int,
    va: npt.NDArray[np.uint64],
    size: npt.NDArray[np.uint16],
    kind: npt.NDArray[np.uint8],
    ip: npt.NDArray[np.uint64],
    n: int,
    stop_on_bad: bool,
    last_ip: int,
) -> tuple[int, int, int, int, int, int, int, int, int, int]: ...

ST_NOMEM: int

@disjoint_base
class PageSet:
    """Pages (va >> 12) touched so far; ``take`` returns those first touched since the last call."""
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def take(self) -> npt.NDArray[np.uint64]: ...

def scan_block_records(
    buf: bytes | bytearray | memoryview | Any,
    pos: int,
    limit: int,
    rec: npt.NDArray[np.uint8],
    ip: npt.NDArray[np.uint64],
    n: int,
    stop_on_bad: bool,
    last_ip: int,
    rtype: int,
    cpl: int,
    pages: PageSet,
) -> tuple[int, int, int, int, int, int, int, int, int, int, int]: ...
