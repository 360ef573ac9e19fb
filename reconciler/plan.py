"""plan: drifts → the minimal actions, and the hooks they will run. Pure: no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from reconciler.diff import CHMOD, CHOWN, CONTENT_ACTIONS, RUN_HOOK, Blocked, Drift, diff
from reconciler.model import Desired, DesiredCert
from reconciler.observe import Observed


@dataclass(frozen=True)
class Action:
    action: str
    reason: str
    drifts: tuple[Drift, ...]


@dataclass(frozen=True)
class CertPlan:
    cert: DesiredCert
    actions: tuple[Action, ...] = ()
    error: str | None = None  # the path cannot be managed; nothing will be done to it

    @property
    def content_action(self) -> Action | None:
        return next((a for a in self.actions if a.action in CONTENT_ACTIONS), None)

    @property
    def runs_hook(self) -> bool:
        return bool(self.cert.post_renewal_command) and any(
            a.action in CONTENT_ACTIONS or a.action == RUN_HOOK for a in self.actions
        )


@dataclass(frozen=True)
class HookRun:
    command: str
    certificates: tuple[str, ...]  # names, in manifest order


@dataclass(frozen=True)
class Plan:
    certificates: tuple[CertPlan, ...]
    hooks: tuple[HookRun, ...]

    @property
    def changes(self) -> bool:
        return any(c.actions for c in self.certificates)

    @property
    def errors(self) -> tuple[CertPlan, ...]:
        return tuple(c for c in self.certificates if c.error)


def plan_cert(cert: DesiredCert, observed: Observed, now: datetime, hook_pending: bool = False) -> CertPlan:
    try:
        drifts = diff(cert, observed, now, hook_pending)
    except Blocked as exc:
        return CertPlan(cert, (), str(exc))
    content = [d for d in drifts if d.action in CONTENT_ACTIONS]
    actions: list[Action] = []
    if content:
        # the first identity drift decides; others of the same action only add words
        first = content[0].action
        same = tuple(d for d in content if d.action == first)
        actions.append(Action(first, "; ".join(d.reason for d in same), same))
    else:
        # a new certificate is written with the right owner and mode anyway
        for kind in (CHOWN, CHMOD, RUN_HOOK):
            found = tuple(d for d in drifts if d.action == kind)
            if found:
                actions.append(Action(kind, "; ".join(d.reason for d in found), found))
    return CertPlan(cert, tuple(actions))


def make_plan(desired: Desired, observed: dict[str, Observed], now: datetime, hooks_pending: frozenset[str] = frozenset()) -> Plan:
    plans = tuple(plan_cert(c, observed[c.name], now, c.name in hooks_pending) for c in desired.certificates)
    return Plan(plans, hooks_for(plans))


def hooks_for(plans) -> tuple[HookRun, ...]:
    """One run per distinct command, for every certificate that needs it, in manifest order."""
    runs: dict[str, list[str]] = {}
    for p in plans:
        if p.runs_hook:
            runs.setdefault(p.cert.post_renewal_command, []).append(p.cert.name)
    return tuple(HookRun(cmd, tuple(names)) for cmd, names in runs.items())
