"""The files one certificate's deployment writes: its key, certificate and CA file.

Each is reached through its folder opened from / without following a link that anyone but
root could have planted (reconciler.folders), and checked before the CA is asked: a folder
where a file belongs, an immutable or append-only file, or a file another state folder
manages fails with nothing issued and nothing replaced. The new files are then written
all or nothing (atomic.Transaction) and marked as ours (reconciler.managed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from pathlib import Path

from reconciler.atomic import CommitRefused, Transaction, commit, set_metadata, stage
from reconciler.errors import ReconcilerError
from reconciler.folders import Folder, FolderError, Walked, resolve_file
from reconciler.managed import XATTR, foreign, refusal, sidecar_name, xattr_supported
from reconciler.model import CA_MODE, DesiredCert

READ_LIMIT = 1024 * 1024  # a certificate or key file is never larger


class DeployError(ReconcilerError):
    """One certificate's deployment failed; `str()` says what, where and what to do."""


def os_error(exc: OSError, what: str, path: str | Path) -> str:
    """`exc` as one line for an operator: what could not be done to which file, and the fix."""
    if isinstance(exc, FolderError):
        return str(exc)
    hints = {
        errno.ENOSPC: "the filesystem is full; the old files were left as they were. Free space and run again",
        errno.EDQUOT: "a disk quota is exhausted; the old files were left as they were",
        errno.EACCES: "permission denied; run as root or give the reconciler write access to the folder",
        errno.EPERM: "operation not permitted; run as root (chown needs it)",
        errno.EROFS: "the filesystem is read-only",
        errno.ELOOP: "it is a symlink now; refusing to follow it",
        errno.EBUSY: "it is a mount point (a bind mount?); unmount it, "
        "or point the manifest at the mounted file's own path",
        errno.EISDIR: "it is a directory; point the manifest at a file inside it",
    }
    if os.geteuid() == 0:  # root already: "run as root" would send the operator the wrong way
        folder = Path(path).parent
        hints[errno.EPERM] = hints[errno.EACCES] = (
            "not permitted even as root: the file or its folder may have the immutable or append-only attribute "
            f"(lsattr -d {path} {folder}; chattr -i -a ...), or sit on a read-only or bind mount (findmnt {path})"
        )
    return f"cannot {what} {path}: {exc.strerror or exc}" + (f" ({hints[exc.errno]})" if exc.errno in hints else "")


def open_target(
    cert: DesiredCert, label: str, path: str | Path, create: bool = False, walked: Walked | None = None
) -> tuple[Folder, str]:
    """The folder a write to `path` lands in, and the file's name there. A symlink at `path`
    itself is replaced, never written through, unless the entry says "allow_symlink": true:
    then its final target is (observe followed it too). `walked`: see folders.open_folder."""
    return resolve_file(
        path,
        {cert.uid} if cert.uid is not None else set(),
        cert.allow_symlink,
        0o755 if create else None,
        label,
        walked,
    )


def refuse_foreign(folder: Folder, name: str, label: str, path: str | Path, manager: str | None) -> None:
    if manager is None:
        return
    other = foreign(folder.path / name, manager)
    if other:
        raise DeployError(refusal(label, path, other, manager))


def fix_metadata(cert: DesiredCert, owner: bool, mode: bool, manager: str | None) -> None:
    """Owner and mode in one step per file, through its folder opened without following a
    planted link, never through a symlink that appeared since observe (unless the entry
    allows links), never wider than the final mode."""
    uid, gid = (cert.uid, cert.gid) if owner else (None, None)
    for label, path, final in cert_files(cert):
        try:
            folder, name = open_target(cert, label, path)
            with folder:
                if label != "ca":  # one CA root file may serve several reconcilers
                    refuse_foreign(folder, name, label, path, manager)
                set_metadata(Path(name), uid, gid, final if mode else None, folder=folder)
        except OSError as exc:
            raise DeployError(os_error(exc, "change the owner or mode of", path)) from None


def cert_files(cert: DesiredCert) -> list[tuple[str, str, int]]:
    """(label, path, mode) of every file the entry manages."""
    files = [("cert", cert.cert_path, cert.cert_mode), ("key", cert.key_path, cert.key_mode)]
    if cert.ca_path is not None:
        files.append(("ca", cert.ca_path, CA_MODE))
    return files


def read(folder: Folder, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder.fd)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(READ_LIMIT)


