"""folder_checks: may root write keys below these folders? Reads (stat, realpath) only.

The read-only checks `observe` and the pass make before anything is written, in the spirit
of sshd's StrictModes; folders.py opens the folders for the writes themselves.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from reconciler.folders import unsafe
from reconciler.model import DesiredCert


def folder_problem(path: str | Path, owner_uid: int | None, memo: dict | None = None) -> str | None:
    """sshd's StrictModes for the folders above a file we write as root: each existing folder
    from the file's up to / must belong to root (or to the reconciler's user, or to the
    certificate's owner) and be writable by no group and no other user, unless it is sticky
    like /tmp (then others cannot rename or delete what is not theirs). Otherwise whoever can
    write there can swap the files, or a folder, for a symlink between our check and our write.
    Checked along the path as written and along its resolved form. `memo`: per pass, by folder."""
    if memo is not None:
        # files share folders: resolving the path above each one (realpath, a stat per
        # level) once per folder instead of once per file is most of a 10k-file pass
        # keyed by the path up to its last "/" (its folder, as written): os.path.dirname
        # costs four times as much, once for each of 20,000 files in a 10k-entry pass
        text = os.fspath(path)
        whole = ("file-folder", text[: text.rfind("/") + 1], owner_uid)
        if whole not in memo:
            memo[whole] = _folder_problem(path, owner_uid, memo)
        return memo[whole]
    return _folder_problem(path, owner_uid, None)


def _folder_problem(path: str | Path, owner_uid: int | None, memo: dict | None) -> str | None:
    allowed = {0, os.geteuid()} | ({owner_uid} if owner_uid is not None else set())
    for f in _folders_above(path):
        key = (str(f), owner_uid)
        if memo is not None and key in memo:
            found = memo[key]
        else:
            found = _writable_by_others(f, allowed)
            if memo is not None:
                memo[key] = found
        if found:
            return (
                f"{found[0]}, not only root and the certificate's owner; refusing to write keys there, "
                f"as sshd's StrictModes would. Fix: {found[1]}"
            )
    return None


def manifest_trust_problem(path: Path) -> str | None:
    """Running as root, a manifest (or a folder above it) that another user can write hands
    that user root: its post-renewal commands run as root. None when it is safe (or when we
    are not root, and commands run as our own user anyway)."""
    if os.geteuid() != 0:
        return None
    for f in (Path(os.path.realpath(path)), *_folders_above(path)):
        found = _writable_by_others(f, {0})
        if found:
            return (
                f"the manifest is not trusted: {found[0]}, and its post_renewal_commands would run as root; "
                f"refusing to run them. Fix: {found[1]}; or pass --allow-untrusted-manifest "
                "(env RECONCILER_ALLOW_UNTRUSTED_MANIFEST=1) if everyone who can write it may run commands as root"
            )
    return None


def _folders_above(path: str | Path) -> list[Path]:
    """The folders above `path`, along the path as written and along its resolved form."""
    folder = Path(os.path.abspath(path)).parent
    out = [folder, *folder.parents]
    real = Path(os.path.realpath(folder))
    if real != folder:
        out += [real, *real.parents]
    return out


def _writable_by_others(target: Path, allowed: set[int]) -> tuple[str, str] | None:
    """(what is wrong, the fix) when someone outside `allowed` (uids) can write `target`."""
    try:
        st = os.stat(target)
    except OSError:
        return None  # not there yet (created when written) or not reachable: the write says so
    if not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
        return None  # a file where a folder should be: the write fails with its own error
    return unsafe(st, target, allowed)


def folders_problem(cert: DesiredCert, memo: dict | None) -> str | None:
    """The first folder problem of any path `cert` writes (see folder_problem)."""
    paths = [cert.cert_path, cert.key_path] + ([cert.ca_path] if cert.ca_path is not None else [])
    if cert.allow_symlink:  # the writes land beside the link's final target
        paths += [os.path.realpath(p) for p in (cert.cert_path, cert.key_path)]
    for p in paths:
        problem = folder_problem(p, cert.uid, memo)
        if problem:
            return problem
    return None
