"""--watch's schedule (reconciler/schedule.py), driven with a fake clock and fake stamps:
events and pass outcomes in, the next job and the sleep out. No threads, no files, no
waiting: every test runs in milliseconds. The real loop is tested end to end in
tests/test_watch.py."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from reconciler.backoff import BASE, CAP, Backoff
from reconciler.outcome import CertOutcome, PassOutcome
from reconciler.plan import Plan
from reconciler.schedule import MAX_SLEEP, QUIET, RECHECKS_AT_ONCE, SETTLE, PassReport, Schedule

MANIFEST = "/etc/reconciler/m.json"
RESYNC = 600.0


class FakeClock:
    def __init__(self):
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class Disk:
    """What stat would say of each path: the schedule's only window on files."""

    def __init__(self):
        self.stamps: dict[str, tuple] = {}

    def __call__(self, path: str, follow: bool) -> tuple:
        return self.stamps.get(path, ())


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def disk():
    return Disk()


@pytest.fixture
def schedule(clock, disk):
    rng = random.Random(7)
    s = Schedule(RESYNC, clock, disk, backoff=lambda: Backoff(rng))
    s.manifest_names = {MANIFEST}
    return s


def cert(name: str, **fields) -> CertOutcome:
    values = dict(
        name=name,
        cert_path=f"/srv/{name}.crt",
        key_path=f"/srv/{name}.key",
        follow_symlinks=False,
        sans=(f"{name}.example",),
        state="ready",
        problem=None,
        not_after=None,
        renewal_at=None,
        owner_ok=True,
        mode_ok=True,
        hook_owed=False,
        stamps=((1, 1), (1, 2)),
    )
    values.update(fields)
    return CertOutcome(**values)


def outcome(*certs: CertOutcome) -> PassOutcome:
    return PassOutcome(tuple(certs), Plan((), ()))


def run(schedule: Schedule, *certs: CertOutcome) -> PassReport:
    """A pass ran with these outcomes and the runner finished it."""
    report = schedule.ran(outcome(*certs))
    schedule.finish(report)
    return report


def settle_start(schedule: Schedule, clock: FakeClock, disk: Disk, *certs: CertOutcome) -> None:
    """The first pass has run over `certs` and left their files with their stamps."""
    job = schedule.first_job()
    assert job.first and job.force
    for c in certs:
        disk.stamps[c.cert_path], disk.stamps[c.key_path] = c.stamps
    run(schedule, *certs)
    assert schedule.next_job() is None


# --------------------------------------------------------------------------- manifest saves


