"""pks_emu: an emulator of x86 protection keys for supervisor (PKS) and user (PKU) pages.

The public API lives here; the compiled core (``pks_emu._core``) is an
implementation detail with a documented ``.pxd`` for Cython embedders.
"""
from ._core import CPU, PhysicalMemory, Translation, access_batch
from .constants import (ALL_FEATURES, MSR_IA32_EFER, MSR_IA32_PKRS, PAGE_KERNEL, PAGE_KERNEL_PKEY,
                        PF_I, PF_P, PF_PK, PF_RSVD, PF_SGX, PF_SS, PF_U, PF_W, PKEY_DISABLE_ACCESS,
                        PKEY_DISABLE_WRITE, PKR_AD_BIT, PKR_AD_KEY, PKR_WD_BIT, PKR_WD_KEY,
                        PKS_INIT_VALUE, AccessKind, _PAGE_PKEY, pf_error_code_str,
                        pkey_update_pkval, pte_pkey)
from .errors import (CPUException, GeneralProtectionFault, InvalidOpcode, MachineBusyError,
                     PageFault, PksEmuError, TraceFormatError)
from .embed import get_cython_include, get_include
from .machine import Machine
from .paging import AddressSpace
from .trace.format import RecordType
from .trace.replay import ReplayResult, replay, replay_records
from .trace.writer import TraceWriter

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - a build always writes _version.py
    __version__ = "0+unknown"

__all__ = [
    "ALL_FEATURES", "AccessKind", "AddressSpace", "CPU", "CPUException", "GeneralProtectionFault",
    "InvalidOpcode", "MSR_IA32_EFER", "MSR_IA32_PKRS", "Machine", "MachineBusyError",
    "PAGE_KERNEL", "PAGE_KERNEL_PKEY", "PF_I", "PF_P", "PF_PK", "PF_RSVD", "PF_SGX", "PF_SS",
    "PF_U", "PF_W", "PKEY_DISABLE_ACCESS", "PKEY_DISABLE_WRITE", "PKR_AD_BIT", "PKR_AD_KEY",
    "PKR_WD_BIT", "PKR_WD_KEY", "PKS_INIT_VALUE", "PageFault", "PhysicalMemory", "PksEmuError",
    "RecordType", "ReplayResult", "TraceFormatError", "TraceWriter", "Translation", "_PAGE_PKEY",
    "access_batch", "get_cython_include", "get_include", "pf_error_code_str", "pkey_update_pkval",
    "pte_pkey", "replay", "replay_records", "sweep", "__version__",
]


def __getattr__(name: str):
    # pks_emu.sweep (Dask) is imported on first use: the core needs no Dask.
    if name == "sweep":
        from .sweep import sweep
        return sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
