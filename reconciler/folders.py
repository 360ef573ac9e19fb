"""Folders root writes into: walked one name at a time, never through a link someone else planted.

`os.open(path)` follows every symlink on the way. If a folder above a key can be changed
by another user (the certificate's owner, say, who may own its folder), that user can
swap a folder for a link and send root's writes anywhere. So every write starts from `/`
and opens each folder with `O_NOFOLLOW|O_DIRECTORY` relative to the one above it; the
temporary file, its owner, its mode and the rename all act on the final folder's
descriptor, which a later swap of any name on the path cannot redirect.

A symlink on the way is followed only where nobody but root (or the user we run as)
could have put it there: in a folder owned by root or us that no group or other user can
write, or in a sticky folder like /tmp when the link itself is ours. A link in a folder the
certificate's owner (or anyone else) can write is refused: that is the attack.

Each folder opened is also checked like sshd's `StrictModes` (owner root, us or, for
target folders, the certificate's owner; writable by no group or other user unless sticky)
on its open descriptor, so what is checked is what is written into.

One deployment's files (a key, its certificate, a CA file) share most of the way from `/`:
their walks share the folders opened and checked on it (`Walked`), moments apart, held
open until the deployment ends, as the final folders themselves are.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ReconcilerError

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_MAX_LINKS = 40  # like the kernel's own limit


class FolderError(ReconcilerError, OSError):
    """A folder on the way cannot be trusted or opened. `str()` is the whole message, the fix
    included. An OSError too, so a certificate's write failing on it fails that certificate."""

    def __init__(self, code: int, message: str):
        OSError.__init__(self, code, message)
        self.hint = ""
        self._text = message

    @property
    def message(self) -> str:  # OSError's args are (errno, text)
        return self._text


def trusted_uids() -> set[int]:
    return {0, os.geteuid()}


def unsafe(
    st: os.stat_result, target: Path | str, allowed: set[int] | frozenset[int], sticky_ok: bool = True
) -> tuple[str, str] | None:
    """(what is wrong, the fix) when someone outside `allowed` (uids) can change the file
    or folder `st` describes; None when only they can."""
    is_dir = stat.S_ISDIR(st.st_mode)
    mode = stat.S_IMODE(st.st_mode)
    owner_ok = st.st_uid in allowed
    writable = bool(mode & 0o022) and not (sticky_ok and is_dir and mode & stat.S_ISVTX)
    if owner_ok and not writable:
        return None
    who = []
    if not owner_ok:
        who.append(f"its owner {user_name(st.st_uid)}")
    if writable and mode & 0o020:
        who.append(f"group {group_name(st.st_gid)}")
    if writable and mode & 0o002:
        who.append("every user")
    fixes = []
    if not owner_ok:
        fixes.append(f"chown root {target}")
    if writable:
        fixes.append(f"chmod go-w {target}")
    kind = "folder" if is_dir else "file"
    return (
        f"{kind} {target} (owner {user_name(st.st_uid)}, group {group_name(st.st_gid)}, mode {mode:04o}) "
        f"can be written by {' and '.join(who)}",
        " && ".join(fixes),
    )


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@dataclass
class Folder:
    """An open folder: `fd` for the *at() calls, `path` where it really is (no link in it)."""

    fd: int
    path: Path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _link_trusted(parent: os.stat_result, link: os.stat_result) -> bool:
    """Only root (or we) could have put this link here, and nobody else can swap it."""
    trusted = trusted_uids()
    if parent.st_uid not in trusted:
        return False
    mode = stat.S_IMODE(parent.st_mode)
    if not mode & 0o022:
        return True
    return bool(mode & stat.S_ISVTX) and link.st_uid in trusted


