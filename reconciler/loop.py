"""`reconcile --watch`: decides WHEN to run a pass, and nothing else.

Level-triggered, in the style of controller-runtime: an event only says "look again";
every pass re-reads the manifest (a stat when unchanged) and the disk (a stat per file
when unchanged), and plans from scratch. What starts a pass:

* a save of the manifest (watchdog on its folder), once the burst of writes settles;
* a managed certificate or key deleted, replaced or re-moded (watchdog on their folders),
  unless its stat is exactly what the last pass left (our own writes wake us too);
* a file a pass wrote that no longer matches when the pass re-reads it: a recheck pass
  (after rechecks too; three in a row run at once, then they back off);
* timers: the earliest renewal deadline, the next retry after a failure (see backoff.py),
  the resync period; the main thread sleeps in select() until then (no polling);
* SIGHUP. SIGTERM/SIGINT stop starting new work, let the current write finish, exit 0.

Threads: the main thread owns the schedule and the signals and never blocks for long;
passes run one at a time on a worker thread (under the same lock as one-shot runs);
watchdog's threads only record events and wake the main thread through a pipe.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from reconciler.backoff import Backoff
from reconciler.tracker import CHANGED, NOT_READY, ManifestTracker

log = logging.getLogger("reconciler.watch")

QUIET = 0.15  # a burst of writes to the manifest has settled after this long without events
SETTLE = 0.03  # after a rename over the manifest or a close after writing: the save is complete
MAX_SLEEP = 60.0  # look at the wall clock at least this often (suspend, clock steps)
STOP_GRACE = 4.5  # SIGTERM: how long the current pass may take to wind down
LOCK_RETRY = 5.0  # another reconcile holds the lock: look again this much later
MAX_WATCHED_FOLDERS = 512  # inotify costs a thread per folder in watchdog; beyond this, resync covers
CA = "ca"
RECHECK = "recheck"
RECHECKS_AT_ONCE = 3  # rechecks in a row before they back off


@dataclass
class Job:
    reasons: list[str]
    first: bool = False
    force: bool = False  # SIGHUP: re-read the manifest, retry everything in backoff now
    final: bool = True  # the manifest's burst of writes has settled


@dataclass
class Outcome:
    ran: bool = False
    not_ready: bool = False
    failed: bool = False
    retry_in: float | None = None
    run_again: bool = False  # the CA answers again: everything that waited goes now
    recheck: bool = False  # what this pass wrote changed again before it ended
    next_renewal: float | None = None
    managed: dict[str, tuple[bool, tuple]] | None = None
    folders: set[str] = field(default_factory=set)


def sd_notify(message: str) -> None:
    """systemd readiness/status (Type=notify), without a dependency: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("cannot notify systemd at %s: %s", address, exc)


def _stat_stamp(path: str, follow: bool) -> tuple:
    from reconciler.observe import stat_file

    return stat_file(Path(path), follow).stamp


