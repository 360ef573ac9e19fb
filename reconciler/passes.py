"""One pass = load → observe → diff → plan (→ apply → status). Shared by the CLI and --watch.

This module wires the stages together; it holds no certificate logic of its own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.issuers import Issuer, make_issuer
from reconciler.model import Desired, IssuerSpec
from reconciler.observe import ObservationCache, Observed, Trust, observe_all
from reconciler.plan import Plan, make_plan

if TYPE_CHECKING:  # pragma: no cover
    from reconciler.status import StatusStore

log = logging.getLogger("reconciler")


@dataclass(frozen=True)
class IssuerOptions:
    """--ca-url, --root, ... for bare-array manifests (flags > env > $STEPPATH defaults)."""

    url: str | None = None
    root: str | None = None
    fingerprint: str | None = None
    provisioner: str | None = None
    password_file: str | None = None

    def given(self) -> bool:
        return any(v for v in (self.url, self.root, self.fingerprint, self.provisioner, self.password_file))


@dataclass(frozen=True)
class Settings:
    manifest: Path
    state_dir: Path
    issuer_options: IssuerOptions = field(default_factory=IssuerOptions)
    lock_timeout: float = 60.0
    workers: int = 4


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/reconciler")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "reconciler"


def load_desired(settings: Settings, save_cache: bool = False) -> Desired:
    from reconciler.manifest import load

    desired = load(settings.manifest, settings.state_dir, save_cache=save_cache)
    return replace(desired, issuer=resolve_issuer(desired, settings.issuer_options))


def resolve_issuer(desired: Desired, options: IssuerOptions) -> IssuerSpec:
    spec = desired.issuer
    is_bare = spec == IssuerSpec() and options.given()
    if is_bare or spec.type == "step-ca":
        from reconciler.issuers.stepca import resolve_spec, spec_from_options

        if is_bare:
            return spec_from_options(options.url, options.root, options.fingerprint, options.provisioner, options.password_file, os.environ)
        return resolve_spec(spec, os.environ)
    return spec


def trust_of(issuer: Issuer, spec: IssuerSpec) -> Trust:
    # the embedded CA is authoritative: no CA yet means nothing chains to it
    return Trust.of(issuer.trust_roots(), authoritative=spec.type == "local")


@dataclass
class Snapshot:
    desired: Desired
    observed: dict[str, Observed]
    plan: Plan
    issuer: Issuer
    cache: ObservationCache


def snapshot(settings: Settings, desired: Desired, status: "StatusStore", now: datetime | None = None) -> Snapshot:
    """Observe and plan. Reads only: `--plan` is exactly this."""
    issuer = make_issuer(desired.issuer, settings.state_dir)
    cache = ObservationCache(settings.state_dir)
    observed = observe_all(desired.certificates, trust_of(issuer, desired.issuer), cache)
    serials = {name: (o.cert.serial if o.cert else None) for name, o in observed.items()}
    plan = make_plan(desired, observed, now or datetime.now(timezone.utc), status.hooks_pending(serials))
    return Snapshot(desired, observed, plan, issuer, cache)


def run_pass(settings: Settings, desired: Desired | None = None, progress: bool | None = None):
    """A full pass under the lock: sweep, plan, apply, record. Returns (snapshot, result)."""
    from reconciler.apply import apply, sweep
    from reconciler.lock import PassLock
    from reconciler.status import StatusStore

    with PassLock(settings.state_dir, settings.lock_timeout):
        if desired is None:
            desired = load_desired(settings, save_cache=True)
        status = StatusStore(settings.state_dir)
        snap = snapshot(settings, desired, status)
        for path in sweep(snap.plan):
            log.warning("removed %s, a temporary file left by an interrupted pass", path)
        try:
            result = apply(
                snap.plan, snap.issuer, status, settings.workers, progress,
                before_files=status.save, after_files=status.save,
                cwd=desired.manifest_path.parent,  # hooks run where relative paths resolve
                serials={n: (o.cert.serial if o.cert else None) for n, o in snap.observed.items()},
            )
        finally:
            snap.issuer.close()
        status.forget_except({c.name for c in desired.certificates})
        status.data["last_pass"] = {
            "at": datetime.now(timezone.utc).isoformat(),
            "ok": result.ok,
            "changed": result.changed,
        }
        status.save()
        # what we just wrote is what the next pass will see: re-observe it once now
        if result.changed:
            trust = trust_of(snap.issuer, desired.issuer)
            changed = {c.name for c in result.certificates if c.ok and c.actions}
            observe_all([c for c in desired.certificates if c.name in changed], trust, snap.cache)
        snap.cache.save()
        return snap, result
