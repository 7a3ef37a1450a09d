"""Just enough of debugfs for ``/sys/kernel/debug/x86/run_pks``.

A ``File`` is an open file description: shared by fork, released when the
last reference goes (``release()`` runs then, e.g. when an oops kills the
task holding it). ``read``/``write`` run as system calls of the calling
task, returning what the kernel returns: a byte count or a negative errno.
"""
from __future__ import annotations

import errno
from ._part import KernelPart


class FileOperations:
    """Base of a debugfs file's ``file_operations``."""

    def open(self, file) -> int:
        return 0

    def read(self, file, count: int) -> bytes:
        return b""

    def write(self, file, buf: bytes) -> int:
        return -errno.EINVAL

    def release(self, file) -> int:
        return 0


class File:
    """An open debugfs file."""

    def __init__(self, kernel, path: str, fops: FileOperations) -> None:
        self.kernel = kernel
        self.path = path
        self.fops = fops
        self.private_data = None
        self.refs = 1
        self.closed = False

    def get(self) -> None:
        self.refs += 1

    def put(self, task) -> None:
        self.refs -= 1
        if self.refs == 0 and not self.closed:
            self.closed = True
            self.fops.release(self)

    def write(self, task, data: bytes | str) -> int:
        """write(2) by ``task``: the byte count, or a negative errno."""
        if isinstance(data, str):
            data = data.encode()
        self._check(task)
        with self.kernel.syscall(task):
            return self.fops.write(self, bytes(data))

    def read(self, task, count: int = 16) -> bytes:
        """read(2) by ``task``: the bytes read (the test files never fail a read)."""
        self._check(task)
        with self.kernel.syscall(task):
            return self.fops.read(self, count)

    def close(self, task) -> None:
        """close(2) by ``task``."""
        if self in task.files:
            task.files.remove(self)
            with self.kernel.syscall(task):
                self.put(task)

    def _check(self, task) -> None:
        if self.closed or self not in task.files:
            raise OSError(errno.EBADF, f"{self.path}: not open in task {task.name!r}")


class DebugfsMixin(KernelPart):
    """``debugfs_create_file`` and ``open`` (part of Kernel)."""

    def debugfs_create_file(self, path: str, fops: FileOperations) -> None:
        self.debugfs[path] = fops

    def debugfs_remove(self, path: str) -> None:
        self.debugfs.pop(path, None)

    def open(self, task, path: str) -> File:
        """open(2) by ``task``; ``FileNotFoundError`` if the file does not exist
        (``run_pks`` is only created when the CPU has PKS, docs/rules.md §2.13)."""
        self._check_current(task)
        fops = self.debugfs.get(path)
        if fops is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        f = File(self, path, fops)
        with self.syscall(task):
            r = fops.open(f)
        if r < 0:
            raise OSError(-r, f"open {path}")
        task.files.append(f)
        return f
