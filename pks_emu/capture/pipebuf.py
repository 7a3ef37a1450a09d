"""A pipe read ahead into memory by a thread: the capture's slack between QEMU and the replay.

A boot alternates between stretches where QEMU's vCPU thread is the slowest
stage and stretches where the replay is (records that touch many pages, the
kallsyms dump). A pipe holds at most 1 MiB (Linux's ``pipe-max-size`` for an
unprivileged process), a few tens of milliseconds of trace, so without more
room the faster side waits for the slower one in every stretch and a core
idles. :class:`PipeBuffer` drains the pipe as fast as the plugin writes it and
holds up to ``limit`` bytes of the (compact, ~2 bytes a record) trace v2
stream, so that QEMU runs ahead while the replay is behind and the replay
catches up while QEMU is slow: a few seconds of boot in 256 MiB.

Memory stays bounded: at ``limit`` the thread stops reading and QEMU waits on
the full pipe, as it would without the buffer.
"""
from __future__ import annotations

import collections
import os
import threading

#: bytes asked of the pipe per read (its capacity: one read empties it)
READ_SIZE = 1 << 20

#: default bound of the bytes held
DEFAULT_LIMIT = 256 << 20


class PipeBuffer:
    """A readable binary stream over the read end ``fd`` of a pipe (closed
    by :meth:`close`), filled ahead by a thread up to ``limit`` bytes.
    ``read(n)`` returns up to ``n`` bytes, fewer only at the end of the
    stream; read errors are raised by the read that reaches them."""

    def __init__(self, fd: int, limit: int = DEFAULT_LIMIT, name: str = "<capture>") -> None:
        if limit < READ_SIZE:
            raise ValueError(f"limit {limit}: expected at least {READ_SIZE} bytes")
        self.name = name
        self._fd = fd
        self._limit = limit
        self._parts: collections.deque[bytes] = collections.deque()
        self._held = 0          # bytes in _parts (from _head on for the first)
        self._head = 0          # offset consumed in _parts[0]
        self._eof = False
        self._error: OSError | None = None
        self._closed = False
        #: most bytes held at once (for the capture's report)
        self.peak = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._fill, name="pks-emu-pipe-buffer",
                                        daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        cv = self._cv
        while True:
            with cv:
                while self._held >= self._limit and not self._closed:
                    cv.wait()
                if self._closed:
                    return
            try:
                b = os.read(self._fd, READ_SIZE)
            except OSError as e:
                with cv:
                    self._error = e
                    self._eof = True
                    cv.notify_all()
                return
            with cv:
                if not b:
                    self._eof = True
                else:
                    self._parts.append(b)
                    self._held += len(b)
                    if self._held > self.peak:
                        self.peak = self._held
                cv.notify_all()
                if not b:
                    return

    def read(self, n: int = -1) -> bytes:
        if self._closed:
            raise ValueError("read of a closed PipeBuffer")
        out: list[bytes] = []
        want = n if n >= 0 else 1 << 62
        cv = self._cv
        with cv:
            while want:
                while not self._parts and not self._eof:
                    cv.wait()
                if not self._parts:
                    if self._error is not None and not out:
                        e, self._error = self._error, None
                        raise e
                    break
                b = self._parts[0]
                avail = len(b) - self._head
                if avail <= want:
                    out.append(b if self._head == 0 else b[self._head:])
                    self._parts.popleft()
                    self._head = 0
                    take = avail
                else:
                    out.append(b[self._head:self._head + want])
                    self._head += want
                    take = want
                want -= take
                self._held -= take
                cv.notify_all()
        return out[0] if len(out) == 1 else b"".join(out)

    def peek(self, n: int = 1) -> bytes:
        """The next bytes without consuming them: at least ``n`` (fewer only
        at the end of the stream), maybe more."""
        if self._closed:
            raise ValueError("peek of a closed PipeBuffer")
        cv = self._cv
        with cv:
            while self._held < n and not self._eof:
                cv.wait()
            if not self._parts:
                return b""
            first = self._parts[0]
            if len(first) - self._head < n and len(self._parts) > 1:
                # join as many head parts as ``n`` needs, so that the bytes are contiguous
                pieces = [self._parts.popleft()[self._head:]]
                got = len(pieces[0])
                while got < n and self._parts:
                    pieces.append(self._parts.popleft())
                    got += len(pieces[-1])
                first = b"".join(pieces)
                self._parts.appendleft(first)
                self._head = 0
            return first[self._head:]

    def readinto(self, buf) -> int:
        mv = memoryview(buf).cast("B")
        b = self.read(len(mv))
        mv[:len(b)] = b
        return len(b)

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stops the thread and closes the pipe (a writer still writing then
        gets EPIPE)."""
        if self._closed:
            return
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        # The thread may be blocked in os.read: closing the fd under it is not
        # safe, so wait for the read to return (the writer ending or writing).
        # A reader that gives up first cancels the capture (CaptureJob.cancel),
        # which ends the writer.
        self._thread.join(0.05)
        if not self._thread.is_alive():
            os.close(self._fd)
        else:
            threading.Thread(target=self._close_later, daemon=True).start()

    def _close_later(self) -> None:
        self._thread.join()
        os.close(self._fd)

    def __enter__(self) -> PipeBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
