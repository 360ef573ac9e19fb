"""load+validate: certificate-manifest.json → Desired, or every error at once.

The JSON Schema shipped in the package (reconciler/schema/) is the source of every structural error message; the checks
a schema cannot express (SAN syntax, durations, key exposure, duplicate paths, owners
that exist on this host) follow it. Nothing here writes, except the validation cache.
"""

from __future__ import annotations

import difflib
import grp
import hashlib
import json
import os
import pwd
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import starmap
from datetime import timedelta
from pathlib import Path
from typing import Any

from reconciler.durations import DurationError, parse_duration, parse_share
from reconciler.endpoints import endpoints_of
from reconciler.errors import ReconcilerError
from reconciler.guestfacts import guest_spec_of
from reconciler.model import Desired, DesiredCert, IssuerSpec, KeySpec, RenewBefore
from reconciler.sans import SANError, display, normalise

SCHEMA_RESOURCE = "schema/certificate-manifest.schema.json"  # package data: found wherever the package is installed

DEFAULTS: dict[str, Any] = {
    "renew_before": "12h",
    "duration": "24h",
    "hook_timeout": "5m",
    "serve_settle": "5s",
    "include_ca": False,
    "cert_type": "server",
    "key": {"type": "EC", "curve": "P-256"},
}
DEFAULT_CERT_MODE = 0o644
DEFAULT_KEY_MODE = 0o600
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Issue:
    """One validation error: where (a JSON path) and what is wrong, with the fix."""

    path: str
    message: str

    def __str__(self) -> str:
        # a hostile manifest's 10 MB key or value must not come back as a 10 MB message
        path, message = _clip(self.path, 200), _clip(self.message, 2000)
        return f"{path}: {message}" if path else message


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class ManifestError(ReconcilerError):
    def __init__(self, manifest: Path, issues: list[Issue]):
        self.manifest = manifest
        self.issues = issues
        super().__init__(f"{manifest}: {len(issues)} error(s); first: {issues[0]}")

    def explain(self) -> str:
        """Every error, each with its JSON path, under one line saying nothing was changed."""
        n = len(self.issues)
        head = f"{self.manifest} is invalid ({n} error{'s' if n != 1 else ''}); nothing was changed:"
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


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
    import stat as _stat

    if _stat.S_ISDIR(st.st_mode):
        raise fail(f"manifest {path} is a directory; pass the JSON file inside it with -m/--manifest")
    if not _stat.S_ISREG(st.st_mode):
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

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text
        return number


class _DuplicateKey(Exception):
    pass


class _BadConstant(Exception):
    pass


# --------------------------------------------------------------------------- schema


_validators: dict[str, Any] = {}


def schema_bytes() -> bytes:
    """The installed schema, byte for byte (`reconcile schema` prints it)."""
    if "bytes" not in _validators:
        from importlib.resources import files

        _validators["bytes"] = files("reconciler").joinpath(SCHEMA_RESOURCE).read_bytes()
    return _validators["bytes"]


def _schema() -> dict[str, Any]:
    if "schema" not in _validators:
        _validators["schema"] = json.loads(schema_bytes())
    return _validators["schema"]


def schema_digest() -> str:
    if "digest" not in _validators:
        _validators["digest"] = hashlib.sha256(schema_bytes()).hexdigest()[:16]
    return _validators["digest"]


def _validator(definition: str):
    """A Draft 2020-12 validator for one of the schema's $defs.

    The schema uses no `format` keyword on purpose: SANs, durations and modes are checked by
    patterns and by our own SAN normaliser, so no FormatChecker (and none of the slow
    grammar-compiling format packages) is needed."""
    if definition not in _validators:
        from jsonschema import Draft202012Validator

        from jsonschema.validators import extend

        root = _schema()
        sub = {"$ref": f"#/$defs/{definition}", "$defs": root["$defs"]}
        # JSON Schema counts 101.0 and 1e3 as integers; a guest id or key size written that
        # way is a slip (or a spreadsheet's export), so only numbers written as digits count
        checker = Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
        )
        _validators[definition] = extend(Draft202012Validator, type_checker=checker)(sub)
    return _validators[definition]


