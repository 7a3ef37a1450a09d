"""The capture guest's initramfs: a valid cpio newc archive with /init and busybox."""
import gzip
import stat

import pytest

from capture_marks import needs_busybox
from pks_emu.capture import guest
from pks_emu.errors import PksEmuError


def _entries(path):
    return {e["name"]: e for e in guest.read_cpio(gzip.decompress(path.read_bytes()))}


def test_cpio_roundtrip(tmp_path):
    import io
    buf = io.BytesIO()
    w = guest.CpioWriter(buf)
    w.file("a/b/c.txt", b"hello")            # parents created on the way
    w.symlink("bin/sh", "/bin/busybox")
    w.chardev("dev/console", 5, 1)
    w.file("odd", b"x" * 7, 0o755)            # data needing padding
    w.close()
    data = buf.getvalue()
    assert len(data) % 4 == 0
    ents = {e["name"]: e for e in guest.read_cpio(data)}
    assert list(ents) == ["a", "a/b", "a/b/c.txt", "bin", "bin/sh", "dev", "dev/console", "odd"]
    assert ents["a/b/c.txt"]["data"] == b"hello"
    assert stat.S_ISDIR(ents["a/b"]["mode"])
    assert stat.S_ISLNK(ents["bin/sh"]["mode"]) and ents["bin/sh"]["data"] == b"/bin/busybox"
    assert stat.S_ISCHR(ents["dev/console"]["mode"])
    assert (ents["dev/console"]["rdevmajor"], ents["dev/console"]["rdevminor"]) == (5, 1)
    assert ents["odd"]["data"] == b"xxxxxxx" and ents["odd"]["mode"] & 0o777 == 0o755
    with pytest.raises(PksEmuError, match="truncated|magic"):
        guest.read_cpio(data[:-200])          # trailer cut off
    with pytest.raises(PksEmuError, match="magic"):
        guest.read_cpio(b"070702" + data[6:])


@needs_busybox
def test_initramfs_has_init_and_busybox(tmp_path):
    script = tmp_path / "w.sh"
    script.write_text("echo my-workload\n")
    module = tmp_path / "fake.ko"
    module.write_bytes(b"\x7fELF-not-really")
    out = guest.build_initramfs(script, tmp_path / "initrd.gz", modules=[module])
    ents = _entries(out)
    bb = guest.find_busybox()
    assert ents["bin/busybox"]["data"] == bb.read_bytes()
    assert ents["bin/busybox"]["mode"] & 0o111
    init = ents["init"]
    assert stat.S_ISREG(init["mode"]) and init["mode"] & 0o111
    text = init["data"].decode()
    assert text.startswith("#!/bin/sh\n")
    for needed in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "sh /workload.sh",
                   "/proc/kallsyms > /dev/ttyS1", "poweroff -f", "insmod /lib/modules/pks/fake.ko"):
        assert needed in text
    assert ents["workload.sh"]["data"] == b"echo my-workload\n"
    assert ents["lib/modules/pks/fake.ko"]["data"] == module.read_bytes()
    # the applets the init script uses resolve to busybox
    for applet in ("bin/sh", "bin/mount", "bin/cat", "sbin/poweroff", "sbin/insmod"):
        assert ents[applet]["data"] == b"/bin/busybox", applet
    assert stat.S_ISCHR(ents["dev/console"]["mode"])


@needs_busybox
def test_initramfs_default_workload_and_no_dump(tmp_path):
    ents = _entries(guest.build_initramfs(None, tmp_path / "i.gz", dump_kallsyms=False))
    assert ents["workload.sh"]["data"] == guest.DEFAULT_WORKLOAD.encode()
    assert b"kallsyms" not in ents["init"]["data"]


def test_dynamic_busybox_rejected(tmp_path):
    import sys
    # the Python interpreter is a dynamically linked ELF (has PT_INTERP)
    with pytest.raises(PksEmuError, match="dynamically linked.*busybox-static"):
        guest.find_busybox(sys.executable)
    with pytest.raises(PksEmuError, match="busybox-static"):
        guest.find_busybox(tmp_path / "nope")


@needs_busybox
def test_bad_module_and_workload(tmp_path):
    with pytest.raises(PksEmuError, match="uncompressed .ko"):
        guest.build_initramfs(None, tmp_path / "i.gz", modules=[tmp_path / "m.ko.xz"])
    with pytest.raises(PksEmuError, match="workload script"):
        guest.build_initramfs(tmp_path / "missing.sh", tmp_path / "i.gz")
