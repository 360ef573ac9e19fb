"""One pass, one outcome: in-process passes against the embedded CA on real files.

The outcome a pass returns is what the CLI, `status`, metrics and `--watch` read; these
tests pin what it says per certificate, and that `status` (the read-only snapshot) says
the same thing about the disk a pass just left.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest

from helpers import entry, load_cert
from reconciler.diff import renewal_due_at
from reconciler.outcome import ERROR, HOOK_PENDING, MISSING, READY
from reconciler.desired import load_desired
from reconciler.passes import Settings, assess, run_pass, snapshot
from reconciler.status import read_only


@pytest.fixture
def site(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = tmp_path / "m.json"

    def write(*entries: dict) -> Settings:
        manifest.write_text(json.dumps({"issuer": {"type": "local"}, "certificates": list(entries)}))
        return Settings(manifest=manifest, state_dir=tmp_path / "state")

    return out, write


def status_of(settings: Settings):
    store = read_only(settings.state_dir)
    return assess(snapshot(settings, load_desired(settings), store), store)


def by_name(outcome) -> dict:
    return {c.name: c for c in outcome.certificates}


def test_a_first_pass_says_what_it_issued_and_that_each_certificate_is_ready(site):
    out, write = site
    settings = write(entry(out, "a"), entry(out, "b"))
    _snap, outcome = run_pass(settings)
    assert outcome.ok and outcome.changed == 2 and outcome.ready == 2
    for name, c in by_name(outcome).items():
        leaf = load_cert(out / f"{name}.crt")
        assert (c.state, c.changed, c.content_changed, c.attempted, c.failed) == (READY, ("issue",), True, True, None)
        assert c.not_after == leaf.not_valid_after_utc
        desired = next(d for d in load_desired(settings).certificates if d.name == name)
        assert c.renewal_at == renewal_due_at(desired, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        st = os.lstat(out / f"{name}.crt")
        assert c.stamps[0][1:4] == (st.st_ino, st.st_size, st.st_mtime_ns), "stamps are of the file as the pass left it"
    # what deploy parsed is reused by the re-read, then dropped: a pass may write thousands
    assert all(c.written is not None and c.written.parsed is None for c in outcome.result.certificates)


def test_a_converged_pass_changes_nothing_and_reports_every_certificate_ready(site):
    out, write = site
    settings = write(entry(out, "a"))
    run_pass(settings)
    _snap, outcome = run_pass(settings)
    assert (outcome.changed, outcome.ready, outcome.failures()) == (0, 1, [])
    assert by_name(outcome)["a"].changed == ()


def test_a_failed_hook_leaves_the_certificate_hook_pending_and_status_agrees(site):
    out, write = site
    settings = write(entry(out, "svc", post_renewal_command="exit 3"), entry(out, "plain"))
    _snap, outcome = run_pass(settings)
    svc = by_name(outcome)["svc"]
    assert (svc.state, svc.hook_ok, svc.hook_owed, svc.ready) == (HOOK_PENDING, False, True, False)
    assert by_name(outcome)["plain"].hook_ok is None, "no command ran for it"
    assert not outcome.ok and outcome.ready == 1
    seen = status_of(settings)
    assert {c.name: c.state for c in seen.certificates} == {c.name: c.state for c in outcome.certificates}
    assert by_name(seen)["svc"].last_hook == "failed"


def test_a_path_that_cannot_be_managed_is_an_error_with_its_reason_and_nothing_is_attempted(site):
    out, write = site
    (out / "blocked.crt").mkdir()
    settings = write(entry(out, "blocked"), entry(out, "fine"))
    _snap, outcome = run_pass(settings)
    blocked = by_name(outcome)["blocked"]
    assert (blocked.state, blocked.attempted, blocked.serving) == (ERROR, False, False)
    assert "is a directory" in blocked.problem
    assert outcome.ready == 1 and not outcome.all_serving


def test_status_before_any_pass_says_missing_and_names_what_the_next_pass_does(site):
    out, write = site
    settings = write(entry(out, "a"))
    c = by_name(status_of(settings))["a"]
    assert (c.state, c.not_after, c.renewal_at, c.changed) == (MISSING, None, None, ())
    assert c.problem == "certificate file missing; key file missing"


def test_the_next_renewal_is_the_earliest_deadline_still_ahead(site):
    out, write = site
    settings = write(entry(out, "short", duration="2h", renew_before="1h"), entry(out, "long", duration="48h"))
    _snap, outcome = run_pass(settings)
    now = datetime.now(timezone.utc)
    deadlines = {c.name: c.renewal_at for c in outcome.certificates}
    assert outcome.next_renewal(now) == deadlines["short"] < deadlines["long"]
    assert outcome.next_renewal(deadlines["short"]) == deadlines["long"]
    assert outcome.next_renewal(deadlines["long"]) is None
