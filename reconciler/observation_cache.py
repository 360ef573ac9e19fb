"""The observation cache (`<state-dir>/cache/observed.json`): parsed certificate facts keyed
by the files' identity, so a steady-state pass costs a `stat` per file.

A row is keyed by the cert and key paths and holds (dev, inode, size, mtime, ctime) of both
files and the digest of the trust anchors it was checked against; any change of either
means the row is not used. It also holds the state folder each file was marked with
(managed.py) when that mark is the file's extended attribute: setting or removing one changes
the ctime, so a hit needs no `getxattr`. What a run observes is kept as values and turned into rows only
when a pass saves (`--plan` never does, so it never pays for it). Damaged or stale rows are
re-read from the certificates, never an error (docs/design.md, "Caches").
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reconciler.atomic import write_atomic
from reconciler.model import CertFacts, DesiredCert, FileState, Observed
from reconciler.parse import Trust
from reconciler.statefiles import StateFileDamaged, read_state_file

# 3: SANs read typed (a dNSName that spells an address is no IP SAN); 4: usages, chains, CA files;
# 5: marks; 6: facts as a list, a matching key's id as null
CACHE_VERSION = 6

# the state folder marked on the cert and on the key file (managed.read_mark), kept in a row
# only when both are the files' extended attributes (None: read them again every time)
Marks = tuple[str | None, str | None]


class ObservationCache:
    """Parsed facts keyed by the files' identity; stale or damaged entries are simply re-read.
    Every method that reads or writes a row marks its key used: save() drops the others."""

    def __init__(self, state_dir: Path | None, repair: bool = True, keep: bool = True):
        self.path = state_dir / "cache" / "observed.json" if state_dir else None
        # `keep`: remember what this process observes, for save() and later passes; a
        # read-only run (--plan, status) never saves, and keeping 50,000 certificates' values
        # and keys would cost it a sixth of its memory
        self.keep = keep
        self.entries: dict[str, Any] = {}  # rows, as read or as last saved
        # observed in this process and not yet a row: (Observed, trust digest, marks) by key
        self.fresh: dict[str, tuple[Observed, str, Marks | None]] = {}
        # keys asked for since the last save: a row no one asked for is a file no longer managed
        self.used: set[str] = set()
        self.dirty = False
        if self.path:
            # `repair`: only passes that may write set a damaged cache aside (--plan never writes)
            found = read_state_file(
                self.path,
                _parse_cache,
                "observation cache",
                repair=repair,
                consequence="re-reading the certificates",
                state_dir=state_dir,
            )
            self.entries = found.value or {}

    @staticmethod
    def _key(cert: DesiredCert) -> str:
        return f"{cert.cert_path}\0{cert.key_path}"

    def _mark(self, key: str) -> None:
        if self.keep:
            self.used.add(key)

    def get(
        self, cert: DesiredCert, cert_file: FileState, key_file: FileState, trust: Trust
    ) -> tuple[Observed, Marks | None] | None:
        """(what was observed of these very files, the marks they had then) or None."""
        key = self._key(cert)
        self._mark(key)
        if not cert_file.present or not key_file.present:
            return None
        if key in self.fresh:
            o, digest, marks = self.fresh[key]
            if o.cert_file.stamp != cert_file.stamp or o.key_file.stamp != key_file.stamp or digest != trust.digest:
                return None
            hit = Observed(
                cert_file,
                key_file,
                o.cert,
                None,
                o.key_public_id,
                None,
                o.chains_to_issuer,
                issuer_root=trust.root_for(cert),
            )
            return hit, marks
        # a run that keeps nothing reads each row once: dropped as it becomes values, its
        # memory holds those values instead of growing the process by the whole file's rows
        row = self.entries.get(key) if self.keep else self.entries.pop(key, None)
        if not row or row[0] != list(cert_file.stamp) or row[1] != list(key_file.stamp) or row[2] != trust.digest:
            return None
        try:
            facts = _facts_of(row[3])
        except (TypeError, ValueError, OverflowError):
            return None
        key_id = facts.public_key_id if row[4] is None else row[4]
        hit = Observed(cert_file, key_file, facts, None, key_id, None, row[5], issuer_root=trust.root_for(cert))
        return hit, None if row[6] is None else (row[6][0], row[6][1])

    def put(self, cert: DesiredCert, observed: Observed, trust: Trust, marks: Marks | None = None) -> None:
        if not self.keep:
            return
        key = self._key(cert)
        self.used.add(key)
        if observed.cert is None or observed.key_public_id is None:
            gone = self.entries.pop(key, None) is not None
            if self.fresh.pop(key, None) is not None or gone:
                self.dirty = True
            return
        self.fresh[key] = (observed, trust.digest, marks)
        self.dirty = True

    def get_ca(self, path: str | Path, state: FileState) -> tuple[str, ...] | None:
        self._mark(f"ca\0{path}")
        row = self.entries.get(f"ca\0{path}")
        if not isinstance(row, list) or len(row) != 2 or row[0] != list(state.stamp) or not isinstance(row[1], list):
            return None
        return tuple(row[1])

    def put_ca(self, path: str | Path, state: FileState, certs: tuple[str, ...]) -> None:
        self._mark(f"ca\0{path}")
        row = [list(state.stamp), list(certs)]
        if self.entries.get(f"ca\0{path}") != row:
            self.entries[f"ca\0{path}"] = row
            self.dirty = True

    def save(self) -> None:
        """Write the cache when it changed (only from passes that may write): so a pass
        rebuilds a missing or stale cache even when it changes nothing else, and the
        steady state writes nothing. Rows no one asked for since the last save (entries
        removed from the manifest, paths renamed) are dropped: a pass observes every entry."""
        if not self.path:
            return
        if self.used:
            gone = [k for k in self.entries if k not in self.used]
            for k in gone:
                del self.entries[k]
            self.dirty = self.dirty or bool(gone)
            self.used = set()
        if not self.dirty:
            return
        for key, (observed, digest, marks) in self.fresh.items():
            self.entries[key] = _row(observed, digest, marks)
        self.fresh.clear()
        try:
            data = json.dumps({"version": CACHE_VERSION, "entries": self.entries}, separators=(",", ":")).encode()
            write_atomic(self.path, data, mode=0o600, make_parents=True)
            self.dirty = False  # a cache kept across passes (--watch) is written only when it changed
        except OSError:
            pass


def _row(o: Observed, digest: str, marks: Marks | None) -> list:
    f = o.cert
    assert f is not None
    facts = [  # CertFacts' fields in their order (FACTS), times as POSIX seconds
        f.common_name,
        sorted(f.sans),
        f.not_before.timestamp(),
        f.not_after.timestamp(),
        f.key_type,
        f.public_key_id,
        f.issued_by,
        f.serial,
        sorted(f.usages),
        list(f.chain),
        None if f.issuer_chain is None else list(f.issuer_chain),
        None if f.signer_not_after is None else f.signer_not_after.timestamp(),
    ]
    return [
        list(o.cert_file.stamp),
        list(o.key_file.stamp),
        digest,
        facts,
        # the key's public id is the certificate's in a usable pair: null, not its 64 digits again
        None if o.key_public_id == f.public_key_id else o.key_public_id,
        o.chains_to_issuer,
        None if marks is None else list(marks),
    ]


FACTS = 12  # fields in a row's certificate facts (_row)


def _facts_of(f: list) -> CertFacts:
    cn, sans, not_before, not_after, key_type, key_id, issued_by, serial, usages, chain, issuer_chain, signer = f
    return CertFacts(
        cn,
        frozenset(sans),
        datetime.fromtimestamp(not_before, timezone.utc),
        datetime.fromtimestamp(not_after, timezone.utc),
        key_type,
        key_id,
        issued_by,
        serial,
        frozenset(usages),
        tuple(chain),
        None if issuer_chain is None else tuple(issuer_chain),
        None if signer is None else datetime.fromtimestamp(signer, timezone.utc),
    )


# --------------------------------------------------------------------------- reading: every row checked


def _parse_cache(data: bytes) -> dict[str, Any]:
    """The cache's entries, each checked so that get() cannot trip over a wrong shape."""
    raw = json.loads(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict):
        raise StateFileDamaged("not an observation cache (no 'entries' object)")
    if raw.get("version") != CACHE_VERSION:
        return {}  # another version's format: rebuilt, not damaged
    for key, row in raw["entries"].items():
        problem = _ca_row_problem(row) if key.startswith("ca\0") else _row_problem(row)
        if problem:
            raise StateFileDamaged(f"entry {key.replace(chr(0), ' + ')!r}: {problem}")
    return raw["entries"]


