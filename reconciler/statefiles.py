"""Reading the files in the state folder (status store, caches): validated on read, and a
damaged one is set aside as `<name>.bad-<timestamp>` with a warning naming it, then rebuilt.

Everything that decides what a pass does is re-read from the managed files on every pass,
so a state file of the wrong shape costs at most a cache rebuild (or, for the status store,
one more run of a hook it can no longer vouch for), never a crash and never a stuck loop.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from reconciler.errors import ReconcilerError

log = logging.getLogger("reconciler.state")


class StateFileDamaged(ValueError):
    """A state file (or one record of it) has the wrong shape. `salvaged`: what could be kept."""

    def __init__(self, message: str, salvaged: Any = None):
        super().__init__(message)
        self.salvaged = salvaged


class StatusError(ReconcilerError, OSError):
    """The state folder cannot be used, or the status store cannot be written. A pass stops
    there rather than forget an owed hook; what it already wrote stays, and the next pass
    re-reads it from disk. (Defined here, below the status store, so that the caches the pure
    core reads can raise it too; `reconciler.status` re-exports it.)"""


@dataclass(frozen=True)
class Found:
    value: Any = None  # None: absent or set aside
    raw: bytes | None = None
    warning: str | None = None


def check_state_dir(state_dir: Path) -> None:
    """A state folder that is not a folder, or that we cannot enter, is a clear error
    (StatusError: exit 1) before anything is read from or written to it."""
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        return  # created on first use
    except OSError as exc:
        raise _state_dir_error(state_dir, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise _state_dir_error(state_dir, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    if not os.access(state_dir, os.R_OK | os.W_OK | os.X_OK):
        raise _state_dir_error(state_dir, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))


def _state_dir_error(state_dir: Path, exc: OSError) -> Exception:
    if exc.errno == errno.ENOTDIR:
        blocker = next(
            (p for p in reversed((state_dir, *state_dir.parents)) if p.exists() and not p.is_dir()), state_dir
        )
        where = "is not a folder" if blocker == state_dir else f"cannot be a folder: {blocker} is a file"
        return StatusError(
            f"the state folder {state_dir} {where}; "
            "move that file away or choose another with --state-dir (env RECONCILER_STATE_DIR)"
        )
    hint = (
        "give this user read, write and search access to it "
        "(it should be mode 0700 and owned by the user running reconcile), or choose another with --state-dir"
        if exc.errno in (errno.EACCES, errno.EPERM)
        else "check --state-dir (env RECONCILER_STATE_DIR)"
    )
    return StatusError(f"cannot use the state folder {state_dir}: {exc.strerror or exc}; {hint}")


def read_state_file(
    path: Path,
    parse: Callable[[bytes], Any],
    what: str,
    *,
    repair: bool = True,
    consequence: str = "rebuilding it",
    state_dir: Path | None = None,
) -> Found:
    """`parse(bytes)` returns the value or raises (ValueError, StateFileDamaged, or any shape
    error such as KeyError/TypeError). A damaged file is renamed aside when `repair`.
    `state_dir`: the state folder `path` is in (default: its parent)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Found()
    except OSError as exc:
        return _unreadable(path, exc, what, repair, consequence, Path(state_dir or path.parent))
    try:
        return Found(parse(data), data)
    except StateFileDamaged as exc:
        found = _damaged(path, what, str(exc), repair, consequence)
        return Found(exc.salvaged, None, found.warning) if exc.salvaged is not None else found
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        return _damaged(path, what, f"it has the wrong shape ({reason})", repair, consequence)


def _unreadable(path: Path, exc: OSError, what: str, repair: bool, consequence: str, state_dir: Path) -> Found:
    """A state file that cannot be read. A file where one of the state folder's own folders
    belongs (cache/), or one of them that cannot be entered, is damage like any other: set
    aside and rebuilt; the state folder itself being unusable is an error."""
    folder_what = what.split(" ")[-1] + " folder"
    if isinstance(exc, NotADirectoryError):
        folder = next((p for p in reversed(path.parents) if p.is_relative_to(state_dir) and not p.is_dir()), state_dir)
        if folder == state_dir:
            raise _state_dir_error(state_dir, exc) from None
        return _damaged(folder, folder_what, "it is a file, not a folder", repair, consequence)
    if isinstance(exc, IsADirectoryError):
        return _damaged(path, what, "it is a folder, not a file", repair, consequence)
    if isinstance(exc, PermissionError):
        blocked = next(
            (p for p in reversed(path.parents) if p.is_relative_to(state_dir) and not os.access(p, os.X_OK)), None
        )
        if blocked == state_dir:
            raise _state_dir_error(state_dir, exc) from None
        if blocked is not None:
            return _damaged(blocked, folder_what, f"it cannot be entered ({exc.strerror})", repair, consequence)
    return _damaged(path, what, f"it cannot be read ({exc.strerror or exc})", repair, consequence)


def _damaged(path: Path, what: str, reason: str, repair: bool, consequence: str) -> Found:
    if not repair:
        warning = f"the {what} {path} is damaged: {reason}; reading around it (the next pass sets it aside)"
        log.warning("%s", warning)
        return Found(warning=warning)
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
    try:
        os.rename(path, aside)
        where = f"set aside as {aside}"
    except OSError as exc:
        where = f"could not be set aside ({exc.strerror or exc}); it will be overwritten"
    warning = f"the {what} {path} is damaged: {reason}; {where}; {consequence}"
    log.warning("%s", warning)
    return Found(warning=warning)


PRIVATE = "private"


def private_dir(state_dir: Path) -> Path:
    """A 0700 folder in the state folder for secrets that must exist as files for a moment
    (OpenSSL loads a client certificate and key only from a file): never a shared /tmp,
    where a killed pass would leave the key for anyone to find."""
    path = state_dir / PRIVATE
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise StatusError(f"{path} is not a folder owned by this user; remove it so the reconciler can recreate it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def sweep_private(state_dir: Path) -> list[Path]:
    """Remove what a killed pass left in the private folder, and the /tmp/reconciler-mtls-*
    folders of versions that kept client credentials there (ours only, never a link)."""
    removed: list[Path] = []
    folders = []
    try:
        folders += [state_dir / PRIVATE / name for name in os.listdir(state_dir / PRIVATE)]
    except OSError:
        pass
    try:
        tmp = Path(tempfile.gettempdir())
        folders += [tmp / name for name in os.listdir(tmp) if name.startswith("reconciler-mtls-")]
    except OSError:
        pass
    for path in folders:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.geteuid():
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                continue
        removed.append(path)
    return removed
