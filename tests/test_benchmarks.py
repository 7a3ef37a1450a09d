"""Run every asv benchmark once, with small data, so a broken benchmark fails CI.

This does what ``asv run --quick`` does for each benchmark, without asv: it
imports every ``benchmarks/bench_*.py``, runs each class's ``setup_cache`` once
(in a scratch folder, as asv does), then for every parameter combination
``setup``, the benchmark itself once, and ``teardown``. ``PKS_EMU_BENCH_QUICK=1``
makes ``benchmarks/common.py`` shrink the data. No timing is asserted; a
``track_`` benchmark must return a finite number, and the semantic pins
(faults found on fixed traces, walks per access) are checked against what
the generators say they put in the traces. docs/benchmarks.md says why this
is not ``asv run --quick --dry-run --python=same``.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pks_emu  # noqa: F401  (the installed package, before the benchmarks import it)

os.environ["PKS_EMU_BENCH_QUICK"] = "1"   # read by benchmarks/common.py at import

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
PREFIXES = ("time_", "timeraw_", "track_", "mem_", "peakmem_")


def _import(stem: str):
    """Import ``benchmarks.<stem>`` from the source tree without putting the
    source tree on sys.path (that would shadow the installed pks_emu)."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", BENCH_DIR / "__init__.py", submodule_search_locations=[str(BENCH_DIR)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"benchmarks.{stem}")


def _discover():
    """(module, class name or None, benchmark name) for every benchmark, by asv's naming rules."""
    found = []
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        try:
            mod = _import(path.stem)
        except Exception:   # reported by the test below, with its traceback
            found.append(pytest.param(path.stem, None, None, id=f"{path.stem}:import"))
            continue
        for name, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if isinstance(obj, type):
                for meth in sorted(vars(obj)):
                    if meth.startswith(PREFIXES):
                        found.append(pytest.param(path.stem, name, meth, id=f"{path.stem}.{name}.{meth}"))
            elif callable(obj) and name.startswith(PREFIXES):
                found.append(pytest.param(path.stem, None, name, id=f"{path.stem}.{name}"))
    return found


BENCHMARKS = _discover()


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """setup_cache results, one per class, each made in its own scratch folder."""
    store: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(mod, cls_name: str):
        key = (mod.__name__, cls_name)
        if key not in store:
            cls = getattr(mod, cls_name)
            folder = tmp_path_factory.mktemp(f"{mod.__name__.split('.')[-1]}-{cls_name}")
            old = os.getcwd()
            os.chdir(folder)
            try:
                store[key] = (folder, cls().setup_cache() if hasattr(cls, "setup_cache") else None)
            finally:
                os.chdir(old)
        return store[key]

    return get


def _check_result(name: str, result) -> None:
    if name.startswith("track_"):
        assert isinstance(result, (int, float, np.integer, np.floating)) and not isinstance(result, bool), \
            f"{name} returned {result!r}: a track_ benchmark must return a number"
        assert math.isfinite(float(result)), f"{name} returned {result!r}"
    elif name.startswith("timeraw_"):
        assert isinstance(result, str), f"{name} must return the code to time"
        subprocess.run([sys.executable, "-c", result], check=True, timeout=120)


@pytest.mark.parametrize("stem,cls_name,bench", BENCHMARKS)
def test_benchmark_runs(stem, cls_name, bench, caches, monkeypatch):
    mod = _import(stem)     # an import error surfaces here with its traceback
    if bench is None:
        return
    if cls_name is None:
        _check_result(bench, getattr(mod, bench)())
        return
    cls = getattr(mod, cls_name)
    folder, cache = caches(mod, cls_name)
    monkeypatch.chdir(folder)
    func = getattr(cls, bench)
    if bench.startswith("track_") and cls.__module__.startswith("benchmarks.bench_") \
            and stem in ("bench_core", "bench_registers", "bench_replay"):
        assert hasattr(func, "unit"), f"{cls_name}.{bench} has no .unit"
    prefix = () if not hasattr(cls, "setup_cache") else (cache,)
    params = getattr(cls, "params", None)
    if params and not isinstance(params[0], list):
        params = [params]
    combos = list(itertools.product(*params)) if params else [()]
    ran = 0
    for combo in combos:
        obj = cls()
        args = prefix + tuple(combo)
        if hasattr(obj, "setup"):
            try:
                obj.setup(*args)
            except NotImplementedError:     # asv's way to skip a combination
                continue
        try:
            _check_result(bench, getattr(obj, bench)(*args))
            ran += 1
        finally:
            if hasattr(obj, "teardown"):
                obj.teardown(*args)
    assert ran or not combos, f"{cls_name}.{bench}: every parameter combination was skipped"


