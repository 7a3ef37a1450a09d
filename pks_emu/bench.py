"""``pks-emu bench``: measure the core's throughput on this machine against
the project's targets (docs/benchmarks.md). Each figure is the best of
``--repeat`` runs; nothing here asserts anything."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .constants import MSR_IA32_PKRS, PKS_INIT_VALUE, pkey_update_pkval


def _best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def _kernel_cpu(levels: int = 4):
    from .machine import kernel_machine
    from .trace.generators import PMEM_BASE, PMEM_KEY
    m, aspace = kernel_machine(1, levels, pkrs=pkey_update_pkval(PKS_INIT_VALUE, PMEM_KEY, 0))
    return m, aspace, PMEM_BASE, PMEM_KEY


def bench_single_access(n: int, repeat: int) -> float:
    """ns per cpu.access() call on a TLB hit."""
    m, a, base, key = _kernel_cpu()
    a.map(base, 0x100000, pkey=key)
    cpu = m.cpus[0]
    access = cpu.access
    access(base, "read")

    def once() -> float:
        t = time.perf_counter()
        for _ in range(n):
            access(base, "read")
        return (time.perf_counter() - t) / n * 1e9
    return _best(once, repeat)


def bench_batch(n: int, repeat: int, *, miss: bool, levels: int = 4) -> float:
    """M accesses/s through access_batch: hits on 64 pages, or one access per
    page over a large mapping (every access misses the TLB and walks)."""
    from ._core import access_batch
    m, a, base, key = _kernel_cpu(levels)
    rng = np.random.default_rng(1)
    pages = n if miss else 64
    a.map_range(base, 1 << 32, pages * 4096, pkey=key)
    if miss:
        va = base + np.arange(n, dtype=np.uint64) * np.uint64(4096) + (rng.integers(0, 512, n) * 8).astype(np.uint64)
    else:
        va = base + (rng.integers(0, pages * 512, n) * 8).astype(np.uint64)
    kind = rng.integers(0, 2, n).astype(np.uint8)
    cpu = m.cpus[0]
    out = (np.empty(n, np.uint64), np.empty(n, np.int32))     # reused, as a simulator would
    access_batch(cpu, va, kind, 8, out=out)

    def once() -> float:
        cpu.flush_tlb()
        if not miss:
            access_batch(cpu, va[:4096], kind[:4096], 8)    # warm the TLB
        t = time.perf_counter()
        access_batch(cpu, va, kind, 8, out=out)
        return n / (time.perf_counter() - t) / 1e6
    return -_best(lambda: -once(), repeat)


# --- issue 11: the access path against hand-written C loops --------------------------------
#
# benchmarks/calibration/batch_loops.c builds the same machine state and the
# same access patterns (seeded, statistically identical) and runs one tight C
# loop per case; the ratios below are taken in the same run.

CALIBRATION_C = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration" / "batch_loops.c"
STORM_DENY = 0
for _k in range(3, 16):                       # 13 of the 16 keys access-disabled
    STORM_DENY |= 1 << (2 * _k)

#: case -> (paging levels, pages, pattern, C mode, accesses)
CASES = {
    "batch_hit": (4, 64, "hit", "hit", 4_000_000),
    "batch_miss_random_4level": (4, 256 << 10, "random", "miss4", 512 << 10),
    "batch_miss_random_5level": (5, 256 << 10, "random", "miss5", 512 << 10),
    "fault_storm": (4, 64, "storm", "faults", 4_000_000),
}


def case_setup(case: str, n: int | None = None, psc: bool = True):
    """Machine, CPU, va and kind arrays and reused output arrays of ``case``
    (the state of batch_loops.c: supervisor NX pages under PMEM_KEY, CR0.WP,
    CR4.PGE/SMEP/SMAP/PKE/PKS, EFER.NXE, CPL 0)."""
    from .constants import CR0_WP, CR4_PGE, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP, EFER_NXE
    from .machine import Machine
    from .trace.generators import PMEM_BASE, PMEM_KEY
    levels, pages, pattern, _, default_n = CASES[case]
    n = default_n if n is None else n
    m = Machine(paging_levels=levels)
    a = m.address_space()
    if pattern == "storm":
        for p in range(pages):
            a.map(PMEM_BASE + p * 4096, (1 << 32) + p * 4096, pkey=p % 16, nx=True)
    else:
        a.map_range(PMEM_BASE, 1 << 32, pages * 4096, pkey=PMEM_KEY, nx=True)
    cpu = m.cpus[0]
    cpu.efer |= EFER_NXE
    cpu.cr0 |= CR0_WP
    cpu.cr4 |= CR4_PGE | CR4_PKE | CR4_PKS | CR4_SMEP | CR4_SMAP
    cpu.wrmsr(MSR_IA32_PKRS, STORM_DENY if pattern == "storm" else
              pkey_update_pkval(PKS_INIT_VALUE, PMEM_KEY, 0))
    if not psc and hasattr(cpu, "paging_structure_caches"):
        cpu.paging_structure_caches = False
    a.activate()
    rng = np.random.default_rng(11)
    if pattern == "random":
        page = rng.permutation(pages).astype(np.uint64)[np.arange(n, dtype=np.uint64) % np.uint64(pages)]
    else:
        page = rng.integers(0, pages, n).astype(np.uint64)
    va = np.uint64(PMEM_BASE) + page * np.uint64(4096) + (rng.integers(0, 512, n) * 8).astype(np.uint64)
    kind = rng.integers(0, 2, n).astype(np.uint8)
    out = (np.empty(n, np.uint64), np.empty(n, np.int32))
    return m, cpu, va, kind, out


def _case_warm(case: str, cpu, va, kind, out) -> None:
    from ._core import access_batch
    cpu.flush_tlb()
    if CASES[case][2] == "random":
        access_batch(cpu, va, kind, 8, out=out)             # sets every A/D bit once
        cpu.flush_tlb()
    else:
        access_batch(cpu, va[:4096], kind[:4096], 8)         # fills the TLB


def bench_case(case: str, repeat: int, psc: bool = True, n: int | None = None) -> float:
    """M accesses/s of one CASES workload through access_batch (out= reused)."""
    from ._core import access_batch
    m, cpu, va, kind, out = case_setup(case, n, psc=psc)

    def once() -> float:
        _case_warm(case, cpu, va, kind, out)
        t = time.perf_counter()
        access_batch(cpu, va, kind, 8, out=out)
        return len(va) / (time.perf_counter() - t) / 1e6
    return -_best(lambda: -once(), repeat)


def build_calibration(tmp: str, name: str = "batch_loops.c") -> str | None:
    """Compile a calibration loop with ``cc -O3``; None without a compiler or the source."""
    cc = shutil.which("cc") or shutil.which("gcc")
    src = CALIBRATION_C.parent / name
    if cc is None or not src.exists():
        return None
    exe = os.path.join(tmp, name[:-2])
    r = subprocess.run([cc, "-O3", "-o", exe, str(src)], capture_output=True)
    return exe if r.returncode == 0 else None


def bench_c(exe: str, mode: str, n: int, repeat: int) -> float:
    out = subprocess.run([exe, mode, str(n), str(repeat)], capture_output=True, text=True,
                         check=True).stdout
    return parse_rate(out, f"{exe} {mode}")


def parse_rate(out: str, what: str) -> float:
    """The "N M accesses/s" figure a calibration program printed."""
    m = re.search(r"([0-9.]+) M accesses/s", out)
    if m is None:
        raise RuntimeError(f"{what}: no 'M accesses/s' figure in its output {out!r}")
    return float(m.group(1))


def _callgrind_ir(cmd: list[str], toggle: str) -> int:
    """Instructions executed inside ``toggle`` (a function name pattern) by ``cmd``."""
    with tempfile.TemporaryDirectory(prefix="pks-emu-cg-") as d:
        path = os.path.join(d, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no",
                        f"--toggle-collect={toggle}", f"--callgrind-out-file={path}", *cmd],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        text = Path(path).read_text()
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def instructions_case(case: str, exe: str | None, n: int, psc: bool = True) -> tuple[float, float | None]:
    """(pks_emu, C) instructions per access of ``case`` under callgrind."""
    child = [sys.executable, "-m", "pks_emu.bench", "--child", case, "--n", str(n)]
    if not psc:
        child.append("--no-psc")
    ours = _callgrind_ir(child, "*_measured_batch*") / n
    theirs = None
    if exe is not None:
        mode = CASES[case][3]
        calls = n + (0 if mode.startswith("miss") else min(n, 4096))   # its warm-up call is counted
        theirs = _callgrind_ir([exe, mode, str(n), "1"], "run_loop") / calls
    return ours, theirs


#: replayed cases whose instructions per record ``--instructions`` counts:
#: case -> (trace maker, C mode of batch_loops.c for the same accesses, or None)
REPLAY_IR_CASES = {"replay_hit": ("hit", None), "replay_fault_storm": ("storm", "faults")}


def instructions_replay(case: str, exe: str | None, n: int) -> tuple[float, float | None]:
    """(pks_emu, C) instructions per record of the replayed ``case`` (a key
    of REPLAY_IR_CASES) under callgrind: ``ReplayEngine._run`` alone, over
    the records of a trace of ``n`` accesses (the trace is written first,
    outside the count)."""
    maker, mode = REPLAY_IR_CASES[case]
    with tempfile.TemporaryDirectory(prefix="pks-emu-cg-") as d:
        path = os.path.join(d, f"{maker}.pkt")
        (make_hit_trace if maker == "hit" else make_storm_trace)(path, n)
        from .trace.format import read_header
        records = read_header(path).record_count
        child = [sys.executable, "-m", "pks_emu.bench", "--replay-child", path]
        ours = _callgrind_ir(child, "*ReplayEngine__run*") / records
    theirs = None
    if exe is not None and mode is not None:
        theirs = _callgrind_ir([exe, mode, str(n), "1"], "run_loop") / (n + min(n, 4096))
    return ours, theirs


def _child(case: str, n: int, psc: bool) -> None:
    """Under callgrind: set up ``case``, warm up, then one measured call."""
    from ._core import _measured_batch  # type: ignore[attr-defined]  # internal, no stub
    m, cpu, va, kind, out = case_setup(case, n, psc=psc)
    _case_warm(case, cpu, va, kind, out)
    _measured_batch(cpu, va, kind, 8, out)


def bench_replay(path: str, repeat: int) -> float:
    """M accesses/s replaying a native trace file (in the page cache)."""
    from .trace.replay import replay
    replay(path)

    def once() -> float:
        r = replay(path)
        return r.record_counts["access"] / r.elapsed / 1e6
    return -_best(lambda: -once(), repeat)


def make_storm_trace(path: str, accesses: int) -> None:
    """The fault storm of CASES["fault_storm"] as a native trace: the same
    machine state (64 pages, page i under key i % 16, 13 keys access-disabled)
    and the same seeded accesses, so that the C loop's "faults" mode is the
    reference for its replay too."""
    from .trace.format import KEEP_CPL, RECORD, RecordType
    from .trace.writer import TraceWriter
    m, cpu, va, kind, _ = case_setup("fault_storm", accesses)
    with TraceWriter(path, m) as w:
        recs = np.zeros(len(va), dtype=RECORD)
        recs["type"] = RecordType.ACCESS
        recs["size"] = 8
        recs["cpl"] = KEEP_CPL
        recs["op"] = kind
        recs["addr"] = va
        w.extend(recs)


#: The replayed fault-storm cases and the fault log each keeps: "sites"
#: (every fault counted by site, the first 1000 kept: what ``pks-emu replay``
#: does; the case with the issue's target), "memory" (every fault kept in
#: memory too: ``log_limit=0``) or "file" (every fault streamed to a
#: fault-log file: ``--faults``).
STORM_CASES = {"replay_fault_storm": "sites", "replay_fault_storm_memory": "memory",
               "replay_fault_storm_file": "file"}


def bench_replay_storm(path: str, repeat: int, log: str) -> float:
    """M accesses/s replaying a fault-storm trace with the fault log ``log``
    (a value of STORM_CASES)."""
    from .trace.replay import replay
    out = os.path.join(os.path.dirname(path), "storm-faults.npy")
    options: dict[str, dict] = {"sites": {"log_limit": 1000}, "memory": {"log_limit": 0},
                                "file": {"faults_out": out}}
    kw = options[log]

    def once() -> float:
        r = replay(path, **kw)
        if not r.fault_total:
            raise AssertionError("the fault storm produced no faults")
        return r.record_counts["access"] / r.elapsed / 1e6
    once()
    best = -_best(lambda: -once(), repeat)
    if os.path.exists(out):
        os.unlink(out)
    return best


def make_hit_trace(path: str, accesses: int) -> None:
    """Accesses on 256 pages that fit the TLB, one WRMSR every 100 accesses."""
    from .trace.format import KEEP_CPL, RECORD, RecordType
    from .trace.writer import TraceWriter
    m, a, base, key = _kernel_cpu()
    a.map_range(base, 1 << 32, 256 * 4096, pkey=key)
    rng = np.random.default_rng(2)
    on = pkey_update_pkval(PKS_INIT_VALUE, key, 0)
    with TraceWriter(path, m) as w:
        done = 0
        while done < accesses:
            n = min(1 << 20, accesses - done)
            groups = (n + 99) // 100
            recs = np.zeros(groups * 101, dtype=RECORD)
            recs["type"] = RecordType.ACCESS
            recs["size"] = 8
            recs["cpl"] = KEEP_CPL
            recs["op"] = rng.integers(0, 2, len(recs))
            recs["addr"] = base + (rng.integers(0, 256 * 512, len(recs)) * 8).astype(np.uint64)
            wr = np.arange(0, len(recs), 101)
            recs["type"][wr] = RecordType.WRMSR
            recs["addr"][wr] = MSR_IA32_PKRS
            recs["value"][wr] = on
            w.extend(recs)
            done += groups * 100


def bench_lackey(path: str, repeat: int) -> float:
    """M lines/s parsing an uncompressed lackey file."""
    from .lackey import parse_lackey

    def once() -> float:
        t = time.perf_counter()
        tr = parse_lackey(path)
        return tr.lines / (time.perf_counter() - t) / 1e6
    return -_best(lambda: -once(), repeat)


def make_lackey_inputs(src: str, tmp: str, copies: int) -> tuple[str, str, int]:
    """A plain and an xz lackey trace: ``copies`` times the trace in ``src``
    (an .xz file). The xz file is the compressed file repeated (xz reads
    concatenated streams), so no compression time is spent; the plain file
    is its text. Returns (plain, xz, lines)."""
    import lzma
    packed = Path(src).read_bytes()
    text = lzma.decompress(packed)
    plain = os.path.join(tmp, "end-to-end.lackey")
    xz = plain + ".xz"
    with open(plain, "wb") as f:
        for _ in range(copies):
            f.write(text)
    with open(xz, "wb") as f:
        for _ in range(copies):
            f.write(packed)
    return plain, xz, copies * text.count(b"\n")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def bench_lackey_end_to_end(plain: str, xz: str, policy: str, lines: int,
                            repeat: int) -> dict[str, float | None]:
    """``replay(TRACE, policy=...)`` from the file to the result, plain and
    xz, and ``xz -dc TRACE.xz > /dev/null`` alone, interleaved in one run
    (medians of ``repeat``): M lines/s plain and xz, and the xz path's time
    over ``xz -dc``'s (the median of the ratios of each pair). The page cache holds both files. ``threads``: whether
    the replays read in threads (decided by the spare CPUs at the start)."""
    from .trace.replay import _lackey_threads, replay
    xz_tool = shutil.which("xz")
    threads = _lackey_threads()
    t_plain: list[float] = []
    t_xz: list[float] = []
    t_dc: list[float] = []
    faults = None
    replay(plain, policy=policy)     # warm: the files in the page cache, the imports done
    for _ in range(repeat):
        t = time.perf_counter()
        r = replay(plain, policy=policy)
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        rx = replay(xz, policy=policy)
        t_xz.append(time.perf_counter() - t)
        if faults is None:
            faults = r.fault_count
            if rx.fault_count != faults:
                raise AssertionError(f"xz replay found {rx.fault_count} faults, plain {faults}")
        if xz_tool:
            t = time.perf_counter()
            subprocess.run([xz_tool, "-dc", xz], stdout=subprocess.DEVNULL, check=True)
            t_dc.append(time.perf_counter() - t)
    p, x = _median(t_plain), _median(t_xz)
    dc = _median(t_dc) if t_dc else None
    # The ratio pair by pair (each xz replay against the xz -dc run right
    # after it), then the median: the machine's speed drifts between runs.
    ratio = _median([a / b for a, b in zip(t_xz, t_dc)]) if t_dc else None
    return {"plain_mlines_per_s": lines / p / 1e6, "xz_mlines_per_s": lines / x / 1e6,
            "plain_seconds": p, "xz_seconds": x, "xz_dc_seconds": dc,
            "xz_over_xz_dc": ratio, "lines": lines, "faults": faults,
            "threads": threads}


TARGETS = {
    "access_single_ns": ("cpu.access() on a TLB hit", "ns/call", 150, "max"),
    "batch_hit": ("access_batch, TLB hits, 64 pages (out= reused)", "M acc/s", 100, "min"),
    "batch_miss_random_4level": ("access_batch, random order over 256 Ki pages, 4-level", "M acc/s", None, "min"),
    "batch_miss_random_5level": ("access_batch, random order over 256 Ki pages, 5-level", "M acc/s", None, "min"),
    "fault_storm": ("access_batch, 64 pages, 13 of 16 keys deny", "M acc/s", None, "min"),
    "batch_miss_4level": ("access_batch, every access a 4-level walk", "M acc/s", 20, "min"),
    "batch_miss_5level": ("access_batch, every access a 5-level walk", "M acc/s", None, "min"),
    "replay_hit": ("replay, TLB-resident, 1 WRMSR per 100 accesses", "M acc/s", 100, "min"),
    "replay_miss": ("replay, tlb-miss-scan (4-level walks)", "M acc/s", 20, "min"),
    "replay_fault_storm": ("replay, fault storm, faults counted by site", "M acc/s", None, "min"),
    "replay_fault_storm_memory": ("replay, fault storm, every fault kept in memory", "M acc/s",
                                  None, "min"),
    "replay_fault_storm_file": ("replay, fault storm, every fault streamed to a file", "M acc/s",
                                None, "min"),
    "lackey_import": ("lackey import, uncompressed", "M lines/s", 5, "min"),
    "lackey_end_to_end": ("lackey replay end to end (file to result), uncompressed", "M lines/s",
                          20, "min"),
}


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pks_emu.bench")
    p.add_argument("--child", choices=sorted(CASES))
    p.add_argument("--n", type=int)
    p.add_argument("--no-psc", action="store_true")
    p.add_argument("--replay-child", metavar="TRACE")
    a = p.parse_args(argv)
    if a.replay_child:
        from .trace.replay import replay
        replay(a.replay_child, log_limit=1000)     # as bench_replay_storm's "sites" case
    elif a.child and a.n:
        _child(a.child, a.n, not a.no_psc)
    else:
        p.error("--child CASE --n N, or --replay-child TRACE")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