def test_a_rename_onto_the_manifest_starts_a_pass_once_the_save_settles(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    assert schedule.on_event("/etc/reconciler/.m.json.swp", MANIFEST, "moved")
    assert schedule.timeout() == pytest.approx(SETTLE)
    assert schedule.next_job() is None, "someone may still be writing"
    clock.advance(QUIET)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["manifest saved"] and job.final
    assert schedule.next_job() is None, "one save, one pass"


def test_a_burst_of_writes_waits_for_the_quiet_period_after_the_last_one(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    for _ in range(5):
        schedule.on_event(MANIFEST, "", "modified")
        clock.advance(QUIET / 2)
        assert schedule.next_job() is None, "still being written"
        assert 0 < schedule.timeout() <= QUIET
    clock.advance(QUIET)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["manifest saved"]


def test_a_manifest_not_ready_yet_is_looked_at_again_after_the_quiet_period(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    schedule.on_event(MANIFEST, "", "closed")
    clock.advance(SETTLE)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["manifest saved"]
    schedule.finish(PassReport(not_ready=True))
    assert 0 < schedule.timeout() <= QUIET
    clock.advance(QUIET)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["manifest saved"]


def test_events_on_files_nobody_manages_are_ignored(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    assert not schedule.on_event("/srv/unrelated.txt", "", "modified")
    clock.advance(QUIET)
    assert schedule.next_job() is None


# --------------------------------------------------------------------------- damaged files


def test_our_own_writes_wake_us_but_start_no_pass(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    assert schedule.on_event("/srv/a.crt", "", "closed")
    clock.advance(QUIET)
    assert schedule.next_job() is None, "the stamp is what the last pass left"


def test_a_deleted_key_starts_a_pass_that_names_it(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"), cert("b", stamps=((2, 1), (2, 2))))
    del disk.stamps["/srv/a.key"]
    disk.stamps["/srv/b.crt"] = (9, 9)
    schedule.on_event("/srv/a.key", "", "deleted")
    schedule.on_event("/srv/b.crt", "", "modified")
    assert schedule.next_job() is None, "not before the burst settles"
    clock.advance(QUIET)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["/srv/a.key changed (and 1 more files)"]


def test_a_shared_ca_file_is_managed_too_its_deletion_starts_a_pass(schedule, clock, disk):
    shared = dict(ca_path="/srv/ca/root.crt", ca_stamp=(5, 5))
    settle_start(schedule, clock, disk, cert("a", **shared), cert("b", **shared))
    disk.stamps["/srv/ca/root.crt"] = (5, 5)
    assert schedule.on_event("/srv/ca/root.crt", "", "closed")
    clock.advance(QUIET)
    assert schedule.next_job() is None, "the stamp the last pass left: our own write"
    del disk.stamps["/srv/ca/root.crt"]
    schedule.on_event("/srv/ca/root.crt", "", "deleted")
    clock.advance(QUIET)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["/srv/ca/root.crt changed"]


def test_a_change_behind_an_allowed_symlink_starts_a_pass_and_its_folder_is_watched(clock, disk):
    links = {"/srv/a.crt": "/data/tls/a.crt"}  # the key is no link: it stays where it is
    schedule = Schedule(RESYNC, clock, disk, real_path=lambda p: links.get(p, p))
    a = cert("a", follow_symlinks=True)
    disk.stamps["/data/tls/a.crt"] = a.stamps[0]
    settle_start(schedule, clock, disk, a)
    assert "/data/tls" in schedule.folders and "/srv" in schedule.folders
    assert schedule.on_event("/data/tls/a.crt", "", "closed")
    clock.advance(QUIET)
    assert schedule.next_job() is None, "the stamp the last pass left at the target: our own write"
    disk.stamps["/data/tls/a.crt"] = (8, 8)
    schedule.on_event("/data/tls/a.crt", "", "modified")
    clock.advance(QUIET)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["/data/tls/a.crt changed"]


def test_a_watched_folder_deleted_starts_a_pass(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    assert schedule.on_event("/srv", "", "deleted", folder_gone=True)
    clock.advance(QUIET)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["a watched folder was deleted or moved"]


def test_a_folder_watched_late_has_its_files_looked_at(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    disk.stamps["/srv/a.crt"] = (7, 7)  # changed before the watch was in place
    schedule.watching({"/srv"})
    job = schedule.next_job()
    assert job is not None and job.reasons == ["/srv/a.crt changed"]


def test_a_file_that_changed_again_during_the_pass_is_rechecked_at_once_then_with_backoff(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    for _ in range(RECHECKS_AT_ONCE):
        report = run(schedule, cert("a", changed=("issue",), attempted=True, content_changed=True, still_drifts=True))
        assert report.recheck
        job = schedule.next_job()
        assert job is not None and job.reasons == ["recheck"]
    run(schedule, cert("a", changed=("issue",), attempted=True, still_drifts=True))
    assert schedule.next_job() is None, "a file fought over by another program is not a hot loop"
    assert BASE * 0.8 <= schedule.timeout() <= BASE * 1.2
    clock.advance(BASE * 1.2)
    job = schedule.next_job()
    assert job is not None and "recheck" in job.reasons
    run(schedule, cert("a"))
    assert schedule.rechecks_in_a_row == 0, "a pass that settles ends the run of rechecks"


# --------------------------------------------------------------------------- timers


def test_the_next_renewal_deadline_sets_the_sleep_and_starts_a_pass(schedule, clock, disk):
    now = datetime.fromtimestamp(clock.wall, timezone.utc)
    soon, later = now + timedelta(seconds=30), now + timedelta(seconds=90)
    settle_start(schedule, clock, disk, cert("a", renewal_at=later), cert("b", renewal_at=soon))
    assert schedule.timeout() == pytest.approx(30, abs=0.02)
    clock.advance(30.02)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["renewal due"]


def test_deadlines_already_past_are_not_timers(schedule, clock, disk):
    past = datetime.fromtimestamp(clock.wall, timezone.utc) - timedelta(seconds=5)
    settle_start(schedule, clock, disk, cert("a", renewal_at=past))
    assert schedule.next_renewal is None
    assert schedule.timeout() == MAX_SLEEP


def test_a_full_pass_runs_every_resync_period(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    for _ in range(int(RESYNC // MAX_SLEEP) - 1):
        assert schedule.timeout() == MAX_SLEEP, "the wall clock is looked at at least every minute"
        clock.advance(MAX_SLEEP)
        assert schedule.next_job() is None
    clock.advance(MAX_SLEEP)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["resync"]


def test_sighup_starts_a_pass_now_and_forgets_every_backoff(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    run(schedule, cert("a", attempted=True, failed="the CA refused"))
    assert schedule.deferral({"a"}).certificates == {"a"}
    schedule.hup()
    assert schedule.timeout() == 0.0
    job = schedule.next_job()
    assert job is not None and job.force and job.reasons[0] == "SIGHUP"
    assert schedule.deferral({"a"}).certificates == frozenset()


# --------------------------------------------------------------------------- failures and backoff


def test_a_failed_issuance_defers_that_certificate_and_retries_it_when_its_backoff_ends(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"), cert("b"))
    run(schedule, cert("a", attempted=True, failed="bad CSR"), cert("b"))
    assert schedule.deferral({"a", "b"}).certificates == {"a"}
    wait = schedule.timeout()
    assert BASE * 0.8 <= wait <= BASE * 1.2 + 0.01
    clock.advance(wait)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["backoff over"]
    assert schedule.deferral({"a", "b"}).certificates == frozenset()
    run(schedule, cert("a", attempted=True, changed=("issue",)), cert("b"))
    assert schedule.issues.failures == {}, "a success forgets the failures"


def test_repeated_failures_back_off_exponentially_up_to_the_cap(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    waits = []
    for _ in range(9):
        run(schedule, cert("a", attempted=True, failed="refused"))
        waits.append(schedule.issues.until["a"] - clock.time())
        clock.advance(waits[-1])
    assert waits[1] > waits[0] * 1.3 and waits[2] > waits[1] * 1.3
    assert max(waits) <= CAP and waits[-1] >= CAP * 0.8


def test_an_edited_entry_is_tried_at_once_whatever_its_backoff(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"), cert("b"))
    run(schedule, cert("a", attempted=True, failed="refused"), cert("b", attempted=True, failed="refused"))
    schedule.manifest_changed(["a"], issuer_changed=False)
    assert schedule.deferral({"a", "b"}).certificates == {"b"}


def test_a_removed_entry_takes_its_backoff_with_it(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"), cert("b"))
    run(schedule, cert("a", attempted=True, failed="refused"), cert("b", attempted=True, failed="refused"))
    schedule.deferral({"b"})
    assert set(schedule.issues.failures) == {"b"}


def test_a_failed_hook_defers_only_the_hook(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    run(schedule, cert("a", hook_ok=False, hook_owed=True, state="hook pending"))
    deferral = schedule.deferral({"a"})
    assert (deferral.certificates, deferral.hooks) == (frozenset(), {"a"})
    run(schedule, cert("a", hook_ok=True))
    assert schedule.deferral({"a"}).hooks == frozenset()


def test_while_the_ca_does_not_answer_one_certificate_at_a_time_probes_it(schedule, clock, disk):
    names = {"a", "b", "c"}
    settle_start(schedule, clock, disk, *(cert(n) for n in names))
    run(schedule, *(cert(n, attempted=True, failed="connection refused", transient=True) for n in names))
    assert not schedule.ca_reachable
    assert schedule.deferral(names).issue_limit == 0, "between probes nobody calls the CA"
    assert schedule.deferral(names).certificates == frozenset(), "the CA's backoff, not each certificate's"
    clock.advance(schedule.timeout())
    job = schedule.next_job()
    assert job is not None and job.reasons == ["backoff over"]
    assert schedule.deferral(names).issue_limit == 1, "one probe"
    report = run(schedule, cert("a", attempted=True, changed=("issue",), content_changed=True), cert("b"), cert("c"))
    assert report.run_again and schedule.ca_reachable
    job = schedule.next_job()
    assert job is not None and job.reasons == ["CA answers again"]
    assert schedule.deferral(names).issue_limit is None


def test_a_transient_failure_while_others_get_through_backs_off_that_certificate_alone(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"), cert("b"))
    timed_out = cert("a", attempted=True, failed="timeout", transient=True)
    run(schedule, timed_out, cert("b", attempted=True, content_changed=True, changed=("issue",)))
    assert schedule.ca_reachable
    assert schedule.deferral({"a", "b"}).certificates == {"a"}


def test_another_issuer_forgets_what_was_learnt_about_the_old_one(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    run(schedule, cert("a", attempted=True, failed="connection refused", transient=True))
    assert not schedule.ca_reachable
    schedule.manifest_changed([], issuer_changed=True)
    assert schedule.ca_reachable and schedule.deferral({"a"}).issue_limit is None


def test_a_pass_that_could_not_run_is_retried_with_backoff_and_a_success_resets_it(schedule, clock, disk):
    settle_start(schedule, clock, disk, cert("a"))
    first = schedule.failed()
    schedule.finish(first)
    second = schedule.failed()
    assert first.retry_in is not None and second.retry_in is not None and second.retry_in > first.retry_in
    schedule.finish(second)
    clock.advance(second.retry_in)
    job = schedule.next_job()
    assert job is not None and job.reasons == ["retry"]
    run(schedule, cert("a"))
    assert schedule.passes.failures == {}