def _json_path(prefix: str, parts) -> str:
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_issues(validator, instance: Any, prefix: str) -> list[Issue]:
    issues: list[Issue] = []
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    for error in errors:
        issues.extend(_explain(error, prefix))
    return issues


def _explain(error, prefix: str) -> list[Issue]:
    path = _json_path(prefix, error.absolute_path)
    kind = error.validator
    value = error.instance
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        out = []
        for key in sorted(set(value) - set(allowed)):
            where = _json_path(path, [key])
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f'did you mean "{close[0]}"?' if close else f"known fields: {', '.join(allowed)}"
            out.append(Issue(where, f"unknown field; {hint}"))
        return out
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [Issue(path, f'"{missing}" is required')]
    if kind == "pattern":
        desc = error.schema.get("description", f"must match {error.schema['pattern']}")
        return [Issue(path, f"{json.dumps(value)[:80]} is not valid: {desc}")]
    if kind == "enum":
        choices = ", ".join(json.dumps(c) for c in error.validator_value)
        return [Issue(path, f"{json.dumps(value)[:80]} is not allowed; choose one of {choices}")]
    if kind == "type" and isinstance(value, float) and "integer" in error.validator_value:
        return [Issue(path, _not_whole(value, error.validator_value))]
    if kind == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return [Issue(path, f"expected {_article(want)}, got {_json_type(value)}")]
    if kind == "not" and isinstance(error.schema, dict) and "description" in error.schema:
        # $defs/forbidden: a field that does not belong to this issuer type
        return [Issue(path, error.schema["description"])]
    if kind in ("minLength", "maxLength"):
        return [Issue(path, f"{'is empty' if kind == 'minLength' else 'is too long'}")]
    if kind in ("not", "if"):
        return [Issue(path, "combines key fields that do not belong together (curve is for EC, size for RSA)")]
    return [Issue(path, error.message[:200])]


def _not_whole(value: float, want) -> str:
    written = getattr(value, "text", repr(value))
    message = f"{written} is written with a fraction or exponent; write a whole number as plain digits"
    if value == value and abs(value) != float("inf") and value == int(value) and value >= 0:
        example = int(value)
        message += f", e.g. {example}" + (f' (or the string "{example}")' if "string" in want else "")
    return message


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _entry_digest(entry: Any) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def _parse_digests(data: bytes) -> set[str]:
    """One digest per line: anything else is damage (or a way to skip validation)."""
    from reconciler.statefiles import StateFileDamaged

    digests = set(data.decode("ascii").split())
    bad = next((d for d in digests if not re.fullmatch(r"(?:file:)?[0-9a-f]{24,64}", d)), None)
    if bad is not None:
        raise StateFileDamaged(f"{bad[:40]!r} is not an entry digest")
    return digests


class ValidationCache:
    """Digests of entries that already passed the schema, so a 10k-entry manifest
    pays jsonschema only for what changed. Lives in the state folder; any damage
    just means validating again."""

    def __init__(self, state_dir: Path | None, repair: bool = False):
        self.path = state_dir / "cache" / f"valid-entries-{schema_digest()}.txt" if state_dir else None
        self.known: set[str] = set()
        self.added: set[str] = set()
        if self.path:
            from reconciler.statefiles import read_state_file

            try:
                found = read_state_file(self.path, _parse_digests, "validation cache", repair=repair, consequence="validating every entry again", state_dir=state_dir)
                self.known = found.value or set()
            except OSError:
                pass  # an unusable state folder: the pass (or doctor) reports it; validation does not need it

    def save(self) -> None:
        if not self.path or not self.added:
            return
        from reconciler.atomic import write_atomic

        try:
            data = "\n".join(sorted(self.known | self.added)).encode()
            write_atomic(self.path, data, mode=0o600, make_parents=True)
        except OSError:
            pass  # a cache is never worth failing a pass for


# --------------------------------------------------------------------------- load


