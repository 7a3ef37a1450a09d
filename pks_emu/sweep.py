"""Sweeps: many traces x many policies x compat modes x API versions on Dask.

:func:`sweep` turns the cross product of its inputs into one Dask task per
combination and gathers one row per combination into a pandas DataFrame
(docs/sweeps.md describes the columns). With no ``client`` it starts a
``LocalCluster`` of worker processes on this machine and closes it afterwards;
with a ``distributed.Client`` it uses that cluster, whose workers read the
traces and policies from the same paths.

Dask, pandas and pyarrow are the ``dist`` extra (``pip install 'pks-emu[dist]'``):
this module imports them only when a sweep runs, so ``pks_emu`` works without them.

Every value of a row comes from the replay's JSON result (``ReplayResult.to_dict()``,
docs/cli.md): the ``counters`` under their own names, ``faults_by_error_code``
and ``faults_by_pkey``, the top ``sites`` when the result has them (schema 2).
Rows come in the cross-product order whatever the number of workers, and the
same inputs give the same table except for :data:`TIMING_COLUMNS`.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import PksEmuError

if TYPE_CHECKING:  # pragma: no cover
    import pandas  # type: ignore[import-untyped]

__all__ = ["COMBINATION_COLUMNS", "SweepInterrupted", "TIMING_COLUMNS", "read_table", "sweep",
           "write_table"]

#: The inputs of a row, in the order the cross product runs through them.
COMBINATION_COLUMNS = ("trace", "policy", "compat", "api")
#: Columns that differ from run to run of the same sweep.
TIMING_COLUMNS = ("replay_seconds", "elapsed_seconds", "worker")
#: Text columns (every other column but the float ones is a nullable integer).
_TEXT_COLUMNS = COMBINATION_COLUMNS + ("top_sites", "worker", "status", "error")
_FLOAT_COLUMNS = ("replay_seconds", "elapsed_seconds")
#: Whole-replay figures of the result placed before the counters.
_RESULT_COLUMNS = ("records", "records_replayed", "accesses", "fault_count")
#: Row status: replayed, failed (``error`` says why), or not run (interrupted sweep).
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"

_COMPATS = (None, "sdm", "qemu")
_APIS = (None, "v6", "v7", "v10")


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by an interrupt: ``table`` holds every row, those that
    had not finished with status ``cancelled`` (``table.attrs["partial"]`` is True)."""

    def __init__(self, table: pandas.DataFrame) -> None:
        super().__init__("sweep interrupted")
        self.table = table


def _need_dist():
    """Import distributed and pandas, or say which extra to install."""
    try:
        import distributed
        import pandas
    except ImportError as e:
        raise PksEmuError(f"sweeps need Dask and pandas ({e.name or e} is missing): "
                          "pip install 'pks-emu[dist]'") from None
    return distributed, pandas


# --- on the worker --------------------------------------------------------

def _replay_one(trace: str, policy: str | None, compat: str | None, api: str | None) -> dict:
    """One replay; its JSON result (``ReplayResult.to_dict()``)."""
    from .trace.replay import replay

    if not os.path.exists(trace):
        raise PksEmuError(f"{trace}: no such file")
    result = replay(trace, policy=policy, compat=compat, api=api)
    result.path = trace
    return result.to_dict()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _values(d: dict, top_sites: int) -> dict[str, Any]:
    """The row's values taken from one replay's JSON result."""
    v: dict[str, Any] = {k: d.get(k) for k in _RESULT_COLUMNS}
    v["counters"] = dict(d.get("counters", {}))
    v["faults_by_error_code"] = dict(d.get("faults_by_error_code", {}))
    v["faults_by_pkey"] = dict(d.get("faults_by_pkey", {}))
    sites = d.get("sites")
    if sites is None:
        v["top_sites"] = None
        v["sites_total"] = None
    else:
        keep = ("ip", "symbol", "vector", "kind", "pkey", "error_code", "error_code_bits", "count")
        v["top_sites"] = json.dumps([{k: s.get(k) for k in keep} for s in sites[:top_sites]],
                                    separators=(",", ":"))
        v["sites_total"] = d.get("sites_total", len(sites))
    v["replay_seconds"] = d.get("elapsed_seconds")
    return v


