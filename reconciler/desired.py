"""The Desired a pass reconciles against: the manifest's bytes, validated, with the issuer
resolved; or, while the manifest is invalid, the last valid copy `--watch` keeps in the
state folder. The one way from bytes to a Desired: one-shot passes, `--watch`'s tracker
and `reconcile status` all come here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.errors import ReconcilerError
from reconciler.folders import require_private
from reconciler.issuers.choice import choose_issuer
from reconciler.manifest import ManifestError, build, load, parse_document
from reconciler.model import Desired, IssuerSpec
from reconciler.validation_cache import ValidationCache

if TYPE_CHECKING:  # pragma: no cover
    from reconciler.passes import IssuerOptions, Settings

LAST_VALID = "last-valid-manifest.json"  # in the state folder


def load_desired(settings: "Settings", save_cache: bool = False, raw: bytes | None = None) -> Desired:
    """`raw`: the manifest's bytes as already read (--watch keeps exactly what it validated).
    Raises ManifestError, or IssuerConfigError when it is not clear which CA is meant."""
    desired, cache = load_with_cache(settings, raw, repair=save_cache)
    if save_cache:
        cache.save()
    return desired


def load_with_cache(
    settings: "Settings", raw: bytes | None = None, repair: bool = False
) -> tuple[Desired, ValidationCache]:
    """(Desired with its issuer resolved, the validation cache still to be saved): an issuer
    that cannot be resolved stops everything before the state folder is even created."""
    # its validation cache is read from the state folder: refuse one another user can change
    require_private(settings.state_dir, "state folder")
    cache = ValidationCache(settings.state_dir, repair=repair)  # repair: a damaged cache is set aside
    if raw is None:
        desired = load(settings.manifest, cache=cache)
    else:
        path = Path(os.path.abspath(settings.manifest))
        desired = build(parse_document(raw, path), path, cache=cache)
    return replace(desired, issuer=resolve_issuer(desired, settings.issuer_options)), cache


def resolve_issuer(desired: Desired, options: "IssuerOptions") -> IssuerSpec:
    flags = {
        "url": options.url,
        "root": options.root,
        "fingerprint": options.fingerprint,
        "provisioner": options.provisioner,
        "password_file": options.password_file,
    }
    return choose_issuer(desired.issuer, desired.manifest_path, options.issuer, flags)


@dataclass(frozen=True)
class LastValid:
    """The copy of the last manifest that loaded, as a Desired for the manifest's own path."""

    desired: Desired
    saved_at: str  # when the copy was written (ISO 8601)
    digest: str  # SHA-256 of its bytes: an unchanged valid manifest is not copied again
    path: Path


def last_valid_path(settings: "Settings") -> Path:
    return Path(settings.state_dir) / LAST_VALID


def load_last_valid(settings: "Settings") -> LastValid | None:
    """The last valid copy, or None when there is none. Raises ReconcilerError (a
    ManifestError, an unclear issuer) or OSError when there is one and it cannot be used."""
    path = last_valid_path(settings)
    try:
        raw = path.read_bytes()
        saved = path.stat().st_mtime
    except FileNotFoundError:
        return None
    desired = build(parse_document(raw, path), Path(os.path.abspath(settings.manifest)))
    desired = replace(desired, issuer=resolve_issuer(desired, settings.issuer_options))
    saved_at = datetime.fromtimestamp(saved, timezone.utc).isoformat(timespec="seconds")
    return LastValid(desired, saved_at, hashlib.sha256(raw).hexdigest(), path)


def load_or_last_valid(settings: "Settings") -> tuple[Desired | None, ManifestError | None]:
    """For readers (`reconcile status`): the manifest, or, when it is invalid, the last valid
    copy with the manifest's error (None when no usable copy exists)."""
    try:
        return load_desired(settings), None
    except ManifestError as exc:
        try:
            kept = load_last_valid(settings)
        except (OSError, ReconcilerError):
            kept = None
        return (kept.desired if kept else None), exc
