"""The one atomic-write helper.

The temporary file is created in the target folder with O_CREAT|O_EXCL and its final
mode, so a private key is never readable beyond that mode, not even for a moment; the
owner is set before the rename; file and folder are fsynced. A crash leaves either the
old file or the new one, plus at most a stray temporary file that `sweep_temporaries`
removes on the next pass.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TMP_MARK = ".reconciler-tmp-"


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{secrets.token_hex(4)}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def make_parents(folder: Path, mode: int = 0o755) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True, mode=mode)


def write_atomic(
    path: Path,
    data: bytes,
    mode: int,
    uid: int | None = None,
    gid: int | None = None,
    make_parents: bool = False,
    pending_dirs: set[Path] | None = None,
) -> None:
    """`pending_dirs`: collect the folder instead of fsyncing it now, so a pass that writes
    many files syncs each folder once (call `fsync_dirs` before anything depends on them)."""
    folder = path.parent
    if make_parents and not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = temporary_name(path)
    # umask must not loosen or tighten what we ask for: fchmod after open sets it exactly,
    # and the open mode already excludes every bit we do not want.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o777)
    try:
        try:
            os.fchmod(fd, mode & 0o7777)
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                os.fchmod(fd, mode & 0o7777)  # chown may clear set-id bits
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if pending_dirs is None:
        fsync_dir(folder)
    else:
        pending_dirs.add(folder)


def fsync_dirs(folders: set[Path]) -> None:
    for folder in sorted(folders):
        fsync_dir(folder)
    folders.clear()


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files a killed pass left behind in `folder`."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if is_temporary(name):
            try:
                os.unlink(folder / name)
                removed.append(folder / name)
            except OSError:
                pass
    return removed
