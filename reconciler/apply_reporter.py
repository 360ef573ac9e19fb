"""What `apply` tells the world as it goes: the status store, the log, a progress bar.

Apply calls one method per event of its plan, in pass order; this is where each event
becomes the status store's record (reconciler.status: the owed-hook rule) and is saved at
the moments that rule needs: before the first file changes, after the last rename, and
after each hook that succeeded (a kill during a later hook must not run it again).
"""

from __future__ import annotations

import logging
import sys
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Mapping

from reconciler.hooks import HookOutcome
from reconciler.plan import CertPlan, Plan
from reconciler.status import HookRun, StatusStore

if TYPE_CHECKING:  # pragma: no cover  (apply imports this module)
    from reconciler.apply import CertResult

log = logging.getLogger("reconciler.apply")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ApplyReporter:
    """`save`: write the store at the moments the owed-hook rule needs (a pass); False
    keeps the records in memory only. `progress`: a bar on stderr (None: when a TTY)."""

    def __init__(
        self,
        status: StatusStore,
        progress: bool | None = None,
        save: bool = True,
        now: Callable[[], datetime] = _utcnow,
    ):
        self.status = status
        self.save = save
        self.now = now
        self.progress = progress
        self._bar: _Progress | None = None

    def _save(self) -> None:
        if self.save:
            self.status.save()

    def save_now(self) -> None:
        """For stages that record as they go (guest deliveries: reload owed before the files move)."""
        self._save()

    # ----------------------------------------------------------------- before any file
    def starting(self, plan: Plan, todo: list[CertPlan], serials: Mapping[str, str | None]) -> None:
        # a killed pass's deployments first: a certificate it replaced owes its hook,
        # whatever this pass does with it (even if it replaces it again, or fails to)
        self.status.settle(dict(serials))
        self.status.nothing_to_run({p.cert.name for p in plan.certificates if not p.cert.post_renewal_command})
        deploying = [p for p in todo if p.content_action]
        for p in deploying:
            self.status.cert(p.cert.name).begin_deploy(serials.get(p.cert.name))
        for p in todo:
            if p.content_action is None and p.writes_files and p.cert.post_renewal_command:
                self.status.cert(p.cert.name).begin_rewrite()
        self._save()
        self._bar = _Progress(len(deploying), self.progress)

    def certificate_done(self) -> None:
        """Called from the worker threads."""
        if self._bar is not None:
            self._bar.tick()

    # ----------------------------------------------------------------- after the renames
    def files_done(self, plan: Plan, todo: list[CertPlan], outcomes: Mapping[str, "CertResult"]) -> None:
        if self._bar is not None:
            self._bar.done()
        stamp = self.now().isoformat()
        for p in todo:
            self._record(p, outcomes.get(p.cert.name), stamp)
        for p in plan.errors:
            self.status.cert(p.cert.name).failed(p.error or "", stamp, count=False)
            log.error("%s: %s", p.cert.name, p.error)
        # "deployed, hook owed" is saved before anything runs, so a crash cannot forget it
        self._save()

    def _record(self, p: CertPlan, res: "CertResult | None", stamp: str) -> None:
        record = self.status.cert(p.cert.name)
        if res is None:  # never started: the pass was cancelled
            if p.content_action:
                record.cancel_deploy()
            record.cancel_rewrite()
            return
        if p.content_action:
            record.end_deploy(res.content_changed, bool(p.cert.post_renewal_command))
        if res.ok:
            record.succeeded(stamp, p.content_action.action if res.content_changed and p.content_action else None)
            log.info("%s: %s (%s)", p.cert.name, ", ".join(res.actions), "; ".join(a.reason for a in p.actions))
        else:
            record.cancel_rewrite()
            record.failed(res.error or "", stamp)
            log.error("%s: %s failed: %s", p.cert.name, ", ".join(res.actions), res.error)

    # ----------------------------------------------------------------- hooks
    def hook_left(self, command: str, ready: list[str]) -> None:
        log.warning("stopping: hook %r for %s left for the next start (recorded as owed)", command, ", ".join(ready))

    def hook_skipped(self, command: str, ready: list[str]) -> None:
        run = HookRun(command, "skipped", None, self.now().isoformat())
        for name in ready:
            self.status.cert(name).hook_ran(run)
        log.warning(
            "hook %r for %s not run (--no-hooks); recorded as owed, the next pass without --no-hooks runs it",
            command,
            ", ".join(ready),
        )

    def hook_finished(self, outcome: HookOutcome, ready: list[str]) -> None:
        run = HookRun(
            outcome.command, _result(outcome), outcome.returncode, self.now().isoformat(), list(outcome.output_tail)
        )
        for name in ready:
            self.status.cert(name).hook_ran(run)
        if outcome.ok:
            self._save()  # at once: a kill during a later hook must not run this one again
            log.info("hook %r for %s succeeded in %.1fs", outcome.command, ", ".join(ready), outcome.seconds)
            return
        log.error(
            "hook %r for %s %s; it will run again on the next pass. Last output: %s",
            outcome.command,
            ", ".join(ready),
            outcome.describe(),
            " | ".join(outcome.output_tail[-3:]) or "(none)",
        )


def _result(outcome: HookOutcome) -> str:
    if outcome.ok:
        return "ok"
    if outcome.timed_out:
        return "timeout"
    if outcome.not_taken:
        return "not taken"  # exited 0, but a `serve` endpoint kept the old certificate
    return "refused" if outcome.refused else "failed"


class _Progress:
    """A one-line progress bar on a TTY when a pass issues many certificates."""

    def __init__(self, total: int, enabled: bool | None):
        self.total = total
        self.count = 0
        self.enabled = (sys.stderr.isatty() if enabled is None else enabled) and total >= 20
        self._lock = threading.Lock()

    def tick(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.count += 1
            if self.count % 10 == 0 or self.count == self.total:
                width = 30
                filled = int(width * min(self.count, self.total) / self.total)
                sys.stderr.write(
                    f"\r[{'#' * filled}{'.' * (width - filled)}] "
                    f"{min(self.count, self.total)}/{self.total} certificates"
                )
                sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
