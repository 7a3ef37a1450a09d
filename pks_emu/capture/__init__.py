"""Capture a booting Linux kernel's memory accesses under QEMU TCG (trace v2).

:func:`capture` boots a kernel (default: Debian's cloud kernel, see
:func:`find_default_kernel`) with an initramfs built from busybox-static
(:func:`build_initramfs`) under ``qemu-system-x86_64`` with this package's TCG
plugin, which writes every guest data access as a trace-v2 record to a file or
a descriptor. See docs/capture.md.
"""
from .build import plugin_path
from .guest import DEFAULT_WORKLOAD, build_initramfs, find_busybox, find_modules, read_cpio
from .qemu import find_default_kernel, find_qemu, kernel_release
from .session import CaptureInfo, CaptureJob, capture, capture_pipe

__all__ = ["CaptureInfo", "CaptureJob", "capture_pipe", "DEFAULT_WORKLOAD", "build_initramfs", "capture", "find_busybox",
           "find_default_kernel", "find_modules", "find_qemu", "kernel_release", "plugin_path",
           "read_cpio"]