def _task(trace: str, policy: str | None, compat: str | None, api: str | None,
          top_sites: int, keep_result: bool) -> dict[str, Any]:
    """What one Dask task runs: never raises for bad input, the row says it."""
    start = time.perf_counter()
    out: dict[str, Any] = {"status": DONE, "error": None, "values": None, "result": None}
    try:
        d = _replay_one(trace, policy, compat, api)
        out["values"] = _values(d, top_sites)
        if keep_result:
            out["result"] = d
    except Exception as e:  # one bad combination must not stop the sweep
        out["status"] = FAILED
        out["error"] = _one_line(e)
    out["elapsed_seconds"] = time.perf_counter() - start
    try:
        from distributed import get_worker
        out["worker"] = get_worker().address
    except (ImportError, ValueError):  # not on a Dask worker
        out["worker"] = None
    return out


# --- on the client --------------------------------------------------------

def _path(p: str | os.PathLike | None) -> str | None:
    return None if p is None else os.path.abspath(os.fspath(p))


def _combinations(traces, policies, compat, api) -> list[tuple[str, str | None, str | None, str | None]]:
    if isinstance(traces, (str, os.PathLike)):
        traces = [traces]
    traces = [_path(t) for t in traces]
    policies = [_path(p) for p in policies]
    compat = list(compat)
    api = list(api)
    for name, values in (("traces", traces), ("policies", policies), ("compat", compat), ("api", api)):
        if not values:
            raise ValueError(f"sweep: {name} is empty")
    for c in compat:
        if c not in _COMPATS:
            raise ValueError(f"compat {c!r}: expected None, 'sdm' or 'qemu'")
    for a in api:
        if a not in _APIS:
            raise ValueError(f"api {a!r}: expected None, 'v6', 'v7' or 'v10'")
    return list(itertools.product(traces, policies, compat, api))


def _build_table(combos, outcomes: list[dict | None], partial: bool):
    """One row per combination, in the cross-product order; columns that only
    some rows have (counters, fault counts) are the union over all rows, so
    the table does not depend on which task finished first."""
    _, pd = _need_dist()
    counter_names: dict[str, None] = {}
    codes: set[str] = set()
    keys: set[str] = set()
    for o in outcomes:
        if o and o["values"]:
            counter_names.update(dict.fromkeys(o["values"]["counters"]))
            codes.update(o["values"]["faults_by_error_code"])
            keys.update(o["values"]["faults_by_pkey"])
    code_list = sorted(codes, key=lambda c: int(c, 16))
    key_list = sorted(keys, key=int)
    clash = set(_RESULT_COLUMNS) | set(_TEXT_COLUMNS) | set(_FLOAT_COLUMNS) | {"sites_total"}
    counters = [c for c in counter_names if c not in clash]
    columns = (list(COMBINATION_COLUMNS) + list(_RESULT_COLUMNS) + counters
               + [f"faults_ec_{c}" for c in code_list] + [f"faults_pkey_{k}" for k in key_list]
               + ["sites_total", "top_sites", "replay_seconds", "elapsed_seconds", "worker",
                  "status", "error"])
    rows = []
    for combo, o in zip(combos, outcomes):
        row: dict[str, Any] = dict.fromkeys(columns)
        row.update(zip(COMBINATION_COLUMNS, combo))
        if o is None:
            row["status"] = CANCELLED
        else:
            row.update(status=o["status"], error=o["error"], worker=o["worker"],
                       elapsed_seconds=o["elapsed_seconds"])
            v = o["values"]
            if v is not None:
                for k in _RESULT_COLUMNS + ("sites_total", "top_sites", "replay_seconds"):
                    row[k] = v[k]
                for c in counters:
                    row[c] = v["counters"].get(c, 0)
                for c in code_list:
                    row[f"faults_ec_{c}"] = v["faults_by_error_code"].get(c, 0)
                for k in key_list:
                    row[f"faults_pkey_{k}"] = v["faults_by_pkey"].get(k, 0)
        rows.append(row)
    table = _apply_schema(pd.DataFrame(rows, columns=columns))
    table.attrs["partial"] = partial
    return table


