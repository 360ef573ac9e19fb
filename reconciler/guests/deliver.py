"""The delivery stage: one certificate's files into its guest, atomically inside the guest,
and the reload there. Runs after the host files are in place; the pass records the outcome.

Each file goes to a temporary name in its target folder inside the guest, created with its
final owner and mode before a byte is written (pct push --perms/--user/--group; in a VM a
shell under umask 077 that chowns and chmods before the rename); then one command renames
them all into place (key first). A kill at any step leaves the old files or the new ones in
place, at worst a temporary file the next delivery overwrites; the next pass sees the
guest's files differ from what was recorded as delivered and delivers again.
"""

from __future__ import annotations

import hashlib
import posixpath

from reconciler.faults import fault_point
from reconciler.guestfacts import GuestSpec, GuestTarget, GuestView, InGuestFile
from reconciler.guests.agent import GuestRun
from reconciler.guests.proxmox import RUNNING, Guest, GuestError, GuestMissing, ProxmoxCLI

TMP_SUFFIX = ".reconciler-new"

# one line per file: "<uid> <gid> <user> <group> <octal mode> <sha256>", or "missing"
_LOOK = """for f in "$@"; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then
    echo "$(stat -c '%u %g %U %G %a' "$f") $(sha256sum < "$f" | cut -d ' ' -f 1)"
  else echo missing; fi
done
"""
_RENAME = """set -e
while [ "$#" -gt 1 ]; do mv -f -- "$1" "$2"; shift 2; done
"""
# what pct and qm say when the guest is not running ("QEMU guest agent is not running" is
# a running VM whose agent does not answer: unreachable, not stopped)
_NOT_RUNNING = ("' not running!", "can only push files to a running", "is not running")


def guest_of(spec: GuestSpec) -> Guest:
    return Guest(spec.id, spec.type)


def look(cli: ProxmoxCLI, spec: GuestSpec, paths: list[str]) -> GuestView:
    """The guest's state and, when it runs, each path's sha256, owner and mode: one command."""
    guest = guest_of(spec)
    try:
        run = cli.run(guest, _LOOK, tuple(paths))
    except GuestMissing as exc:
        return GuestView("missing", str(exc))
    except GuestError as exc:
        if any(words in exc.message for words in _NOT_RUNNING) and "guest agent" not in exc.message:
            return GuestView("stopped", exc.message)
        return GuestView("unreachable", str(exc))
    if not run.ok:
        return GuestView("unreachable", f"looking at the files in {guest} failed: {run.describe()}")
    lines = run.out.splitlines()
    if len(lines) != len(paths):
        return GuestView(
            "unreachable", f"looking at the files in {guest} printed {len(lines)} lines for {len(paths)} files"
        )
    return GuestView(RUNNING, files={p: _file_of(line) for p, line in zip(paths, lines, strict=True)})


def _file_of(line: str) -> InGuestFile:
    parts = line.split()
    if len(parts) != 6:
        return InGuestFile(None)
    uid, gid, user, group, mode, digest = parts
    return InGuestFile(digest, int(uid), int(gid), user, group, int(mode, 8))


def temporary(path: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}{TMP_SUFFIX}")


def deliver(cli: ProxmoxCLI, spec: GuestSpec, payload: dict[str, bytes]) -> dict[str, dict]:
    """Every target of `spec` with its bytes from `payload` (label → bytes); returns what
    the status store keeps per guest path. Raises GuestError; nothing is renamed into place
    unless every file was written."""
    guest = guest_of(spec)
    targets = [t for t in spec.targets() if t.label in payload]
    for target in targets:
        cli.push(guest, payload[target.label], temporary(target.path), target.user, target.group, target.mode)
        fault_point("guest_pushed")
    pairs = [arg for t in targets for arg in (temporary(t.path), t.path)]
    run = cli.run(guest, _RENAME, tuple(pairs))
    if not run.ok:
        raise GuestError(
            f"moving the delivered files into place in {guest} failed: {run.describe()}",
            "do the target folders exist inside the guest?",
        )
    fault_point("guest_renamed")
    return {t.path: _delivered(t, payload[t.label]) for t in targets}


def _delivered(target: GuestTarget, data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "owner": target.owner, "mode": target.mode}


def reload(cli: ProxmoxCLI, spec: GuestSpec) -> GuestRun:
    """The guest's reload command, run by /bin/sh inside it."""
    assert spec.reload
    return cli.run(guest_of(spec), spec.reload)
