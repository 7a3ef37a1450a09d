"""One capture: build the plugin and the guest, run QEMU, check what came out."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import PksEmuError
from . import guest as _guest
from . import qemu as _qemu
from .build import plugin_path

#: Header defaults of a captured trace: 5-level paging (the Debian kernel has
#: CONFIG_X86_5LEVEL=y and ``-cpu max`` offers LA57), QEMU TCG's 40 physical
#: address bits, every feature of ``-cpu max`` that pks_emu models.
TRACE_LEVELS = 5
TRACE_MAXPHYADDR = 40
TRACE_FEATURES = 0x7F
#: Records per chunk of a captured trace: 4x the writer's default. A boot is
#: hundreds of millions of records, and each chunk costs the replay a round of
#: Python (reading, checking, dispatch); 131,072 keep a decoded chunk at 5 MB.
CAPTURE_CHUNK_RECORDS = 131072

START_MODES = ("boot", "kernel", "user")


@dataclass
class CaptureInfo:
    """What a capture did (see :func:`capture`)."""

    #: the QEMU command line, as run
    command: list[str]
    #: wall time of the QEMU run, seconds
    wall_time: float
    #: QEMU's exit status (0: the guest powered off)
    exit_status: int
    #: "count" or "record"
    plugin: str
    #: the counts the plugin reported at exit (kernel_loads, kernel_stores,
    #: user_loads, user_stores, kernel_user_accesses, kernel_fetches,
    #: user_fetches; the recording plugin adds records, records_dropped,
    #: pa_none, limit_reached, write_error)
    counts: dict = field(default_factory=dict)
    #: the exit status of the workload script (None: not our guest, or unknown)
    workload_status: int | None = None
    #: the guest's /proc/kallsyms saved on the host (None: not saved)
    kallsyms: Path | None = None
    #: the trace file (None when written to a descriptor or count-only)
    trace: Path | None = None
    #: size of the trace file in bytes (None when unknown)
    trace_bytes: int | None = None
    #: the last lines of the guest console
    console_tail: str = ""

    @property
    def accesses(self) -> int:
        """Data accesses the plugin saw (loads and stores, kernel and user)."""
        c = self.counts
        return sum(int(c.get(k, 0)) for k in ("kernel_loads", "kernel_stores", "user_loads",
                                               "user_stores"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kallsyms"] = str(self.kallsyms) if self.kallsyms else None
        d["trace"] = str(self.trace) if self.trace else None
        d["accesses"] = self.accesses
        d["accesses_per_second"] = (self.accesses / self.wall_time) if self.wall_time else None
        if self.trace_bytes and self.counts.get("records"):
            d["bytes_per_record"] = self.trace_bytes / self.counts["records"]
        return d


def _out_fd(out) -> int | None:
    if isinstance(out, bool):
        raise PksEmuError(f"capture output {out!r}: expected a path or a file descriptor")
    if isinstance(out, int):
        return out
    fileno = getattr(out, "fileno", None)
    if fileno is not None:
        flush = getattr(out, "flush", None)
        if flush:
            flush()
        return fileno()
    return None


def _widen_pipe(fd: int) -> None:
    """A pipe of 1 MiB instead of Linux's 64 KiB: the writer hands over chunks
    of about 150 KB, and a small pipe puts both ends to sleep several times a
    chunk (a context switch each way). Best effort: other files, other
    systems, or a lower ``/proc/sys/fs/pipe-max-size`` keep the default."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    try:
        if setsz is not None and stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, setsz, 1 << 20)
    except OSError:
        pass


