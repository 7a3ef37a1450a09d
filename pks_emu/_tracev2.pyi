"""Type stub of the trace format v2 record codec (``pks_emu/_tracev2.pyx``)."""
from __future__ import annotations

from typing import Any

from typing_extensions import disjoint_base

import numpy as np
import numpy.typing as npt

PA_NONE: int
MAX_CHUNK_RECORDS: int
ERRORS: dict[int, str]
CRC32C_HARDWARE: bool

def crc32c(data: bytes | bytearray | memoryview | Any, crc: int = 0, *, software: bool = False) -> int: ...

@disjoint_base
class Codec:
    def __init__(self, ncpus: int) -> None: ...
    def encode(
        self,
        records: bytes | bytearray | memoryview | npt.NDArray[np.uint8] | Any,
        ip: npt.NDArray[np.uint64],
        pa: npt.NDArray[np.uint64] | None = None,
    ) -> tuple[bytes, int]: ...
    def decode(
        self,
        payload: bytes | bytearray | memoryview | Any,
        main_len: int,
        nrec: int,
        has_pa: bool,
        records_out: npt.NDArray[np.uint8] | memoryview | Any,
        ip_out: npt.NDArray[np.uint64],
        pa_out: npt.NDArray[np.uint64] | None = None,
    ) -> tuple[int, int, str] | None: ...
