"""One pass = load → observe → diff → plan (→ apply → status). Shared by the CLI and --watch.

This module wires the stages together; it holds no certificate logic of its own.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from reconciler import defaults
from reconciler.apply import ApplyContext, apply, sweep
from reconciler.apply_reporter import ApplyReporter
from reconciler.desired import load_with_cache
from reconciler.diff import RUN_HOOK
from reconciler.errors import ReconcilerError
from reconciler.faults import fault_point
from reconciler.folder_checks import manifest_trust_problem
from reconciler.guests.cluster import local_share
from reconciler.guests.stage import observe_guests, with_records
from reconciler.guestfacts import DELIVER, RELOAD
from reconciler.hooks import secrets_of
from reconciler.issuers import Issuer, IssuerError, make_issuer
from reconciler.lock import LockTimeout, PassLock
from reconciler.managed import identity
from reconciler.model import Desired, IssuerSpec, Observed
from reconciler.observation_cache import ObservationCache
from reconciler.observe import observe_all, unknown_chain_certificates
from reconciler.outcome import PassOutcome, outcome_of
from reconciler.parse import Trust
from reconciler.plan import CertPlan, Plan, force_renewal, hooks_for, make_plan, plan_cert
from reconciler.probe import ReloadCheck, observe_served
from reconciler.statefiles import check_state_dir, sweep_private
from reconciler.status import StatusStore

log = logging.getLogger("reconciler")


@dataclass(frozen=True)
class IssuerOptions:
    """--issuer, --ca-url, --root, ... as given on the command line (not the environment:
    flags > env > $STEPPATH defaults is decided in reconciler.issuers.choice)."""

    url: str | None = None
    root: str | None = None
    fingerprint: str | None = None
    provisioner: str | None = None
    password_file: str | None = None
    issuer: str | None = None  # "local" | "step-ca"


@dataclass(frozen=True)
class Settings:
    manifest: Path
    state_dir: Path
    issuer_options: IssuerOptions = field(default_factory=IssuerOptions)
    lock_timeout: float = defaults.LOCK_TIMEOUT
    workers: int = defaults.WORKERS
    # run post_renewal_commands as root even from a manifest another user can write
    allow_untrusted_manifest: bool = False
    ca_timeout: float | None = None  # seconds for one step-ca request; None: the issuer's default


def trust_of(issuer: Issuer, spec: IssuerSpec) -> Trust:
    # the embedded CA is authoritative: no CA yet means nothing chains to it
    return Trust.of(issuer.trust_pems(), authoritative=spec.type == "local")


class UnknownCertificate(ReconcilerError, ValueError):
    """`reconcile renew` named a certificate the manifest does not have."""


@dataclass(frozen=True)
class ForcedRenewal:
    """`reconcile renew`: the certificates to renew now, whatever their expiry (None: all)."""

    names: tuple[str, ...] | None = None

    def chosen(self, desired: Desired) -> frozenset[str]:
        known = [c.name for c in desired.certificates]
        if self.names is None:
            return frozenset(known)
        have = set(known)
        unknown = [n for n in dict.fromkeys(self.names) if n not in have]
        if unknown:
            more = len(known) - LIST_NAMES
            tail = f" … and {more} more (`reconcile status` lists them all)" if more > 0 else ""
            shown = ", ".join(known[:LIST_NAMES]) + tail
            raise UnknownCertificate(
                f"no certificate{'s' if len(unknown) > 1 else ''} named {', '.join(json.dumps(n) for n in unknown)} "
                f"in {desired.manifest_path}; nothing was done. "
                f"A name is the entry's \"name\", or its common_name when it has none; known: {shown or '(none)'}"
            )
        return frozenset(self.names)


LIST_NAMES = 50  # an error message, not a listing: `status` shows a 10,000-entry manifest


def _unknown_trust(issuer: Issuer, spec: IssuerSpec, fetch: bool) -> str | None:
    """Why certificates cannot be checked against the issuer's root (None: they can).

    `fetch` (a pass, never --plan): a step-ca root known only by its fingerprint is
    downloaded and verified first, so the issuer check is real."""
    if spec.type != "step-ca" or issuer.trust_pems():
        return None
    if fetch:
        try:
            issuer.fetch_root()  # type: ignore[attr-defined]
        except IssuerError as exc:
            return f"the CA's root could not be fetched: {exc}"
        if issuer.trust_pems():
            return None
    return issuer.untrusted_reason()  # type: ignore[attr-defined]


def _learn_intermediates(
    issuer: Issuer, desired: Desired, observed: dict[str, Observed], trust: Trust, persist: bool
) -> bool:
    """Let a step-ca adopt the intermediates bundled in the certificate files (verified
    against its root), so that certificates another state folder issued, or the old script's
    `step ca certificate`, are recognised instead of reissued. True: observe again."""
    learn = getattr(issuer, "learn_intermediates", None)
    if learn is None or not trust.fingerprints:
        return False
    candidates = unknown_chain_certificates(desired.certificates, observed, trust)
    return bool(candidates) and learn(candidates, persist) > 0


@dataclass
class Snapshot:
    desired: Desired
    observed: dict[str, Observed]
    plan: Plan
    issuer: Issuer
    cache: ObservationCache


def snapshot(
    settings: Settings,
    desired: Desired,
    status: StatusStore,
    now: datetime | None = None,
    cache: ObservationCache | None = None,
    forced: ForcedRenewal | None = None,
    fetch_root: bool = False,
    repair: bool = False,
    look_at_guests: bool = True,
) -> Snapshot:
    """Observe and plan. Reads only unless `fetch_root`: `--plan` is exactly this.
    `cache`: an ObservationCache kept across passes (--watch), instead of reading it from disk.
    `forced`: `reconcile renew`; an unknown name raises UnknownCertificate before anything is read.
    `fetch_root`: a pass may download a step-ca root known by its fingerprint (see _unknown_trust).
    `repair`: set a damaged cache aside (passes only: `--plan` and `status` never write).
    `look_at_guests`: look at every Proxmox guest's files (a resync); False: only at the guests
    the rows already plan a delivery for (--watch between resyncs)."""
    assert desired.issuer is not None, "desired.load_desired resolves the issuer"
    chosen = forced.chosen(desired) if forced is not None else None
    desired, elsewhere = local_share(desired)  # a Proxmox cluster's manifest: this node's share
    check_state_dir(settings.state_dir)
    issuer = make_issuer(desired.issuer, settings.state_dir, settings.ca_timeout)
    unknown = _unknown_trust(issuer, desired.issuer, fetch_root)
    cache = cache if cache is not None else ObservationCache(settings.state_dir, repair=repair, keep=repair)
    trust = trust_of(issuer, desired.issuer)
    manager = identity(settings.state_dir)
    observed = observe_all(desired.certificates, trust, cache, manager=manager)
    if _learn_intermediates(issuer, desired, observed, trust, persist=fetch_root):
        observed = observe_all(desired.certificates, trust_of(issuer, desired.issuer), cache, manager=manager)
    # what each Proxmox guest was given and, where the plan needs it, holds now (only guest
    # entries have a delivery record: no 50,000-entry dict of None for a host without guests)
    records = {c.name: status.get(c.name).delivery for c in desired.certificates if c.guest is not None}
    observed = observe_guests(
        desired.certificates, observed, records, look_all=look_at_guests, workers=settings.workers
    )
    # the running services too: which leaf each `serve` endpoint presents (read-only)
    observed, probed = observe_served(desired.certificates, observed)
    owed = status.hooks_pending(_serials(observed))
    plan = make_plan(desired, observed, now or datetime.now(timezone.utc), owed, issuer_unknown=unknown)
    if probed:
        plan = replace(plan, notes=plan.notes + (probed,))
    if chosen is not None:
        plan = force_renewal(plan, chosen)
    if elsewhere:
        plan = replace(plan, notes=plan.notes + elsewhere)
    return Snapshot(desired, observed, plan, issuer, cache)


def _serials(observed: dict[str, Observed]) -> dict[str, str | None]:
    return {name: (o.cert.serial if o.cert else None) for name, o in observed.items()}


def assess(snap: Snapshot, status: StatusStore, now: datetime | None = None) -> PassOutcome:
    """The read-only snapshot's outcome (`reconcile status`): each certificate as it is."""
    now = now or datetime.now(timezone.utc)
    return outcome_of(snap.plan, snap.observed, status.records, status.hooks_pending(_serials(snap.observed)), now)