def load(path: Path, state_dir: Path | None = None, save_cache: bool = False, cache: ValidationCache | None = None) -> Desired:
    """Read, validate and resolve the manifest. Raises ManifestError with every issue."""
    path = Path(os.path.abspath(path))
    document, digest = read_document(path, with_digest=True)
    return build(document, path, state_dir, save_cache, digest, cache)


def build(
    document: Any, path: Path, state_dir: Path | None = None, save_cache: bool = False, file_digest: str | None = None,
    cache: ValidationCache | None = None,
) -> Desired:
    """`file_digest`: sha256 of the manifest's bytes; a file that passed the schema before,
    byte for byte, skips the per-entry digests too (10k entries cost ~0.4 s to digest).
    `cache`: the caller's ValidationCache, which the caller saves (after its own checks)."""
    issues: list[Issue] = []
    cache = cache if cache is not None else ValidationCache(state_dir, repair=save_cache)
    whole = f"file:{file_digest}" if file_digest else None
    if isinstance(document, list):
        prefix, entries, defaults, issuer_raw = "", document, {}, None
    elif isinstance(document, dict):
        prefix = "certificates"
        # entries are validated one by one below (with their cache); "certificates" stays in
        # the document only as an empty list, so its absence is still reported as required
        head = {k: v for k, v in document.items() if k != "certificates"}
        if "certificates" in document:
            head["certificates"] = []
        if whole not in cache.known:
            issues += _schema_issues(_validator("document"), head, "")
        entries = document.get("certificates", [])
        defaults = document.get("defaults", {}) if isinstance(document.get("defaults"), dict) else {}
        # a default that failed the schema is reported once, at defaults.<field>; resolving
        # entries with it would only crash or repeat the same error for every entry
        bad_defaults = {i.path[len("defaults.") :].split(".")[0].split("[")[0] for i in issues if i.path.startswith("defaults.")}
        defaults = {k: v for k, v in defaults.items() if k not in bad_defaults}
        issuer_raw = document.get("issuer")
        if not isinstance(entries, list):
            issues.append(Issue("certificates", f"expected an array, got {_json_type(entries)}"))
            entries = []
    else:
        raise ManifestError(path, [Issue("", f"expected a JSON array of certificates or an object with \"certificates\", got {_json_type(document)}")])

    entry_validator = None
    schema_ok: list[bool] = []
    for i, entry in enumerate(entries):
        if whole in cache.known:
            schema_ok.append(True)
            continue
        digest = _entry_digest(entry) if isinstance(entry, dict) else None
        if digest and digest in cache.known:
            schema_ok.append(True)
            continue
        entry_validator = entry_validator or _validator("entry")
        found = _schema_issues(entry_validator, entry, f"{prefix}[{i}]")
        issues += found
        schema_ok.append(not found)
        if not found and digest:
            cache.added.add(digest)

    base = path.parent
    certificates: list[DesiredCert] = []
    claims: list[_Claim] = []
    for i, entry in enumerate(entries):
        claim = _claim({**defaults, **entry} if isinstance(entry, dict) else entry, f"{prefix}[{i}]", base)
        if claim:
            claims.append(claim)
        if not schema_ok[i]:
            continue
        merged = {**DEFAULTS, **defaults, **entry}
        inherited = frozenset(k for k in defaults if k not in entry)
        cert, found = _resolve(merged, f"{prefix}[{i}]", base, inherited)
        issues += found
        if cert:
            certificates.append(cert)
    # path and name clashes are checked on every entry whose paths are strings, so an entry
    # with another problem (an unknown owner, say) still has its clashes reported now
    issues += _cross_checks(claims)
    if issues:
        # an error in "defaults" is found once per entry that inherits it: report it once
        raise ManifestError(path, list(dict.fromkeys(issues)))
    if whole and whole not in cache.known:
        cache.added.add(whole)
    if save_cache:
        cache.save()
    return Desired(issuer=_issuer(issuer_raw, base), certificates=tuple(certificates), manifest_path=path)


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


def resolve_path(base: Path, value: str) -> Path:
    """A manifest path: relative ones resolve against the manifest's folder (symlinks kept)."""
    return Path(os.path.normpath(os.path.join(base, value)))


