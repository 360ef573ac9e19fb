"""step-ca settings: where the CA is and which root to trust, from the manifest, flags,
environment and `$STEPPATH/config/defaults.json` (what `step ca bootstrap` writes)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from reconciler.crypto import fingerprint
from reconciler.defaults import ENV_ISSUER_SETTINGS, ENVIRON
from reconciler.issuers import IssuerError
from reconciler.model import IssuerSpec

log = logging.getLogger("reconciler.issuers.stepca")

# keys of $STEPPATH/config/defaults.json, as `step ca bootstrap` writes them
_DEFAULTS_KEYS = {
    "url": "ca-url",
    "root": "root",
    "fingerprint": "fingerprint",
    "provisioner": "provisioner",
    "password_file": "password-file",
}


_FLAGS = {
    "url": "--ca-url",
    "root": "--root",
    "fingerprint": "--fingerprint",
    "provisioner": "--provisioner",
    "password_file": "--password-file",
}
_PATH_SETTINGS = ("root", "password_file")


def steppath(env: Mapping[str, str] = ENVIRON) -> Path:
    """`$STEPPATH`, or `~/.step` like the step CLI."""
    if env.get("STEPPATH"):
        return Path(env["STEPPATH"]).expanduser()
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".step"


def defaults_path(env: Mapping[str, str] = ENVIRON) -> Path:
    return steppath(env) / "config" / "defaults.json"


def read_step_defaults(env: Mapping[str, str] = ENVIRON) -> dict[str, Any]:
    """`$STEPPATH/config/defaults.json` as a dict; {} when it is absent or unreadable."""
    path = defaults_path(env)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _defaults_value(defaults: Mapping[str, Any], field: str) -> Any:
    value = defaults.get(_DEFAULTS_KEYS[field])
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if field in _PATH_SETTINGS:
        return Path(value).expanduser()
    return value


def _from_defaults(field: str, env: Mapping[str, str]) -> str:
    return f"{_DEFAULTS_KEYS[field]} in {defaults_path(env)}"


def resolve_spec(spec: IssuerSpec, env: Mapping[str, str] = ENVIRON) -> IssuerSpec:
    """Fill what a step-ca issuer block leaves out from `$STEPPATH/config/defaults.json`.

    The URL comes from `ca-url` when unset. Trust (`root`, `fingerprint`) is taken as a
    pair, and only when the spec names neither, so a manifest's root is never mixed with
    the fingerprint of whatever CA `step ca bootstrap` last pointed at. `provisioner` and
    `password-file` are filled when the file has them (step accepts any flag there).
    """
    if spec.type != "step-ca":
        return spec
    defaults = read_step_defaults(env)
    if not defaults:
        return spec
    changes: dict[str, Any] = {}
    if spec.url is None and _defaults_value(defaults, "url"):
        changes["url"] = _defaults_value(defaults, "url")
    if spec.root is None and spec.fingerprint is None:
        for field in ("root", "fingerprint"):
            if _defaults_value(defaults, field):
                changes[field] = _defaults_value(defaults, field)
    for field in ("provisioner", "password_file"):
        if getattr(spec, field) is None and _defaults_value(defaults, field):
            changes[field] = _defaults_value(defaults, field)
    if not changes:
        return spec
    sources = dict(spec.sources) | {f: _from_defaults(f, env) for f in changes}
    return replace(spec, **changes, sources=tuple(sources.items()))


def spec_from_options(
    url: str | None,
    root: str | Path | None,
    fingerprint: str | None,
    provisioner: str | None,
    password_file: str | Path | None,
    env: Mapping[str, str] = ENVIRON,
) -> IssuerSpec:
    """The step-ca issuer of a bare-array manifest: flags > `RECONCILER_*` env > defaults.json.

    Hints name where each value came from, or the flag for one that is still missing."""
    flags = {
        "url": url,
        "root": root,
        "fingerprint": fingerprint,
        "provisioner": provisioner,
        "password_file": password_file,
    }
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field, flag in flags.items():
        value: Any = None
        if flag not in ("", None):
            value, sources[field] = flag, _FLAGS[field]
        elif env.get(ENV_ISSUER_SETTINGS[field]):
            value, sources[field] = env[ENV_ISSUER_SETTINGS[field]], ENV_ISSUER_SETTINGS[field]
        else:
            sources[field] = _FLAGS[field]
        if value is not None and field in _PATH_SETTINGS:
            value = Path(value).expanduser()
        if value is not None and field == "url":
            value = str(value).rstrip("/")
        values[field] = value
    return resolve_spec(IssuerSpec(type="step-ca", **values, sources=tuple(sources.items())), env)


def _ways(field: str, bare: bool, env: Mapping[str, str]) -> str:
    """Every way to give one setting, in the order they win."""
    if bare:
        return f"{_FLAGS[field]}, {ENV_ISSUER_SETTINGS[field]} or {_from_defaults(field, env)}"
    return f"issuer.{field} in the manifest, or {_from_defaults(field, env)}"


def configuration_lines(spec: IssuerSpec | None, bare: bool, env: Mapping[str, str] = ENVIRON) -> list[str]:
    """What a step-ca issuer still lacks (or has wrong), one line per setting with every way
    to give it. `spec` None: list them all (nothing is configured)."""
    lines = []
    if spec is None or not spec.url:
        lines.append(f"URL: {_ways('url', bare, env)} (e.g. https://ca.internal:9000)")
    elif urlsplit(spec.url).scheme != "https":
        lines.append(
            f"URL: {spec.url} (from {spec.where('url')}) is not https; step-ca only speaks HTTPS: write https://host:port"
        )
    if spec is None or (spec.root is None and not spec.fingerprint):
        lines.append(
            f"trust: {_ways('root', bare, env)} (the CA's root certificate file), or "
            f"{_ways('fingerprint', bare, env)} (its SHA-256, `step certificate fingerprint root_ca.crt`)"
        )
    if spec is None or not spec.provisioner:
        lines.append(f"provisioner: {_ways('provisioner', bare, env)} (the name of a JWK provisioner)")
    if spec is None or spec.password_file is None:
        ways = _ways("password_file", bare, env)
        lines.append(f"password file: {ways} (a 0600 file holding the provisioner's password)")
    return lines


def normalise_fingerprint(fingerprint: str) -> str:
    """sha256 hex, lower case, colons and spaces dropped (step prints it both ways)."""
    fp = fingerprint.strip().lower().replace(":", "").replace(" ", "")
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise IssuerError(
            f"step-ca root fingerprint {fingerprint!r} is not a sha256 hex digest",
            hint="copy it from `step certificate fingerprint root_ca.crt` (64 hex digits)",
        )
    return fp


fingerprint_of = fingerprint  # the name the step-ca client and its doctor know it by
