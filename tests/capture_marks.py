"""Skip markers of the capture tests: each skips only when a tool it needs is absent."""
import glob
import shutil

import pytest

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
HAVE_KERNEL = bool(glob.glob("/boot/vmlinuz-*"))
HAVE_BUSYBOX = any(shutil.which(p) for p in ("/bin/busybox", "/usr/bin/busybox")) or \
    shutil.which("busybox") is not None
HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))

needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 not installed "
                                "(apt-get install -y qemu-system-x86)")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="no /boot/vmlinuz-* "
                                  "(apt-get install -y linux-image-cloud-amd64)")
needs_busybox = pytest.mark.skipif(not HAVE_BUSYBOX, reason="no busybox "
                                   "(apt-get install -y busybox-static)")
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc, gcc or clang)")
