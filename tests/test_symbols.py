"""The symbolizer (pks_emu/symbols.py): ELF files checked against binutils
(nm, addr2line, objdump) on a program compiled here, kallsyms text against
hand-computed answers."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from pks_emu.errors import PksEmuError
from pks_emu.symbols import LAST_SYMBOL_REACH, Symbolizer, parse_spec

PROGRAM = r"""
#include <stdio.h>
#include <string.h>
static int helper(int x) {
    int y = x * 3;
    return y + 1;
}
__attribute__((noinline)) int compute(int n) {
    int s = 0;
    for (int i = 0; i < n; i++)
        s += helper(i);
    return s;
}
__attribute__((noinline)) void shout(const char *m) {
    puts(m);
    fputs(m, stderr);
}
int main(int argc, char **argv) {
    shout(argv[0]);
    return compute(argc + (int)strlen(argv[0]));
}
"""

TOOLS = ("gcc", "nm", "addr2line", "objdump", "objcopy", "strip")
needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="needs gcc and binutils (nm, addr2line, objdump, objcopy, strip)")


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    d = tmp_path_factory.mktemp("elf")
    src = d / "prog.c"
    src.write_text(PROGRAM)
    exe = d / "prog"
    subprocess.run(["gcc", "-g", "-O1", "-fPIE", "-pie", "-o", str(exe), str(src)], check=True)
    return exe


def nm_functions(path) -> dict[str, tuple[int, int]]:
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True,
                         check=True).stdout
    funcs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tT":
            funcs[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return funcs


def addr2line(path, addrs: list[int]) -> list[str]:
    out = subprocess.run(["addr2line", "-e", str(path)] + [f"{a:#x}" for a in addrs],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [re.sub(r" \(discriminator \d+\)", "", line) for line in out]


@needs_tools
@pytest.mark.parametrize("base", [None, 0x555555554000, 0x108000])
def test_elf_functions_and_lines_match_binutils(program, base):
    funcs = nm_functions(program)
    assert {"main", "compute", "shout"} <= set(funcs)
    sym = Symbolizer()
    sym.add_elf(program, base)
    bias = base or 0
    probes = []
    for name, (start, size) in funcs.items():
        for off in sorted({0, 1, size // 2, size - 1}):
            if 0 <= off < size:
                probes.append((name, start, off))
    ips = np.array([bias + s + o for _, s, o in probes], dtype=np.uint64)
    names, sources = sym.lookup_many(ips)
    truth = addr2line(program, [s + o for _, s, o in probes])
    for (name, start, off), got, src, want in zip(probes, names, sources, truth):
        assert got == f"{name}+{off:#x}", (name, off)
        file, line = want.rsplit(":", 1)
        if line.isdigit() and int(line) > 0 and not file.startswith("?"):
            assert src == f"{os.path.basename(file)}:{line}", (name, off, want)
    # Past the end of the last function and before the first: unknown.
    first = min(s for s, _ in funcs.values())
    assert sym.lookup(bias + first - 1)[0] is None or sym.lookup(bias + first - 1)[0].endswith("@plt+0xf")
    assert sym.lookup(0)[0] is None


@needs_tools
def test_plt_stubs_are_named_as_objdump_does(program):
    out = subprocess.run(["objdump", "-d", "--wide", str(program)], capture_output=True, text=True,
                         check=True).stdout
    stubs = {m.group(2): int(m.group(1), 16) for m in re.finditer(r"^([0-9a-f]+) <(\w+)@plt>:", out, re.M)}
    assert "puts" in stubs
    sym = Symbolizer([f"{program}@0x1000000"])
    for name, addr in stubs.items():
        assert sym.lookup(0x1000000 + addr + 2)[0] == f"{name}@plt+0x2"


@needs_tools
def test_stripped_binary_uses_dynsym_and_debuglink(program, tmp_path):
    stripped = tmp_path / "prog.stripped"
    debug = tmp_path / "prog.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(program), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(program)], check=True)
    funcs = nm_functions(program)
    start = funcs["compute"][0]
    # Without the debug file: .dynsym only (a PIE exports no functions of
    # its own here), the PLT stubs still named.
    bare = Symbolizer()
    bare.add_elf(stripped, 0x400000, debug_dirs=())
    assert bare.lookup(0x400000 + start + 4) == (None, None)
    # With a .gnu_debuglink beside it, the detached file's .symtab and DWARF.
    linked = tmp_path / "prog.linked"
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(stripped), str(linked)], check=True)
    full = Symbolizer()
    full.add_elf(linked, 0x400000, debug_dirs=())
    got, src = full.lookup(0x400000 + start + 4)
    assert got == "compute+0x4"
    want = addr2line(program, [start + 4])[0]
    assert src == f"{os.path.basename(want.rsplit(':', 1)[0])}:{want.rsplit(':', 1)[1]}"


def test_shared_object_dynsym(tmp_path):
    if shutil.which("gcc") is None or shutil.which("nm") is None:
        pytest.skip("needs gcc and nm")
    src = tmp_path / "lib.c"
    src.write_text("int pks_lib_a(int x) { return x + 1; }\nint pks_lib_b(int x) { return x * 7 + 3; }\n")
    so = tmp_path / "lib.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    subprocess.run(["strip", "--strip-all", str(so)], check=True)
    out = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True,
                         check=True).stdout
    addr = {p[2]: int(p[0], 16) for p in (line.split() for line in out.splitlines()) if len(p) == 3}
    sym = Symbolizer([f"{so}@0x7f0000000000"])
    assert sym.lookup(0x7f0000000000 + addr["pks_lib_b"] + 1) == ("pks_lib_b+0x1", None)
    assert sym.files == [str(so)]


KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81001000 t secondary_startup
ffffffff81001100 T copy_user_generic
ffffffff81002000 D some_data
ffffffff81003000 W weak_fn
ffffffffc0a01000 t pks_test_init\t[pks_test]
ffffffffc0a01040 t pks_test_fault\t[pks_test]
ffffffffc0a02000 d pks_test_data\t[pks_test]
"""


