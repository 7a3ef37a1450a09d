"""Regenerate gzip-services.syms.xz: the function symbols of the code that
examples/gzip-services.lackey.xz ran, at the addresses it ran them.

Run on Debian 12 (bookworm) with libc6 and libc6-dbg 2.36-9+deb12u14
installed and Debian's gzip 1.12-1 binary at hand::

    apt-get install libc6-dbg          # detached debug symbols of ld.so and libc
    apt-get download gzip && dpkg-deb -x gzip_1.12-1_amd64.deb gzip-deb
    python examples/make_gzip_symbols.py gzip-deb/bin/gzip

The load bases are those valgrind 3.19 used in the trace; every instruction
of the trace starts at an instruction boundary of these binaries with the
same length (checked by this script against ``objdump -d``), which is how the
bases were found and how the binaries were matched to the trace.
"""
from __future__ import annotations

import lzma
import os
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pks_emu.symbols import Symbolizer  # noqa: E402

OBJECTS = [  # (file, load base, module name)
    (None, 0x108000, "gzip"),
    ("/lib64/ld-linux-x86-64.so.2", 0x4000000, "ld-linux-x86-64.so.2"),
    ("/lib/x86_64-linux-gnu/libc.so.6", 0x4848000, "libc.so.6"),
]


def instructions(path: str) -> dict[int, int]:
    """Start address -> length of every instruction objdump decodes."""
    out = subprocess.run(["objdump", "-d", "--wide", path], capture_output=True, text=True, check=True).stdout
    d = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip().endswith(":"):
            try:
                d[int(parts[0].strip()[:-1], 16)] = len(parts[1].split())
            except ValueError:
                continue
    return d


def trace_instructions() -> Counter:
    seen: Counter = Counter()
    with lzma.open(os.path.join(HERE, "gzip-services.lackey.xz"), "rt") as f:
        for line in f:
            if line.startswith("I  "):
                a, s = line[3:].split(",")
                seen[(int(a, 16), int(s))] += 1
    return seen


def main(gzip_binary: str) -> None:
    seen = trace_instructions()
    parts = ["# Function symbols of the code in examples/gzip-services.lackey.xz, at the addresses\n",
             "# it ran at (kallsyms format; pks-emu replay --symbols FILE). Made by\n",
             "# examples/make_gzip_symbols.py from Debian 12 packages: gzip 1.12-1 (/bin/gzip,\n",
             "# stripped: its PLT stubs only), libc6 + libc6-dbg 2.36-9+deb12u14 (ld.so, libc.so.6).\n"]
    for path, base, module in OBJECTS:
        path = path or gzip_binary
        size = max(s["p_vaddr"] + s["p_memsz"] for s in _loads(path))
        mine = {(a, n) for (a, n) in seen if base <= a < base + size}
        insns = instructions(path)
        bad = [a for a, n in mine if insns.get(a - base) != n]
        print(f"{module}: base {base:#x}: {len(mine) - len(bad)}/{len(mine)} distinct trace instructions "
              "match an instruction of the binary", file=sys.stderr)
        if bad:
            raise SystemExit(f"{path} does not match the trace at {base:#x}")
        shown = "/bin/gzip of gzip_1.12-1_amd64.deb" if module == "gzip" else path
        parts.append(f"# {module}: {shown} at {base:#x}\n")
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "t")
            with Symbolizer([f"{path}@{base:#x}"]) as sym:
                sym.write_kallsyms(out, module=module)
            with open(out) as f:
                parts.append(f.read())
    with lzma.open(os.path.join(HERE, "gzip-services.syms.xz"), "wt", preset=9) as f:
        f.write("".join(parts))


def _loads(path: str):
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        return [dict(s.header) for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
