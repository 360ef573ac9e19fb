"""One manifest entry that passed the schema → a DesiredCert, or every Issue it has.

What the schema cannot say is checked here: SAN syntax (the one SAN normaliser), durations
(the one duration parser), a key mode that exposes the key, owners that exist on this host,
paths no filesystem call can take. A value inherited from "defaults" is reported there.
"""

from __future__ import annotations

import grp
import os
import pwd
from datetime import timedelta
from functools import lru_cache
from itertools import starmap
from pathlib import Path
from typing import Any, Callable

from reconciler.durations import DurationError, parse_duration, parse_share
from reconciler.endpoints import endpoints_of
from reconciler.guestfacts import guest_spec_of
from reconciler.manifest_issues import Issue
from reconciler.model import DesiredCert, KeySpec, RenewBefore
from reconciler.sans import SANError, display, normalise

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
PATH_MAX, NAME_MAX = 4096, 255  # Linux: bytes in a whole path (with its NUL), in one name
MAX_NAME = 256  # LOGIN_NAME_MAX
MAX_ID = 2**32 - 2  # uid_t and gid_t; 2**32 - 1 means "no change" to chown
PATH_FIELDS = ("cert_path", "key_path", "ca_path")

At = Callable[[str], str]  # field -> its JSON path in the manifest


def resolve_entry(
    entry: dict[str, Any],
    defaults: dict[str, Any],
    where: str,
    paths: dict[str, str | None],
    inherited: frozenset[str] = frozenset(),
    names: tuple[str, frozenset[str]] | None = None,
) -> tuple[DesiredCert | None, list[Issue]]:
    """`entry`: as written; `defaults`: what it inherits (DEFAULTS under the manifest's own);
    `paths`: its PATH_FIELDS resolved against the manifest's folder (manifest_checks.Claim.paths:
    worked out once for both). `names`: the common name and SAN set an earlier load of these
    same bytes derived; the checks of what depends on the bytes alone (SAN syntax, path
    lengths) passed then, and are not repeated."""

    def at(field: str) -> str:
        # a value inherited from "defaults" is wrong there, not in the entry
        return f"defaults.{field}" if field.split("[")[0] in inherited else f"{where}.{field}"

    e = {**defaults, **entry}
    common_name, sans, issues = _names(e, at) if names is None else (*names, [])
    (durations, renew), found = _lifetimes(e, at)
    issues += found
    modes, found = _modes(e, at)
    issues += found
    uid, gid, problem = resolve_owner(e["owner"]) if e.get("owner") is not None else (None, None, None)
    if problem:
        issues.append(Issue(at("owner"), problem))
    if names is None:
        issues += _path_issues(e, paths, at)
    guest, problems = guest_spec_of(e)
    issues += [Issue(at(field), message) for field, message in problems]
    serve, problems = endpoints_of(e.get("serve", []), common_name, at)
    issues += starmap(Issue, problems)
    guest_id = e.get("guest_id")
    if not issues and isinstance(guest_id, int) and not 0 <= guest_id < 2**63:
        issues.append(Issue(at("guest_id"), "is out of range; a guest id is a number from 0 to 2^63 - 1, or a string"))
    if issues:
        return None, issues
    ca_path = paths["ca_path"]
    return (
        DesiredCert(
            name=e.get("name", e["common_name"]),
            common_name=common_name,
            sans=sans,
            cert_path=paths["cert_path"],  # type: ignore[arg-type]  # a claim always has both
            key_path=paths["key_path"],  # type: ignore[arg-type]
            owner=e.get("owner"),
            uid=uid,
            gid=gid,
            cert_mode=modes[0],
            key_mode=modes[1],
            renew_before=renew,
            duration=durations["duration"],
            key=_key_spec(**e["key"]),
            post_renewal_command=e.get("post_renewal_command"),
            hook_timeout=durations["hook_timeout"],
            include_ca=bool(e["include_ca"]),
            ca_path=ca_path,
            cert_type=e["cert_type"],
            guest_id=None if guest_id is None else str(guest_id),
            guest_type=e.get("guest_type"),
            allow_symlink=bool(e.get("allow_symlink", False)),
            guest=guest,
            node=e.get("node"),
            serve=serve,
            serve_settle=durations["serve_settle"],
            entry=entry,
            defaults=defaults,
            where=where,
        ),
        [],
    )


def _names(e: dict[str, Any], at: At) -> tuple[str, frozenset[str], list[Issue]]:
    """(common name as written into the subject, the desired SAN set: SANs plus the common
    name, normalised, issues)."""
    issues: list[Issue] = []
    names: set[str] = set()
    common_name = e["common_name"]
    for field, value in (
        ("common_name", e["common_name"]),
        *((f"sans[{j}]", s) for j, s in enumerate(e.get("sans", []))),
    ):
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
    return common_name, frozenset(names), issues


DURATION_FIELDS = ("duration", "hook_timeout", "serve_settle")


def _lifetimes(e: dict[str, Any], at: At) -> tuple[tuple[dict[str, timedelta], RenewBefore], list[Issue]]:
    """((each of DURATION_FIELDS, renew before), issues); a value in error reads as zero."""
    found, problems = _lifetimes_of(*(e[field] for field in DURATION_FIELDS), e["renew_before"])
    return found, [Issue(at(field), message) for field, message in problems]