class Watcher:
    def __init__(self, settings, resync: float, poll: bool = False, metrics=None, metrics_file: Path | None = None):
        from reconciler.observe import ObservationCache

        self.settings = settings
        self.resync = resync
        self.poll = poll
        self.metrics = metrics
        self.metrics_file = metrics_file
        self.tracker = ManifestTracker(settings)
        self.cache = ObservationCache(settings.state_dir)  # kept across passes: unchanged files cost a stat
        self.issue_backoff = Backoff()
        self.hook_backoff = Backoff()
        self.ca = Backoff()
        self.pass_backoff = Backoff()
        self.recheck_backoff = Backoff()
        self.rechecks_in_a_row = 0
        self.cancel = threading.Event()

        # shared with watchdog's threads, under self.lock
        self.lock = threading.Lock()
        self.manifest_names: set[str] = set()
        self.manifest_last_event = float("-inf")
        self.manifest_due: float | None = None
        self.managed: dict[str, tuple[bool, tuple]] = {}  # path -> (follow symlinks, stamp after the last pass)
        self.dirty: set[str] = set()
        self.files_due: float | None = None
        self.watched: dict[str, tuple[object, int]] = {}  # folder -> (ObservedWatch, inode)
        self.stale_folders = False

        # main thread only
        self.stop_signal: int | None = None
        self.hup = False
        self.thread: threading.Thread | None = None
        self.outcome: Outcome | None = None
        self.rerun_at: float | None = None  # monotonic
        self.rerun_reason = "retry"
        self.resync_at = 0.0  # monotonic
        self.next_renewal: float | None = None  # wall clock
        self.retry_at: float | None = None  # wall clock
        self.first_done = False
        self.cert_folders: set[str] = set()
        self.handler = _Handler(self)
        self._too_many_folders_logged = False
        self._refresh_manifest_names()

    # ------------------------------------------------------------------ events (watchdog threads)

    def _refresh_manifest_names(self) -> None:
        path = str(self.tracker.path)
        names = {path, os.path.realpath(path)}  # a symlinked manifest: its target's folder too
        with self.lock:
            self.manifest_names = names

    def on_fs_event(self, event) -> None:
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        kind = event.event_type
        now = time.monotonic()
        with self.lock:
            if src in self.manifest_names or dest in self.manifest_names:
                # a rename onto the manifest, or a close after writing it, ends a save;
                # anything else (truncate, partial write, delete) waits for the quiet period
                commit = (kind == "moved" and dest in self.manifest_names) or kind == "closed"
                self.manifest_last_event = now
                self.manifest_due = now + (SETTLE if commit else QUIET)
            elif src in self.managed or dest in self.managed:
                self.dirty.update(p for p in (src, dest) if p in self.managed)
                self.files_due = now + QUIET
            elif event.is_directory and kind in ("deleted", "moved") and src in self.watched:
                self.stale_folders = True
                self.files_due = now + QUIET
            else:
                return
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except OSError as exc:  # a full pipe already means "wake up"
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.observer = PollingObserver(timeout=1.0) if self.poll else Observer(timeout=5.0)
        self.observer.start()
        self._sync_watches(self._manifest_folders())
        desired = self.tracker.desired
        log.info(
            "watching %s (%s); resync every %gs; issuer: %s", self.tracker.path, "polling every 1s" if self.poll else "inotify", self.resync,
            desired.issuer.describe(self.settings.state_dir) if desired is not None and desired.issuer else "not known yet",
        )
        self._start(Job(["start"], first=True, force=True))
        try:
            while True:
                self._sleep(self._timeout())
                if self.stop_signal is not None:
                    return self._shutdown()
                if self.hup:
                    self.hup = False
                    self.force_pending = True
                    log.info("SIGHUP: re-reading the manifest and retrying everything now")
                if self.thread is not None:
                    if self.outcome is None:  # set by the pass thread just before it wakes us
                        continue
                    self._finish()
                job = self._due_job()
                if job is not None:
                    self._start(job)
        finally:
            signal.set_wakeup_fd(-1)

    force_pending = False

    def _on_stop(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self.stop_started = time.monotonic()

    def _on_hup(self, signum, frame) -> None:
        self.hup = True

    def _sleep(self, timeout: float) -> None:
        try:
            select.select([self.wake_r], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _timeout(self) -> float:
        if self.thread is not None:
            return MAX_SLEEP  # the pass wakes us when it ends
        mono, wall = time.monotonic(), time.time()
        if self.force_pending:
            return 0.0
        candidates = [self.resync_at - mono, MAX_SLEEP]
        with self.lock:
            settled_at = self.manifest_last_event + QUIET
            if mono < settled_at:
                # the manifest is being written: nothing but its own save may start a pass
                due = settled_at if self.manifest_due is None else min(settled_at, self.manifest_due)
                return max(0.0, due - mono)
            candidates += [t - mono for t in (self.manifest_due, self.files_due) if t is not None]
        if self.rerun_at is not None:
            candidates.append(self.rerun_at - mono)
        for at in (self.next_renewal, self.retry_at):
            if at is not None:
                candidates.append(at - wall + 0.01)
        return max(0.0, min(candidates))

    def _due_job(self) -> Job | None:
        mono, wall = time.monotonic(), time.time()
        reasons: list[str] = []
        force = self.force_pending
        if force:
            self.force_pending = False
            reasons.append("SIGHUP")
        with self.lock:
            final = mono - self.manifest_last_event >= QUIET - 0.005
            saved = self.manifest_due is not None and mono >= self.manifest_due
            if not (final or saved or force):
                return None  # someone is writing the manifest: wait for the burst to settle
            if saved:
                self.manifest_due = None
                reasons.append("manifest saved")
            dirty: set[str] = set()
            stale = False
            if self.files_due is not None and mono >= self.files_due:
                dirty, self.dirty, self.files_due = self.dirty, set(), None
                stale, self.stale_folders = self.stale_folders, False
            managed = self.managed
        changed = sorted(p for p in dirty if p in managed and _stat_stamp(p, managed[p][0]) != managed[p][1])
        if changed:
            reasons.append(f"{changed[0]} changed" + (f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""))
        elif stale:
            reasons.append("a watched folder was deleted or moved")
        if self.rerun_at is not None and mono >= self.rerun_at:
            self.rerun_at = None
            reasons.append(self.rerun_reason)
        if mono >= self.resync_at:
            reasons.append("resync")
        if self.next_renewal is not None and wall >= self.next_renewal:
            self.next_renewal = None
            reasons.append("renewal due")
        if self.retry_at is not None and wall >= self.retry_at:
            self.retry_at = None
            reasons.append("backoff over")
        if not reasons:
            return None
        return Job(reasons, force=force, final=final)

    def _start(self, job: Job) -> None:
        log.debug("pass starting: %s", ", ".join(job.reasons))
        self.outcome = None
        self.thread = threading.Thread(target=self._run_job, args=(job,), name="reconcile-pass", daemon=True)
        self.thread.start()

    def _run_job(self, job: Job) -> None:
        from reconciler.folders import FolderError
        from reconciler.statefiles import StatusError

        try:
            self.outcome = self._work(job)
        except (FolderError, StatusError) as exc:
            # an unsafe or unwritable state folder: the operator must act, so say why on
            # every pass, touch nothing, and keep retrying so the fix is picked up unaided
            wait = self.pass_backoff.failed("pass", time.time())
            log.error("pass refused: %s; trying again in %.0fs", exc, wait)
            self.outcome = Outcome(failed=True, retry_in=wait)
        except BaseException:  # a bug must not kill the service silently; retry with backoff
            log.exception("pass failed unexpectedly; retrying later")
            wait = self.pass_backoff.failed("pass", time.time())
            self.outcome = Outcome(failed=True, retry_in=wait)
        finally:
            self._wake()

    def _finish(self) -> None:
        assert self.thread is not None
        self.thread.join()
        self.thread = None
        out = self.outcome or Outcome(failed=True, retry_in=LOCK_RETRY)
        mono = time.monotonic()
        if out.not_ready:
            # empty or half-written: look again once the quiet period has passed
            with self.lock:
                due = max(self.manifest_last_event + QUIET, mono + SETTLE)
                self.manifest_due = due if self.manifest_due is None else max(self.manifest_due, due)
            return
        if out.managed is not None:
            with self.lock:
                self.managed = out.managed
            self.cert_folders = out.folders
        self._refresh_manifest_names()
        added = self._sync_watches(self.cert_folders)
        if added:
            # anything that happened there between the pass and the watch went unseen
            with self.lock:
                fresh = [p for p in self.managed if os.path.dirname(p) in added]
                if fresh:
                    self.dirty.update(fresh)
                    self.files_due = mono
        if out.ran or out.failed:
            self.resync_at = mono + self.resync
        self.next_renewal = out.next_renewal
        wall = time.time()
        retries = [b.next_at(wall) for b in (self.issue_backoff, self.hook_backoff, self.ca)]
        retries = [t for t in retries if t is not None]
        self.retry_at = min(retries) if retries else None
        if out.retry_in is not None:
            self.rerun_at, self.rerun_reason = mono + out.retry_in, "retry"
        if out.recheck:
            at = mono + self._recheck_delay()
            if self.rerun_at is None or at <= self.rerun_at:
                self.rerun_at, self.rerun_reason = at, "recheck"
        elif out.ran:
            self.rechecks_in_a_row = 0
            self.recheck_backoff.succeeded(RECHECK)
        if out.run_again:
            self.rerun_at, self.rerun_reason = mono, "CA answers again"
        if not self.first_done:
            self.first_done = True
            sd_notify("READY=1")

    def _recheck_delay(self) -> float:
        """The first rechecks in a row run at once; a file that changes again after every pass
        (another program fighting over it) is then looked at with backoff, not in a hot loop."""
        self.rechecks_in_a_row += 1
        if self.rechecks_in_a_row <= RECHECKS_AT_ONCE:
            return 0.0
        wait = self.recheck_backoff.failed(RECHECK, time.time())
        log.warning("a managed file keeps changing after every pass that repairs it; looking again in %.0fs", wait)
        return wait

    def _shutdown(self) -> int:
        name = signal.Signals(self.stop_signal).name
        sd_notify("STOPPING=1")
        self.cancel.set()
        if self.thread is not None and self.thread.is_alive():
            log.info("%s: letting the current pass finish its write, then stopping", name)
            self.thread.join(max(0.1, STOP_GRACE - (time.monotonic() - self.stop_started)))
            if self.thread.is_alive():
                log.warning("%s: a pass is still busy (a hook or a CA call); exiting without it (it runs again next start)", name)
                logging.shutdown()
                sys.stderr.flush()
                os._exit(0)
        log.info("%s: stopped", name)
        try:
            self.observer.stop()
        except Exception:  # stopping is best effort; we are exiting anyway
            pass
        return 0

    # ------------------------------------------------------------------ watches

    def _manifest_folders(self) -> set[str]:
        with self.lock:
            return {os.path.dirname(n) for n in self.manifest_names}

    def _sync_watches(self, folders: set[str]) -> set[str]:
        """Watch the manifest's folder(s) and `folders`; returns the folders newly watched."""
        from watchdog.events import (
            DirDeletedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )

        # no open/read events: our own reads of certificates must not wake us
        kinds = [FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent, DirDeletedEvent, DirMovedEvent]
        manifest = self._manifest_folders()
        wanted = sorted(manifest) + sorted(folders - manifest)
        if len(wanted) > MAX_WATCHED_FOLDERS:
            if not self._too_many_folders_logged:
                log.warning(
                    "managed files live in %d folders; watching %d of them, the others are checked every resync (--resync)",
                    len(wanted), MAX_WATCHED_FOLDERS,
                )
                self._too_many_folders_logged = True
            wanted = wanted[:MAX_WATCHED_FOLDERS]
        inodes = {}
        for folder in wanted:
            try:
                inodes[folder] = os.stat(folder).st_ino
            except OSError:
                pass  # not there yet: the pass that creates it is followed by another sync
        for folder in list(self.watched):
            watch, ino = self.watched[folder]
            if inodes.get(folder) != ino:
                try:
                    self.observer.unschedule(watch)
                except (KeyError, OSError):
                    pass
                with self.lock:
                    del self.watched[folder]
        added: set[str] = set()
        for folder, ino in inodes.items():
            if folder in self.watched:
                continue
            try:
                watch = self.observer.schedule(self.handler, folder, recursive=False, event_filter=kinds)
            except OSError as exc:
                log.warning("cannot watch %s (%s); changes there are noticed at the next resync", folder, exc.strerror or exc)
                continue
            with self.lock:
                self.watched[folder] = (watch, ino)
            added.add(folder)
        return added

    # ------------------------------------------------------------------ one pass (worker thread)

    def _work(self, job: Job) -> Outcome:
        from reconciler.issuers import IssuerError
        from reconciler.lock import LockTimeout
        from reconciler.passes import Deferral, run_pass

        started = time.monotonic()
        if job.force:
            for b in (self.issue_backoff, self.hook_backoff, self.ca, self.pass_backoff):
                b.clear()
        refresh = self.tracker.refresh(force=job.force, final=job.final)
        if refresh.outcome == NOT_READY:
            log.debug("manifest not completely written yet; looking again shortly")
            return Outcome(not_ready=True)
        if refresh.outcome == CHANGED:
            self.issue_backoff.forget(refresh.touched)  # an edited entry is tried at once
            self.hook_backoff.forget(refresh.touched)
            if refresh.issuer_changed:  # another CA: nothing learnt about the old one applies
                self.ca.clear()
                self.issue_backoff.clear()
        if self.metrics:
            self.metrics.set_manifest_valid(bool(self.tracker.valid))
        desired = self.tracker.desired
        if desired is None:
            self._record_manifest_state()
            self._write_metrics()
            return Outcome(ran=True)
        names = {c.name for c in desired.certificates}
        for b in (self.issue_backoff, self.hook_backoff):
            b.retain(names)
        now = time.time()
        issue_limit = None
        if self.ca.active(CA):
            issue_limit = 1 if now >= self.ca.until[CA] else 0
        deferral = Deferral(self.issue_backoff.waiting(now), self.hook_backoff.waiting(now), issue_limit)
        try:
            _snap, outcome = run_pass(
                self.settings, desired, progress=False, cache=self.cache, deferral=deferral,
                cancelled=self.cancel.is_set, sweep_files=job.first or job.force, manifest_state=self.tracker.state(),
            )
        except LockTimeout as exc:
            log.warning("%s; trying again in %gs", exc, LOCK_RETRY)
            return Outcome(failed=True, retry_in=LOCK_RETRY)
        except IssuerError as exc:
            wait = self.pass_backoff.failed("pass", time.time())
            log.error("pass failed: %s; trying again in %.0fs", exc, wait)
            if self.metrics:
                self.metrics.record_failed_pass(time.monotonic() - started, time.time())
                self._write_metrics()
            return Outcome(failed=True, retry_in=wait)
        self.pass_backoff.clear()
        run_again = self._record_failures(outcome, time.time())
        # also after a recheck pass: the re-read stamps already hold the damage, so its events
        # compare equal and nothing else would look before the resync (_finish paces repeats)
        if outcome.recheck:
            log.info("a file this pass wrote changed again before the pass ended; looking again")
        level = logging.INFO if outcome.changed or outcome.failures() or job.first or job.force else logging.DEBUG
        log.log(
            level, "pass (%s): %d changed, %d failed, %d of %d ready, %.2fs", ", ".join(job.reasons),
            outcome.changed, len(outcome.failures()), outcome.ready, len(outcome.certificates), outcome.duration,
        )
        if self.metrics:
            self.metrics.record(outcome, not self.ca.active(CA))
            self._write_metrics()
        sd_notify(
            f"STATUS={outcome.ready} of {len(outcome.certificates)} certificates ready; "
            f"manifest {'valid' if self.tracker.valid else 'INVALID'}; last pass {time.strftime('%H:%M:%S')}"
        )
        self._settle_memory(job)
        next_renewal = outcome.next_renewal(datetime.now(timezone.utc))
        managed = {}
        for c in outcome.certificates:
            managed[c.cert_path], managed[c.key_path] = (c.follow_symlinks, c.stamps[0]), (c.follow_symlinks, c.stamps[1])
        folders = {os.path.dirname(p) for p in managed}
        return Outcome(
            ran=True, run_again=run_again, recheck=outcome.recheck, managed=managed, folders=folders,
            next_renewal=next_renewal.timestamp() if next_renewal else None,
        )

    def _settle_memory(self, job: Job) -> None:
        """A long-lived process holding 10k certificates' state: move what survived this pass
        out of the garbage collector's sight (gc.freeze), so the next pass does not spend a
        third of its time re-scanning it. A full collection runs at each resync and SIGHUP."""
        import gc

        if job.first or job.force or "resync" in job.reasons:
            gc.unfreeze()
            gc.collect()
        gc.freeze()

    def _record_failures(self, outcome, now: float) -> bool:
        """Feed the pass's outcome to the backoffs. True when the CA answers again after an
        outage: everything that waited for it goes in the next pass, at once."""
        transient = [c for c in outcome.certificates if c.transient]
        run_again = False
        if outcome.ca_unreachable:
            first = not self.ca.active(CA)
            wait = self.ca.failed(CA, now)
            if first:
                log.warning(
                    "the CA does not answer (%s); until it does, one certificate at a time probes it, next in %.0fs",
                    transient[0].failed, wait,
                )
            else:
                log.warning("the CA still does not answer; next probe in %.0fs", wait)
        else:
            if any(c.content_changed for c in outcome.certificates) and self.ca.succeeded(CA):
                log.info("the CA answers again; issuing everything that waited for it now")
                run_again = True
            for c in transient:  # the CA works for others: this one backs off on its own
                self.issue_backoff.failed(c.name, now)
        for c in outcome.certificates:
            if c.attempted and not c.failed:
                self.issue_backoff.succeeded(c.name)
            elif c.attempted and not c.transient:
                wait = self.issue_backoff.failed(c.name, now)
                log.info("%s: next attempt in %.0fs (failure %d in a row)", c.name, wait, self.issue_backoff.failures[c.name])
            if c.hook_ok is True:
                self.hook_backoff.succeeded(c.name)
            elif c.hook_ok is False:
                wait = self.hook_backoff.failed(c.name, now)
                log.info("%s: post-renewal command runs again in %.0fs", c.name, wait)
        return run_again

    def _record_manifest_state(self) -> None:
        """No valid manifest to reconcile against: still tell `reconcile status` why."""
        from reconciler.lock import LockTimeout, PassLock
        from reconciler.status import StatusStore

        try:
            with PassLock(self.settings.state_dir, self.settings.lock_timeout):
                store = StatusStore(self.settings.state_dir)
                store.manifest.clear()
                store.manifest.update(self.tracker.state())
                store.save()
        except (LockTimeout, OSError) as exc:
            log.warning("cannot record the manifest's state: %s", exc)

    def _write_metrics(self) -> None:
        if self.metrics and self.metrics_file:
            self.metrics.write_file(self.metrics_file)


class _Handler:
    """watchdog calls `dispatch`; everything goes to Watcher.on_fs_event."""

    def __init__(self, watcher: Watcher):
        self.watcher = watcher

    def dispatch(self, event) -> None:
        self.watcher.on_fs_event(event)


def run_watch(settings, args) -> int:
    from reconciler.durations import DurationError, parse_duration

    try:
        resync = parse_duration(args.resync).total_seconds()
    except DurationError as exc:
        print(f"error: --resync: {exc}", file=sys.stderr)
        return 1
    root = logging.getLogger("reconciler")
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)  # a service's journal shows every pass that changed something
    metrics = None
    if args.metrics_listen or args.metrics_file:
        from reconciler.metrics import Metrics

        metrics = Metrics()
        if args.metrics_listen:
            try:
                host, port = metrics.serve(args.metrics_listen)
            except (ValueError, OSError) as exc:
                print(f"error: --metrics-listen {args.metrics_listen}: {exc}", file=sys.stderr)
                return 1
            log.info("serving metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)
    import deepdiff  # noqa: F401  imported now, not on the first save

    watcher = Watcher(
        settings, resync, poll=getattr(args, "poll", False), metrics=metrics,
        metrics_file=Path(args.metrics_file) if args.metrics_file else None,
    )
    return watcher.run()