PATH_MAX, NAME_MAX = 4096, 255  # Linux: bytes in a whole path (with its NUL), in one name


def path_problem(path: Path | None) -> str | None:
    """A path no filesystem call can take: too long as a whole or in one of its names."""
    if path is None:
        return None
    raw = os.fsencode(path)
    if len(raw) <= NAME_MAX:  # the usual case: too short for either limit
        return None
    if len(raw) >= PATH_MAX:
        return f"is {len(raw)} bytes long once resolved; a path holds at most {PATH_MAX - 1} (PATH_MAX)"
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return f"has a {len(longest)}-byte name in it; one file or folder name holds at most {NAME_MAX} bytes (NAME_MAX)"
    return None


def _names_a_folder(value: Any) -> str | None:
    """A trailing "/" (or a last name "." or "..") says the path is a folder; resolving it
    would drop that and write a file where the operator meant a folder."""
    if not isinstance(value, str) or not value:
        return None
    last = value.rstrip("/").rsplit("/", 1)[-1]
    if value.endswith("/") or last in (".", ".."):
        return f"{value!r} names a folder; give the path of the file inside it (e.g. {value.rstrip('/') + '/' + 'server.pem'!r})"
    return None


def _mode(text: str) -> int:
    return int(text, 8)


def _resolve(
    e: dict[str, Any], where: str, base: Path, inherited: frozenset[str] = frozenset()
) -> tuple[DesiredCert | None, list[Issue]]:
    issues: list[Issue] = []

    def at(field: str) -> str:
        # a value inherited from "defaults" is wrong there, not in the entry
        top = field.split("[")[0]
        return f"defaults.{field}" if top in inherited else f"{where}.{field}"

    names: set[str] = set()
    common_name = e["common_name"]
    for field, value in (("common_name", e["common_name"]), *((f"sans[{j}]", s) for j, s in enumerate(e.get("sans", [])))):
        try:
            canonical = normalise(value)
        except SANError as exc:
            issues.append(Issue(at(field), str(exc)))
            continue
        names.add(canonical)
        if field == "common_name":
            # written into the subject as the SAN normaliser spells it: " a.example " and
            # "A.Example." are the name a.example, in the certificate as in its SANs
            common_name = display(canonical)
    sans = frozenset(names)  # the desired SAN set: SANs plus the common name, normalised

    durations: dict[str, timedelta] = {}
    for field in ("duration", "hook_timeout", "serve_settle"):
        try:
            durations[field] = parse_duration(e[field])
        except DurationError as exc:
            issues.append(Issue(at(field), str(exc)))
    renew_text = e["renew_before"]
    try:
        renew = RenewBefore(share=parse_share(renew_text)) if renew_text.endswith("%") else RenewBefore(fixed=parse_duration(renew_text))
    except DurationError as exc:
        issues.append(Issue(at("renew_before"), str(exc)))
        renew = RenewBefore()
    if renew.fixed is not None and "duration" in durations and renew.fixed >= durations["duration"]:
        issues.append(
            Issue(at("renew_before"), f'"{renew_text}" is not shorter than the lifetime "{e["duration"]}", so every pass would renew; use a smaller value or a share like "33%"')
        )

    cert_mode = _mode(e.get("cert_permissions", e.get("permissions", "644")))
    key_field = "key_permissions" if "key_permissions" in e else ("permissions" if "permissions" in e else None)
    key_mode = _mode(e[key_field]) if key_field else DEFAULT_KEY_MODE
    if key_mode & 0o007 and not e.get("allow_world_readable_key", False):
        issues.append(
            Issue(
                at(key_field or "key_permissions"),
                f'"{e[key_field]}" would make the private key readable by every user; set "key_permissions": "600"'
                + ' (or "640" with an owner group), or "allow_world_readable_key": true if you really mean it',
            )
        )
    if cert_mode & 0o002:
        cert_field = "cert_permissions" if "cert_permissions" in e else "permissions"
        issues.append(
            Issue(at(cert_field), f'"{e[cert_field]}" would let every user replace the certificate; set "cert_permissions": "644"')
        )

    uid = gid = None
    owner = e.get("owner")
    if owner is not None:
        uid, gid, problem = resolve_owner(owner)
        if problem:
            issues.append(Issue(at("owner"), problem))

    key_raw = e["key"]
    key = KeySpec(
        type=key_raw["type"],
        curve=(key_raw.get("curve", "P-256") if key_raw["type"] == "EC" else None),
        size=(key_raw.get("size", 2048) if key_raw["type"] == "RSA" else None),
        rotation=key_raw.get("rotation", "always"),
    )

    paths = {f: resolve_path(base, v) if isinstance(v := e.get(f), str) else None for f in ("cert_path", "key_path", "ca_path")}
    path_of = paths.__getitem__

    for field in ("cert_path", "key_path", "ca_path"):
        problem = _names_a_folder(e.get(field)) or path_problem(path_of(field))
        if problem:
            issues.append(Issue(at(field), problem))

    guest, problems = guest_spec_of(e)
    issues += [Issue(at(field), message) for field, message in problems]
    serve, problems = endpoints_of(e.get("serve", []), common_name, at)
    issues += starmap(Issue, problems)
    if issues:
        return None, issues
    guest_id = e.get("guest_id")
    if isinstance(guest_id, int) and not 0 <= guest_id < 2**63:
        return None, [Issue(at("guest_id"), "is out of range; a guest id is a number from 0 to 2^63 - 1, or a string")]
    return (
        DesiredCert(
            name=e.get("name", e["common_name"]),
            common_name=common_name,
            sans=sans,
            cert_path=path_of("cert_path"),
            key_path=path_of("key_path"),
            owner=owner,
            uid=uid,
            gid=gid,
            cert_mode=cert_mode,
            key_mode=key_mode,
            renew_before=renew,
            duration=durations["duration"],
            key=key,
            post_renewal_command=e.get("post_renewal_command"),
            hook_timeout=durations["hook_timeout"],
            include_ca=bool(e["include_ca"]),
            ca_path=path_of("ca_path"),
            cert_type=e["cert_type"],
            guest_id=None if guest_id is None else str(guest_id),
            guest_type=e.get("guest_type"),
            allow_symlink=bool(e.get("allow_symlink", False)),
            guest=guest,
            node=e.get("node"),
            serve=serve,
            serve_settle=durations["serve_settle"],
            fields=e,
            where=where,
        ),
        [],
    )


