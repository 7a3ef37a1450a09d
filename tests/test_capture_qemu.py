"""The QEMU command line of a capture, the binary and kernel look-ups, the plugin build."""
import os
import subprocess

import pytest

from capture_marks import needs_cc, needs_qemu
from pks_emu.capture import build, qemu
from pks_emu.errors import PksEmuError


def test_command_line():
    cmd = qemu.build_command(qemu="/usr/bin/qemu-system-x86_64", kernel="/k/vmlinuz",
                             initrd="/i/initrd.gz", append="memmap=64M!1G", memory="2G", smp=2,
                             console="/t/con.log", serial2="/t/k,s.raw",
                             plugins=[("/p/pks.so", {"out": "/t/a,b.pkt2", "limit": 10})],
                             extra_qemu_args=["-plugin", "other.so,x=1", "-rtc", "base=utc"])
    assert cmd[0] == "/usr/bin/qemu-system-x86_64"

    def after(opt):
        return [cmd[i + 1] for i, a in enumerate(cmd) if a == opt]
    assert after("-cpu") == ["max"]
    assert after("-accel") == ["tcg"]
    assert after("-m") == ["2G"] and after("-smp") == ["2"]
    assert after("-kernel") == ["/k/vmlinuz"] and after("-initrd") == ["/i/initrd.gz"]
    append = after("-append")[0]
    assert append.split() == ["console=ttyS0", "nokaslr", "panic=-1", "quiet", "memmap=64M!1G"]
    # commas in file names are doubled (QEMU option escaping)
    assert after("-serial") == ["file:/t/con.log", "file:/t/k,,s.raw"]
    assert after("-plugin")[0] == "/p/pks.so,out=/t/a,,b.pkt2,limit=10"
    assert cmd[-4:] == ["-plugin", "other.so,x=1", "-rtc", "base=utc"]  # verbatim, last
    assert "-no-reboot" in cmd and "-nodefaults" in cmd
    with pytest.raises(PksEmuError, match="smp"):
        qemu.build_command(qemu="q", kernel="k", initrd=None, append=None, memory="1G", smp=0,
                           console="c", serial2=None)


def test_memory_and_lowmem():
    assert qemu.parse_memory("512M") == 512 << 20
    assert qemu.parse_memory("2G") == 2 << 30
    assert qemu.parse_memory(256) == 256 << 20
    assert qemu.parse_memory("1024") == 1 << 30
    with pytest.raises(PksEmuError, match="guest memory"):
        qemu.parse_memory("lots")
    assert qemu.pc_lowmem(2 << 30) == 2 << 30
    assert qemu.pc_lowmem(4 << 30) == 3 << 30


def test_find_default_kernel(tmp_path):
    with pytest.raises(PksEmuError, match="apt-get install -y linux-image-cloud-amd64"):
        qemu.find_default_kernel(tmp_path)
    for name in ("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-10-cloud-amd64",
                 "vmlinuz-6.1.0-9-cloud-amd64", "vmlinuz-6.2.0-1-amd64"):
        (tmp_path / name).write_bytes(b"")
    # a cloud kernel wins over a newer generic one; 10 > 9 numerically
    assert qemu.find_default_kernel(tmp_path).name == "vmlinuz-6.1.0-10-cloud-amd64"
    for p in tmp_path.glob("*cloud*"):
        p.unlink()
    assert qemu.find_default_kernel(tmp_path).name == "vmlinuz-6.2.0-1-amd64"
    assert qemu.kernel_release("/boot/vmlinuz-6.1.0-57-cloud-amd64") == "6.1.0-57-cloud-amd64"


@needs_qemu
def test_missing_kernel(tmp_path):
    from pks_emu.capture import capture
    with pytest.raises(PksEmuError, match="kernel .*nope does not exist"):
        capture(tmp_path / "t", kernel=tmp_path / "nope")


def test_missing_qemu(monkeypatch, tmp_path):
    from pks_emu.capture import capture
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PksEmuError, match="no qemu-system-x86_64.*apt-get install -y qemu-system-x86"):
        capture(tmp_path / "t", kernel=tmp_path / "nope")


def test_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(PksEmuError, match="no C compiler"):
        build.plugin_path("count")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(PksEmuError, match="CC="):
        build.plugin_path("count")


@needs_cc
def test_plugins_build_and_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PKS_EMU_CACHE", str(tmp_path))
    paths = {name: build.plugin_path(name) for name in build.PLUGINS}
    for name, p in paths.items():
        assert p.is_file() and p.parent == tmp_path / "plugins"
        mtime = p.stat().st_mtime_ns
        assert build.plugin_path(name) == p and p.stat().st_mtime_ns == mtime  # cached
    assert paths["count"] != paths["record"]
    # the exported symbols QEMU 7.2 looks for
    for p in paths.values():
        syms = subprocess.run(["nm", "-D", "--defined-only", str(p)], capture_output=True,
                              text=True).stdout
        assert " qemu_plugin_install" in syms and " qemu_plugin_version" in syms


@needs_cc
def test_build_error_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("PKS_EMU_CACHE", str(tmp_path))
    src = tmp_path / "plugin"
    src.mkdir()
    for f in build.PLUGIN_DIR.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "pks_count.c").write_text("this is not C\n")
    monkeypatch.setattr(build, "PLUGIN_DIR", src)
    with pytest.raises(PksEmuError, match="building the capture plugin pks_count.c failed"):
        build.plugin_path("count")


@needs_qemu
@needs_cc
@pytest.mark.parametrize("name,message", [
    ("count", "pks_count: bad option 'bogus=1'"),
    ("record", "pks_capture: bad option 'bogus=1'"),
])
def test_qemu_loads_the_plugin(name, message):
    # QEMU dlopen()s the plugin, checks qemu_plugin_version and calls
    # qemu_plugin_install, which rejects the option: the message is ours.
    res = subprocess.run(["qemu-system-x86_64", "-machine", "none", "-display", "none",
                          "-nodefaults", "-plugin", f"{build.plugin_path(name)},bogus=1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert message in res.stderr


@needs_qemu
@needs_cc
def test_record_plugin_needs_an_output():
    res = subprocess.run(["qemu-system-x86_64", "-machine", "none", "-display", "none",
                          "-nodefaults", "-plugin", str(build.plugin_path("record"))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "give exactly one of out=PATH and fd=N" in res.stderr
