"""QEMU's TCG and pks_emu's replay on the same accesses, in one run.

    python benchmarks/calibration/qemu_pks.py [--runs 3] [--keep DIR]

Builds ``qemu_guest.S`` (GNU as, ld and objcopy from binutils), boots it
under ``qemu-system-x86_64 -accel tcg -cpu max`` with 4-level and with
5-level paging, and times each of its phases by when the guest's marker
bytes arrive on the serial port. The guest's pseudo-random patterns are
reproduced here exactly, written as native traces with the guest's machine
state (the same page tables, keys, CR0/CR4/EFER and IA32_PKRS) and replayed
by pks_emu; the storm's fault count must be the same on both sides (and the
count the guest derives from its own pattern), or the run fails.

Medians of ``--runs`` runs; M accesses/s, and pks_emu's over QEMU's. QEMU's
figure is for real guest code: a load of the next address from the pattern
array, a test of its write bit and the access, which TCG translates into a
few host instructions each; pks_emu reads a 24-byte record instead.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "qemu_guest.S")

# The guest's constants (qemu_guest.S).
TEST_VA = 0x40000000
TEST_PAGES = 262144
FRAMES = 0x800000
HIT_N = 1_000_000
MASK64 = (1 << 64) - 1
SEED = 0x9E3779B97F4A7C15
MULT = 0x2545F4914F6CDD1D
STORM_KEYS_DENIED = range(3, 16)

#: phase letter: (what, guest passes over its pattern, pks_emu passes)
PHASES = {
    "A": ("TLB-resident, 256 pages", 50, 2),
    "B": ("TLB-resident, WRMSR IA32_PKRS every 100", 5, 2),
    "C": ("random order over 256 Ki pages", 8, 8),
    "D": ("fault storm, 13 of 16 keys deny", 2, 2),
}


class Rng:
    """xorshift64* as the guest's ``rand``."""

    def __init__(self) -> None:
        self.x = SEED

    def next(self) -> int:
        x = self.x
        x ^= x >> 12
        x ^= (x << 25) & MASK64
        x ^= x >> 27
        self.x = x
        return (x * MULT) & MASK64


def _entry(page: int, r: int) -> int:
    return TEST_VA + (page << 12) + (((r >> 20) & 511) << 3) + ((r >> 61) & 1)


def guest_patterns() -> dict[str, np.ndarray]:
    """The arrays the guest builds, in its order: the 256-page pattern (A
    and B), the permutation (C), the storm's 64-page pattern (D)."""
    rng = Rng()
    hit = np.fromiter((_entry((r >> 32) & 255, r) for r in (rng.next() for _ in range(HIT_N))),
                      np.uint64, HIT_N)
    perm = list(range(TEST_PAGES))
    for i in range(TEST_PAGES - 1, 0, -1):
        j = (rng.next() * (i + 1)) >> 64
        perm[i], perm[j] = perm[j], perm[i]
    rnd = np.fromiter((_entry(p, rng.next()) for p in perm), np.uint64, TEST_PAGES)
    storm = np.fromiter((_entry((r >> 32) & 63, r) for r in (rng.next() for _ in range(HIT_N))),
                        np.uint64, HIT_N)
    return {"A": hit, "B": hit, "C": rnd, "D": storm}


def storm_pkrs() -> int:
    return sum(1 << (2 * k) for k in STORM_KEYS_DENIED)


def guest_machine(levels: int, pkrs: int):
    """A pks_emu machine in the guest's state for the test region."""
    from pks_emu.constants import (CR0_WP, CR4_PGE, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP,
                                   EFER_NXE, MSR_IA32_PKRS)
    from pks_emu.machine import Machine
    m = Machine(paging_levels=levels)
    a = m.address_space()
    a.map_range(TEST_VA, FRAMES, TEST_PAGES * 4096, nx=True)
    # The guest's leaves: one of 256 frames, A and D set, key = page % 16.
    page = np.arange(TEST_PAGES, dtype=np.uint64)
    leaf = (np.uint64(FRAMES) + (page & np.uint64(255)) * np.uint64(4096)) \
        | np.uint64(0x8000000000000063) | ((page & np.uint64(15)) << np.uint64(59))
    for t in range(TEST_PAGES // 512):
        table = a.entry_address(TEST_VA + t * (2 << 20), 1)
        m.memory.write(table, leaf[t * 512:(t + 1) * 512].astype("<u8").tobytes())
    cpu = m.cpus[0]
    cpu.efer |= EFER_NXE
    cpu.cr0 |= CR0_WP
    cpu.cr4 |= CR4_PGE | CR4_PKE | CR4_PKS | CR4_SMEP | CR4_SMAP
    cpu.wrmsr(MSR_IA32_PKRS, pkrs)
    a.activate()
    return m


def write_trace(path: str, levels: int, phase: str, pattern: np.ndarray, passes: int) -> None:
    from pks_emu.constants import MSR_IA32_PKRS
    from pks_emu.trace.format import KEEP_CPL, RECORD, RecordType
    from pks_emu.trace.writer import TraceWriter
    m = guest_machine(levels, storm_pkrs() if phase == "D" else 0)
    acc = np.zeros(len(pattern), dtype=RECORD)
    acc["type"] = RecordType.ACCESS
    acc["size"] = 8
    acc["cpl"] = KEEP_CPL
    acc["op"] = (pattern & np.uint64(1)).astype(np.uint8)      # 0 read, 1 write
    acc["addr"] = pattern & ~np.uint64(1)
    if phase == "B":            # WRMSR IA32_PKRS (its own value, 0) before every 100
        groups = acc.reshape(-1, 100)
        recs = np.zeros((len(groups), 101), dtype=RECORD)
        recs[:, 1:] = groups
        recs[:, 0]["type"] = RecordType.WRMSR
        recs[:, 0]["addr"] = MSR_IA32_PKRS
        recs[:, 0]["value"] = 0
        acc = recs.reshape(-1)
    with TraceWriter(path, m) as w:
        for _ in range(passes):
            w.extend(acc)


def build_guest(d: str) -> str:
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"qemu_pks: {tool} (binutils) not found")
    obj, elf64, elf = (os.path.join(d, n) for n in ("guest.o", "guest64.elf", "guest.elf"))
    subprocess.run(["as", "--64", "-o", obj, GUEST], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-nostdlib", "-Ttext=0x100000", "-e", "_start",
                    "-o", elf64, obj], check=True)
    # QEMU's Multiboot loader takes ELF32 images only.
    subprocess.run(["objcopy", "-O", "elf32-i386", elf64, elf], check=True,
                   stderr=subprocess.DEVNULL)
    return elf


