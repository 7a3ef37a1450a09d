"""Stubs of the compiled C-ABI module (pks_emu/_capi.pyx)."""
from typing import Any


PKS_EMU_C_API: Any  # a PyCapsule named CAPSULE_NAME
ABI_VERSION: int
API_VERSION: int
CAPSULE_NAME: str
TABLE_SIZE: int

def cpu_handle(cpu: Any) -> int: ...
def frame_address(memory: Any, pa: int, create: bool = ...) -> int: ...