@dataclass(frozen=True)
class Deferral:
    """What `--watch` leaves for a later pass (it decides when; the plan still says what).

    `certificates`: names in backoff after a failed issuance: none of their actions run.
    `hooks`: names whose failed post-renewal command is in backoff: their `run_hook` waits.
    `issue_limit`: how many certificates may contact the CA (None: all; while the CA is
    unreachable, 1 for the probe or 0 between probes). `deliveries`: names whose failed
    delivery into their Proxmox guest (or reload there) is in backoff: `deliver`/`reload` wait."""

    certificates: frozenset[str] = frozenset()
    hooks: frozenset[str] = frozenset()
    issue_limit: int | None = None
    deliveries: frozenset[str] = frozenset()


def defer(plan: Plan, deferral: Deferral) -> Plan:
    """`plan` without what `deferral` leaves for later; hooks recomputed for what remains."""
    budget = deferral.issue_limit
    kept: list[CertPlan] = []
    for p in plan.certificates:
        if p.actions and p.cert.name in deferral.certificates:
            p = replace(p, actions=())
        elif p.content_action is not None and budget is not None:
            if budget <= 0:
                p = replace(p, actions=())
            else:
                budget -= 1
        if p.actions and p.cert.name in deferral.hooks and p.content_action is None:
            p = replace(p, actions=tuple(a for a in p.actions if a.action != RUN_HOOK))
        if p.actions and p.cert.name in deferral.deliveries and p.content_action is None:
            p = replace(p, actions=tuple(a for a in p.actions if a.action not in (DELIVER, RELOAD)))
        kept.append(p)
    return Plan(tuple(kept), hooks_for(kept), plan.notes)


