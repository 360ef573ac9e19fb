"""The one atomic-write helper.

The temporary file is created in the target folder with O_CREAT|O_EXCL|O_NOFOLLOW and
only the owner bits of its final mode, while it still belongs to root: nobody but its
creator can open it until its final owner is set, and only then does it get its final
mode, so a private key is never readable beyond that mode, not even for a moment, even
in a setgid folder. File and folder are fsynced. A crash leaves either the old file or
the new one, plus at most a stray temporary file that `sweep_temporaries` removes on the
next pass.

`stage` + `commit` split a write in two, so that several files (a key and its
certificate) are all written out before any of them replaces its old version: a full
disk then fails before anything is replaced. `Transaction` does exactly that for a set of
files, and puts the old files back when a rename is refused after an earlier one succeeded.

Given a `Folder` (reconciler.folders: opened from / without following a link another
user planted), every step acts on that folder's descriptor and the file's bare name, so
swapping a folder on the path for a link mid-write cannot redirect it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from reconciler.faults import fault_point
from reconciler.folders import Folder, open_folder

TMP_MARK = ".reconciler-tmp-"


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{secrets.token_hex(4)}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def make_parents(folder: Path, mode: int = 0o755) -> None:
    """Create `folder` (and the folders above it, 0755) with exactly `mode`, whatever the umask."""
    open_folder(folder, None, mode).close()


def _at(path: Path, folder: Folder | None) -> tuple[str | Path, int | None]:
    """What to pass to an *at() call: the bare name in `folder`, or the whole path."""
    return (path.name, folder.fd) if folder is not None else (path, None)


def stage(
    path: Path,
    data: bytes,
    mode: int,
    uid: int | None = None,
    gid: int | None = None,
    folder: Folder | None = None,
    xattrs: dict[str, bytes] | None = None,
) -> Path:
    """Write `data` to a new temporary file beside `path` with its final owner and mode,
    fsynced; returns the temporary's path for `commit` (or `discard`). `xattrs` are set
    on the temporary, so they arrive with the rename (unsupported ones are skipped)."""
    tmp = temporary_name(path)
    name, dir_fd = _at(tmp, folder)
    # owner bits only, and the umask can only take bits away: until fchown below the file
    # belongs to us, and a folder's setgid group must not be able to read it meanwhile
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o600, dir_fd=dir_fd)
    try:
        try:
            fault_point("tmp_created")
            if uid is not None or gid is not None:
                os.fchmod(fd, mode & 0o600)
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode & 0o7777)  # after chown, which may clear set-id bits
            for key, value in (xattrs or {}).items():
                try:
                    os.setxattr(fd, key, value)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                        raise
            view = memoryview(data)
            half = len(view) // 2
            for i, chunk in enumerate((view[:half], view[half:])):
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
                if i == 0:
                    fault_point("tmp_partial")  # a torn temporary: half written, not renamed
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        discard(tmp, folder)
        raise
    return tmp


def commit(tmp: Path, path: Path, pending_dirs: set[Path] | None = None, folder: Folder | None = None) -> None:
    """Rename a staged temporary over `path` (the rename replaces a symlink, never follows it)."""
    fault_point("before_rename")
    src, dir_fd = _at(tmp, folder)
    dst, _ = _at(path, folder)
    try:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        discard(tmp, folder)
        raise
    where = folder.path if folder is not None else path.parent
    if pending_dirs is None:
        fsync_dir(where)
    else:
        pending_dirs.add(where)


def discard(tmp: Path, folder: Folder | None = None) -> None:
    name, dir_fd = _at(tmp, folder)
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


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
    with open_folder(path.parent, None, 0o700 if make_parents else None) as folder:
        commit(stage(path, data, mode, uid, gid, folder), path, pending_dirs, folder)


def set_metadata(
    path: Path,
    uid: int | None,
    gid: int | None,
    mode: int | None,
    follow_symlinks: bool = False,
    folder: Folder | None = None,
) -> None:
    """chown + chmod of an existing regular file, through one descriptor opened without
    following a symlink (unless asked): a path swapped for a link since it was observed
    fails with ELOOP instead of changing the link's target. While the owner changes the
    mode is first narrowed to what both old and new allow, so no new owner or group ever
    sees the file with more than its final mode."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    name, dir_fd = _at(path, folder)
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        current = stat.S_IMODE(st.st_mode)
        final = current if mode is None else mode
        new_uid = st.st_uid if uid is None else uid
        new_gid = st.st_gid if gid is None else gid
        chowned = (new_uid, new_gid) != (st.st_uid, st.st_gid)
        if chowned:
            if current & final != current:
                os.fchmod(fd, current & final)
            os.fchown(fd, new_uid, new_gid)
            fault_point("after_chown")
        if chowned or final != current:
            os.fchmod(fd, final)
            fault_point("after_chmod")
    finally:
        os.close(fd)


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


@dataclass
class _Staged:
    label: str  # "key", "cert", "ca": names the fault point after its rename
    folder: Folder
    name: str
    tmp: Path
    # the old file's bytes, mode and owner (None: there was none), kept in memory and not
    # as a second name on disk: a kill must not leave an old key lying around
    old: tuple[bytes, int, int, int] | None


class CommitRefused(Exception):
    """A rename was refused (a bind-mounted file, say). `undone`: the labels of the files
    already renamed, which were put back (`restored`) or could not be (not `restored`)."""

    def __init__(self, cause: OSError, label: str, undone: tuple[str, ...], restored: bool):
        super().__init__(str(cause))
        self.cause, self.label, self.undone, self.restored = cause, label, undone, restored


class Transaction:
    """Several files replaced all or nothing, in the order they were staged.

    Every file is written out in full (`stage`) before the first replaces its old version
    (`commit`), so a full disk or a failed write leaves the old files together, untouched.
    A rename refused after an earlier one succeeded puts the earlier old files back, so a
    service keeps a matching key and certificate. Leaving the `with` block discards
    whatever was staged and not committed."""

    def __init__(self, pending_dirs: set[Path] | None = None):
        self.pending_dirs = pending_dirs
        self._staged: list[_Staged] = []

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def stage(
        self,
        label: str,
        folder: Folder,
        name: str,
        data: bytes,
        mode: int,
        uid: int | None = None,
        gid: int | None = None,
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        tmp = stage(Path(name), data, mode, uid, gid, folder, xattrs)
        self._staged.append(_Staged(label, folder, name, tmp, None))
        self._staged[-1].old = _keep_old(folder, name)

    def commit(self) -> None:
        done: list[_Staged] = []
        for item in self._staged:
            try:
                commit(item.tmp, Path(item.name), self.pending_dirs, item.folder)
            except OSError as exc:
                raise CommitRefused(exc, item.label, tuple(d.label for d in done), _put_back(done)) from None
            done.append(item)
            fault_point(f"after_{item.label}")
        self._staged.clear()  # all renamed: nothing is left to discard

    def discard(self) -> None:
        for item in self._staged:
            discard(item.tmp, item.folder)  # a no-op once renamed
        self._staged.clear()


def _keep_old(folder: Folder, name: str) -> tuple[bytes, int, int, int] | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder.fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        return fh.read(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _put_back(done: list[_Staged]) -> bool:
    ok = True
    for item in reversed(done):
        try:
            if item.old is not None:
                data, mode, uid, gid = item.old
                commit(stage(Path(item.name), data, mode, uid, gid, item.folder), Path(item.name), None, item.folder)
            else:
                os.unlink(item.name, dir_fd=item.folder.fd)  # there was none: the new one goes
        except OSError:
            ok = False
    return ok
