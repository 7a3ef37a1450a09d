"""The QEMU side of a capture: find the binaries, build the command line, run it.

The guest runs under TCG (``-accel tcg``, the plugins need it) on the ``pc``
machine with ``-cpu max`` (which offers PKS, PKU, LA57, SMEP and SMAP),
``-nodefaults`` (no VGA, NIC or disk to probe), the console on the first
serial port and the kallsyms dump on the second, both written to host files.
SMP guests run one host thread per vCPU (MTTCG, QEMU's default for x86 on
x86), so the plugin's callbacks run concurrently.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import PksEmuError

QEMU_HINT = "apt-get install -y qemu-system-x86"
KERNEL_HINT = "apt-get install -y linux-image-cloud-amd64"

#: Kernel command line of every capture; the user's ``append`` comes after it.
BASE_APPEND = "console=ttyS0 nokaslr panic=-1 quiet"

_MEM_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.I)
_MEM_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def find_qemu() -> Path:
    """``qemu-system-x86_64`` on PATH, or a clear error naming the package."""
    path = shutil.which("qemu-system-x86_64")
    if not path:
        raise PksEmuError(f"no qemu-system-x86_64 on PATH: {QEMU_HINT}")
    return Path(path)


def _version_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.-]", name))


def find_default_kernel(boot: str | os.PathLike = "/boot") -> Path:
    """The newest ``/boot/vmlinuz-*-cloud-amd64``, else the newest ``vmlinuz-*``.

    Raises :class:`PksEmuError` naming the package to install when there is none.
    """
    boot = Path(boot)
    kernels = [p for p in boot.glob("vmlinuz-*") if p.is_file()]
    if not kernels:
        raise PksEmuError(f"no kernel in {boot} (vmlinuz-*): {KERNEL_HINT}")
    cloud = [p for p in kernels if p.name.endswith("-cloud-amd64")]
    return max(cloud or kernels, key=lambda p: _version_key(p.name[len("vmlinuz-"):]))


def kernel_release(kernel: str | os.PathLike) -> str | None:
    """``6.1.0-57-cloud-amd64`` for ``/boot/vmlinuz-6.1.0-57-cloud-amd64`` (None if not so named)."""
    name = Path(kernel).name
    return name[len("vmlinuz-"):] if name.startswith("vmlinuz-") else None


def parse_memory(memory: str | int) -> int:
    """Guest memory in bytes from QEMU's ``-m`` syntax (a bare number is MiB)."""
    if isinstance(memory, int):
        return memory << 20
    m = _MEM_RE.match(str(memory))
    if not m:
        raise PksEmuError(f"guest memory {memory!r}: expected e.g. 512M or 2G")
    return int(m.group(1)) * _MEM_UNITS[m.group(2).upper()]


def pc_lowmem(ram: int) -> int:
    """RAM below 4 GiB on QEMU's ``pc`` machine (7.2: all of it up to 3.5 GiB, else 3 GiB).

    QEMU numbers RAM in one block (its ``ram_addr``); the part above ``lowmem``
    appears at guest-physical 4 GiB. The plugin uses this to turn the address
    QEMU reports into the guest-physical address.
    """
    return ram if ram < 0xE000_0000 else 0xC000_0000


def _optval(value: object) -> str:
    """A value for a QEMU ``-plugin``/``-serial`` option: commas doubled (QemuOpts escaping)."""
    return str(value).replace(",", ",,")


def plugin_option(path: str | os.PathLike, args: Mapping[str, object]) -> str:
    return ",".join([_optval(path)] + [f"{k}={_optval(v)}" for k, v in args.items()])


def build_command(*, qemu: str | os.PathLike, kernel: str | os.PathLike,
                  initrd: str | os.PathLike | None, append: str | None, memory: str | int,
                  smp: int, console: str | os.PathLike, serial2: str | os.PathLike | None,
                  plugins: Sequence[tuple[str | os.PathLike, Mapping[str, object]]] = (),
                  extra_qemu_args: Sequence[str] = ()) -> list[str]:
    """The full ``qemu-system-x86_64`` command line of a capture."""
    if smp < 1:
        raise PksEmuError(f"smp {smp}: expected at least 1 vCPU")
    parse_memory(memory)  # validate early, with our message
    full_append = BASE_APPEND + (" " + append if append else "")
    cmd = [str(qemu), "-nodefaults", "-no-user-config", "-machine", "pc", "-accel", "tcg",
           "-cpu", "max", "-m", str(memory), "-smp", str(smp),
           "-kernel", str(kernel)]
    if initrd is not None:
        cmd += ["-initrd", str(initrd)]
    cmd += ["-append", full_append, "-display", "none", "-no-reboot",
            "-serial", f"file:{_optval(console)}"]
    if serial2 is not None:
        cmd += ["-serial", f"file:{_optval(serial2)}"]
    for path, args in plugins:
        cmd += ["-plugin", plugin_option(path, args)]
    cmd += list(extra_qemu_args)
    return cmd


def run(cmd: Sequence[str], *, log_path: str | os.PathLike, timeout: float | None,
        pass_fds: Sequence[int] = (), cancel: threading.Event | None = None
        ) -> tuple[int, float, bool]:
    """Run QEMU with its stdout/stderr to ``log_path``.

    Returns (exit status, wall seconds, timed_out). On a timeout, or when
    ``cancel`` is set, QEMU gets SIGTERM (it shuts down cleanly: the plugins'
    exit callbacks run and flush), then SIGKILL 10 s later; a cancelled run
    counts as timed out.
    """
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, pass_fds=tuple(pass_fds))
        except OSError as e:
            raise PksEmuError(f"cannot start {cmd[0]}: {e.strerror}") from None
        timed_out = False
        try:
            rc = _wait(proc, timeout, cancel)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return rc, time.monotonic() - t0, timed_out


def _wait(proc: subprocess.Popen, timeout: float | None, cancel: threading.Event | None) -> int:
    """``proc.wait(timeout)``, also ending (TimeoutExpired) when ``cancel`` is set."""
    if cancel is None:
        return proc.wait(timeout=timeout)
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 0.1 if end is None else max(0.0, min(0.1, end - time.monotonic()))
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            if cancel.is_set() or (end is not None and time.monotonic() >= end):
                raise


def tail(path: str | os.PathLike, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file ('' if unreadable)."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").rstrip().splitlines()[-lines:])
