"""One pass at a time per state folder: an flock on <state-dir>/lock.

The holder's pid is read from /proc/locks rather than written into the file, so a
pass that changes nothing writes nothing at all."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from reconciler.errors import ReconcilerError
from reconciler.folders import require_private


class LockTimeout(ReconcilerError):
    pass


class PassLock:
    def __init__(self, state_dir: Path, timeout: float = 60.0):
        self.path = state_dir / "lock"
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> "PassLock":
        # the lock, the status store and the caches are trusted from here on: the folder
        # must be ours alone (and it is created 0700 whatever the umask)
        require_private(self.path.parent, "state folder", create=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise LockTimeout(
                        f"another reconcile (pid {holder}) holds {self.path} for more than {self.timeout:g}s",
                        hint="wait for it, or raise --lock-timeout",
                    ) from None
                time.sleep(0.05)
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        """The pid holding an flock on the same inode, from /proc/locks (Linux)."""
        st = os.fstat(fd)
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            with open("/proc/locks") as fh:
                for line in fh:
                    parts = line.split()
                    # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
                    if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted and "->" not in parts:
                        return parts[4]
        except OSError:
            pass
        return "unknown"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
