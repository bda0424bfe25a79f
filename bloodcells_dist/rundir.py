"""A run folder owned by one training at a time: an exclusive lock held for the run's life.

The lock is a POSIX record lock (`fcntl.lockf`) on RUN/.lock, taken by the main process before the run writes
anything. Such a lock belongs to the process that took it: forked data workers do not hold it, and the
kernel drops it when that process ends, however it ends (SIGKILL included), so a killed run never blocks the
next start. It also works on NFS (through the lock daemon), where multi-machine runs keep their folder.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .cli import UserError

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(run_dir):` holds the folder for one run; a second one is refused naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UserError saying which process (pid, host, start time) holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by a live process
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another training ({holder}); wait for it to end, "
                            "or give another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: the next run takes it again)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