def _hook_refusal(settings: Settings, desired: Desired, plan: Plan) -> str | None:
    """Why no post-renewal command may run this pass: the manifest is writable by a user
    other than root while we run as root (docs/security.md). None: run them."""
    if not plan.hooks or settings.allow_untrusted_manifest:
        return None
    problem = manifest_trust_problem(desired.manifest_path)
    if problem:
        log.error("%s", problem)
    return problem


def run_pass(
    settings: Settings,
    desired: Desired | None = None,
    progress: bool | None = None,
    *,
    cache: ObservationCache | None = None,
    deferral: Deferral | None = None,
    cancelled=None,
    sweep_files: bool = True,
    manifest_state: dict | None = None,
    forced: ForcedRenewal | None = None,
    skip_hooks: bool = False,
    look_at_guests: bool = True,
) -> tuple[Snapshot, PassOutcome]:
    """A full pass under the lock: sweep, plan, apply, record. Returns (snapshot, outcome).

    The keyword arguments are for `--watch`: a `cache` kept across passes, a `deferral`
    (backoff), `cancelled()` (SIGTERM: stop starting new work), no sweep after the first
    pass, and the manifest's validity to record in the status store; `forced` is for
    `reconcile renew` (see ForcedRenewal). `snap.plan` is the whole plan; `snap.observed`
    is refreshed for what this pass wrote; the outcome judges each certificate after it."""
    started = time.monotonic()
    validation_cache = None
    if desired is None:
        # before the lock, which creates the state folder: a manifest whose CA is unclear
        # (or that is invalid) leaves no trace
        desired, validation_cache = load_with_cache(settings, repair=True)
    check_state_dir(settings.state_dir)
    with PassLock(settings.state_dir, settings.lock_timeout):
        # credentials a killed pass left in the private folder (step-ca mTLS): nobody but
        # the pass holding the lock uses them
        for path in sweep_private(settings.state_dir):
            log.warning("removed %s, a credential left by an interrupted pass", path)
        if validation_cache is not None:
            validation_cache.save()
        status = StatusStore(settings.state_dir)
        snap = snapshot(
            settings,
            desired,
            status,
            cache=cache,
            forced=forced,
            fetch_root=True,
            repair=True,
            look_at_guests=look_at_guests,
        )
        work = defer(snap.plan, deferral) if deferral is not None else snap.plan
        if manifest_state is not None:
            status.manifest.clear()
            status.manifest.update(manifest_state)
        for path in sweep(work, (settings.state_dir, settings.state_dir / "cache")) if sweep_files else ():
            log.warning("removed %s, a temporary file left by an interrupted pass", path)
        reload_check = ReloadCheck()  # after each command: did its services take the certificate?
        try:
            ctx = ApplyContext(
                snap.issuer,
                settings.workers,
                serials=_serials(snap.observed),
                manager=identity(settings.state_dir),
                cancelled=cancelled or (lambda: False),
                refuse_hooks=_hook_refusal(settings, desired, work),
                skip_hooks=skip_hooks,
                secrets=secrets_of(desired.issuer),
                cwd=desired.manifest_path.parent,  # hooks run where relative paths resolve
                confirm_reload=reload_check,
            )
            result = apply(work, ctx, ApplyReporter(status, progress))
        finally:
            snap.issuer.close()
        status.forget_except({c.name for c in desired.certificates})
        served = _record_served(status, snap.observed, reload_check.served)
        status.save()  # only if something changed: a pass with nothing to do writes nothing
        after = _reobserve(settings, snap, result, status)
        snap.observed.update({n: replace(o, served=served[n]) for n, o in snap.observed.items() if served.get(n)})
        snap.cache.save()
        outcome = outcome_of(
            snap.plan,
            snap.observed,
            status.records,
            status.hooks_pending(_serials(snap.observed)),
            datetime.now(timezone.utc),
            result,
            after,
            time.monotonic() - started,
        )
        return snap, outcome


