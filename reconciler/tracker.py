"""The manifest as `--watch` sees it between saves.

Keeps the last valid manifest (in memory, and a copy in the state folder for `reconcile
status`), says what each save changed, and tells three outcomes of a save apart: valid,
invalid (log every error, keep reconciling against the last valid version), and "not
ready yet" (empty or half-written while an editor is still writing it).

What changed is a structural diff of small per-entry dicts (each `DesiredCert.source`,
the canonical JSON of one entry after defaults), keyed by name: entries whose source did
not change cost a string comparison, never a deepdiff of the whole manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reconciler.atomic import write_atomic
from reconciler.desired import last_valid_path, load_desired, load_last_valid
from reconciler.issuers import IssuerError
from reconciler.manifest import MAX_MANIFEST_BYTES, ManifestError
from reconciler.model import Desired

log = logging.getLogger("reconciler.watch")

UNCHANGED, CHANGED, INVALID, NOT_READY = "unchanged", "changed", "invalid", "not-ready"
MAX_DESCRIBED = 20  # entries described field by field per save; the rest are counted


@dataclass
class Refresh:
    outcome: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    issuer_changed: bool = False

    @property
    def touched(self) -> list[str]:
        """Names whose entry is new or different: their backoff starts afresh."""
        return self.added + self.changed


def file_stamp(path: Path) -> tuple:
    """Identity of the manifest's current content; () when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, stat.S_ISREG(st.st_mode))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _comparable(source: str) -> dict[str, Any]:
    """An entry's canonical JSON as a dict, lists of plain values as sets (SAN order never matters)."""
    entry = json.loads(source) if source else {}

    def plain_list(v) -> bool:
        return isinstance(v, list) and all(isinstance(i, (str, int, float)) for i in v)

    return {k: (set(map(str, v)) if plain_list(v) else v) for k, v in entry.items()}


def describe_entry_change(old_source: str, new_source: str) -> list[str]:
    """Field-level changes of one entry, e.g. ['duration "24h" → "48h"', 'sans + "b.example"'].
    Empty when the entries are equal once normalised (only the SAN order moved)."""
    # deepdiff is third-party and slow to import, and only --watch describes edits
    # (run_watch imports it at start, so the first save does not wait for it)
    from deepdiff import DeepDiff
    from deepdiff.helper import notpresent

    old, new = _comparable(old_source), _comparable(new_source)
    if old == new:
        return []
    out: list[str] = []
    for kind, levels in DeepDiff(old, new, view="tree").items():
        for level in levels:
            steps = level.path(output_format="list")
            where = ".".join(str(p) for p in steps if p is not None and not isinstance(p, int))
            t1 = None if level.t1 is notpresent else level.t1
            t2 = None if level.t2 is notpresent else level.t2
            if kind == "set_item_added":
                out.append(f"{where} + {json.dumps(t2)}")
            elif kind == "set_item_removed":
                out.append(f"{where} - {json.dumps(t1)}")
            elif kind.endswith("_added"):
                out.append(f"{where} set to {json.dumps(t2, default=sorted)}")
            elif kind.endswith("_removed"):
                out.append(f"{where} removed (was {json.dumps(t1, default=sorted)})")
            else:
                out.append(f"{where} {json.dumps(t1, default=sorted)} → {json.dumps(t2, default=sorted)}")
    return sorted(out)


