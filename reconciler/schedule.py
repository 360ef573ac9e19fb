"""`--watch`'s schedule: WHEN the next pass runs, and what it leaves for later. Pure: file
events, signals and pass outcomes go in; the next job and how long to sleep come out. It
reads no clock and no file of its own: the clock (`monotonic()` for timers, `time()` for
certificate deadlines, which live in wall-clock time) and `stamp_of(path, follow)` (a file's
stat stamp) are injected, so tests drive it with a fake clock, fast.

What starts a pass (controller-runtime style: an event only says "look again"):

* a save of the manifest, once the burst of writes settles (QUIET after the last event, or
  SETTLE after a rename onto it or a close after writing: the save is complete);
* a managed file whose stamp differs from what the last pass left (our own writes wake us
  too, and compare equal), or a watched folder deleted or moved;
* a file a pass wrote that no longer matches when the pass re-read it: a recheck pass
  (RECHECKS_AT_ONCE in a row run at once, then they back off);
* timers: the earliest renewal deadline, the next retry after a failure (backoff.py), the
  resync period, a retry after a pass that could not run, and while a Proxmox guest owes a
  delivery because it is not running, a poll every GUEST_POLL (the pass looks at the guest);
* SIGHUP: re-read the manifest, retry everything in backoff now.

Not thread-safe by itself: the runner (loop.py) holds one lock around every call.
"""

from __future__ import annotations

import logging
import os.path
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Protocol

from reconciler.backoff import Backoff
from reconciler.outcome import PassOutcome
from reconciler.passes import Deferral

log = logging.getLogger("reconciler.watch")

QUIET = 0.15  # a burst of writes to the manifest has settled after this long without events
SETTLE = 0.03  # after a rename over the manifest or a close after writing: the save is complete
MAX_SLEEP = 60.0  # look at the wall clock at least this often (suspend, clock steps)
LOCK_RETRY = 5.0  # another reconcile holds the lock: look again this much later
RECHECKS_AT_ONCE = 3  # rechecks in a row before they back off
CA, PASS, RECHECK = "ca", "pass", "recheck"  # backoff keys that are not certificate names
# a stopped guest owing a delivery is looked at this often (--guest-poll): `pct status` and
# `qm status` cost about half a second of a node's CPU, and a guest that starts gets its files within this
GUEST_POLL = 30.0
RESYNC_REASON, GUEST_POLL_REASON = "resync", "guest poll"  # passes that look at every guest


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


StampOf = Callable[[str, bool], tuple]  # (path, follow symlinks) -> stat stamp; () when absent
RealPath = Callable[[str], str]  # a path -> where it leads, every symlink followed (os.path.realpath)


@dataclass
class Job:
    reasons: list[str]
    first: bool = False
    force: bool = False  # SIGHUP: re-read the manifest, retry everything in backoff now
    final: bool = True  # the manifest's burst of writes has settled


@dataclass
class PassReport:
    """What a pass (or an attempt at one) means for the schedule."""

    ran: bool = False
    not_ready: bool = False  # the manifest is still being written
    failed: bool = False
    retry_in: float | None = None
    run_again: bool = False  # the CA answers again: everything that waited goes now
    recheck: bool = False  # what this pass wrote changed again before it ended
    next_renewal: float | None = None  # wall clock
    managed: dict[str, tuple[bool, tuple]] | None = None  # path -> (follow symlinks, stamp the pass left)
    folders: set[str] = field(default_factory=set)
    guests_waiting: bool = False  # a delivery is owed to a guest that is not running