def _apply_schema(df):
    """Column types: text (object, None when missing), float seconds, and
    nullable integers for everything else (missing in failed rows)."""
    _, pd = _need_dist()
    out = {}
    for c in df.columns:
        col = df[c]
        if c in _TEXT_COLUMNS:
            out[c] = pd.Series([None if _missing(x) else str(x) for x in col], dtype=object, index=df.index)
        elif c in _FLOAT_COLUMNS:
            out[c] = pd.to_numeric(col, errors="coerce").astype("float64")
        else:
            out[c] = pd.to_numeric(col, errors="coerce").astype("Int64")
    return pd.DataFrame(out, columns=list(df.columns), index=pd.RangeIndex(len(df)))


def _missing(x) -> bool:
    if x is None:
        return True
    try:
        return bool(x != x)  # NaN, pandas.NA
    except (TypeError, ValueError):
        return False


def _result_name(i: int, combo) -> str:
    trace, policy, compat, api = combo

    def stem(p):
        if p is None:
            return "default"
        base = os.path.basename(p)
        for suffix in (".xz", ".gz", ".lackey", ".pkt", ".toml", ".txt"):
            if base.endswith(suffix):
                base = base[:-len(suffix)]
        return re.sub(r"[^A-Za-z0-9._+-]", "_", base) or "x"
    return f"{i:04d}-{stem(trace)}-{stem(policy)}-{compat or 'trace'}-{api or 'any'}.json"


