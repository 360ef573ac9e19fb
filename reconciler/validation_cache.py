"""The validation cache: what earlier loads of the manifest found, kept in the state folder
between runs. Two files in `<state-dir>/cache/`, both named by the schema's digest:

* `valid-entries-<digest>.txt`: one "file:<sha256>" a line, each a whole manifest that loaded,
  so its schema check is not repeated;
* `derived-<digest>.json`: what the last manifest that loaded derived from its bytes alone,
  entry by entry (manifest.Derived), so the same bytes are not resolved again.

An optimisation only: a missing or damaged file means working it out again, never an error.
The manifest stage reads and adds to it as a plain `Validated`; reading and writing the files
is here, with the other state files, so the core does no I/O of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from reconciler.atomic import write_atomic
from reconciler.manifest import DERIVED_VERSION, Derived, Validated
from reconciler.manifest_schema import schema_digest
from reconciler.statefiles import StateFileDamaged, read_state_file

_DIGEST = re.compile(r"(?:file:)?[0-9a-f]{24,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _parse_digests(data: bytes) -> set[str]:
    """One digest per line: anything else is damage (or a way to skip validation)."""
    digests = set(data.decode("ascii").split())
    bad = next((d for d in digests if not _DIGEST.fullmatch(d)), None)
    if bad is not None:
        raise StateFileDamaged(f"{bad[:40]!r} is not an entry digest")
    return digests


def _parse_derived(data: bytes) -> Derived | None:
    """Derived values of the wrong shape are damage; those of another version are just old."""
    doc = json.loads(data)
    if doc["version"] != DERIVED_VERSION:
        return None
    manifest, digest, rows = doc["manifest"], doc["digest"], doc["entries"]
    if (
        not isinstance(manifest, str)
        or not isinstance(digest, str)
        or not _SHA256.fullmatch(digest)
        or not isinstance(rows, list)
    ):
        raise StateFileDamaged("its manifest, digest or entries are not what a load writes")
    bad = next((i for i, row in enumerate(rows) if not _is_row(row)), None)
    if bad is not None:
        raise StateFileDamaged(f"entry {bad} is not [common name, [SANs], cert path, key path, ca path or null]")
    return Derived(manifest, digest, rows)


def _is_row(row: Any) -> bool:
    # one call per entry of every warm load: exact type checks, no slices copied
    return (
        type(row) is list
        and len(row) == 5
        and type(row[0]) is str
        and type(row[2]) is str
        and type(row[3]) is str
        and type(row[1]) is list
        and all(type(s) is str for s in row[1])
        and (row[4] is None or type(row[4]) is str)
    )


class ValidationCache(Validated):
    """What earlier loads found, read from the state folder (`state_dir` None: nothing)."""

    def __init__(self, state_dir: Path | None, repair: bool = False):
        super().__init__()
        folder = state_dir / "cache" if state_dir else None
        self.path = folder / f"valid-entries-{schema_digest()}.txt" if folder else None
        self.derived_path = folder / f"derived-{schema_digest()}.json" if folder else None
        if self.path and self.derived_path:
            read: dict[str, Any] = {
                "repair": repair,
                "consequence": "validating every entry again",
                "state_dir": state_dir,
            }
            try:
                self.known = read_state_file(self.path, _parse_digests, "validation cache", **read).value or set()
                self.derived = read_state_file(self.derived_path, _parse_derived, "validation cache", **read).value
            except OSError:
                pass  # an unusable state folder: the pass (or doctor) reports it; validation does not need it
        self._read = self.derived

    def save(self) -> None:
        try:
            if self.path and self.added:
                write_atomic(
                    self.path, "\n".join(sorted(self.known | self.added)).encode(), mode=0o600, make_parents=True
                )
            if self.derived_path and self.derived is not None and self.derived is not self._read:
                d = self.derived
                doc = {"version": DERIVED_VERSION, "manifest": d.manifest, "digest": d.digest, "entries": d.entries()}
                write_atomic(
                    self.derived_path, json.dumps(doc, separators=(",", ":")).encode(), mode=0o600, make_parents=True
                )
        except OSError:
            pass  # a cache is never worth failing a pass for