# --- the workloads are what they claim, and the pins agree with the generators ---

def test_miss_benchmarks_walk_on_every_access_and_hit_ones_do_not():
    core = _import("bench_core")
    for levels in (4, 5):
        b = core.BatchMiss()
        b.setup(levels, "sequential")
        assert b.track_walks_per_access(levels, "sequential") == 1.0
        b = core.BatchMiss()
        b.setup(levels, "random")
        # A random permutation of 4,096 pages: a page may survive in the
        # 1,024-entry TLB until it comes back, rarely (~2 % in quick mode).
        assert b.track_walks_per_access(levels, "random") > 0.95
        h = core.BatchHit()
        h.setup(levels)
        assert h.track_faults(levels) == 0


def test_replay_pins_match_the_generators(caches):
    mod = _import("bench_replay")
    _, traces = caches(mod, "ReplayFaultPins")
    pins = mod.ReplayFaultPins()
    assert pins.track_pmem_stray_pk_faults(traces) == traces["pmem_stray"][1]["stray_writes"] > 0
    assert pins.track_kmap_nesting_faults(traces) == traces["kmap_nesting"][1]["expected_faults"] > 0
    assert pins.track_multi_task_faults(traces) == traces["multi_task"][1]["foreign_accesses"] > 0
    # The bundled example's documented answer (examples/protect-heap.toml).
    assert pins.track_lackey_example_pk_faults(traces) == 1918


def test_replay_workload_pins(caches):
    mod = _import("bench_replay")
    _, paths = caches(mod, "ReplayThroughput")
    t = mod.ReplayThroughput()
    assert t.track_walks_per_access(paths, "miss4") > 0.95
    assert t.track_walks_per_access(paths, "miss5") > 0.95
    assert t.track_walks_per_access(paths, "hit") < 0.1
    _, ctl = caches(mod, "ReplayControlRecords")
    c = mod.ReplayControlRecords()
    assert c.track_pkrs_writes_per_record(ctl, "wrmsr") == 1.0
    assert c.track_pkrs_writes_per_record(ctl, "wrpkru") == 0.0
    assert c.track_pkrs_writes_per_record(ctl, "switch_different_pkrs") > 0.99
    assert c.track_pkrs_writes_per_record(ctl, "switch_same_pkrs") < 0.01
    assert c.track_pkrs_writes_per_record(ctl, "exception_pairs") > 0.99


def test_kernel_window_pins(caches):
    """The window benchmark's capture: one window opening per accessor run
    (every 16th run of 64 records), no fault, and the hot path (one chunk)
    agreeing with one record at a time."""
    mod = _import("bench_replay")
    _, paths = caches(mod, "ReplayKernelWindows")
    b = mod.ReplayKernelWindows()
    runs = -(-(mod.REPLAY_RECORDS // 2) // 64)
    assert b.track_window_opens(paths) == sum(1 for r in range(runs) if r % 16 == 15) > 0
    assert b.track_faults(paths) == 0
    from pks_emu.trace.replay import replay
    whole, single = replay(paths[0], policy=paths[1]), replay(paths[0], policy=paths[1], chunk_records=1)
    assert whole.counters == single.counters and whole.kernel == single.kernel
    assert whole.input_info["mapper"] == single.input_info["mapper"]


def test_wrmsr_flushes_the_tlb_only_in_qemu_mode():
    regs = _import("bench_registers")
    flushes = {}
    for compat in ("sdm", "qemu"):
        b = regs.KeyRegisters()
        b.setup(compat)
        flushes[compat] = b.track_tlb_flushes_per_wrmsr(compat)
    assert flushes == {"sdm": 0.0, "qemu": 1.0}


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (CI installs it)")
def test_instruction_counts_of_the_replay_loop():
    """pks-emu bench --instructions for the replayed cases: callgrind over
    ReplayEngine._run only, per record. A faulting record (the storm: about
    13 of 16 fault) costs more than a TLB hit, and each is a count a design
    can be compared by."""
    from pks_emu._core import DEBUG_BUILD
    from pks_emu.bench import build_calibration, instructions_replay
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        exe = build_calibration(d)
        hit, none = instructions_replay("replay_hit", exe, 5000)
        storm, c = instructions_replay("replay_fault_storm", exe, 5000)
    assert none is None                       # no C loop counted for replay_hit
    # A debug build (bounds checks, assertions: CI's second pass) counts
    # several times more per record; the order of the two cases still holds.
    ceiling = 20000 if DEBUG_BUILD else 2000
    assert 20 < hit < storm < ceiling
    if exe is not None:
        assert 30 < c < 200                   # the C loop's fault-counting mode, per access
