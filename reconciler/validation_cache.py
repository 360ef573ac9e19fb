"""The validation cache: what already passed the manifest's schema, kept in the state folder
between runs (`<state-dir>/cache/valid-entries-<schema digest>.txt`, one digest a line).

An optimisation only: a missing or damaged file means validating again, never an error.
The manifest stage (manifest.py) reads and adds to it as a plain `Validated`; reading and
writing the file is here, with the other state files, so the core does no I/O of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from reconciler.atomic import write_atomic
from reconciler.manifest_schema import Validated, schema_digest
from reconciler.statefiles import StateFileDamaged, read_state_file

_DIGEST = re.compile(r"(?:file:)?[0-9a-f]{24,64}")


def _parse_digests(data: bytes) -> set[str]:
    """One digest per line: anything else is damage (or a way to skip validation)."""
    digests = set(data.decode("ascii").split())
    bad = next((d for d in digests if not _DIGEST.fullmatch(d)), None)
    if bad is not None:
        raise StateFileDamaged(f"{bad[:40]!r} is not an entry digest")
    return digests


class ValidationCache(Validated):
    """Digests of entries (and whole manifests) that already passed the schema, so a
    10k-entry manifest pays for validation only for what changed."""

    def __init__(self, state_dir: Path | None, repair: bool = False):
        super().__init__()
        self.path = state_dir / "cache" / f"valid-entries-{schema_digest()}.txt" if state_dir else None
        if self.path:
            try:
                found = read_state_file(self.path, _parse_digests, "validation cache", repair=repair, consequence="validating every entry again", state_dir=state_dir)
                self.known = found.value or set()
            except OSError:
                pass  # an unusable state folder: the pass (or doctor) reports it; validation does not need it

    def save(self) -> None:
        if not self.path or not self.added:
            return
        try:
            data = "\n".join(sorted(self.known | self.added)).encode()
            write_atomic(self.path, data, mode=0o600, make_parents=True)
        except OSError:
            pass  # a cache is never worth failing a pass for