def _write_result(results_dir: str, name: str, d: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1)
            f.write("\n")
    _atomic_write(os.path.join(results_dir, name), write)


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file beside ``path``, then rename it over ``path``."""
    from .atomic import is_special
    if is_special(path):     # a device or FIFO cannot be renamed onto
        write(path)
        return
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _local_cluster(distributed, n_workers: int):
    """A LocalCluster of ``n_workers`` one-thread worker processes that keep
    quiet (a task that fails or a worker that dies shows in its row) and ignore SIGINT: an interrupt at the terminal stops the sweep on
    the client, which then closes the cluster itself (no worker tracebacks)."""
    import logging
    import signal
    old = None
    if sys.platform != "win32" and _in_main_thread():
        # Worker processes inherit an ignored SIGINT (Python keeps it ignored).
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers, which
    # turns off glibc's adaptive mmap threshold: every large buffer (the lackey
    # reader's 16 MiB block, twice per conversion) is then mapped, faulted in
    # and unmapped again, 4x the time of a small replay. These workers live
    # only as long as the sweep, so they keep glibc's defaults.
    import dask
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.CRITICAL)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return cluster


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def sweep(traces: str | os.PathLike | Iterable[str | os.PathLike],
          policies: Sequence[str | os.PathLike | None] = (None,),
          compat: Sequence[str | None] = (None,), api: Sequence[str | None] = (None,), *,
          client=None, n_workers: int | None = None, results_dir: str | os.PathLike | None = None,
          progress: bool = True, top_sites: int = 5) -> pandas.DataFrame:
    """Replay every combination of ``traces`` x ``policies`` x ``compat`` x ``api``
    as one Dask task each and return one row per combination (docs/sweeps.md).

    ``policies``: TOML policy files for lackey traces (None: the default policy;
    a native trace takes None only). ``compat``: None (the trace's), "sdm",
    "qemu". ``api``: None, "v6", "v7", "v10". ``client``: a
    ``distributed.Client`` of an existing cluster; without it a
    ``LocalCluster`` of ``n_workers`` one-thread processes (default: the CPU
    count, at most one per combination) runs the sweep and is closed after.
    ``results_dir``: keep each combination's JSON result there, one file per
    row (``NNNN-trace-policy-compat-api.json``, NNNN the row number).
    ``progress``: a tqdm bar on stderr when it is a terminal. ``top_sites``:
    sites kept in the ``top_sites`` column.

    A combination that fails (missing or corrupt trace, bad policy) gets
    status ``failed`` and a one-line ``error``; the others go on. On an
    interrupt the remaining tasks are cancelled and :class:`SweepInterrupted`
    is raised carrying the partial table.
    """
    distributed, _ = _need_dist()
    combos = _combinations(traces, policies, compat, api)
    if top_sites < 0:
        raise ValueError(f"top_sites {top_sites}: expected 0 or more")
    keep = results_dir is not None
    folder = os.fspath(results_dir) if results_dir is not None else ""
    if keep:
        os.makedirs(folder, exist_ok=True)
    own = None
    if client is None:
        if n_workers is None:
            n_workers = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1)
        if n_workers < 1:
            raise ValueError(f"n_workers {n_workers}: expected 1 or more")
        own = _local_cluster(distributed, min(n_workers, len(combos)))
        client = distributed.Client(own, set_as_default=False)
    outcomes: list[dict | None] = [None] * len(combos)
    futures: dict = {}
    bar = None
    try:
        token = uuid.uuid4().hex[:12]
        for i, c in enumerate(combos):
            fut = client.submit(_task, *c, top_sites, keep, key=f"pks-emu-sweep-{token}-{i}")
            futures[fut] = i
        if progress and sys.stderr.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]
            bar = tqdm(total=len(combos), unit="replay", file=sys.stderr, leave=False)
        # with_results: the results come back in the background as tasks
        # finish, not one request per task from this loop (~20 ms each on a
        # busy machine).
        for fut, o in distributed.as_completed(list(futures), loop=client.loop, with_results=True,
                                              raise_errors=False):
            i = futures[fut]
            if fut.status != "finished" or not isinstance(o, dict):
                # The task itself died (worker lost...), not the replay: with
                # raise_errors=False an error comes as (type, exception, traceback).
                exc = o[1] if isinstance(o, tuple) and len(o) == 3 else o
                o = {"status": FAILED, "error": _one_line(exc) if isinstance(exc, BaseException)
                     else f"task {fut.status}", "values": None, "result": None,
                     "elapsed_seconds": None, "worker": None}
            if keep and o.get("result") is not None:
                _write_result(folder, _result_name(i, combos[i]), o["result"])
            o["result"] = None
            outcomes[i] = o
            fut.release()
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        pending = [f for f, i in futures.items() if outcomes[i] is None]
        try:
            client.cancel(pending)
        except Exception:  # pragma: no cover - the cluster is going away anyway
            pass
        raise SweepInterrupted(_build_table(combos, outcomes, partial=True)) from None
    finally:
        if bar is not None:
            bar.close()
        if own is not None:
            client.close()
            own.close()
    return _build_table(combos, outcomes, partial=False)


# --- tables on disk --------------------------------------------------------

_SUFFIXES = (".csv", ".parquet", ".json")


def table_format(path: str | os.PathLike) -> str:
    """The output format a file name asks for: "csv", "parquet" or "json"."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in _SUFFIXES:
        raise PksEmuError(f"{os.fspath(path)}: unknown table format {suffix or '(no suffix)'!r}: "
                          "expected .csv, .parquet or .json")
    return suffix[1:]


def write_table(table: pandas.DataFrame, path: str | os.PathLike) -> None:
    """Write a sweep table as CSV, Parquet or JSON (records), by suffix,
    atomically (a temporary file beside ``path``, then a rename)."""
    path = os.fspath(path)
    fmt = table_format(path)
    if fmt == "csv":
        _atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    elif fmt == "parquet":
        _atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    else:
        rows = json.loads(table.to_json(orient="records"))  # NA -> null, numpy -> JSON numbers

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1)
                f.write("\n")
        _atomic_write(path, write)


def read_table(path: str | os.PathLike) -> pandas.DataFrame:
    """Read back a table written by :func:`write_table` (or ``pks-emu sweep -o``),
    with the column types :func:`sweep` returns."""
    _, pd = _need_dist()
    path = os.fspath(path)
    fmt = table_format(path)
    if fmt == "csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    elif fmt == "parquet":
        df = pd.read_parquet(path)
    else:
        with open(path) as f:
            df = pd.DataFrame(json.load(f))
    table = _apply_schema(df)
    table.attrs["partial"] = bool((table["status"] == CANCELLED).any()) if "status" in table else False
    return table


class _CallableModule(types.ModuleType):
    """``pks_emu.sweep(...)`` calls :func:`sweep` even once this module has
    been imported and shadows the lazy attribute of the package."""

    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