class Walked:
    """Folders walks from / reached and checked, kept open by their real path and the owners
    they were checked for, until `close()`. A walk given one continues from the deepest of
    them on its way instead of from / again: one deployment's files (a key and its
    certificate, targets.Targets) usually share most of the way, walked moments before by
    the same rules. The folder a walk ends in is handed to its caller, not kept here."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, frozenset[int] | None], int] = {}

    def deepest(self, names: list[str], owners: frozenset[int] | None) -> tuple[int, int | None, str]:
        """(how many of `names` are walked, the folder they lead to, its path); (0, None, "/")
        when not even / is open yet."""
        for i in range(len(names), -1, -1):
            real = "/" + "/".join(names[:i])
            fd = self._fds.get((real, owners))
            if fd is not None:
                return i, fd, real
        return 0, None, "/"

    def add(self, real: str, owners: frozenset[int] | None, fd: int) -> None:
        self._fds[(real, owners)] = fd

    def take(self, real: str, owners: frozenset[int] | None) -> int:
        return self._fds.pop((real, owners))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def open_folder(
    folder: Path | str,
    allowed: set[int] | None = None,
    create_mode: int | None = None,
    what: str = "folder",
    walked: Walked | None = None,
) -> Folder:
    """Open `folder` from `/` one name at a time (see the module's docstring).

    `allowed`: uids that may own each folder on the way (root and us always may); None
    skips that StrictModes check (links are still only followed where trusted).
    `create_mode`: create missing folders, the last with this mode and the ones above it
    0755, whatever the umask. `what` names the path in errors ("folder of key /a/b.key").
    `walked`: folders walked to before, kept open by the caller (see Walked)."""
    path = os.path.normpath(os.path.abspath(os.fspath(folder)))
    own = walked is None
    walked = Walked() if walked is None else walked
    links = 0
    try:
        while True:
            try:
                return _walk(path, allowed, create_mode, what, walked)
            except _Restart as again:
                links += 1
                if links > _MAX_LINKS:
                    raise FolderError(errno.ELOOP, f"{what} {folder}: too many levels of symbolic links") from None
                path = again.path
    finally:
        if own:
            walked.close()


class _Restart(Exception):
    def __init__(self, path: str):
        self.path = path


def _walk(path: str, allowed: set[int] | None, create_mode: int | None, what: str, walked: Walked) -> Folder:
    """Every folder opened on the way is kept in `walked` once it passed its check; the
    last one is handed over as the Folder."""
    names = [n for n in path.split("/") if n]
    # the owners each folder may have, worked out once per walk (geteuid is a system call)
    owners = None if allowed is None else frozenset(allowed | trusted_uids())
    start, fd, real = walked.deepest(names, owners)
    if fd is None:
        fd = _checked(os.open("/", _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), real, owners, what)
        walked.add(real, owners, fd)
    for i in range(start, len(names)):
        name = names[i]
        here = os.path.join(real, name)
        where = f"{what} {path}: {here}"
        nfd = _open_below(fd, name, create_mode if create_mode is None or i == len(names) - 1 else 0o755, where)
        if nfd is None:  # a link, or no folder at all
            target = _trusted_link(fd, name, where, real)
            raise _Restart(path if target is None else os.path.normpath(os.path.join(real, target, *names[i + 1 :])))
        fd, real = _checked(nfd, here, owners, what), here
        walked.add(real, owners, fd)
    return Folder(walked.take(real, owners), Path(real))


def _checked(fd: int, real: str, owners: frozenset[int] | None, what: str) -> int:
    """`fd`, once the folder passed _check; closed when it did not."""
    try:
        _check(fd, real, owners, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_below(fd: int, name: str, create_mode: int | None, where: str) -> int | None:
    """The folder `name` in the folder `fd`, opened without following a link (None: `name`
    is a link or no folder); a missing one made with `create_mode` (None: it must exist).
    The open comes first and a stat only when it fails: a folder is the usual answer, and
    this way it costs one system call."""
    for _ in range(2):  # a folder made here is opened on the second round
        try:
            return os.open(name, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            if create_mode is None:
                raise FolderError(errno.ENOENT, f"{where} does not exist") from None
            _make(fd, name, create_mode)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                return None
            raise
    raise FolderError(errno.ENOENT, f"{where} does not exist")  # removed again as soon as it was made


def _trusted_link(fd: int, name: str, where: str, real: str) -> str | None:
    """The target of `name`, which could not be opened as a folder, when it is a link only
    root (or we) could have planted; None when it is gone (look again). Anything else raises:
    a link someone else could swap, or no folder at all."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISLNK(st.st_mode):
        raise FolderError(errno.ENOTDIR, f"{where} is not a folder")
    parent = os.fstat(fd)
    target = _readlink(name, fd)
    if not _link_trusted(parent, st):
        raise FolderError(errno.ELOOP, _untrusted_link(where, target, parent, st, real))
    return target


def _untrusted_link(where: str, target: str, parent: os.stat_result, link: os.stat_result, folder: str) -> str:
    found = unsafe(parent, folder, trusted_uids())
    why = found[0] if found else f"sticky folder {folder} holds a link that belongs to {user_name(link.st_uid)}"
    return (
        f"{where} is a symlink to {target}, and {why}, not only root; refusing to follow it: "
        "that user could point it at another service's folder. Point the manifest at the real path"
    )


def _readlink(name: str, fd: int) -> str:
    try:
        return os.readlink(name, dir_fd=fd)
    except OSError:
        return "?"


def _check(fd: int, real: str, owners: frozenset[int] | None, what: str) -> None:
    if owners is None:
        return
    found = unsafe(os.fstat(fd), real, owners)
    if found:
        raise FolderError(
            errno.EPERM,
            f"{found[0]}, not only root and the certificate's owner; refusing to write there, "
            f"as sshd's StrictModes would. Fix: {found[1]}",
        )


def _make(parent_fd: int, name: str, mode: int) -> None:
    """mkdir with exactly `mode`: created 0700 (nobody else can enter it meanwhile), then
    chmod'ed, so the umask never widens or narrows it."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        return  # someone (another pass) made it meanwhile: it is checked like any other
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def resolve_file(
    path: str | Path,
    allowed: set[int] | None,
    follow_link: bool,
    create_mode: int | None = None,
    what: str = "file",
    walked: Walked | None = None,
) -> tuple[Folder, str]:
    """The open folder `path` lands in and the file's name there. `follow_link`
    ("allow_symlink": true): a link at `path` itself is followed to its final target,
    under the same rule as every folder on the way (only where nobody else could plant it).
    `walked`: see open_folder."""
    current = os.path.normpath(os.path.abspath(os.fspath(path)))
    for _ in range(_MAX_LINKS):
        folder = open_folder(os.path.dirname(current), allowed, create_mode, f"folder of {what}", walked)
        name = os.path.basename(current)
        if not follow_link:
            return folder, name
        try:
            st = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
        except FileNotFoundError:
            return folder, name
        except BaseException:
            folder.close()
            raise
        if not stat.S_ISLNK(st.st_mode):
            return folder, name
        parent = os.fstat(folder.fd)
        target = _readlink(name, folder.fd)
        folder.close()
        if not _link_trusted(parent, st):
            raise FolderError(
                errno.ELOOP,
                _untrusted_link(f"{what} {path}", target, parent, st, str(folder.path)) + " (even with allow_symlink)",
            )
        current = os.path.normpath(os.path.join(str(folder.path), target))
    raise FolderError(errno.ELOOP, f"{what} {path}: too many levels of symbolic links")


def private_folder_problem(folder: Path, label: str) -> str | None:
    """The state folder and the embedded CA's folder: everything the reconciler trusts next
    (which CA to issue from, which hooks are owed) is read from them, so they and every
    folder above them must belong to root or us and be writable by nobody else (sticky
    folders above excepted, like /tmp). None when that holds (or the folder does not exist
    yet: it is created 0700)."""
    path = Path(os.path.abspath(folder))
    chain = [path, *path.parents]
    real = Path(os.path.realpath(path))
    if real != path:
        chain += [real, *real.parents]
    for f in chain:
        try:
            st = os.stat(f)
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there (yet): creating it, or using it, fails with its own error
        except OSError as exc:
            return f"{label} {folder}: cannot check {f}: {exc.strerror or exc}"
        found = unsafe(st, f, trusted_uids(), sticky_ok=f not in (path, real))
        if found:
            return (
                f"{label} {folder} is not safe: {found[0]}, not only root; that user could swap what the reconciler "
                f"trusts there (the CA it issues from, the hooks it owes). Refusing to use it. Fix: {found[1]}"
            )
    return None


def require_private(folder: Path, label: str, create: bool = False) -> None:
    """Raise FolderError unless `folder` passes `private_folder_problem`; `create`: make it
    (0700, the folders above it 0755, whatever the umask) once the folders above are safe."""
    problem = private_folder_problem(folder, label)
    if problem is None and create and not os.path.isdir(folder):
        open_folder(folder, None, 0o700, label).close()
        problem = private_folder_problem(folder, label)
    if problem:
        raise FolderError(errno.EPERM, problem)
