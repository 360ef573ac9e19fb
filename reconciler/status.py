"""The status store: what the reconciler remembers between passes (hooks pending, last
issuance, last error). A versioned JSON file in the state folder, written atomically.
A corrupt or foreign file is a warning and a fresh start, never a crash: everything
that matters for correctness is re-read from disk on every pass anyway."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from reconciler.atomic import write_atomic
from reconciler.faults import fault_point

VERSION = 1
log = logging.getLogger("reconciler.status")


class StatusError(OSError):
    """The status store cannot be written. A pass stops there rather than forget a pending
    hook; what it already wrote stays, and the next pass re-reads it from disk."""


class StatusStore:
    def __init__(self, state_dir: Path):
        self.path = state_dir / "status.json"
        self.data: dict[str, Any] = {"version": VERSION, "certificates": {}, "manifest": {}}
        self.warning: str | None = None
        self._saved: bytes | None = None
        try:
            data = self.path.read_bytes()
            raw = json.loads(data)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.warning = f"status store {self.path} is unreadable ({exc}); starting afresh from what is on disk"
            log.warning(self.warning)
            return
        if not isinstance(raw, dict) or raw.get("version") != VERSION or not isinstance(raw.get("certificates"), dict):
            self.warning = f"status store {self.path} is not a version {VERSION} status file; starting afresh from what is on disk"
            log.warning(self.warning)
            return
        raw.setdefault("manifest", {})
        self.data = raw
        self._saved = data  # save() compares against it: an unchanged store is not rewritten

    def cert(self, name: str) -> dict[str, Any]:
        entry = self.data["certificates"].setdefault(name, {})
        if not isinstance(entry, dict):
            entry = self.data["certificates"][name] = {}
        return entry

    def get(self, name: str) -> dict[str, Any]:
        entry = self.data["certificates"].get(name)
        return entry if isinstance(entry, dict) else {}

    def hooks_pending(self, serials: dict[str, str | None] | None = None) -> frozenset[str]:
        """Certificates whose post-renewal command still has to succeed.

        `serials` (name → serial on disk now) catches a pass killed after writing a
        certificate but before recording it: the entry still says "deploying from
        serial X", and the disk no longer holds X, so the content changed."""
        pending = set()
        for name, e in self.data["certificates"].items():
            if not isinstance(e, dict):
                continue
            if e.get("hook_pending"):
                pending.add(name)
            elif "deploying_from" in e and serials is not None and name in serials and serials[name] is not None and serials[name] != e["deploying_from"]:
                pending.add(name)
        return frozenset(pending)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.data["manifest"]

    def forget_except(self, names: set[str]) -> None:
        for name in list(self.data["certificates"]):
            if name not in names:
                del self.data["certificates"][name]

    def save(self) -> None:
        """Write the store if anything in it changed: a pass with nothing to do writes nothing."""
        payload = _encode(self.data)
        if payload == self._saved:
            return
        fault_point("before_status")
        try:
            write_atomic(self.path, payload, mode=0o600, make_parents=True)
        except OSError as exc:
            import errno

            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StatusError(
                f"cannot write the status store {self.path}: {exc.strerror or exc}"
                + ("; the filesystem is full" if full else "")
                + ". The pass stopped there: certificates and keys already in place stay as they are (old or complete new), "
                "nothing is half-written, and the next pass re-reads them from disk. "
                + ("Free space in the state folder and run again" if full else "Check --state-dir and run again")
            ) from None
        self._saved = payload
        fault_point("after_status")


def _encode(data: dict) -> bytes:
    # sorted keys so equal content is equal bytes; no indent, so Python's C encoder runs
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def read_only(state_dir: Path) -> StatusStore:
    """For --plan and status: the same store, never saved."""
    return StatusStore(state_dir)