def test_kallsyms(tmp_path):
    p = tmp_path / "kallsyms"
    p.write_text(KALLSYMS)
    sym = Symbolizer()
    sym.add_kallsyms(p)
    cases = {
        0xffffffff81000000: "startup_64+0x0",       # the T alias without underscores wins
        0xffffffff81000fff: "startup_64+0xfff",
        0xffffffff81001010: "secondary_startup+0x10",
        0xffffffff81001fff: "copy_user_generic+0xeff",
        0xffffffff81002010: None,                    # data symbol bounds the text before it
        0xffffffff81003004: "weak_fn+0x4",
        0xffffffff81003000 + LAST_SYMBOL_REACH: None,
        0xffffffffc0a01044: "pks_test_fault+0x4 [pks_test]",
        0xffffffffc0a0103f: "pks_test_init+0x3f [pks_test]",
        0xffffffffc0a02000: None,
        0x1000: None,
    }
    names, srcs = sym.lookup_many(list(cases))
    assert names == list(cases.values())
    assert srcs == [None] * len(cases)
    # @BASE adds to every address; nm output is the same format.
    shifted = Symbolizer([f"{p}@0x10"])
    assert shifted.lookup(0xffffffff81001020)[0] == "secondary_startup+0x10"


def test_kallsyms_errors(tmp_path):
    zero = tmp_path / "zero"
    zero.write_text("0000000000000000 T startup_64\n0000000000000000 t foo\n")
    with pytest.raises(PksEmuError, match="kptr_restrict"):
        Symbolizer([str(zero)])
    bad = tmp_path / "bad"
    bad.write_text("ffffffff81000000 T ok\nthis is not a symbol line\n")
    with pytest.raises(PksEmuError, match=r"bad:2"):
        Symbolizer([str(bad)])
    with pytest.raises(PksEmuError, match="cannot read"):
        Symbolizer([str(tmp_path / "missing")])


