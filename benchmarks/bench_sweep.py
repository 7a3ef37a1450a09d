"""asv benchmarks of sweeps on Dask (pks_emu.sweep, docs/sweeps.md).

``SweepWorkers``: the same sweep (8 seeded lackey traces of 300,000 lines x
2 policies x 2 compat modes = 32 tasks) on a LocalCluster of 1 and of 2
one-thread worker processes; ``SweepSpeedup`` reports the ratio of the two.
``SweepOverhead``: what the scheduler adds per task, from a sweep of 64
trivially small traces on one worker minus the same 64 tasks run in-process.
Clusters start in ``setup`` (not timed) and are warmed up by one sweep.
Needs the ``dist`` extra; without it every benchmark here is skipped.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .common import EXAMPLES, QUICK, REPEATS, SEED

N_TRACES = 2 if QUICK else 8
N_LINES = 2_000 if QUICK else 300_000
POLICIES = 1 if QUICK else 2
#: Tasks of the overhead sweep, and lines of each of its traces.
OVERHEAD_TASKS = 8 if QUICK else 64
OVERHEAD_LINES = 10

SECOND_POLICY = """\
[registers]
cpl = 3
pkru = { 3 = "no-access" }

[[region]]
name = "heap"
start = 0x4a00000
end = 0x4b00000
pkey = 3
"""


def _lackey(seed: int, n: int) -> bytes:
    """n lines: 60 % I, then loads, stores and modifies on the stack and the heap."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=n, p=[0.6, 0.24, 0.14, 0.02])
    heap = rng.random(n) < 0.3
    addr = np.where(heap, 0x4a00000, 0x1ffefff000) + rng.integers(0, 1 << 13, n) * 8
    code = 0x400000 + rng.integers(0, 1 << 16, n) * 4
    prefix = ("I  ", " L ", " S ", " M ")
    lines = ["==1== Lackey, an example Valgrind tool\n"]
    for k, a, c in zip(kind.tolist(), addr.tolist(), code.tolist()):
        lines.append(f"I  {c:08x},4\n" if k == 0 else f"{prefix[k]}{a:08x},8\n")
    return "".join(lines).encode()


def _have_dist() -> bool:
    try:
        import distributed  # noqa: F401
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


def _cluster(workers: int):
    """The local cluster ``sweep`` starts when given no client."""
    import distributed

    from pks_emu.sweep import _local_cluster
    cluster = _local_cluster(distributed, workers)
    return cluster, distributed.Client(cluster, set_as_default=False)


def _write_inputs() -> dict:
    paths: dict = {"traces": [], "tiny": os.path.abspath("sweep-tiny.lackey")}
    for i in range(N_TRACES):
        p = os.path.abspath(f"sweep-{i}.lackey")
        with open(p, "wb") as f:
            f.write(_lackey(SEED + i, N_LINES))
        paths["traces"].append(p)
    with open(paths["tiny"], "wb") as f:
        f.write(_lackey(SEED, OVERHEAD_LINES))
    second = os.path.abspath("sweep-no-access.toml")
    with open(second, "w") as f:
        f.write(SECOND_POLICY)
    paths["policies"] = [os.path.join(EXAMPLES, "protect-heap.toml"), second][:POLICIES]
    return paths


def _sweep(paths: dict, client) -> object:
    from pks_emu.sweep import sweep
    return sweep(paths["traces"], paths["policies"], ["sdm", "qemu"], client=client, progress=False)


class SweepWorkers:
    """One sweep of N_TRACES x POLICIES x 2 tasks on 1 and on 2 workers."""
    params = [1, 2]
    param_names = ["workers"]
    timeout = 900
    number = 1
    repeat = (1, 3, 120.0)

    def setup_cache(self) -> dict:
        return _write_inputs()

    def setup(self, paths: dict, workers: int) -> None:
        if not _have_dist():
            raise NotImplementedError("needs pip install 'pks-emu[dist]'")
        self.cluster, self.client = _cluster(workers)
        _sweep({"traces": [paths["tiny"]], "policies": paths["policies"]}, self.client)  # warm-up

    def teardown(self, paths: dict, workers: int) -> None:
        self.client.close()
        self.cluster.close()

    def time_sweep(self, paths: dict, workers: int) -> None:
        _sweep(paths, self.client)

    def track_tasks_per_second(self, paths: dict, workers: int) -> float:
        n = len(paths["traces"]) * len(paths["policies"]) * 2
        best = float("inf")
        for _ in range(REPEATS if not QUICK else 1):
            t0 = time.perf_counter()
            table = _sweep(paths, self.client)
            best = min(best, time.perf_counter() - t0)
        assert (table["status"] == "done").all()
        return n / best

    track_tasks_per_second.unit = "tasks/s"  # type: ignore[attr-defined]

    def track_cpu_ms_per_task(self, paths: dict, workers: int) -> float:
        """CPU time per task, workers and this process (client and scheduler)
        together: the same for 1 and 2 workers when the sweep parallelises
        without extra work, whatever else shares the machine."""
        n = len(paths["traces"]) * len(paths["policies"]) * 2

        def workers_cpu() -> float:
            return sum(t.user + t.system for t in self.client.run(os.times).values())
        w0, c0 = workers_cpu(), time.process_time()
        _sweep(paths, self.client)
        return (time.process_time() - c0 + workers_cpu() - w0) / n * 1e3

    track_cpu_ms_per_task.unit = "ms"  # type: ignore[attr-defined]


