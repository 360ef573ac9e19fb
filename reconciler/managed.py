"""Which state folder manages a file: two reconcilers must not fight over one file.

Two reconcilers with different state folders (so different locks) that name the same
files would each see the other's certificate as drift and re-issue it, forever, running
the hooks every time. Each managed file therefore carries the state folder that wrote it,
as the extended attribute `user.reconciler.state` (set on the temporary file before the
rename, so it arrives with the content), and another state folder refuses to touch it.

Where the filesystem has no user extended attributes (vfat, some NFS setups), the mark
is a small file beside the managed one, `.NAME.reconciler-state`, holding the same text.
A mark naming a state folder that no longer exists is stale: the file is taken over.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

XATTR = "user.reconciler.state"
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


def identity(state_dir: Path) -> str:
    """The state folder as a mark: its resolved path."""
    return os.path.realpath(state_dir)


def sidecar_name(name: str) -> str:
    return f".{name}.reconciler-state"


def read_mark(path: Path, follow_symlinks: bool = False) -> str | None:
    """The state folder recorded on `path`, or None (unmarked, missing, unreadable)."""
    return mark_of(path, follow_symlinks)[0]


def mark_of(path: str | Path, follow_symlinks: bool = False) -> tuple[str | None, bool]:
    """(read_mark's answer, whether it is the file's own extended attribute, set or absent).
    Only that answer may be kept with the file's stamp (observation_cache.py): setting or
    removing an xattr changes the file's ctime, writing a sidecar file does not."""
    try:
        return os.getxattr(path, XATTR, follow_symlinks=follow_symlinks).decode("utf-8", "replace"), True
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            return None, exc.errno == errno.ENODATA
    folder, name = os.path.split(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(folder, sidecar_name(name)), flags)
    except OSError:
        return None, False
    try:
        return os.read(fd, 8192).decode("utf-8", "replace").strip() or None, False
    finally:
        os.close(fd)


def foreign(path: Path, ours: str, follow_symlinks: bool = False) -> str | None:
    """The other state folder managing `path`, if it is not ours and still exists."""
    return foreign_mark(read_mark(path, follow_symlinks), ours)


def foreign_mark(mark: str | None, ours: str) -> str | None:
    """`mark` (read_mark's answer) when it names another state folder that still exists."""
    if mark is None or mark == ours or not os.path.isdir(mark):
        return None
    return mark


def refusal(label: str, path: str | Path, other: str, ours: str) -> str:
    return (
        f"{label} {path} is managed by the reconciler with state folder {other}, and this one uses {ours}; "
        "refusing to touch it, or the two would replace each other's certificate on every pass. "
        f"Keep the entry in one manifest only; if {other} is no longer used, remove it "
        f"(or the mark: setfattr -x {XATTR} {path})"
    )


def xattr_supported(folder_fd: int) -> bool:
    try:
        os.getxattr(f"/proc/self/fd/{folder_fd}", XATTR)
    except OSError as exc:
        return exc.errno not in _UNSUPPORTED
    return True