class Targets:
    """The folders of one certificate's files, each opened once for the whole deployment
    (and the folders on the way to them walked once: folders.Walked).

    `check()` opens the folder of each existing file and refuses, before the CA is asked,
    a target a rename could not replace. A folder that does not exist yet is created only by
    `write()`, once there is something to write, so a refused issuance creates nothing."""

    def __init__(self, cert: DesiredCert, manager: str | None):
        self.cert = cert
        self.manager = manager
        self._opened: dict[str, tuple[Folder, str] | None] = {}
        self._walked = Walked()  # the folders on the way to them, walked once for all

    def __enter__(self) -> "Targets":
        return self

    def __exit__(self, *exc) -> None:
        for opened in self._opened.values():
            if opened is not None:
                opened[0].close()
        self._opened.clear()
        self._walked.close()

    def _open(self, label: str, path: str | Path, create: bool = False) -> tuple[Folder, str]:
        """The folder `path` lands in, walked from / once per deployment: a key and its
        certificate usually share one, and the walk of a moment ago reached it by the same
        rules (same owners allowed, no link on the way), so its checks hold for both."""
        if not self.cert.allow_symlink:  # else a link at `path` itself may lead elsewhere
            where = Path(os.path.normpath(os.path.abspath(path)))
            for opened in self._opened.values():
                if opened is not None and opened[0].path == where.parent:
                    return opened[0], where.name  # closed once: Folder.close is idempotent
        return open_target(self.cert, label, path, create, self._walked)

    def check(self, label: str, path: str | Path) -> None:
        try:
            self._opened[label] = opened = self._open(label, path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise DeployError(os_error(exc, "write", path)) from None
            self._opened[label] = None
            return
        _preflight(*opened, label, path, self.manager)

    def existing(self, label: str) -> tuple[Folder, str] | None:
        """The checked folder and name of a target whose folder exists (None: it does not)."""
        return self._opened.get(label)

    def write(self, files: list[tuple[str, str, bytes, int]], pending_dirs: set[Path] | None) -> None:
        """Replace `files` ((label, path, data, mode)) all or nothing."""
        walked_again = False
        for label, path, _data, _mode in files:
            if label not in self._opened:
                self.check(label, path)
            if self._opened[label] is None:
                if not walked_again:
                    # a folder created now, after the CA answered, is walked to from / again:
                    # the folders above it may have changed since they were checked before the call
                    self._walked.close()
                    walked_again = True
                try:
                    self._opened[label] = self._open(label, path, create=True)
                except OSError as exc:
                    raise DeployError(os_error(exc, "write", path)) from None
        marks = {XATTR: self.manager.encode()} if self.manager else None  # key and certificate; a CA root may be shared
        with Transaction(pending_dirs) as tx:
            for label, path, data, mode in files:
                folder, name = self._opened[label]  # type: ignore[misc]
                try:
                    tx.stage(
                        label, folder, name, data, mode, self.cert.uid, self.cert.gid, marks if label != "ca" else None
                    )
                except OSError as exc:
                    raise DeployError(os_error(exc, "write", path)) from None
            try:
                tx.commit()
            except CommitRefused as exc:
                raise DeployError(_refused(exc, {label: path for label, path, _d, _m in files})) from None
        self._mark_beside([label for label, *_rest in files if label != "ca"], pending_dirs)

    def _mark_beside(self, labels: list[str], pending_dirs: set[Path] | None) -> None:
        """The mark where the filesystem keeps no extended attributes: a file beside."""
        if not self.manager or not labels or xattr_supported(self._opened[labels[0]][0].fd):  # type: ignore[index]
            return
        for label in labels:
            folder, name = self._opened[label]  # type: ignore[misc]
            side = Path(sidecar_name(name))
            commit(stage(side, self.manager.encode() + b"\n", 0o644, None, None, folder), side, pending_dirs, folder)


def _refused(exc: CommitRefused, paths: dict[str, str]) -> str:
    message = os_error(exc.cause, "replace", paths[exc.label])
    if not exc.undone:
        return message
    files = " and ".join(exc.undone)
    if exc.restored:
        return f"{message}; the old {files} {'were' if len(exc.undone) > 1 else 'was'} put back"
    return f"{message}; putting back the old {files} failed too"


def _preflight(folder: Folder, name: str, label: str, path: str | Path, manager: str | None) -> None:
    """Refuse a target that a rename could not replace: a folder, an immutable or
    append-only file, a file another state folder manages."""
    try:
        st = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise DeployError(f"{label} {path} is a directory; point {label}_path at a file inside it")
    if label != "ca":  # one CA root file may serve several reconcilers
        refuse_foreign(folder, name, label, path, manager)
    if stat.S_ISREG(st.st_mode) and _immutable(folder, name):
        raise DeployError(
            os_error(OSError(errno.EPERM, "the file has the immutable or append-only attribute"), "replace", path)
        )


def _immutable(folder: Folder, name: str) -> bool:
    FS_IOC_GETFLAGS, IMMUTABLE, APPEND = 0x80086601, 0x10, 0x20
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder.fd)
    except OSError:
        return False
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], sys.byteorder)
    except OSError:
        return False  # a filesystem without these attributes
    finally:
        os.close(fd)
    return bool(flags & (IMMUTABLE | APPEND))