MAX_NAME = 256  # LOGIN_NAME_MAX
MAX_ID = 2**32 - 2  # uid_t and gid_t; 2**32 - 1 means "no change" to chown


@lru_cache(maxsize=1024)  # passwd/group lookups go through NSS on every call
def resolve_owner(owner: str) -> tuple[int | None, int | None, str | None]:
    """"user:group" / "user" / "0:33" → (uid, gid, problem). gid None means "leave the group"."""
    user, _, group = owner.partition(":")
    uid = gid = None
    problems = []
    # a name longer than any system allows never reaches NSS: some modules abort on it
    if len(user) > MAX_NAME or len(group) > MAX_NAME:
        return None, None, f"is {len(owner)} characters long; user and group names hold at most {MAX_NAME}"
    if user.isdigit():
        uid = int(user)
        if uid > MAX_ID:
            problems.append(f"uid {user[:20]}{'…' if len(user) > 20 else ''} is out of range (0 to {MAX_ID})")
    else:
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            problems.append(f'user "{user}" does not exist on this host; create it or use a numeric uid')
    if group:
        if group.isdigit():
            gid = int(group)
            if gid > MAX_ID:
                problems.append(f"gid {group[:20]}{'…' if len(group) > 20 else ''} is out of range (0 to {MAX_ID})")
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                problems.append(f'group "{group}" does not exist on this host; create it or use a numeric gid')
    return uid, gid, "; ".join(problems) or None