def capture(out, *, kernel: str | os.PathLike | None = None,
            initrd: str | os.PathLike | None = None, append: str | None = None,
            workload: str | os.PathLike | None = None, memory: str | int = "512M",
            smp: int = 1, fetches: bool = False, extra_qemu_args: Sequence[str] = (),
            kallsyms_out: str | os.PathLike | None = None, timeout: float | None = None,
            count_only: bool = False, start: str = "boot", limit: int | None = None,
            modules: Sequence[str | os.PathLike] = (), pa: bool = True,
            writer_thread: bool = True, save_kallsyms: bool = True,
            coalesce: bool = False, writer_nice: int = 0,
            cancel: threading.Event | None = None, pa_shortcut: str = "on") -> CaptureInfo:
    """Boot a kernel under QEMU TCG with the capture plugin; return what happened.

    ``out``: where the trace-v2 stream goes: a path (written as ``PATH.part``,
    renamed on success), or a writable file descriptor / binary file object
    (a pipe into a replay: the descriptor is passed to QEMU). Ignored (may be
    None) with ``count_only``, which loads the counting plugin instead.

    ``kernel``: default :func:`find_default_kernel`. ``initrd``: default the
    busybox guest of :func:`build_initramfs` running ``workload`` (a shell
    script file; default a short file and process workload) with ``modules``
    loaded first. ``append`` goes after ``console=ttyS0 nokaslr panic=-1
    quiet``. ``memory`` and ``smp``: QEMU's ``-m`` and ``-smp``.
    ``extra_qemu_args``: appended verbatim. ``kallsyms_out``: where the
    guest's ``/proc/kallsyms`` goes (default ``OUT.kallsyms`` for a path
    output, else a temporary file; see :attr:`CaptureInfo.kallsyms`).
    ``start``: "boot" records from the first instruction (firmware included),
    "kernel" from the first access by kernel-half code, "user" from the first
    user-space access after the kernel ran (init starting). ``limit``: stop
    recording after that many records (QEMU runs on; the counts stay complete).
    ``coalesce``: merge an access that continues the previous one of the same
    kind by the same instruction (next bytes, same page) into its record, as
    ``rep movs``/``rep stos`` make; counts stay per access. ``pa``: look up
    physical addresses. ``writer_thread``: encode on the
    plugin's writer thread (else on the vCPU threads); ``writer_nice``: added
    to that thread's nice value (Linux), so that it yields the core to a vCPU
    thread it shares one with. ``save_kallsyms``: the
    built-in guest dumps ``/proc/kallsyms`` after the workload (in the trace:
    about as many kernel accesses as the boot itself; off saves that).
    ``pa_shortcut``: "on" (default) takes guest-RAM physical addresses
    from the host address once the plugin has learned and checked it against
    QEMU's API (docs/capture.md, "Physical addresses"); "off" asks the API for
    every access; "check" asks it too and counts disagreements (the counts'
    ``pa_checked`` and ``pa_mismatches``).
    ``cancel``: setting this event stops QEMU (SIGTERM, as a timeout does)
    and the capture fails with "cancelled" (how a failed replay stops the
    boot that feeds it).

    Raises :class:`PksEmuError` (one line plus, where useful, the tail of the
    console or of QEMU's output) when a binary is missing, the kernel does
    not exist, QEMU fails or times out, or the guest did not finish.
    """
    if start not in START_MODES:
        raise PksEmuError(f"start {start!r}: expected one of {', '.join(START_MODES)}")
    if limit is not None and limit < 0:
        raise PksEmuError(f"limit {limit}: expected a record count >= 0")
    if pa_shortcut not in ("on", "off", "check"):
        raise PksEmuError(f"pa_shortcut {pa_shortcut!r}: expected 'on', 'off' or 'check'")
    qemu_bin = _qemu.find_qemu()
    kernel = Path(kernel) if kernel is not None else _qemu.find_default_kernel()
    if not kernel.is_file():
        raise PksEmuError(f"kernel {kernel} does not exist: {_qemu.KERNEL_HINT}, or pass "
                          "--kernel PATH")
    if initrd is not None:
        initrd = Path(initrd)
        if not initrd.is_file():
            raise PksEmuError(f"initrd {initrd} does not exist")
        if workload is not None or modules:
            raise PksEmuError("a workload or modules need the built-in guest: drop --initrd")
    ram = _qemu.parse_memory(memory)

    plugin = plugin_path("count" if count_only else "record")
    out_fd = out_path = None
    if not count_only:
        if out is None:
            raise PksEmuError("capture needs an output (a path or a file descriptor) "
                              "unless count_only")
        out_fd = _out_fd(out)
        if out_fd is not None:
            # QEMU's stdin/stdout/stderr are redirected in the child: hand the
            # plugin a copy of the descriptor numbered 3 or above.
            try:
                out_fd = fcntl.fcntl(out_fd, fcntl.F_DUPFD_CLOEXEC, 3)
            except OSError as e:
                raise PksEmuError(f"capture output descriptor {out!r}: {e.strerror}") from None
        else:
            out_path = Path(out)
            if not out_path.parent.is_dir():
                raise PksEmuError(f"output folder {out_path.parent} does not exist")
            if out_path.exists() and not out_path.is_file():
                # /dev/null, a FIFO...: written in place. Renaming a finished
                # '.part' file onto it would replace the device node itself.
                try:
                    fd = os.open(out_path, os.O_WRONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise PksEmuError(f"capture output {out_path}: {e.strerror}") from None
                try:
                    out_fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                finally:
                    os.close(fd)
                out_path = None

    if out_fd is not None:
        _widen_pipe(out_fd)
    work = Path(tempfile.mkdtemp(prefix="pks-emu-capture-"))
    part = None
    try:
        if initrd is None:
            initrd = _guest.build_initramfs(workload, work / "initrd.cpio.gz", modules,
                                            dump_kallsyms=save_kallsyms)
            own_guest = True
        else:
            own_guest = False
        stats = work / "stats.json"
        args: dict[str, object] = {"stats": stats, "start": start}
        if fetches:
            args["fetches"] = "on"
        if not count_only:
            if out_path is not None:
                part = out_path.with_name(out_path.name + ".part")
                args["out"] = part
            else:
                args["fd"] = out_fd
            lowmem = _qemu.pc_lowmem(ram)
            args.update(ram=ram, lowmem=lowmem, ncpus=smp, levels=TRACE_LEVELS,
                        maxphyaddr=TRACE_MAXPHYADDR, features=TRACE_FEATURES,
                        chunk=CAPTURE_CHUNK_RECORDS)
            if not pa:
                args["pa"] = "off"
            if not writer_thread:
                args["thread"] = "off"
            if pa_shortcut != "on":
                args["pa_shortcut"] = pa_shortcut
            if writer_nice:
                if not 0 <= writer_nice <= 19:
                    raise PksEmuError(f"writer_nice {writer_nice}: expected 0..19")
                args["writer_nice"] = writer_nice
            if coalesce:
                args["coalesce"] = "on"
            if limit is not None:
                args["limit"] = limit
        console, serial2, log = work / "console.log", work / "ttyS1.raw", work / "qemu.log"
        cmd = _qemu.build_command(qemu=qemu_bin, kernel=kernel, initrd=initrd, append=append,
                                  memory=memory, smp=smp, console=console, serial2=serial2,
                                  plugins=[(plugin, args)], extra_qemu_args=extra_qemu_args)
        rc, wall, timed_out = _qemu.run(cmd, log_path=log, timeout=timeout,
                                        pass_fds=(out_fd,) if out_fd is not None else (),
                                        cancel=cancel)
        con_tail = _qemu.tail(console)

        def fail(msg: str, *, qemu_output: bool = False) -> PksEmuError:
            if part is not None:
                part.unlink(missing_ok=True)
            parts = [msg]
            if qemu_output and _qemu.tail(log):
                parts.append("QEMU output:\n" + _qemu.tail(log))
            if con_tail:
                parts.append("guest console (last lines):\n" + con_tail)
            return PksEmuError("\n".join(parts))

        if timed_out and cancel is not None and cancel.is_set():
            raise fail("the capture was cancelled and QEMU stopped")
        if timed_out:
            raise fail(f"QEMU did not finish within {timeout:g} s and was stopped",
                       qemu_output=True)
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            hint = " (the trace's reader went away)" if -rc == signal.SIGPIPE else ""
            raise fail(f"QEMU was killed by {name}{hint}", qemu_output=True)
        if rc != 0:
            raise fail(f"QEMU exited with status {rc}", qemu_output=True)
        try:
            counts = json.loads(stats.read_text())
        except (OSError, ValueError):
            raise fail("the capture plugin reported no totals (QEMU did not run it to exit)",
                       qemu_output=True) from None
        if counts.get("pa_shortcut_failed"):
            raise fail("the capture plugin's physical-address shortcut disagreed with QEMU's "
                       "plugin API and the recording was stopped (please report this QEMU "
                       "version; the plugin option pa_shortcut=off avoids the shortcut)")
        if counts.get("write_error"):
            raise fail(f"writing the trace failed: {counts['write_error']}")
        text = console.read_bytes().decode("utf-8", "replace") if console.exists() else ""
        workload_status = None
        if own_guest:
            for line in text.splitlines():
                line = line.strip()
                if line.startswith(_guest.MARK_EXIT):
                    try:
                        workload_status = int(line[len(_guest.MARK_EXIT):])
                    except ValueError:
                        pass
                elif line.startswith(_guest.MARK_INSMOD_FAILED):
                    raise fail(f"the guest could not load module "
                               f"{line[len(_guest.MARK_INSMOD_FAILED):]}")
            if workload_status is None:
                raise fail("the guest did not finish its workload (kernel panic or crash?)")

        kallsyms = None
        raw = serial2.read_bytes() if serial2.exists() else b""
        if raw.strip():
            if kallsyms_out is not None:
                kallsyms = Path(kallsyms_out)
            elif out_path is not None:
                kallsyms = out_path.with_name(out_path.name + ".kallsyms")
            else:
                fd, name = tempfile.mkstemp(prefix="pks-emu-kallsyms-", suffix=".txt")
                os.close(fd)
                kallsyms = Path(name)
            kallsyms.write_bytes(raw.replace(b"\r", b""))
        trace = trace_bytes = None
        if out_path is not None:
            assert part is not None         # made together with out_path
            os.replace(part, out_path)
            trace, trace_bytes = out_path, out_path.stat().st_size
        return CaptureInfo(command=cmd, wall_time=wall, exit_status=rc,
                           plugin="count" if count_only else "record", counts=counts,
                           workload_status=workload_status, kallsyms=kallsyms, trace=trace,
                           trace_bytes=trace_bytes, console_tail=con_tail)
    finally:
        if part is not None:
            part.unlink(missing_ok=True)   # still there: the capture failed
        if out_fd is not None:
            os.close(out_fd)
        shutil.rmtree(work, ignore_errors=True)


class CaptureJob:
    """A capture running on a background thread (see :func:`capture_pipe`)."""

    def __init__(self, fn, close_fd: int | None = None,
                 cancel: threading.Event | None = None) -> None:
        self._cancel = cancel
        self._result: CaptureInfo | None = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._result = fn()
            except BaseException as e:  # handed to wait()
                self._error = e
            finally:
                if close_fd is not None:
                    os.close(close_fd)  # the reader sees the end of the stream

        self._thread = threading.Thread(target=target, name="pks-emu-capture", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self, timeout: float | None = 30) -> None:
        """Stop QEMU (when it still runs) and wait for the capture to end;
        :meth:`wait` then raises "cancelled" (or what the capture raised first)."""
        if self._cancel is not None:
            self._cancel.set()
        self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> CaptureInfo:
        """The capture's :class:`CaptureInfo`; raises what :func:`capture` raised."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PksEmuError(f"the capture is still running after {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def capture_pipe(*, buffer: int = 256 << 20, **kwargs) -> tuple[BinaryIO, CaptureJob]:
    """Start a capture whose trace comes through a pipe: ``(reader, job)``.

    ``reader`` is a binary file object with the trace-v2 stream (for
    ``open_trace_v2``), ending when QEMU exits; ``job.wait()`` then gives the
    :class:`CaptureInfo` (or raises the capture's error). Keyword arguments are
    those of :func:`capture`. ``reader`` reads the pipe ahead on a thread and
    holds up to ``buffer`` bytes of the stream (:class:`pipebuf.PipeBuffer`:
    QEMU runs ahead while the replay is behind); QEMU waits when it is full.
    Closing the reader early makes the capture fail ("Broken pipe"); a reader
    that gives up calls ``job.cancel()``, which also stops QEMU.
    """
    from .pipebuf import PipeBuffer
    r, w = os.pipe()
    ev = threading.Event()
    try:
        # the reader first: a bad ``buffer`` fails before QEMU starts
        reader = PipeBuffer(r, buffer)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    try:
        job = CaptureJob(lambda: capture(w, cancel=ev, **kwargs), close_fd=w, cancel=ev)
    except BaseException:
        os.close(w)
        reader.close()
        raise
    return cast(BinaryIO, reader), job      # a PipeBuffer reads like a binary file
