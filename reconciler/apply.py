"""apply: carry out a Plan. The only stage that writes files, talks to a CA or runs commands.

It executes the plan it is given and never re-decides it. One certificate's failure
never stops the others; every failure is recorded and makes the pass exit 1.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from reconciler.apply_reporter import ApplyReporter
from reconciler.atomic import fsync_dirs, sweep_temporaries
from reconciler.deploy import deploy
from reconciler.faults import fault_point
from reconciler.guests.proxmox import ProxmoxCLI
from reconciler.guests.stage import DeliveryContext, DeliveryOutcome, deliver_all
from reconciler.hooks import HookOutcome, run_hook
from reconciler.issuers import Issuer, IssuerError
from reconciler.model import DesiredCert, Written
from reconciler.plan import CertPlan, HookRun, Plan
from reconciler.targets import DeployError, os_error

log = logging.getLogger("reconciler.apply")


@dataclass
class CertResult:
    name: str
    actions: tuple[str, ...]
    ok: bool
    error: str | None = None
    content_changed: bool = False
    transient: bool = False
    written: Written | None = None  # the new certificate and key, parsed (re-observation reuses it)


@dataclass
class Result:
    certificates: list[CertResult] = field(default_factory=list)
    hooks: list[HookOutcome] = field(default_factory=list)
    deliveries: list[DeliveryOutcome] = field(default_factory=list)  # into Proxmox guests

    @property
    def ok(self) -> bool:
        return (
            all(c.ok for c in self.certificates)
            and all(h.ok for h in self.hooks)
            and all(d.ok for d in self.deliveries)
        )

    def failures(self) -> list[str]:
        out = [f"{c.name}: {c.error}" for c in self.certificates if not c.ok]
        out += [f"hook {h.command!r} for {', '.join(h.certificates)} {h.describe()}" for h in self.hooks if not h.ok]
        out += [d.describe() for d in self.deliveries if not d.ok]
        return out


def sweep(plan: Plan, extra: tuple[Path, ...] = ()) -> list[Path]:
    """Remove temporary files earlier, killed passes left beside managed files (and in
    `extra` folders: the state folder, where the status store is written)."""
    folders = {Path(path).parent for p in plan.certificates for path in (p.cert.cert_path, p.cert.key_path)}
    folders |= {Path(p.cert.ca_path).parent for p in plan.certificates if p.cert.ca_path is not None}
    folders |= {
        Path(os.path.realpath(path)).parent
        for p in plan.certificates
        if p.cert.allow_symlink
        for path in (p.cert.cert_path, p.cert.key_path)
    }
    folders |= set(extra)
    removed: list[Path] = []
    for folder in sorted(folders):
        removed += sweep_temporaries(folder)
    return removed


def _never() -> bool:
    return False


@dataclass(frozen=True)
class ApplyContext:
    """What apply needs besides the plan.

    `serials`: the serial each certificate's file held when the plan was made (None: none),
    for the owed-hook rule of reconciler.status. `manager`: our state folder's identity
    (reconciler.managed), marked on every file written. `cancelled()` true (SIGTERM in
    --watch): certificates not yet started and hooks are left for the next pass; a write in
    progress finishes. `refuse_hooks`: why no command may run this pass (an untrusted
    manifest); each hook is reported failed and stays owed. `skip_hooks` (--no-hooks): the
    files converge, every hook is recorded as owed, not run. `cwd`: where hooks run.
    `confirm_reload(certs)`: after a command exited 0, why its services still present the
    old certificate (reconciler.probe); the command then counts as failed and stays owed."""

    issuer: Issuer
    workers: int = 4
    serials: Mapping[str, str | None] = field(default_factory=dict)
    manager: str | None = None
    cancelled: Callable[[], bool] = _never
    refuse_hooks: str | None = None
    skip_hooks: bool = False
    secrets: tuple[bytes, ...] = ()
    cwd: Path | None = None
    guests: ProxmoxCLI | None = None  # how Proxmox guests are reached (None: pct/qm in PATH)
    confirm_reload: Callable[[list[DesiredCert]], str | None] | None = None


def apply(plan: Plan, ctx: ApplyContext, reporter: ApplyReporter) -> Result:
    """Carry out `plan`: every certificate's files (in parallel, one failure never stops
    the others), then each distinct hook once, for the certificates whose files are in place.
    `reporter` records each step in the status store as the owed-hook rule needs."""
    result = Result([CertResult(p.cert.name, (), False, p.error) for p in plan.errors])
    todo = [p for p in plan.certificates if p.actions and not p.error]
    reporter.starting(plan, todo, ctx.serials)
    outcomes = _deploy_all(todo, ctx, reporter)
    result.certificates += outcomes.values()
    reporter.files_done(plan, todo, outcomes)
    delivered = _deliver(todo, outcomes, ctx, reporter)
    result.deliveries += delivered.values()
    fault_point("before_hooks")
    by_name = {p.cert.name: p for p in plan.certificates}
    for hook in plan.hooks:
        # a legacy guest entry's command moves the delivered files: not before they are there
        ready = [n for n in hook.certificates if n in outcomes and outcomes[n].ok and _delivered(delivered.get(n))]
        if ready:
            outcome = _run(hook, [by_name[n] for n in ready], ctx, reporter)
            if outcome is not None:
                result.hooks.append(outcome)
    return result


def _deliver(
    todo: list[CertPlan], outcomes: dict[str, CertResult], ctx: ApplyContext, reporter: ApplyReporter
) -> dict[str, DeliveryOutcome]:
    """Into Proxmox guests, for the certificates whose host files are in place."""
    status = reporter.status
    dctx = DeliveryContext(status.cert, reporter.save_now, ctx.issuer.root_pem, ctx.guests, ctx.workers)
    return deliver_all([p for p in todo if p.cert.name in outcomes and outcomes[p.cert.name].ok], dctx)


def _delivered(outcome: DeliveryOutcome | None) -> bool:
    return outcome is None or (outcome.ok and outcome.owed is None)


def _deploy_all(todo: list[CertPlan], ctx: ApplyContext, reporter: ApplyReporter) -> dict[str, CertResult]:
    """Each certificate's result, in plan order; none for those a cancellation left."""
    pending_dirs: set[Path] = set()

    def one(p: CertPlan) -> CertResult | None:
        if ctx.cancelled():
            return None
        res = _deploy_one(p, ctx, pending_dirs)
        reporter.certificate_done()
        return res

    with ThreadPoolExecutor(max_workers=max(1, ctx.workers)) as pool:
        results = [res for res in pool.map(one, todo) if res is not None]
    # every rename of the pass is durable before it is recorded or any hook runs
    fsync_dirs(pending_dirs)
    return {res.name: res for res in results}


