"""plan: drifts → the minimal actions, and the hooks they will run. Pure: no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from reconciler.diff import (
    CHMOD,
    CHOWN,
    CONTENT_ACTIONS,
    FILE_ACTIONS,
    RENEW,
    REWRITE_CHAIN,
    RUN_HOOK,
    WRITE_CA,
    Context,
    Drift,
    Readiness,
    blocked,
    readiness_of,
    walk,
)
from reconciler.guestfacts import DELIVER, RELOAD, GuestSeen, guest_drifts
from reconciler.model import Desired, DesiredCert, Observed


@dataclass(frozen=True, slots=True)
class Action:
    action: str
    reason: str
    drifts: tuple[Drift, ...]


@dataclass(frozen=True, slots=True)
class CertPlan:
    cert: DesiredCert
    actions: tuple[Action, ...] = ()
    error: str | None = None  # the path cannot be managed; nothing will be done to it
    # the certificate on disk as the same drift rows judged it (diff.readiness); None for a
    # plan made by hand. Describes the disk, not the plan: a deferred or forced plan keeps it
    readiness: Readiness | None = field(default=None, compare=False)

    @property
    def content_action(self) -> Action | None:
        return next((a for a in self.actions if a.action in CONTENT_ACTIONS), None)

    @property
    def writes_files(self) -> bool:
        """A file's content changes (a new certificate, a rewritten chain, a CA file)."""
        return any(a.action in CONTENT_ACTIONS + FILE_ACTIONS for a in self.actions)

    @property
    def delivers(self) -> bool:
        return any(a.action == DELIVER for a in self.actions)

    @property
    def runs_hook(self) -> bool:
        if not self.cert.post_renewal_command or not self.actions:
            return False  # (asked of every certificate: most have no command, or nothing to do)
        # a legacy guest entry's command moves the delivered /tmp files into place: a
        # delivery runs it, as the old script did
        delivered = self.delivers and self.cert.guest is not None and self.cert.guest.legacy
        return self.writes_files or delivered or any(a.action == RUN_HOOK for a in self.actions)


@dataclass(frozen=True)
class HookRun:
    command: str
    certificates: tuple[str, ...]  # names, in manifest order


@dataclass(frozen=True)
class Plan:
    certificates: tuple[CertPlan, ...]
    hooks: tuple[HookRun, ...]
    notes: tuple[str, ...] = ()  # what the plan could not know, e.g. an issuer check that was impossible

    @property
    def changes(self) -> bool:
        return any(c.actions for c in self.certificates)

    @property
    def errors(self) -> tuple[CertPlan, ...]:
        return tuple(c for c in self.certificates if c.error)


def plan_cert(
    cert: DesiredCert, observed: Observed, now: datetime, hook_pending: bool = False, issuer_unknown: str | None = None
) -> CertPlan:
    problem = blocked(cert, observed)
    if problem:
        return CertPlan(cert, (), problem, Readiness(False, problem, ()))
    ctx = Context.of(cert, observed, hook_pending, issuer_unknown)
    drifts = walk(cert, observed, now, ctx)
    content = [d for d in drifts if d.action in CONTENT_ACTIONS]
    actions: list[Action] = []
    if content:
        # the first identity drift decides; others of the same action only add words
        first = content[0].action
        same = tuple(d for d in content if d.action == first)
        actions.append(Action(first, "; ".join(d.reason for d in same), same))
    elif drifts:  # (none: the steady state, nothing to sort)
        # a new certificate is written with the right chain, CA file, owner and mode anyway
        for kind in (REWRITE_CHAIN, WRITE_CA, CHOWN, CHMOD, DELIVER, RELOAD, RUN_HOOK):
            found = tuple(d for d in drifts if d.action == kind)
            if found:
                actions.append(Action(kind, "; ".join(d.reason for d in found), found))
    return CertPlan(cert, _with_delivery(cert, actions, observed.guest), None, readiness_of(cert, drifts, ctx))


def _with_delivery(cert: DesiredCert, actions: list[Action], seen: GuestSeen | None) -> tuple[Action, ...]:
    """New host files go to the guest too, and a delivery is followed by the guest's reload."""
    if cert.guest is None:
        return tuple(actions)
    kinds = {a.action for a in actions}
    out = [a for a in actions if a.action not in (DELIVER, RELOAD, RUN_HOOK)]
    if kinds & set(CONTENT_ACTIONS + FILE_ACTIONS) and DELIVER not in kinds:
        seen = seen or GuestSeen()
        rows = guest_drifts(cert.guest, seen.source, seen.record, seen.view, content_changes=True)
        out += [Action(DELIVER, rows[0][2], (Drift(*rows[0]),))]
    else:
        out += [a for a in actions if a.action == DELIVER]
    if any(a.action == DELIVER for a in out) and cert.guest.reload and not cert.guest.legacy:
        out.append(Action(RELOAD, f"after the delivery, inside {cert.guest.describe()}: {cert.guest.reload}", ()))
    else:
        out += [a for a in actions if a.action == RELOAD]
    return tuple(out + [a for a in actions if a.action == RUN_HOOK])


def make_plan(
    desired: Desired,
    observed: dict[str, Observed],
    now: datetime,
    hooks_pending: frozenset[str] = frozenset(),
    issuer_unknown: str | None = None,
) -> Plan:
    """`issuer_unknown`: why certificates cannot be checked against the issuer's root; each
    one on disk is then planned for reissue, never taken for a match."""
    plans = tuple(
        plan_cert(c, observed[c.name], now, c.name in hooks_pending, issuer_unknown) for c in desired.certificates
    )
    notes = (f"cannot check which CA issued the certificates on disk: {issuer_unknown}",) if issuer_unknown else ()
    return Plan(plans, hooks_for(plans), notes)


FORCED = "forced by `reconcile renew`"


def force_renewal(plan: Plan, names: frozenset[str]) -> Plan:
    """`reconcile renew`: the named certificates get a new certificate now, whatever their
    expiry; the rest of `plan` stays as it is (the pass still fixes their drift).

    A named certificate whose drift already asks for a new one (files missing, other SANs)
    keeps that action, so the manifest's change is not lost; any other gets `renew`. Its
    owner/mode and hook actions go: the new files are written with the right owner and
    mode, and a content change runs the hook anyway. A path that cannot be managed stays
    an error."""
    out: list[CertPlan] = []
    for p in plan.certificates:
        if p.cert.name not in names or p.error:
            out.append(p)
            continue
        content = p.content_action
        if content is not None:
            action = Action(content.action, f"{FORCED}; {content.reason}", content.drifts)
        else:
            action = Action(RENEW, FORCED, (Drift("renewal", RENEW, FORCED, None, "renewed now"),))
        delivery = [a for a in p.actions if a.action == DELIVER]
        out.append(CertPlan(p.cert, _with_delivery(p.cert, [action, *delivery], None), None, p.readiness))
    return Plan(tuple(out), hooks_for(out), plan.notes)


def hooks_for(plans) -> tuple[HookRun, ...]:
    """One run per distinct command, for every certificate that needs it, in manifest order."""
    runs: dict[str, list[str]] = {}
    for p in plans:
        if p.runs_hook:
            runs.setdefault(p.cert.post_renewal_command, []).append(p.cert.name)
    return tuple(HookRun(cmd, tuple(names)) for cmd, names in runs.items())
