"""`reconcile --watch`'s runner: threads, signals, systemd, and the pass job. WHEN a pass
runs is the schedule's (schedule.py, pure); which files wake us is fsevents.py's; what a
pass does is passes.py's. This module holds no certificate logic and no timing rule.

Level-triggered, in the style of controller-runtime: an event only says "look again";
every pass re-reads the manifest (a stat when unchanged) and the disk (a stat per file
when unchanged), and plans from scratch.

Threads: the main thread owns the schedule's timers and the signals and never blocks for
long; passes run one at a time on a worker thread (under the same lock as one-shot runs);
watchdog's threads only hand events to the schedule and wake the main thread through a
pipe. Every call into the schedule holds `self.lock`. SIGTERM/SIGINT stop starting new
work, let the current write finish, exit 0; SIGHUP re-reads the manifest and retries
everything now.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.defaults import setting
from reconciler.fsevents import FolderWatches
from reconciler.issuers import IssuerError
from reconciler.lock import LockTimeout
from reconciler.folders import FolderError
from reconciler.metrics import Metrics
from reconciler.observe import ObservationCache, stat_file
from reconciler.outcome import PassOutcome
from reconciler.passes import Settings, record_manifest_state, run_pass
from reconciler.schedule import GUEST_POLL_REASON, LOCK_RETRY, MAX_SLEEP, RESYNC_REASON, Job, PassReport, Schedule
from reconciler.statefiles import StatusError
from reconciler.tracker import CHANGED, NOT_READY, ManifestTracker

log = logging.getLogger("reconciler.watch")

STOP_GRACE = 4.5  # SIGTERM: how long the current pass may take to wind down


@dataclass(frozen=True)
class WatchSettings:
    settings: Settings
    resync: float = 600.0  # seconds: a full pass at least this often
    poll: bool = False  # poll folders instead of inotify (network filesystems)
    metrics_listen: str | None = None  # HOST:PORT to serve /metrics on
    metrics_file: Path | None = None  # a textfile-collector file, rewritten after every pass
    guest_poll: float = 30.0  # seconds: how often a stopped Proxmox guest owing a delivery is looked at


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


def stamp_of(path: str, follow: bool) -> tuple:
    return stat_file(Path(path), follow).stamp


def sd_notify(message: str) -> None:
    """systemd readiness/status (Type=notify), without a dependency: one datagram to $NOTIFY_SOCKET."""
    address = setting("NOTIFY_SOCKET")
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


class Watcher:
    def __init__(self, watch: WatchSettings, metrics: Metrics | None = None):
        self.watch = watch
        self.settings = watch.settings
        self.metrics = metrics
        self.tracker = ManifestTracker(self.settings)
        self.cache = ObservationCache(self.settings.state_dir)  # kept across passes: unchanged files cost a stat
        self.lock = threading.Lock()
        self.schedule = Schedule(
            watch.resync, SystemClock(), stamp_of, guest_poll=watch.guest_poll, real_path=os.path.realpath
        )
        self.watches = FolderWatches(self.on_event, poll=watch.poll)
        self.cancel = threading.Event()
        # main thread only
        self.stop_signal: int | None = None
        self.stop_started = 0.0
        self.hup = False
        self.thread: threading.Thread | None = None
        self.report: PassReport | None = None  # set by the pass thread just before it wakes us
        self.first_done = False
        self._refresh_manifest_names()

    # ------------------------------------------------------------------ events (watchdog threads)

    def on_event(self, src: str, dest: str, kind: str, folder_gone: bool) -> None:
        with self.lock:
            wake = self.schedule.on_event(src, dest, kind, folder_gone)
        if wake:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except OSError as exc:  # a full pipe already means "wake up"
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise

    def _refresh_manifest_names(self) -> None:
        path = str(self.tracker.path)
        names = {path, os.path.realpath(path)}  # a symlinked manifest: its target's folder too
        with self.lock:
            self.schedule.manifest_names = names

    def _manifest_folders(self) -> set[str]:
        with self.lock:
            return {os.path.dirname(n) for n in self.schedule.manifest_names}

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.watches.start()
        self.watches.sync(self._manifest_folders(), set())
        desired = self.tracker.desired
        known = desired is not None and desired.issuer is not None
        issuer = desired.issuer.describe(self.settings.state_dir) if known else "not known yet"
        how = "polling every 1s" if self.watch.poll else "inotify"
        log.info("watching %s (%s); resync every %gs; issuer: %s", self.tracker.path, how, self.watch.resync, issuer)
        self._start(self.schedule.first_job())
        try:
            while True:
                self._sleep(self._timeout())
                if self.stop_signal is not None:
                    return self._shutdown()
                self._take_hup()
                if self.thread is not None:
                    if self.report is None:
                        continue
                    self._finish()
                with self.lock:
                    job = self.schedule.next_job()
                if job is not None:
                    self._start(job)
        finally:
            signal.set_wakeup_fd(-1)

    def _on_stop(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self.stop_started = time.monotonic()

    def _on_hup(self, signum, frame) -> None:
        self.hup = True

    def _take_hup(self) -> None:
        if self.hup:
            self.hup = False
            with self.lock:
                self.schedule.hup()
            log.info("SIGHUP: re-reading the manifest and retrying everything now")

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
        with self.lock:
            return self.schedule.timeout()

    def _start(self, job: Job) -> None:
        log.debug("pass starting: %s", ", ".join(job.reasons))
        self.report = None
        self.thread = threading.Thread(target=self._run_job, args=(job,), name="reconcile-pass", daemon=True)
        self.thread.start()

    def _finish(self) -> None:
        assert self.thread is not None
        self.thread.join()
        self.thread = None
        report = self.report or PassReport(failed=True, retry_in=LOCK_RETRY)
        with self.lock:
            self.schedule.finish(report)
            folders = set(self.schedule.folders)
        if report.not_ready:
            return
        self._refresh_manifest_names()
        added = self.watches.sync(self._manifest_folders(), folders)
        if added:
            with self.lock:
                self.schedule.watching(added)
        if not self.first_done:
            self.first_done = True
            sd_notify("READY=1")

    def _shutdown(self) -> int:
        name = signal.Signals(self.stop_signal).name
        sd_notify("STOPPING=1")
        self.cancel.set()
        if self.thread is not None and self.thread.is_alive():
            log.info("%s: letting the current pass finish its write, then stopping", name)
            self.thread.join(max(0.1, STOP_GRACE - (time.monotonic() - self.stop_started)))
            if self.thread.is_alive():
                log.warning(
                    "%s: a pass is still busy (a hook or a CA call); exiting without it (it runs again next start)",
                    name,
                )
                logging.shutdown()
                sys.stderr.flush()
                os._exit(0)
        log.info("%s: stopped", name)
        self.watches.stop()
        return 0

    # ------------------------------------------------------------------ one pass (worker thread)

    def _run_job(self, job: Job) -> None:
        try:
            self.report = self._work(job)
        except (FolderError, StatusError) as exc:
            # an unsafe or unwritable state folder: the operator must act, so say why on
            # every pass, touch nothing, and keep retrying so the fix is picked up unaided
            with self.lock:
                report = self.schedule.failed()
            log.error("pass refused: %s; trying again in %.0fs", exc, report.retry_in)
            self.report = report
        except BaseException:  # a bug must not kill the service silently; retry with backoff
            log.exception("pass failed unexpectedly; retrying later")
            with self.lock:
                self.report = self.schedule.failed()
        finally:
            self._wake()

    def _work(self, job: Job) -> PassReport:
        started = time.monotonic()
        refresh = self.tracker.refresh(force=job.force, final=job.final)
        if refresh.outcome == NOT_READY:
            log.debug("manifest not completely written yet; looking again shortly")
            return PassReport(not_ready=True)
        if refresh.outcome == CHANGED:
            with self.lock:
                self.schedule.manifest_changed(refresh.touched, refresh.issuer_changed)
        if self.metrics:
            self.metrics.set_manifest_valid(bool(self.tracker.valid))
        desired = self.tracker.desired
        if desired is None:
            record_manifest_state(self.settings, self.tracker.state())
            self._write_metrics()
            return PassReport(ran=True)
        with self.lock:
            deferral = self.schedule.deferral({c.name for c in desired.certificates})
        try:
            _snap, outcome = run_pass(
                self.settings,
                desired,
                progress=False,
                cache=self.cache,
                deferral=deferral,
                cancelled=self.cancel.is_set,
                sweep_files=job.first or job.force,
                manifest_state=self.tracker.state(),
                look_at_guests=job.first or job.force or bool({RESYNC_REASON, GUEST_POLL_REASON} & set(job.reasons)),
            )
        except LockTimeout as exc:
            log.warning("%s; trying again in %gs", exc, LOCK_RETRY)
            return PassReport(failed=True, retry_in=LOCK_RETRY)
        except IssuerError as exc:
            with self.lock:
                report = self.schedule.failed()
            log.error("pass failed: %s; trying again in %.0fs", exc, report.retry_in)
            if self.metrics:
                self.metrics.record_failed_pass(time.monotonic() - started, time.time())
                self._write_metrics()
            return report
        with self.lock:
            report = self.schedule.ran(outcome)
            ca_reachable = self.schedule.ca_reachable
        self._tell(job, outcome, ca_reachable)
        _settle_memory(job)
        return report

    def _tell(self, job: Job, outcome: PassOutcome, ca_reachable: bool) -> None:
        """The pass's outcome in the journal, the metrics and systemd's status line."""
        # also after a recheck pass: the re-read stamps already hold the damage, so its events
        # compare equal and nothing else would look before the resync (the schedule paces repeats)
        if outcome.recheck:
            log.info("a file this pass wrote changed again before the pass ended; looking again")
        level = logging.INFO if outcome.changed or outcome.failures() or job.first or job.force else logging.DEBUG
        log.log(
            level,
            "pass (%s): %d changed, %d failed, %d of %d ready, %.2fs",
            ", ".join(job.reasons),
            outcome.changed,
            len(outcome.failures()),
            outcome.ready,
            len(outcome.certificates),
            outcome.duration,
        )
        if self.metrics:
            self.metrics.record(outcome, ca_reachable)
            self._write_metrics()
        sd_notify(
            f"STATUS={outcome.ready} of {len(outcome.certificates)} certificates ready; "
            f"manifest {'valid' if self.tracker.valid else 'INVALID'}; last pass {time.strftime('%H:%M:%S')}"
        )

    def _write_metrics(self) -> None:
        if self.metrics and self.watch.metrics_file:
            self.metrics.write_file(self.watch.metrics_file)


def _settle_memory(job: Job) -> None:
    """A long-lived process holding 10k certificates' state: move what survived this pass
    out of the garbage collector's sight (gc.freeze), so the next pass does not spend a
    third of its time re-scanning it. A full collection runs at each resync and SIGHUP."""
    if job.first or job.force or "resync" in job.reasons:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


def run_watch(watch: WatchSettings) -> int:
    root = logging.getLogger("reconciler")
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)  # a service's journal shows every pass that changed something
    metrics = None
    if watch.metrics_listen or watch.metrics_file:
        metrics = Metrics()
        if watch.metrics_listen:
            try:
                host, port = metrics.serve(watch.metrics_listen)
            except (ValueError, OSError) as exc:
                print(f"error: --metrics-listen {watch.metrics_listen}: {exc}", file=sys.stderr)
                return 1
            log.info("serving metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)
    import deepdiff  # noqa: F401  third-party and slow to import: now, not on the first save

    return Watcher(watch, metrics).run()
