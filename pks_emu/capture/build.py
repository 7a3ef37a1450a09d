"""Build the capture plugins with the system C compiler, on first use.

The plugins are C sources shipped in the package (``plugin/``); they include
``pks_emu/include/pks_trace.h`` (the trace-v2 writer) and their own
declarations of QEMU's plugin API (``plugin/qemu_api.h``: QEMU installs no
header). A built plugin is cached in ``$PKS_EMU_CACHE`` or
``$XDG_CACHE_HOME/pks_emu/plugins`` (default ``~/.cache/pks_emu/plugins``),
under a name keyed by a hash of the sources, the headers, the compiler and its
flags, so an upgrade of pks_emu rebuilds it and concurrent builds do not clash
(each writes a temporary file and renames it into place).
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import PksEmuError

PLUGIN_DIR = Path(__file__).with_name("plugin")
INCLUDE_DIR = Path(__file__).resolve().parent.parent / "include"

#: plugin name -> its C source (in PLUGIN_DIR)
PLUGINS = {"count": "pks_count.c", "record": "pks_capture.c"}

CFLAGS = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-fPIC", "-shared",
          "-fvisibility=hidden", "-pthread"]

COMPILER_HINT = "apt-get install -y gcc"


def cache_dir() -> Path:
    env = os.environ.get("PKS_EMU_CACHE")
    if env:
        return Path(env) / "plugins"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pks_emu" / "plugins"


def find_compiler() -> list[str]:
    """The C compiler command: ``$CC`` (may hold arguments), else cc, gcc or clang."""
    env = os.environ.get("CC")
    if env:
        cmd = shlex.split(env)
        if cmd and shutil.which(cmd[0]):
            return cmd
        raise PksEmuError(f"CC={env!r} is not an executable; the capture plugin needs a C "
                          f"compiler: {COMPILER_HINT}")
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise PksEmuError(f"no C compiler (cc, gcc or clang) to build the capture plugin: "
                      f"{COMPILER_HINT}")


def _inputs(source: str) -> list[Path]:
    files = [PLUGIN_DIR / source] + sorted(PLUGIN_DIR.glob("*.h"))
    if source == PLUGINS["record"]:
        files.append(INCLUDE_DIR / "pks_trace.h")
    return files


def plugin_path(name: str = "count", *, rebuild: bool = False) -> Path:
    """Path of the built plugin ``name`` ("count" or "record"), compiling it if needed."""
    if name not in PLUGINS:
        raise PksEmuError(f"unknown capture plugin {name!r}: expected one of {sorted(PLUGINS)}")
    source = PLUGINS[name]
    cc = find_compiler()
    h = hashlib.sha256()
    for f in _inputs(source):
        try:
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        except OSError as e:
            raise PksEmuError(f"capture plugin source {f} missing: {e.strerror}") from None
    h.update(" ".join(cc + CFLAGS).encode())
    out_dir = cache_dir()
    out = out_dir / f"{source[:-2]}-{h.hexdigest()[:16]}.so"
    if out.is_file() and not rebuild:
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    cmd = cc + CFLAGS + ["-I", str(PLUGIN_DIR), "-I", str(INCLUDE_DIR), "-o", tmp,
                         str(PLUGIN_DIR / source)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise PksEmuError(f"cannot run the C compiler {cc[0]}: {e.strerror}") from None
    if res.returncode != 0:
        os.unlink(tmp)
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise PksEmuError(f"building the capture plugin {source} failed "
                          f"({shlex.join(cmd)}):\n{tail}")
    os.replace(tmp, out)
    return out