@dataclass(frozen=True)
class _Claim:
    """What one entry claims on this host: its name and its files."""

    where: str
    name: str | None  # None: not a usable string, already reported by the schema
    # normalised path strings: comparing them is all the cross-checks need, and a Path
    # object per file costs more than the rest of the check for a 10k-entry manifest
    cert_path: str
    key_path: str
    ca_path: str | None
    owner: str | None = None  # as written; only compared between entries sharing a ca_path


def _claim(e: Any, where: str, base: Path) -> _Claim | None:
    """The entry's claim, when its paths are at least strings (even if it has other errors)."""
    if not isinstance(e, dict):
        return None

    folder = str(base)

    def p(field: str) -> str | None:
        v = e.get(field)
        return os.path.normpath(os.path.join(folder, v)) if isinstance(v, str) and v and "\0" not in v else None

    name = e.get("name", e.get("common_name"))
    cert_path, key_path = p("cert_path"), p("key_path")
    if cert_path is None or key_path is None:
        return None
    owner = e.get("owner")
    return _Claim(where, name if isinstance(name, str) and name else None, cert_path, key_path, p("ca_path"),
                  owner if isinstance(owner, str) else None)


def _cross_checks(claims: list[_Claim]) -> list[Issue]:
    issues: list[Issue] = []
    owners: dict[str, tuple[_Claim, str]] = {}
    names: dict[str, _Claim] = {}
    folders: dict[str, str] = {}

    def same_file(p: str) -> str:
        """Where `p` really is: two names for one file through a linked folder are one
        file, and two entries writing it would replace each other's certificate forever."""
        head, tail = os.path.split(p)
        if head not in folders:
            folders[head] = os.path.realpath(head)
        return os.path.join(folders[head], tail)

    for c in claims:
        if same_file(c.cert_path) == same_file(c.key_path):
            issues.append(Issue(f"{c.where}.key_path", f"is the same file as cert_path ({c.cert_path}); give the key its own file"))
        for field in ("cert_path", "key_path"):
            p = getattr(c, field)
            real = same_file(p)
            if real in owners and owners[real][0] is not c:
                other, other_field = owners[real]
                theirs = getattr(other, other_field)
                via = f"; through a linked folder it is the same file as {theirs}" if theirs != p else ""
                issues.append(
                    Issue(f"{c.where}.{field}", f"{p} is also the {other_field} of {other.where} ({other.name}){via}; every file belongs to one certificate")
                )
            else:
                owners.setdefault(real, (c, field))
        if c.name is None:
            continue
        if c.name in names:
            issues.append(Issue(f"{c.where}.name", f'"{c.name}" is already the name of {names[c.name].where}; set a unique "name" on one of them'))
        else:
            names[c.name] = c
    for c in claims:
        if c.ca_path is not None and same_file(c.ca_path) in owners:
            other, other_field = owners[same_file(c.ca_path)]
            issues.append(Issue(f"{c.where}.ca_path", f"{c.ca_path} is the {other_field} of {other.where}; give the CA root its own file"))
    return issues + _shared_ca_owners(claims)


def _shared_ca_owners(claims: list[_Claim]) -> list[Issue]:
    """Entries may share one ca_path (it holds the same root), but not with two owners: each
    pass would chown the file to one, the next back to the other. Entries without an owner
    leave it alone and agree with anyone; the same ids spelled differently agree."""
    issues: list[Issue] = []
    first: dict[tuple[str, str], tuple[_Claim, int]] = {}  # (ca_path, "uid"/"gid") -> who set it first
    for c in claims:
        if c.ca_path is None or c.owner is None:
            continue
        uid, gid, problem = resolve_owner(c.owner)
        if problem:
            continue  # reported at the entry's own owner
        for part, value in (("uid", uid), ("gid", gid)):
            if value is None:
                continue
            other, other_value = first.setdefault((c.ca_path, part), (c, value))
            if other_value != value:
                issues.append(Issue(
                    f"{c.where}.owner",
                    f'"{c.owner}" differs from "{other.owner}" of {other.where} ({other.name}), which writes the same ca_path '
                    f"{c.ca_path}; every pass would chown it back and forth: give both one owner, or each its own ca_path",
                ))
                break
    return issues