class Schedule:
    def __init__(
        self,
        resync: float,
        clock: Clock,
        stamp_of: StampOf,
        backoff: Callable[[], Backoff] = Backoff,
        guest_poll: float = GUEST_POLL,
        real_path: RealPath | None = None,
    ):
        """`real_path`: where an "allow_symlink" entry's files really are, to watch them there
        too (the runner passes os.path.realpath; None: links are not followed)."""
        self.resync = resync
        self.real_path = real_path
        self.guest_poll = guest_poll
        self.clock = clock
        self.stamp_of = stamp_of
        self.issues, self.hooks, self.ca, self.passes, self.rechecks = (backoff() for _ in range(5))
        self.deliveries = backoff()  # failed deliveries into Proxmox guests, like hooks
        self.guest_poll_at: float | None = None  # monotonic
        self.rechecks_in_a_row = 0
        self.manifest_names: set[str] = set()
        self.manifest_last_event = float("-inf")
        self.manifest_due: float | None = None  # monotonic
        self.managed: dict[str, tuple[bool, tuple]] = {}
        self.folders: set[str] = set()  # where managed files live: the runner watches them
        self.dirty: set[str] = set()
        self.stale_folders = False
        self.files_due: float | None = None  # monotonic
        self.force_pending = False
        self.rerun_at: float | None = None  # monotonic
        self.rerun_reason = "retry"
        self.resync_at = 0.0  # monotonic
        self.next_renewal: float | None = None  # wall clock
        self.retry_at: float | None = None  # wall clock

    # ------------------------------------------------------------------ events

    def on_event(self, src: str, dest: str, kind: str, folder_gone: bool = False) -> bool:
        """A file event (watchdog's `event_type`); `folder_gone`: a watched folder itself was
        deleted or moved. True when it matters (the runner wakes up)."""
        now = self.clock.monotonic()
        if src in self.manifest_names or dest in self.manifest_names:
            # a rename onto the manifest, or a close after writing it, ends a save;
            # anything else (truncate, partial write, delete) waits for the quiet period
            commit = (kind == "moved" and dest in self.manifest_names) or kind == "closed"
            self.manifest_last_event = now
            self.manifest_due = now + (SETTLE if commit else QUIET)
        elif src in self.managed or dest in self.managed:
            self.dirty.update(p for p in (src, dest) if p in self.managed)
            self.files_due = now + QUIET
        elif folder_gone:
            self.stale_folders = True
            self.files_due = now + QUIET
        else:
            return False
        return True

    def hup(self) -> None:
        self.force_pending = True

    def watching(self, folders: set[str]) -> None:
        """The runner started watching `folders`: what happened there before went unseen."""
        fresh = [p for p in self.managed if os.path.dirname(p) in folders]
        if fresh:
            self.dirty.update(fresh)
            self.files_due = self.clock.monotonic()

    # ------------------------------------------------------------------ when

    def timeout(self) -> float:
        """Seconds until the next job may be due (the runner sleeps until then or an event)."""
        if self.force_pending:
            return 0.0
        mono, wall = self.clock.monotonic(), self.clock.time()
        settled_at = self.manifest_last_event + QUIET
        if mono < settled_at:
            # the manifest is being written: nothing but its own save may start a pass
            due = settled_at if self.manifest_due is None else min(settled_at, self.manifest_due)
            return max(0.0, due - mono)
        candidates = [self.resync_at - mono, MAX_SLEEP]
        candidates += [
            t - mono for t in (self.manifest_due, self.files_due, self.rerun_at, self.guest_poll_at) if t is not None
        ]
        candidates += [t - wall + 0.01 for t in (self.next_renewal, self.retry_at) if t is not None]
        return max(0.0, min(candidates))

    def next_job(self) -> Job | None:
        """The pass to start now, if any is due; consumes what it answers."""
        mono = self.clock.monotonic()
        force, self.force_pending = self.force_pending, False
        final = mono - self.manifest_last_event >= QUIET - 0.005
        saved = self.manifest_due is not None and mono >= self.manifest_due
        if not (final or saved or force):
            return None  # someone is writing the manifest: wait for the burst to settle
        reasons = ["SIGHUP"] if force else []
        if saved:
            self.manifest_due = None
            reasons.append("manifest saved")
        reasons += self._files_changed(mono) + self._timers_due(mono)
        if not reasons:
            return None
        if force:
            for b in (self.issues, self.hooks, self.ca, self.passes, self.deliveries):
                b.clear()
        return Job(reasons, force=force, final=final)

    def first_job(self) -> Job:
        return Job(["start"], first=True, force=True)

    def _files_changed(self, mono: float) -> list[str]:
        if self.files_due is None or mono < self.files_due:
            return []
        dirty, self.dirty, self.files_due = self.dirty, set(), None
        stale, self.stale_folders = self.stale_folders, False
        managed = self.managed
        changed = sorted(p for p in dirty if p in managed and self.stamp_of(p, managed[p][0]) != managed[p][1])
        if changed:
            return [f"{changed[0]} changed" + (f" (and {len(changed) - 1} more files)" if len(changed) > 1 else "")]
        return ["a watched folder was deleted or moved"] if stale else []

    def _timers_due(self, mono: float) -> list[str]:
        wall = self.clock.time()
        reasons = []
        if self.rerun_at is not None and mono >= self.rerun_at:
            self.rerun_at = None
            reasons.append(self.rerun_reason)
        if mono >= self.resync_at:
            reasons.append(RESYNC_REASON)
        if self.guest_poll_at is not None and mono >= self.guest_poll_at:
            self.guest_poll_at = None
            reasons.append(GUEST_POLL_REASON)
        if self.next_renewal is not None and wall >= self.next_renewal:
            self.next_renewal = None
            reasons.append("renewal due")
        if self.retry_at is not None and wall >= self.retry_at:
            self.retry_at = None
            reasons.append("backoff over")
        return reasons

    # ------------------------------------------------------------------ what a pass leaves for later

    def manifest_changed(self, touched: list[str], issuer_changed: bool) -> None:
        """A save changed these entries: they are tried at once; another CA starts afresh."""
        self.issues.forget(touched)
        self.hooks.forget(touched)
        self.deliveries.forget(touched)
        if issuer_changed:  # nothing learnt about the old CA applies
            self.ca.clear()
            self.issues.clear()

    def deferral(self, names: set[str]) -> Deferral:
        """What the next pass over `names` (the manifest's certificates) leaves for later."""
        for b in (self.issues, self.hooks, self.deliveries):
            b.retain(names)
        now = self.clock.time()
        limit = None
        if self.ca.active(CA):  # one probe at a time while the CA does not answer
            limit = 1 if now >= self.ca.until[CA] else 0
        return Deferral(self.issues.waiting(now), self.hooks.waiting(now), limit, self.deliveries.waiting(now))

    # ------------------------------------------------------------------ pass outcomes

    def ran(self, outcome: PassOutcome) -> PassReport:
        """Feed a pass's outcome to the backoffs; what the runner hands to finish()."""
        self.passes.clear()
        run_again = self._record_failures(outcome, self.clock.time())
        managed: dict[str, tuple[bool, tuple]] = {}
        for c in outcome.certificates:
            files = [(c.cert_path, c.stamps[0]), (c.key_path, c.stamps[1])]
            if c.ca_path is not None:  # often one file for many entries: their stamps agree
                files.append((c.ca_path, c.ca_stamp))
            for path, stamp in files:
                managed[path] = (c.follow_symlinks, stamp)
                if c.follow_symlinks and self.real_path is not None:
                    # the writes land at the link's final target, maybe in another folder: a
                    # change there is a change of the file (the stamp is the target's)
                    managed.setdefault(self.real_path(path), (True, stamp))
        nxt = outcome.next_renewal(datetime.fromtimestamp(self.clock.time(), timezone.utc))
        return PassReport(
            ran=True,
            run_again=run_again,
            recheck=outcome.recheck,
            next_renewal=nxt.timestamp() if nxt else None,
            managed=managed,
            folders={os.path.dirname(p) for p in managed},
            guests_waiting=any(c.delivery_waits for c in outcome.certificates),
        )

    def failed(self) -> PassReport:
        """A pass that could not run (an unsafe state folder, a CA misconfigured, a bug)."""
        return PassReport(failed=True, retry_in=self.passes.failed(PASS, self.clock.time()))

    def finish(self, report: PassReport) -> None:
        """The pass thread has ended: set the timers from what it reported."""
        mono = self.clock.monotonic()
        if report.not_ready:
            # empty or half-written: look again once the quiet period has passed
            due = max(self.manifest_last_event + QUIET, mono + SETTLE)
            self.manifest_due = due if self.manifest_due is None else max(self.manifest_due, due)
            return
        if report.managed is not None:
            self.managed = report.managed
            self.folders = report.folders
        if report.ran or report.failed:
            self.resync_at = mono + self.resync
        if report.ran:
            self.guest_poll_at = mono + self.guest_poll if report.guests_waiting else None
        self.next_renewal = report.next_renewal
        wall = self.clock.time()
        backoffs = (self.issues, self.hooks, self.ca, self.deliveries)
        retries = [t for t in (b.next_at(wall) for b in backoffs) if t is not None]
        self.retry_at = min(retries) if retries else None
        if report.retry_in is not None:
            self.rerun_at, self.rerun_reason = mono + report.retry_in, "retry"
        if report.recheck:
            at = mono + self._recheck_delay()
            if self.rerun_at is None or at <= self.rerun_at:
                self.rerun_at, self.rerun_reason = at, "recheck"
        elif report.ran:
            self.rechecks_in_a_row = 0
            self.rechecks.succeeded(RECHECK)
        if report.run_again:
            self.rerun_at, self.rerun_reason = mono, "CA answers again"

    def _recheck_delay(self) -> float:
        """The first rechecks in a row run at once; a file that changes again after every pass
        (another program fighting over it) is then looked at with backoff, not in a hot loop."""
        self.rechecks_in_a_row += 1
        if self.rechecks_in_a_row <= RECHECKS_AT_ONCE:
            return 0.0
        wait = self.rechecks.failed(RECHECK, self.clock.time())
        log.warning("a managed file keeps changing after every pass that repairs it; looking again in %.0fs", wait)
        return wait

    def _record_failures(self, outcome: PassOutcome, now: float) -> bool:
        """True when the CA answers again after an outage: everything that waited for it goes
        in the next pass, at once."""
        run_again = self._record_ca(outcome, now)
        for c in outcome.certificates:
            if c.attempted and not c.failed:
                self.issues.succeeded(c.name)
            elif c.attempted and not c.transient:
                wait = self.issues.failed(c.name, now)
                log.info("%s: next attempt in %.0fs (failure %d in a row)", c.name, wait, self.issues.failures[c.name])
            if c.hook_ok is True:
                self.hooks.succeeded(c.name)
            elif c.hook_ok is False:
                wait = self.hooks.failed(c.name, now)
                log.info("%s: post-renewal command runs again in %.0fs", c.name, wait)
            if c.delivery_ok is True:
                self.deliveries.succeeded(c.name)
            elif c.delivery_ok is False:
                wait = self.deliveries.failed(c.name, now)
                log.info("%s: delivery into its guest is tried again in %.0fs", c.name, wait)
        return run_again

    def _record_ca(self, outcome: PassOutcome, now: float) -> bool:
        transient = [c for c in outcome.certificates if c.transient]
        if outcome.ca_unreachable:
            first = not self.ca.active(CA)
            wait = self.ca.failed(CA, now)
            if first:
                log.warning(
                    "the CA does not answer (%s); until it does, one certificate at a time probes it, next in %.0fs",
                    transient[0].failed,
                    wait,
                )
            else:
                log.warning("the CA still does not answer; next probe in %.0fs", wait)
            return False
        for c in transient:  # the CA works for others: this one backs off on its own
            self.issues.failed(c.name, now)
        if any(c.content_changed for c in outcome.certificates) and self.ca.succeeded(CA):
            log.info("the CA answers again; issuing everything that waited for it now")
            return True
        return False

    @property
    def ca_reachable(self) -> bool:
        return not self.ca.active(CA)