def _deploy_one(p: CertPlan, ctx: ApplyContext, pending_dirs: set[Path]) -> CertResult:
    cert = p.cert
    names = tuple(a.action for a in p.actions)
    try:
        changed, written = deploy(p, ctx.issuer, pending_dirs, ctx.manager)
        return CertResult(cert.name, names, True, content_changed=changed, written=written)
    except IssuerError as exc:
        return CertResult(cert.name, names, False, str(exc), transient=exc.transient)
    except DeployError as exc:
        return CertResult(cert.name, names, False, str(exc))
    except OSError as exc:
        return CertResult(cert.name, names, False, os_error(exc, "read or write", Path(exc.filename or cert.cert_path)))
    except Exception as exc:  # one certificate's bug or bad answer must not stop the others
        log.debug("unexpected failure for %s", cert.name, exc_info=True)
        return CertResult(cert.name, names, False, f"unexpected error: {type(exc).__name__}: {exc}")


def _run(hook: HookRun, plans: list[CertPlan], ctx: ApplyContext, reporter: ApplyReporter) -> HookOutcome | None:
    """Run one distinct command for the certificates whose files are in place (None: it
    was left for later, cancelled or skipped, and stays owed)."""
    ready = [p.cert.name for p in plans]
    if ctx.cancelled():
        reporter.hook_left(hook.command, ready)
        return None
    if ctx.skip_hooks:
        reporter.hook_skipped(hook.command, ready)
        return None
    fault_point("before_hook")
    if ctx.refuse_hooks:
        outcome = HookOutcome(hook.command, tuple(ready), False, None, False, (), 0.0, refused=ctx.refuse_hooks)
    else:
        certs = [p.cert for p in plans]
        actions = {p.cert.name: (p.content_action or p.actions[0]).action for p in plans}
        timeout = max(c.hook_timeout for c in certs).total_seconds()
        outcome = run_hook(hook.command, certs, actions, timeout, ctx.cwd, secrets=ctx.secrets)
        not_taken = ctx.confirm_reload(certs) if outcome.ok and ctx.confirm_reload is not None else None
        if not_taken:
            outcome = replace(outcome, ok=False, not_taken=not_taken)
    reporter.hook_finished(outcome, ready)
    return outcome
