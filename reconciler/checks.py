"""What `reconcile doctor` prints: one `Check` per line, from doctor itself and from each
issuer's `diagnose()`; and the folder probes both need."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

from reconciler.folders import private_folder_problem


class Check(NamedTuple):
    ok: bool
    what: str  # what was checked, and what was found
    hint: str = ""  # what to do about a failed check


def failed(problem: str, hint: str = "") -> Check:
    """A ✗ line from a problem written as "<what>. Fix: <how>" (folders' style), the fix as
    its hint; `hint` when the problem names no fix."""
    what, _, fix = problem.partition(". Fix: ")
    return Check(False, what, fix or hint)


def private_folder(folder: Path, label: str) -> Check | None:
    """A ✗ line when another user could change `folder`; None when it is ours alone."""
    problem = private_folder_problem(folder, label)
    return None if problem is None else failed(problem)


def writable_folder(folder: Path, label: str) -> Check:
    """Whether `folder` is, or can be created, writable by this user (a real file is made
    and removed in the nearest existing folder: permission bits do not tell about ACLs or
    read-only mounts)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():  # probing its parent instead would report a folder that can never exist as writable
        return Check(
            False,
            f"{label} {folder} cannot be created: {probe} is not a folder",
            "pass --state-dir a folder, or move that file away",
        )
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".reconciler-doctor-"):
            pass
        return Check(True, f"{label} {folder} is writable")
    except OSError as exc:
        return Check(
            False,
            f"{label} {folder} is not writable ({exc.strerror})",
            "run as root, or pass --state-dir to a folder you own",
        )