class ManifestTracker:
    def __init__(self, settings):
        self.settings = settings
        self.path = Path(os.path.abspath(settings.manifest))
        self.copy_path = last_valid_path(settings)
        self.desired: Desired | None = None  # the last valid manifest: what passes reconcile against
        self.sources: dict[str, str] = {}
        self.stamp: tuple | None = None  # the file as last read, valid or not
        self.valid: bool | None = None
        self.invalid_since: str | None = None
        self.error: str | None = None
        self.errors = 0
        self.valid_at: str | None = None
        self._copy_digest: str | None = None

    def state(self) -> dict[str, Any]:
        """For the status store's "manifest" entry (`reconcile status` reads it)."""
        return {
            "path": str(self.path),
            "valid": bool(self.valid),
            "invalid_since": self.invalid_since,
            "error": self.error,
            "errors": self.errors,
            "last_valid_at": self.valid_at,
        }

    # ------------------------------------------------------------------ reading

    def refresh(self, force: bool = False, final: bool = True) -> Refresh:
        """Look at the manifest again. Costs a stat when the file did not change (unless
        `force`). `final`: the burst of writes has settled, so a manifest that does not
        load is invalid; otherwise it is only "not ready yet"."""
        before = file_stamp(self.path)
        if not force and self.valid is not None and before == self.stamp:
            return Refresh(UNCHANGED)
        raw: bytes | None = None
        if before and before[-1] and before[2] <= MAX_MANIFEST_BYTES:
            try:
                raw = self.path.read_bytes()
            except OSError:
                raw = None  # load_desired below reports it properly
        if file_stamp(self.path) != before:
            return Refresh(NOT_READY)  # still being written
        try:
            desired = load_desired(self.settings, save_cache=True, raw=raw)
        except (ManifestError, IssuerError) as exc:
            if not final:
                return Refresh(NOT_READY)
            self.stamp = before
            issues = [str(i) for i in exc.issues] if isinstance(exc, ManifestError) else [str(exc)]
            return self._invalid(issues)
        self.stamp = before
        return self._valid(desired, raw)

    def _invalid(self, issues: list[str]) -> Refresh:
        first_time = self.valid is not False
        if first_time:
            self.invalid_since = _now()
        self.valid, self.error, self.errors = False, issues[0], len(issues)
        if self.desired is None:
            self._fall_back_to_copy()
        keeping = (
            f"still reconciling against the last valid version (valid at {self.valid_at})"
            if self.desired is not None
            else "no valid version is known, so nothing is reconciled until it is fixed"
        )
        log.error(
            "manifest %s is invalid (%d error%s, invalid since %s); %s:",
            self.path,
            len(issues),
            "" if len(issues) == 1 else "s",
            self.invalid_since,
            keeping,
        )
        for issue in issues:
            log.error("  %s", issue)
        return Refresh(INVALID)

    def _fall_back_to_copy(self) -> None:
        """At start with an invalid manifest: the copy kept by an earlier run, if it still loads."""
        try:
            kept = load_last_valid(self.settings)
        except Exception as exc:  # a damaged copy is no reason to stop
            log.warning("cannot use the last valid copy %s: %s", self.copy_path, exc)
            return
        if kept is None:
            return
        self.desired = kept.desired
        self.sources = {c.name: c.source for c in kept.desired.certificates}
        self.valid_at = kept.saved_at
        self._copy_digest = kept.digest
        log.warning(
            "using %s, the last valid manifest (saved %s), until the manifest is fixed", self.copy_path, self.valid_at
        )

    def _valid(self, desired: Desired, raw: bytes | None) -> Refresh:
        previous, old = self.desired, self.sources
        new = {c.name: c.source for c in desired.certificates}
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        changed = [n for n in new if n in old and old[n] != new[n]]
        if previous is None:
            log.info("manifest %s: %d certificates", self.path, len(new))
        else:
            self._log_edits(previous, desired, old, new, added, removed, changed)
        if self.valid is False:
            log.info("manifest %s is valid again (it was invalid since %s)", self.path, self.invalid_since)
        self.desired, self.sources = desired, new
        self.valid, self.invalid_since, self.error, self.errors = True, None, None, 0
        self.valid_at = _now()
        if raw is not None:
            self._keep_copy(raw)
        issuer_changed = previous is not None and previous.issuer != desired.issuer
        if previous is None or added or removed or changed or issuer_changed:
            return Refresh(CHANGED, added, removed, changed, issuer_changed)
        return Refresh(UNCHANGED)

    def _log_edits(self, previous: Desired, desired: Desired, old: dict, new: dict, added, removed, changed) -> None:
        if previous.issuer != desired.issuer:
            sd = self.settings.state_dir
            old_issuer, new_issuer = previous.issuer.describe(sd), desired.issuer.describe(sd)
            log.info("manifest: issuer changed from %s to %s", old_issuer, new_issuer)
        for name in added:
            log.info("manifest: added %s", name)
        for name in removed:
            log.info("manifest: removed %s (its files stay on disk; the reconciler never deletes)", name)
        described = 0
        for name in changed:
            if described >= MAX_DESCRIBED:
                log.info("manifest: ... and %d more changed entries", len(changed) - described)
                break
            fields = describe_entry_change(old[name], new[name])
            if fields:
                log.info("manifest: changed %s: %s", name, "; ".join(fields))
                described += 1
        if not (added or removed or changed) and previous.issuer == desired.issuer:
            log.info("manifest saved; no certificate changed")

    def _keep_copy(self, raw: bytes) -> None:
        digest = hashlib.sha256(raw).hexdigest()
        if self._copy_digest is None:
            try:
                self._copy_digest = hashlib.sha256(self.copy_path.read_bytes()).hexdigest()
            except OSError:
                self._copy_digest = ""
        if digest == self._copy_digest:
            return
        try:
            write_atomic(self.copy_path, raw, mode=0o600, make_parents=True)
            self._copy_digest = digest
        except OSError as exc:
            log.warning("cannot keep a copy of the valid manifest in %s: %s", self.copy_path, exc.strerror or exc)
