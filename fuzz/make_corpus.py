"""Write the seed corpus under fuzz/corpus/<target>/ (small files; run again
after a format change: python fuzz/make_corpus.py)."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))


def native(out: str) -> None:
    from pks_emu import Machine, TraceWriter
    from pks_emu.constants import MSR_IA32_PKRS
    # 1. no memory image: every record type, two CPUs (about 500 bytes)
    m = Machine(ncpus=2)
    with TraceWriter(os.path.join(out, "events-2cpu.pkt"), m, max_tasks=8) as w:
        w.access(0, 0x1000, "read")
        w.access(1, 0xFFFF_8000_0000_0000, "write", 8, cpl=3)
        w.access(0, 0x7FFF_FFFF_FFFC, "fetch", 8)
        w.wrmsr(0, MSR_IA32_PKRS, 0x55555554)
        w.rdmsr(1, MSR_IA32_PKRS)
        w.wrpkru(0, 0xC)
        w.mov_cr(0, 4, 0)
        w.invlpg(1, 0x1000)
        w.pte_write(0x2000, 0x3)
        w.context_switch(0, 3)
        w.exception_entry(1, 14, from_user=True)
        w.exception_exit(1)
        w.set_rflags(0, 0x40000)
    # 2. page tables and a key-protected page (4-level; about 20 KiB)
    m = Machine()
    a = m.address_space()
    a.map(0xFFFF_C900_0000_0000, 0x40000000, pkey=1)
    a.activate()
    m.cpus[0].cr4 = m.cpus[0].cr4 | (1 << 24)          # CR4.PKS
    m.cpus[0].wrmsr(MSR_IA32_PKRS, 0x4)
    with TraceWriter(os.path.join(out, "pks-fault.pkt"), m) as w:
        w.access(0, 0xFFFF_C900_0000_0008, "write")
        w.wrmsr(0, MSR_IA32_PKRS, 0)
        w.access(0, 0xFFFF_C900_0000_0008, "write")
        w.exception_exit(0)                             # exit without entry
    # 3. the empty trace
    with TraceWriter(os.path.join(out, "empty.pkt"), Machine()):
        pass


LACKEY = (b"==123== Lackey, an example Valgrind tool\n"
          b"I  0401ab70,3\n L 04a1ade0,8\n S 1fff000778,8\n M 04033e06,1\nSB 0401ab70\n"
          b"I  7ffffffffffe,8\n S 7ffffffffffe,4096\n")


def lackey(out: str) -> None:
    files = {"basic.lackey": LACKEY, "crlf.lackey": LACKEY.replace(b"\n", b"\r\n"),
             "bad.lackey": b"I  0401ab70,3\n X 123,4\n L 0401ab70,0\n L zz,1\n",
             "big-size.lackey": b" S 0401ab70,5000\n",
             "basic.lackey.gz": gzip.compress(LACKEY, mtime=0),
             "basic.lackey.xz": lzma.compress(LACKEY),
             "basic.lackey.bz2": bz2.compress(LACKEY),
             "garbage.gz": gzip.compress(LACKEY, mtime=0) + b"garbage"}
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


POLICIES = {
    "full.toml": '''[registers]
cpl = 3
pkru = { 3 = "read-only", 4 = "no-access" }
pkrs = 0x55555554
cr4 = ["pke", "pks", "smep", "smap"]
nxe = true
wp = true

[machine]
paging_levels = 5

[default]
map = "user"
writable = true
executable = false
pkey = 0

[[region]]
name = "heap"
start = 0x4a0c000
end = 0x4c00000
pkey = 3

[[region]]
name = "kernel"
start = 0xffff800000000000
end = 0x10000000000000000
map = "supervisor"
''',
    "unmapped.toml": '[default]\nmap = "unmapped"\n',
    "types.toml": '[registers]\nnxe = "false"\ncpl = true\n[default]\npkey = true\n',
    "empty.toml": "",
}


def policy(out: str) -> None:
    for name, text in POLICIES.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    shutil.copy(os.path.join(HERE, "..", "examples", "protect-heap.toml"), os.path.join(out, "protect-heap.toml"))


if __name__ == "__main__":
    for target, make in (("native", native), ("lackey", lackey), ("policy", policy)):
        d = os.path.join(HERE, "corpus", target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        make(d)
        print(d, sorted(os.listdir(d)))
    v2 = os.path.join(HERE, "corpus", "native_v2")
    os.makedirs(v2, exist_ok=True)
    try:
        from pks_emu.trace.v2 import convert_v1_to_v2
    except ImportError:
        print(v2, "kept: pks_emu.trace.v2 is not in this build")
    else:
        src = os.path.join(HERE, "corpus", "native")
        for name in sorted(os.listdir(src)):
            if name.endswith(".pkt"):
                convert_v1_to_v2(os.path.join(src, name),
                                 os.path.join(v2, name[:-4] + ".none.pkt2"), codec="none")
        print(v2, sorted(os.listdir(v2)))