def record_manifest_state(settings: Settings, state: dict) -> None:
    """No valid manifest to reconcile against (--watch): still tell `reconcile status` why."""
    try:
        with PassLock(settings.state_dir, settings.lock_timeout):
            store = StatusStore(settings.state_dir)
            store.manifest.clear()
            store.manifest.update(state)
            store.save()
    except (LockTimeout, OSError) as exc:
        log.warning("cannot record the manifest's state: %s", exc)


def _record_served(status: StatusStore, observed: dict[str, Observed], after_hooks: dict) -> dict:
    """What each `serve` endpoint presents, and since when, in the status store: the probe
    after a command ran if there was one, else the pass's own. Returns the latest per name."""
    stamp = datetime.now(timezone.utc).isoformat()
    latest = {name: after_hooks.get(name, o.served) for name, o in observed.items()}
    for name, served in latest.items():
        if served or name in status.records:
            status.cert(name).saw_served(served, stamp)
    return latest


def _reobserve(settings: Settings, snap: Snapshot, result, status: StatusStore) -> dict[str, CertPlan]:
    """What this pass wrote is what the next pass will see: re-read it once now, and plan it
    again, so the outcome judges the disk as the pass left it (and sees a file someone
    changed again before the pass ended). Returns those certificates' new plans."""
    written = {c.name for c in result.certificates if c.ok and c.actions}
    if not written:
        return {}
    fault_point("before_reobserve")  # --watch race tests change a file here
    trust = trust_of(snap.issuer, snap.desired.issuer)
    certs = [c for c in snap.desired.certificates if c.name in written]
    parsed = {c.name: c.written for c in result.certificates if c.written is not None}  # not parsed twice
    again = observe_all(certs, trust, snap.cache, manager=identity(settings.state_dir), written=parsed)
    for c in result.certificates:  # read back: what deploy parsed is not kept until the pass ends
        if c.written is not None:
            c.written = replace(c.written, parsed=None)
    # the guests as this pass left them, from the status store (no guest is asked again)
    snap.observed.update(with_records(certs, again, {c.name: status.get(c.name).delivery for c in certs}))
    owed = status.hooks_pending(_serials(snap.observed))
    now = datetime.now(timezone.utc)
    # what the issuer knows now (a step-ca learns its chain by issuing), never fetched here
    unknown = _unknown_trust(snap.issuer, snap.desired.issuer, fetch=False)
    return {c.name: plan_cert(c, snap.observed[c.name], now, c.name in owed, unknown) for c in certs}
