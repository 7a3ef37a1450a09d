"""How much a capture replayed as it runs costs against QEMU alone.

``measure_speed()`` boots the same guest twice per round, in turn: once with the
counting plugin (QEMU's own speed with a plugin that only counts accesses, the
baseline) and once recording into a pipe that this process replays as the boot
runs (what ``pks-emu capture --policy P`` does). It reports each run's wall
time and CPU time, split between QEMU (the vCPU and the plugin's writer thread)
and the replay, the accesses per second of the whole pipeline and of each
stage, the peak memory of each side, and the ratio of the median wall times.

``pks-emu capture --speed [--repeat N] [--policy P] ...`` prints it.
"""
from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

from . import capture, capture_pipe


#: (writer, replay) nice increments of a capture replayed as it runs. The
#: stages by priority: QEMU's vCPU thread (the boot's critical path, 0), the
#: plugin's writer (it must keep up with the vCPU, or the vCPU waits for a
#: buffer: 5), the replay (it has the pipe buffer's slack and catches up when
#: the vCPU is the slow stage: 19). With 2 CPUs and 3 busy threads this order
#: left 2 % of the CPU time idle, against 9-20 % with equal values
#: (docs/capture.md, "Speed").
DEFAULT_NICE = (5, 19)


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _count_run(kw: dict) -> dict:
    c0 = _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    info = capture(None, count_only=True, **kw)
    wall = time.perf_counter() - t0
    qemu_cpu = _cpu(resource.RUSAGE_CHILDREN) - c0
    return {"wall_s": wall, "qemu_cpu_s": qemu_cpu, "accesses": info.accesses,
            "accesses_per_s": info.accesses / wall if wall else 0.0}


def lower_thread_priority(n: int) -> None:
    """Adds ``n`` to the calling thread's nice value (Linux: per thread; other
    threads, and children started by them, keep theirs). Best effort."""
    if n <= 0:
        return
    import os
    import threading
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + n)
    except (OSError, AttributeError):
        pass


def _pipeline_run(kw: dict, policy, kallsyms, coalesce: bool, writer_nice: int,
                  replay_nice: int) -> dict:
    import threading

    from ..trace.replay import replay
    c0, s0 = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    reader, job = capture_pipe(coalesce=coalesce, writer_nice=writer_nice, **kw)
    out: dict = {}

    def run_replay() -> None:
        # its own thread, so that its nice value does not outlive the run
        lower_thread_priority(replay_nice)
        try:
            out["result"] = replay(reader, policy=policy, kallsyms=kallsyms, threads=False)
        except BaseException as e:  # re-raised below
            out["error"] = e

    t = threading.Thread(target=run_replay, name="pks-emu-speed-replay")
    try:
        t.start()
        t.join()
    finally:
        reader.close()
    if "error" in out:
        # the replay's error first: stop the boot (it fails too)
        job.cancel()
        try:
            job.wait()
        except Exception:
            pass
        raise out["error"]
    result = out["result"]
    info = job.wait()
    wall = time.perf_counter() - t0
    qemu_cpu = _cpu(resource.RUSAGE_CHILDREN) - c0
    # this process: the replay, plus the capture thread that waits for QEMU
    replay_cpu = _cpu(resource.RUSAGE_SELF) - s0
    accesses = info.accesses
    return {"wall_s": wall,
            "qemu_peak_rss_mib": int(info.counts.get("qemu_maxrss_kib", 0)) / 1024,
            "pipe_buffer_peak_mib": getattr(reader, "peak", 0) / 2**20, "qemu_cpu_s": qemu_cpu, "replay_cpu_s": replay_cpu,
            "accesses": accesses, "records": int(info.counts.get("records", 0)),
            "faults": result.fault_count,
            "accesses_per_s": accesses / wall if wall else 0.0,
            "capture_accesses_per_cpu_s": accesses / qemu_cpu if qemu_cpu else 0.0,
            "replay_records_per_cpu_s": result.records_replayed / replay_cpu if replay_cpu else 0.0}


def measure_speed(*, policy=None, kallsyms=None, repeat: int = 1, coalesce: bool = True,
                  writer_nice: int = DEFAULT_NICE[0], replay_nice: int = DEFAULT_NICE[1],
                  progress: Callable[[str], None] | None = None, **capture_kwargs) -> dict:
    """Counting boots and capture-into-replay boots, alternated ``repeat`` times.

    ``capture_kwargs`` go to both boots (kernel, memory, smp, workload, start,
    save_kallsyms, timeout, ...); ``policy`` and ``kallsyms`` to the replay.
    ``writer_nice``, ``replay_nice``: added to the nice values of the plugin's
    writer thread and of the replay's thread (see :data:`DEFAULT_NICE`).
    """
    if repeat < 1:
        raise ValueError(f"repeat {repeat}: expected at least 1")
    counts, pipes = [], []
    for i in range(repeat):
        if progress:
            progress(f"round {i + 1}/{repeat}: counting boot")
        counts.append(_count_run(capture_kwargs))
        if progress:
            progress(f"round {i + 1}/{repeat}: capture piped into the replay")
        pipes.append(_pipeline_run(capture_kwargs, policy, kallsyms, coalesce, writer_nice,
                                       replay_nice))
    count_wall = statistics.median(r["wall_s"] for r in counts)
    pipe_wall = statistics.median(r["wall_s"] for r in pipes)
    return {
        "count": counts, "pipeline": pipes,
        "count_wall_median_s": count_wall, "pipeline_wall_median_s": pipe_wall,
        "ratio": pipe_wall / count_wall if count_wall else float("inf"),
        # QEMU's as its plugin saw it at exit; this process's over its life
        # (the replay, with the pipe buffer)
        "peak_rss_qemu_mib": max(r["qemu_peak_rss_mib"] for r in pipes),
        "peak_rss_replay_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pipe_buffer_peak_mib": max(r["pipe_buffer_peak_mib"] for r in pipes),
    }


def format_speed(doc: dict) -> str:
    lines = ["run                      wall      QEMU CPU  replay CPU  accesses     M acc/s (wall)"]
    for c, p in zip(doc["count"], doc["pipeline"]):
        lines.append(f"counting boot        {c['wall_s']:8.2f} s {c['qemu_cpu_s']:8.2f} s"
                     f"{'':12}  {c['accesses'] / 1e6:8.1f} M  {c['accesses_per_s'] / 1e6:8.1f}")
        lines.append(f"capture -> replay    {p['wall_s']:8.2f} s {p['qemu_cpu_s']:8.2f} s"
                     f" {p['replay_cpu_s']:8.2f} s  {p['accesses'] / 1e6:8.1f} M"
                     f"  {p['accesses_per_s'] / 1e6:8.1f}")
    p = doc["pipeline"][-1]
    lines.append(f"stages (last run): capture {p['capture_accesses_per_cpu_s'] / 1e6:.1f} M "
                 f"accesses per QEMU CPU second; replay {p['replay_records_per_cpu_s'] / 1e6:.1f} M "
                 f"records per replay CPU second ({p['records'] / 1e6:.1f} M records, "
                 f"{p['faults']:,} faults)")
    lines.append(f"peak memory: QEMU {doc['peak_rss_qemu_mib']:.0f} MiB, replay "
                 f"{doc['peak_rss_replay_mib']:.0f} MiB (of it the pipe buffer, at most "
                 f"{doc['pipe_buffer_peak_mib']:.0f} MiB)")
    lines.append(f"ratio of the median wall times: {doc['ratio']:.2f}x "
                 f"({doc['pipeline_wall_median_s']:.2f} s / {doc['count_wall_median_s']:.2f} s)")
    return "\n".join(lines)