class SweepSpeedup:
    """Wall time of the sweep on 1 worker over that on 2 (best of REPEATS each)."""
    timeout = 1800
    number = 1
    repeat = 1

    def setup_cache(self) -> dict:
        return _write_inputs()

    def setup(self, paths: dict) -> None:
        if not _have_dist():
            raise NotImplementedError("needs pip install 'pks-emu[dist]'")

    def track_speedup_2_workers(self, paths: dict) -> float:
        seconds = {}
        for workers in (1, 2):
            cluster, client = _cluster(workers)
            try:
                _sweep({"traces": [paths["tiny"]], "policies": paths["policies"]}, client)
                best = float("inf")
                for _ in range(REPEATS if not QUICK else 1):
                    t0 = time.perf_counter()
                    _sweep(paths, client)
                    best = min(best, time.perf_counter() - t0)
                seconds[workers] = best
            finally:
                client.close()
                cluster.close()
        return seconds[1] / seconds[2]

    track_speedup_2_workers.unit = "x"  # type: ignore[attr-defined]


class SweepOverhead:
    """Cost per task on one worker: OVERHEAD_TASKS no-op tasks (what Dask
    itself costs: submit, schedule, run, send back), and a sweep of
    OVERHEAD_TASKS replays of a 10-line trace next to the same replays run one
    after the other in this process (what a sweep adds to a replay)."""
    timeout = 600
    number = 1
    repeat = 1

    def setup_cache(self) -> dict:
        return _write_inputs()

    def setup(self, paths: dict) -> None:
        if not _have_dist():
            raise NotImplementedError("needs pip install 'pks-emu[dist]'")
        self.cluster, self.client = _cluster(1)
        self.tiny = [paths["tiny"]] * OVERHEAD_TASKS
        self._on_cluster()  # warm-up: imports on the worker

    def teardown(self, paths: dict) -> None:
        self.client.close()
        self.cluster.close()

    def _noops(self) -> float:
        import distributed
        t0 = time.perf_counter()
        futures = self.client.map(abs, range(OVERHEAD_TASKS), pure=False)
        for f in distributed.as_completed(futures, loop=self.client.loop):
            f.result()
        return time.perf_counter() - t0

    def _on_cluster(self) -> float:
        from pks_emu.sweep import sweep
        t0 = time.perf_counter()
        sweep(self.tiny, client=self.client, progress=False)
        return time.perf_counter() - t0

    def _in_process(self) -> float:
        from pks_emu.sweep import _task
        t0 = time.perf_counter()
        for trace in self.tiny:
            _task(trace, None, None, None, 5, False)
        return time.perf_counter() - t0

    def track_dask_ms_per_noop_task(self, paths: dict) -> float:
        reps = REPEATS if not QUICK else 1
        return min(self._noops() for _ in range(reps)) / OVERHEAD_TASKS * 1e3

    track_dask_ms_per_noop_task.unit = "ms"  # type: ignore[attr-defined]

    def track_sweep_ms_per_tiny_task(self, paths: dict) -> float:
        reps = REPEATS if not QUICK else 1
        return min(self._on_cluster() for _ in range(reps)) / OVERHEAD_TASKS * 1e3

    track_sweep_ms_per_tiny_task.unit = "ms"  # type: ignore[attr-defined]

    def track_in_process_ms_per_tiny_task(self, paths: dict) -> float:
        reps = REPEATS if not QUICK else 1
        return min(self._in_process() for _ in range(reps)) / OVERHEAD_TASKS * 1e3

    track_in_process_ms_per_tiny_task.unit = "ms"  # type: ignore[attr-defined]

    def _workers_cpu(self) -> float:
        # os.times is a builtin: it pickles by name, unlike a function of this module.
        return sum(t.user + t.system for t in self.client.run(os.times).values())

    def track_dask_cpu_ms_per_tiny_task(self, paths: dict) -> float:
        """CPU time that running the tiny replays as a sweep adds per task
        (this process, with the scheduler, plus the worker), over the same
        replays run here. Unlike wall times, this holds on a machine shared
        with other work (where the kernel's autogroups give the sweep a fixed
        share of the cores whatever its number of workers)."""
        best = float("inf")
        for _ in range(REPEATS if not QUICK else 1):
            w0, c0 = self._workers_cpu(), time.process_time()
            self._on_cluster()
            sweep_cpu = time.process_time() - c0 + self._workers_cpu() - w0
            c0 = time.process_time()
            self._in_process()
            best = min(best, sweep_cpu - (time.process_time() - c0))
        return best / OVERHEAD_TASKS * 1e3

    track_dask_cpu_ms_per_tiny_task.unit = "ms"  # type: ignore[attr-defined]
