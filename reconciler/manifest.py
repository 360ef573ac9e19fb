"""load+validate: certificate-manifest.json → Desired, or every error at once.

The pipeline's first stage, in four rooms: reading and parsing the file (here), the JSON
Schema check (manifest_schema.py, the source of every structural error message), each
entry's own checks and values (manifest_entry.py: SAN syntax, durations, key exposure,
owners, paths) and the checks across entries (manifest_checks.py: duplicate names and
files). Nothing here writes; the validation cache is read and saved by the caller
(validation_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.manifest_checks import Claim, claim, cross_checks, linked_folders
from reconciler.manifest_entry import DEFAULTS, resolve_entry, resolve_path
from reconciler.manifest_issues import Issue, ManifestError, json_type
from reconciler.manifest_schema import schema_issues
from reconciler.model import Desired, DesiredCert, IssuerSpec

MAX_MANIFEST_BYTES = 64 * 1024 * 1024

__all__ = [
    "Derived",
    "Issue",
    "ManifestError",
    "MAX_MANIFEST_BYTES",
    "Validated",
    "build",
    "load",
    "parse_document",
    "read_document",
]


# --------------------------------------------------------------------------- reading


def read_document(path: Path, with_digest: bool = False) -> Any:
    """Read and parse the manifest file; every failure is a ManifestError with one Issue.
    `with_digest`: return (document, sha256 of the bytes) instead."""

    def fail(message: str) -> ManifestError:
        return ManifestError(path, [Issue("", message)])

    try:
        st = path.stat()
    except FileNotFoundError:
        raise fail(f"manifest {path} does not exist; pass the right file with -m/--manifest") from None
    except OSError as exc:
        raise fail(f"cannot read manifest {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail(f"manifest {path} is a directory; pass the JSON file inside it with -m/--manifest")
    if not stat.S_ISREG(st.st_mode):
        raise fail(f"manifest {path} is not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise fail(f"manifest {path} is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read manifest {path}: {exc.strerror}") from None
    document = parse_document(raw, path)
    return (document, hashlib.sha256(raw).hexdigest()) if with_digest else document


def parse_document(raw: bytes, path: Path) -> Any:
    def fail(message: str) -> ManifestError:
        return ManifestError(path, [Issue("", message)])

    if not raw.strip():
        raise fail(f"manifest {path} is empty; it needs a JSON array or object of certificates")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise fail(f"manifest {path} starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise fail(f"manifest {path} is not UTF-8: invalid byte 0x{raw[exc.start]:02x} at line {line}") from None

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise _DuplicateKey(key)
            seen[key] = value
        return seen

    def no_constant(name: str) -> Any:
        raise _BadConstant(name)

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=no_constant, parse_float=WrittenFloat)
    except json.JSONDecodeError as exc:
        raise fail(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise fail(f"key {exc.args[0]!r} appears twice in one object; keep one") from None
    except _BadConstant as exc:
        raise fail(f"{exc.args[0]} is not valid JSON; use a number or a string") from None
    except RecursionError:
        raise fail("manifest is nested too deeply to be a certificate manifest") from None
    except ValueError as exc:  # e.g. an integer with thousands of digits
        raise fail(f"manifest holds a value Python's JSON reader refuses: {exc}") from None


class WrittenFloat(float):
    """A JSON number written with a fraction or exponent, remembering how it was written, so
    an error can quote `1e3` rather than `1000.0`."""

    text: str

    def __new__(cls, text: str) -> "WrittenFloat":
        number = super().__new__(cls, text)
        number.text = text
        return number


class _DuplicateKey(Exception):
    pass


class _BadConstant(Exception):
    pass


# --------------------------------------------------------------------------- load

DERIVED_VERSION = 2  # a new SAN normaliser or path rule: derived values from older code are not reused
# (2: a name ending in a newline is stripped like other whitespace)


@dataclass(frozen=True)
class Derived:
    """What resolving a manifest derived from its bytes alone, one row per entry: [common name
    as written into the subject, its SANs (sorted), cert path, key path, ca path]; for the
    manifest at `manifest` whose bytes hash to `digest` (relative paths depend on the folder)."""

    manifest: str
    digest: str
    rows: list[list[Any]] | None = None  # as read back from the state folder
    # as just resolved: rows are made from them only when they are saved (--plan never is)
    certificates: tuple[DesiredCert, ...] = ()

    def entries(self) -> list[list[Any]]:
        return self.rows if self.rows is not None else [_derived_row(c) for c in self.certificates]


@dataclass
class Validated:
    """What earlier loads found, kept in the state folder between runs (validation_cache.py;
    the core only reads and adds): "file:<sha256>" for each whole manifest that loaded (its
    schema check is not repeated), and the values the last one derived, so the same bytes are
    not resolved again. Single entries are not remembered: the schema gate checks one in about
    a microsecond, less than it costs to digest it."""

    known: set[str] = field(default_factory=set)
    added: set[str] = field(default_factory=set)
    derived: Derived | None = None


def load(path: Path, cache: Validated | None = None) -> Desired:
    """Read, validate and resolve the manifest. Raises ManifestError with every issue.
    `cache`: what earlier loads found, and where this one adds what it finds."""
    path = Path(os.path.abspath(path))
    document, digest = read_document(path, with_digest=True)
    return build(document, path, digest, cache)


def build(document: Any, path: Path, file_digest: str | None = None, cache: Validated | None = None) -> Desired:
    """`file_digest`: sha256 of the manifest's bytes; a file that loaded before, byte for
    byte, is not checked against the schema again and reuses what it derived (the checks
    that depend on this host, owners and linked folders, always run)."""
    cache = cache if cache is not None else Validated()
    whole = f"file:{file_digest}" if file_digest else None
    known = whole in cache.known
    shape = _Shape.of(document, path, known)
    issues = shape.issues
    schema_ok = [True] * len(shape.entries) if known else _schema_check(shape, issues)
    derived = cache.derived
    rows = (
        derived.rows if known and derived and (derived.manifest, derived.digest) == (str(path), file_digest) else None
    )
    rows = rows if rows is not None and len(rows) == len(shape.entries) else None
    certificates = _resolve_all(shape, schema_ok, path.parent, issues, rows)
    if issues:
        # an error in "defaults" is found once per entry that inherits it: report it once
        raise ManifestError(path, list(dict.fromkeys(issues)))
    if whole and not known:
        cache.added.add(whole)
    if file_digest and rows is None:
        cache.derived = Derived(str(path), file_digest, certificates=tuple(certificates))
    return Desired(issuer=_issuer(shape.issuer, path.parent), certificates=tuple(certificates), manifest_path=path)


def _derived_row(c: DesiredCert) -> list[Any]:
    return [
        c.common_name,
        sorted(c.sans),
        str(c.cert_path),
        str(c.key_path),
        None if c.ca_path is None else str(c.ca_path),
    ]


@dataclass
class _Shape:
    """The document's parts: a bare array of entries, or the object form's head and entries."""

    prefix: str  # JSON path of the entries: "" for a bare array, "certificates" in the object form
    entries: list[Any]
    defaults: dict[str, Any] = field(default_factory=dict)  # those that passed the schema
    issuer: Any = None
    issues: list[Issue] = field(default_factory=list)

    @classmethod
    def of(cls, document: Any, path: Path, known: bool) -> _Shape:
        if isinstance(document, list):
            return cls("", document)
        if not isinstance(document, dict):
            raise ManifestError(
                path,
                [
                    Issue(
                        "",
                        'expected a JSON array of certificates or an object with "certificates", '
                        f"got {json_type(document)}",
                    )
                ],
            )
        # entries are checked one by one (with their own paths); "certificates" stays in the
        # head only as an empty list, so its absence is still reported as required
        head = {k: v for k, v in document.items() if k != "certificates"}
        if "certificates" in document:
            head["certificates"] = []
        issues = [] if known else schema_issues("document", head, "")
        defaults = document.get("defaults", {}) if isinstance(document.get("defaults"), dict) else {}
        # a default that failed the schema is reported once, at defaults.<field>; resolving
        # entries with it would only crash or repeat the same error for every entry
        bad_defaults = {
            i.path[len("defaults.") :].split(".")[0].split("[")[0] for i in issues if i.path.startswith("defaults.")
        }
        entries = document.get("certificates", [])
        if not isinstance(entries, list):
            issues.append(Issue("certificates", f"expected an array, got {json_type(entries)}"))
            entries = []
        return cls(
            "certificates",
            entries,
            {k: v for k, v in defaults.items() if k not in bad_defaults},
            document.get("issuer"),
            issues,
        )


def _schema_check(shape: _Shape, issues: list[Issue]) -> list[bool]:
    """Whether each entry passed the schema; what did not is added to `issues`."""
    ok = []
    for i, entry in enumerate(shape.entries):
        found = schema_issues("entry", entry, f"{shape.prefix}[{i}]")
        issues += found
        ok.append(not found)
    return ok


def _resolve_all(
    shape: _Shape, schema_ok: list[bool], base: Path, issues: list[Issue], rows: list[list[Any]] | None
) -> list[DesiredCert]:
    """`rows`: what a load of these same bytes derived, entry by entry (Derived.rows)."""
    certificates: list[DesiredCert] = []
    defaults = shape.defaults
    inherits = {**DEFAULTS, **defaults}  # one dict, shared by every DesiredCert
    # bytes that loaded before had no clash between entries: unless this host may have changed
    # that, their claims are not even made
    claims = _claims(shape, base, rows) if rows is None or _host_may_differ(rows) else None
    for i, entry in enumerate(shape.entries):
        where = f"{shape.prefix}[{i}]"
        if rows:
            row = rows[i]
            paths, names = {"cert_path": row[2], "key_path": row[3], "ca_path": row[4]}, (row[0], frozenset(row[1]))
        else:
            mine = claims[i] if claims else None
            if not schema_ok[i] or mine is None:  # no claim: paths that are not strings, which the schema reported
                continue
            paths, names = mine.paths(), None
        inherited = frozenset(k for k in defaults if k not in entry) if defaults else _NONE
        cert, found = resolve_entry(entry, inherits, where, paths, inherited, names)
        issues += found
        if cert:
            certificates.append(cert)
    if claims is not None:
        # path and name clashes are checked on every entry whose paths are strings, so an entry
        # with another problem (an unknown owner, say) still has its clashes reported now
        issues += cross_checks([c for c in claims if c is not None], checked_before=rows is not None)
    return certificates


def _claims(shape: _Shape, base: Path, rows: list[list[Any]] | None) -> list[Claim | None]:
    """What each entry claims on this host (manifest_checks.claim), in order; None for one
    whose paths are not strings."""
    out = []
    for i, entry in enumerate(shape.entries):
        row = rows[i] if rows else None
        paths = {"cert_path": row[2], "key_path": row[3], "ca_path": row[4]} if row else None
        # (a bare array has no defaults: most manifests, whose entries are then used as they are)
        merged = {**shape.defaults, **entry} if shape.defaults and isinstance(entry, dict) else entry
        out.append(claim(merged, f"{shape.prefix}[{i}]", base, paths))
    return out


def _host_may_differ(rows: list[list[Any]]) -> bool:
    """For bytes that loaded before: whether this host may have changed what the checks
    across entries found then (manifest_checks.cross_checks): entries share a CA file (the
    ids of its owners may have changed), or a folder of theirs has become a link."""
    return any(row[4] is not None for row in rows) or linked_folders(p for row in rows for p in (row[2], row[3]))


_NONE: frozenset[str] = frozenset()


def _issuer(raw: Any, base: Path) -> IssuerSpec | None:
    if not isinstance(raw, dict):
        return None

    def p(key: str) -> Path | None:
        v = raw.get(key)
        return resolve_path(base, v) if isinstance(v, str) else None

    return IssuerSpec(
        type=raw.get("type", "local"),
        dir=p("dir"),
        url=raw.get("url", "").rstrip("/") or None,
        root=p("root"),
        fingerprint=(raw.get("fingerprint") or "").lower() or None,
        provisioner=raw.get("provisioner"),
        password_file=p("password_file"),
    )