def test_parse_spec():
    assert parse_spec("gzip@0x108000") == ("gzip", 0x108000)
    assert parse_spec("gzip@4096") == ("gzip", 4096)
    assert parse_spec("gzip") == ("gzip", None)
    assert parse_spec("dir@v2/gzip") == ("dir@v2/gzip", None)
    assert parse_spec("a@b@0x10") == ("a@b", 0x10)


def test_write_kallsyms_round_trip(tmp_path):
    p = tmp_path / "k"
    p.write_text(KALLSYMS)
    a = Symbolizer([str(p)])
    out = tmp_path / "out.syms"
    a.write_kallsyms(out)
    b = Symbolizer([str(out)])
    ips = np.array(list(range(0xffffffff80fffff0, 0xffffffff81004100, 7)) +
                   list(range(0xffffffffc0a00ff0, 0xffffffffc0a02010, 5)), dtype=np.uint64)
    assert a.lookup_many(ips)[0] == b.lookup_many(ips)[0]


def test_lookup_many_scales():
    # 1000 symbols, 200k IPs: the vectorized path answers like the scalar one.
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k")
        with open(p, "w") as f:
            for i in range(1000):
                f.write(f"{0x400000 + 64 * i:016x} t f{i}\n")
        sym = Symbolizer([p])
    rng = np.random.default_rng(3)
    ips = rng.integers(0x3fff00, 0x400000 + 64 * 1000 + LAST_SYMBOL_REACH + 64, 200_000).astype(np.uint64)
    names, _ = sym.lookup_many(ips)
    for ip, name in list(zip(ips.tolist(), names))[:2000]:
        if ip < 0x400000 or ip >= 0x400000 + 64 * 999 + LAST_SYMBOL_REACH:
            assert name is None
        else:
            i = min((ip - 0x400000) // 64, 999)
            assert name == f"f{i}+{ip - 0x400000 - 64 * i:#x}"


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_bundled_gzip_trace_symbols():
    # examples/gzip-services.syms.xz names the faulting sites of the bundled
    # trace under examples/protect-heap.toml (see examples/README.md).
    sym = Symbolizer([os.path.join(EXAMPLES, "gzip-services.syms.xz")])
    names, srcs = sym.lookup_many([0x400ddcc, 0x4011418, 0x4021960, 0x48cb9b6, 0x10b030, 0x10c000, 0x4838000])
    assert names == ["_dl_relocate_object+0x1ac [ld-linux-x86-64.so.2]",
                     "_dl_allocate_tls_storage+0x78 [ld-linux-x86-64.so.2]",
                     "memset+0x60 [ld-linux-x86-64.so.2]",
                     "_IO_flush_all_lockp+0x106 [libc.so.6]",
                     "getenv@plt+0x0 [gzip]",
                     None,          # gzip's own code: Debian strips it
                     None]          # valgrind's preload library
    assert srcs == [None] * 7


LDSO = "/lib64/ld-linux-x86-64.so.2"
LDSO_BUILD_ID = "93ac61ec5a8eb1396f9fbd350e3169a558528a40"    # libc6 2.36-9+deb12u14


@pytest.mark.skipif(not os.path.isfile(f"/usr/lib/debug/.build-id/{LDSO_BUILD_ID[:2]}/{LDSO_BUILD_ID[2:]}.debug"),
                    reason="needs Debian 12's libc6-dbg 2.36-9+deb12u14 (the ld.so of the bundled trace)")
def test_bundled_symbols_equal_the_debian_elf_files():
    # The shipped file is what the ELF files (with libc6-dbg) say, and the
    # ELF path adds file:line from the detached DWARF.
    with Symbolizer([f"{LDSO}@0x4000000"]) as elf:
        got, src = elf.lookup(0x400ddcc)
        assert got == "_dl_relocate_object+0x1ac" and src == "dl-reloc.c:301"
        shipped = Symbolizer([os.path.join(EXAMPLES, "gzip-services.syms.xz")])
        ips = np.arange(0x4000000, 0x4030000, 3, dtype=np.uint64)
        a = elf.lookup_many(ips)[0]
        b = [None if n is None else n.rsplit(" [", 1)[0] for n in shipped.lookup_many(ips)[0]]
        assert a == b