# these run for every row of a warm pass: exact type checks (`type(x) is int` also refuses
# a bool) and no per-call closures keep them a small part of reading 10,000 rows
_OPTIONAL_TEXT = (str, type(None))


def _ints(v: Any) -> bool:
    return type(v) is list and all(type(x) is int for x in v)


def _ca_row_problem(row: Any) -> str | None:
    """A `ca_path` file's row (put_ca): its stamp and the fingerprints it holds."""
    if not (type(row) is list and len(row) == 2 and type(row[0]) is list and type(row[1]) is list):
        return "not a list of a file stamp and fingerprints"
    if not _ints(row[0]) or not all(type(x) is str for x in row[1]):
        return "file stamp or fingerprints of the wrong type"
    return None


def _row_problem(row: Any) -> str | None:
    if type(row) is not list or len(row) != 7:
        return "not a list of 7 fields"
    if not (
        _ints(row[0])
        and _ints(row[1])
        and type(row[2]) in _OPTIONAL_TEXT
        and type(row[4]) in _OPTIONAL_TEXT
        and row[5] in (True, False, None)
    ):
        return "file stamps, trust, key id or chain flag of the wrong type"
    marks = row[6]
    if marks is not None and not (
        type(marks) is list and len(marks) == 2 and all(type(m) in _OPTIONAL_TEXT for m in marks)
    ):
        return "file marks are not a pair of state folders"
    f = row[3]
    if type(f) is not list or len(f) != FACTS:
        return f"certificate facts are not a list of {FACTS}"
    return _facts_problem(f)


def _facts_problem(f: list) -> str | None:
    cn, sans, not_before, not_after, key_type, key_id, issued_by, serial, _, _, _, signer = f
    if not (
        type(cn) in _OPTIONAL_TEXT
        and type(issued_by) in _OPTIONAL_TEXT
        and type(key_type) is str
        and type(key_id) is str
        and type(serial) is str
    ):
        return "certificate facts of the wrong type"
    if type(sans) is not list or not all(type(x) is str for x in sans):
        return "SANs are not a list of names"
    times = {"not_before": not_before, "not_after": not_after}
    if signer is not None:
        times["signer_not_after"] = signer
    for name, value in times.items():
        if type(value) not in (int, float):
            return f"{name} is not a time"
        if not _MIN_TIME <= value <= _MAX_TIME:
            return f"{name} {value!r} is out of range"
    return None


# what datetime.fromtimestamp accepts (years 1 to 9999), so a row that passes cannot overflow
_MIN_TIME = datetime(1, 1, 2, tzinfo=timezone.utc).timestamp()
_MAX_TIME = datetime(9999, 12, 30, tzinfo=timezone.utc).timestamp()
