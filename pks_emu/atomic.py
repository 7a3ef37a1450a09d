"""Atomic output files: nothing at the target name until the output is complete.

``atomic_output(path)`` opens a temporary file beside ``path`` (same
directory, so the final ``os.replace`` is a rename within one file system)
named ``.NAME.partial-XXXXXX``; when the ``with`` block ends normally the file
is flushed, ``fsync``-ed and renamed to ``path``; when it ends with any
exception (including ``KeyboardInterrupt``) the temporary file is removed and
the target is left as it was. A process killed outright (SIGKILL, power
loss) leaves at most a ``.partial-`` file, never a file at the target name
that looks complete.

Targets that are not regular files (``/dev/null``, ``/dev/full``, a FIFO,
``/dev/stdout``) cannot be renamed onto; they are written directly, and a
write error reaches the caller as usual.

Errors: :class:`OutputError` (a :class:`~pks_emu.errors.PksEmuError`) naming
the path and the reason, for a missing folder, a full disk, a read-only file
system..., and for an output that is one of the inputs (``same_as``).
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from .errors import PksEmuError

__all__ = ["OutputError", "atomic_output", "check_not_input", "PARTIAL_MARK"]

#: part of every temporary name, so that leftovers of a killed run are easy to spot
PARTIAL_MARK = ".partial-"


class OutputError(PksEmuError, OSError):
    """An output file cannot be written; the message names the file and why
    (``filename`` and ``strerror`` hold them separately)."""

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.filename = path
        self.strerror = reason

    def __str__(self) -> str:
        return str(self.args[0])


def _fail(path: str, what: str, reason: str) -> OutputError:
    return OutputError(f"{path}: {what}: {reason}", path=path, reason=reason)


def _describe(e: OSError) -> str:
    return e.strerror or str(e)


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                    what: str = "output") -> None:
    """Refuse ``path`` if it is the same file as one of ``inputs`` (before anything is written)."""
    path = os.fspath(path)
    for src in inputs:
        if src is None:
            continue
        src = os.fspath(src)
        try:
            same = os.path.samefile(path, src)
        except OSError:
            same = os.path.abspath(path) == os.path.abspath(src)
        if same:
            raise OutputError(f"{path}: the {what} is also an input ({src}); "
                              "refusing to overwrite it: choose another output name")


def is_special(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode)


class _Guarded:
    """The open file, with write errors turned into :class:`OutputError` naming the target."""

    def __init__(self, f: IO, path: str) -> None:
        self._f = f
        self._path = path

    def _call(self, name: str, *a: Any) -> Any:
        try:
            return getattr(self._f, name)(*a)
        except OSError as e:
            raise _fail(self._path, "cannot write", _describe(e)) from None

    def write(self, data: Any) -> Any:
        return self._call("write", data)

    def writelines(self, lines: Any) -> Any:
        return self._call("writelines", lines)

    def flush(self) -> None:
        self._call("flush")

    def seek(self, *a: Any) -> int:
        return self._call("seek", *a)

    def tell(self) -> int:
        return self._call("tell")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._f, name)
        if not callable(attr):
            return attr

        def call(*a: Any, **kw: Any) -> Any:
            try:
                return attr(*a, **kw)
            except OSError as e:
                raise _fail(self._path, "cannot write", _describe(e)) from None
        return call


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", *,
                  inputs: Iterable[str | os.PathLike | None] = (), **kw: Any) -> Iterator[Any]:
    """Open ``path`` for writing, atomically (see the module docstring).

    ``mode`` is ``"wb"`` or ``"w"`` (``kw`` goes to ``open``, e.g. ``newline``);
    ``inputs`` are refused as targets (:func:`check_not_input`).
    """
    path = os.fspath(path)
    if not path:
        raise OutputError("output file name is empty: expected a file name to write", reason="empty name")
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_output mode {mode!r}: expected 'w' or 'wb'")
    check_not_input(path, inputs)
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a directory; expected a file name to write")
    if is_special(path):
        try:
            f = open(path, mode, **kw)
        except OSError as e:
            raise _fail(path, "cannot write", _describe(e)) from None
        try:
            yield _Guarded(f, path)
            try:
                f.flush()
            except OSError as e:
                raise _fail(path, "cannot write", _describe(e)) from None
        finally:
            with contextlib.suppress(OSError):
                f.close()
        return
    # A symlink stays a symlink: the file it points to is the one replaced.
    real = os.path.realpath(path) if os.path.islink(path) else path
    folder = os.path.dirname(os.path.abspath(real))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}{PARTIAL_MARK}", dir=folder)
    except OSError as e:
        reason = ("no such folder" if isinstance(e, FileNotFoundError) and not os.path.isdir(folder)
                  else _describe(e))
        raise _fail(path, "cannot create the output", reason) from None
    ok = False
    try:
        f = os.fdopen(fd, mode, **kw)
        try:
            yield _Guarded(f, path)     # errors of the body pass through unchanged
        except BaseException:
            with contextlib.suppress(OSError):
                f.close()
            raise
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            # mkstemp makes the file 0600; give the output the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, real)
        except OSError as e:
            with contextlib.suppress(OSError):
                f.close()
            raise _fail(path, "cannot write", _describe(e)) from None
        ok = True
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