def run_guest(qemu: str, elf: str, levels: int) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per phase, and the guest's counts (F, E, N)."""
    cmd = [qemu, "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-m", "64", "-nodefaults",
           "-display", "none", "-no-reboot", "-serial", "stdio",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", elf,
           "-append", str(levels)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    seen: dict[str, float] = {}
    text = bytearray()
    fd = p.stdout.fileno()
    while True:
        chunk = os.read(fd, 4096)
        now = time.perf_counter()
        if not chunk:
            break
        for b in chunk:
            # "R<cr4> " first, then the eight phase letters in order.
            if b" " in text and len(seen) < 2 * len(PHASES):
                seen[chr(b)] = now
            text.append(b)
    rc = p.wait()
    p.stdout.close()
    out = text.decode("ascii", "replace")
    # isa-debug-exit: status (0 << 1) | 1 when the guest got to the end.
    if rc != 1 or "X" in out or not out.rstrip().endswith(tuple("0123456789abcdef")):
        raise SystemExit(f"qemu_pks: the guest failed ({levels}-level, exit {rc}): {out!r}")
    counts = {k: int(v, 16) for k, v in re.findall(r"([FEN])([0-9a-f]{16})", out)}
    missing = [c for ph in PHASES for c in (ph, ph.lower()) if c not in seen]
    if missing or set(counts) != {"F", "E", "N"}:
        raise SystemExit(f"qemu_pks: unexpected guest output {out!r}")
    return {ph: seen[ph.lower()] - seen[ph] for ph in PHASES}, counts


def replay_rate(path: str) -> tuple[float, int]:
    from pks_emu.trace.replay import replay
    r = replay(path, log_limit=1000)
    return r.record_counts["access"] / r.elapsed / 1e6, r.fault_total


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="build and write the traces here")
    a = ap.parse_args(argv)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("qemu_pks: qemu-system-x86_64 not found (Debian: qemu-system-x86)")
    d = a.keep or tempfile.mkdtemp(prefix="pks-emu-qemu-")
    os.makedirs(d, exist_ok=True)
    try:
        elf = build_guest(d)
        pats = guest_patterns()
        cases = [(4, ph) for ph in PHASES] + [(5, "C"), (5, "D")]
        traces = {}
        for levels, ph in cases:
            traces[levels, ph] = os.path.join(d, f"{ph}{levels}.pkt")
            write_trace(traces[levels, ph], levels, ph, pats[ph], PHASES[ph][2])
        expected = int(np.count_nonzero((((pats["D"] - np.uint64(TEST_VA)) >> np.uint64(12))
                                         & np.uint64(15)) >= 3))
        q: dict[tuple[int, str], list[float]] = {c: [] for c in cases}
        e: dict[tuple[int, str], list[float]] = {c: [] for c in cases}
        for _ in range(a.runs):
            for levels in (4, 5):
                secs, counts = run_guest(qemu, elf, levels)
                passes = PHASES["D"][1]
                if counts["N"] or counts["F"] != counts["E"] or counts["F"] != expected * passes:
                    raise SystemExit(f"qemu_pks: guest counts {counts}, expected "
                                     f"F = E = {expected * passes} and N = 0")
                for ph in PHASES:
                    if (levels, ph) in q:
                        n = len(pats[ph]) * PHASES[ph][1]
                        q[levels, ph].append(n / secs[ph] / 1e6)
            for c in cases:
                rate, faults = replay_rate(traces[c])
                want = expected * PHASES["D"][2] if c[1] == "D" else 0
                if faults != want:
                    raise SystemExit(f"qemu_pks: pks_emu replay of {c} found {faults} faults, "
                                     f"the guest's pattern has {want}")
                e[c].append(rate)
        print(f"{'case':48s} {'QEMU TCG':>10s} {'pks_emu':>10s} {'ratio':>7s}   (M accesses/s, "
              f"medians of {a.runs})")
        for c in cases:
            qm, em = statistics.median(q[c]), statistics.median(e[c])
            print(f"{PHASES[c[1]][0] + f', {c[0]}-level':48s} {qm:10.1f} {em:10.1f} {em / qm:6.2f}x")
        print(f"storm faults: {expected * PHASES['D'][1]:,} a guest run, the same on both sides "
              "per pass")
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