# a manifest spells the same few lifetimes and keys thousands of times: each is worked out once
@lru_cache(maxsize=256)
def _lifetimes_of(*texts: str) -> tuple[tuple[dict[str, timedelta], RenewBefore], tuple[tuple[str, str], ...]]:
    """What `_lifetimes` says, with (field, message) problems, for one spelling of the
    DURATION_FIELDS and renew_before. The dict is shared by every entry that spells them so:
    read it, never change it."""
    problems: list[tuple[str, str]] = []
    durations = {}
    for field, text in zip(DURATION_FIELDS, texts[:-1], strict=True):  # the last is renew_before
        try:
            durations[field] = parse_duration(text)
        except DurationError as exc:
            problems.append((field, str(exc)))
            durations[field] = timedelta(0)
    renew_text = texts[-1]
    try:
        renew = (
            RenewBefore(share=parse_share(renew_text))
            if renew_text.endswith("%")
            else RenewBefore(fixed=parse_duration(renew_text))
        )
    except DurationError as exc:
        problems.append(("renew_before", str(exc)))
        renew = RenewBefore()
    if renew.fixed is not None and "duration" not in dict(problems) and renew.fixed >= durations["duration"]:
        problems.append(
            (
                "renew_before",
                f'"{renew_text}" is not shorter than the lifetime "{texts[0]}", so every pass would renew; '
                'use a smaller value or a share like "33%"',
            )
        )
    return (durations, renew), tuple(problems)


@lru_cache(maxsize=256)
def _key_spec(type: str, curve: str = "P-256", size: int = 2048, rotation: str = "always") -> KeySpec:
    return KeySpec(
        type=type, curve=curve if type == "EC" else None, size=size if type == "RSA" else None, rotation=rotation
    )


def _modes(e: dict[str, Any], at: At) -> tuple[tuple[int, int], list[Issue]]:
    """((cert mode, key mode), issues): a key every user can read, a certificate every user
    can replace, are refused unless the entry says it means it."""
    issues = []
    cert_mode = int(e.get("cert_permissions", e.get("permissions", "644")), 8)
    key_field = "key_permissions" if "key_permissions" in e else ("permissions" if "permissions" in e else None)
    key_mode = int(e[key_field], 8) if key_field else DEFAULT_KEY_MODE
    if key_field and key_mode & 0o007 and not e.get("allow_world_readable_key", False):
        issues.append(
            Issue(
                at(key_field),
                f'"{e[key_field]}" would make the private key readable by every user; set "key_permissions": "600"'
                + ' (or "640" with an owner group), or "allow_world_readable_key": true if you really mean it',
            )
        )
    if cert_mode & 0o002:
        cert_field = "cert_permissions" if "cert_permissions" in e else "permissions"
        issues.append(
            Issue(
                at(cert_field),
                f'"{e[cert_field]}" would let every user replace the certificate; set "cert_permissions": "644"',
            )
        )
    return (cert_mode, key_mode), issues


def _path_issues(e: dict[str, Any], paths: dict[str, str | None], at: At) -> list[Issue]:
    issues = []
    for field in PATH_FIELDS:
        problem = _names_a_folder(e.get(field)) or path_problem(paths[field])
        if problem:
            issues.append(Issue(at(field), problem))
    return issues


def resolve_path(base: Path, value: str) -> Path:
    """A manifest path: relative ones resolve against the manifest's folder (symlinks kept)."""
    return Path(os.path.normpath(os.path.join(base, value)))


def path_problem(path: str | Path | None) -> str | None:
    """A path no filesystem call can take: too long as a whole or in one of its names."""
    if path is None:
        return None
    if len(str(path)) <= NAME_MAX // 4:  # the usual case: too short for either limit even at 4 bytes a character
        return None
    raw = os.fsencode(path)
    if len(raw) <= NAME_MAX:
        return None
    if len(raw) >= PATH_MAX:
        return f"is {len(raw)} bytes long once resolved; a path holds at most {PATH_MAX - 1} (PATH_MAX)"
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return (
            f"has a {len(longest)}-byte name in it; one file or folder name holds at most {NAME_MAX} bytes (NAME_MAX)"
        )
    return None


def _names_a_folder(value: Any) -> str | None:
    """A trailing "/" (or a last name "." or "..") says the path is a folder; resolving it
    would drop that and write a file where the operator meant a folder."""
    if not isinstance(value, str) or not value.endswith(("/", ".")):
        return None
    last = value.rstrip("/").rsplit("/", 1)[-1]
    if value.endswith("/") or last in (".", ".."):
        example = value.rstrip("/") + "/server.pem"
        return f"{value!r} names a folder; give the path of the file inside it (e.g. {example!r})"
    return None


@lru_cache(maxsize=1024)  # passwd/group lookups go through NSS on every call
def resolve_owner(owner: str) -> tuple[int | None, int | None, str | None]:
    """ "user:group" / "user" / "0:33" → (uid, gid, problem). gid None means "leave the group"."""
    user, _, group = owner.partition(":")
    # a name longer than any system allows never reaches NSS: some modules abort on it
    if len(user) > MAX_NAME or len(group) > MAX_NAME:
        return None, None, f"is {len(owner)} characters long; user and group names hold at most {MAX_NAME}"
    uid, user_problem = _id_of(user, "uid", "user", lambda name: pwd.getpwnam(name).pw_uid)
    gid, group_problem = (
        _id_of(group, "gid", "group", lambda name: grp.getgrnam(name).gr_gid) if group else (None, None)
    )
    return uid, gid, "; ".join(p for p in (user_problem, group_problem) if p) or None


def _id_of(name: str, kind: str, word: str, lookup: Callable[[str], int]) -> tuple[int | None, str | None]:
    """A numeric id as written (in range), or the id NSS gives the name; (id, problem)."""
    if name.isdigit():
        number = int(name)
        if number > MAX_ID:
            return number, f"{kind} {name[:20]}{'…' if len(name) > 20 else ''} is out of range (0 to {MAX_ID})"
        return number, None
    try:
        return lookup(name), None
    except KeyError:
        return None, f'{word} "{name}" does not exist on this host; create it or use a numeric {kind}'
