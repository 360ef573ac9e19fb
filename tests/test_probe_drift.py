"""The `served` row of the drift table and the endpoint states, as pure functions of values:
what a probe found against the certificate in the file (no servers, no disk)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from reconciler.diff import RUN_HOOK, diff, readiness
from reconciler.endpoints import Served, endpoint_states, remembered
from reconciler.manifest import build
from reconciler.model import CertFacts, FileState, Observed
from reconciler.outcome import cert_state
from reconciler.plan import plan_cert

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
FILE_SERIAL, OLD_SERIAL = "9a0b1c2d3e4f5a6b", "4f1e2d3c4b5a6978"


def _cert(command: str | None = "systemctl reload nginx", connects=("127.0.0.1:443",)):
    entry = {
        "common_name": "web.probe.test",
        "cert_path": "web.crt",
        "key_path": "web.key",
        "serve": [{"connect": c} for c in connects],
    }
    if command:
        entry["post_renewal_command"] = command
    (cert,) = build([entry], Path("/srv/m.json")).certificates
    return cert


def _observed(cert, *served: Served, cert_file: str = "file") -> Observed:
    facts = CertFacts(
        common_name="web.probe.test",
        sans=cert.sans,
        not_before=NOW - timedelta(hours=1),
        not_after=NOW + timedelta(hours=23),
        key_type="EC P-256",
        public_key_id="file-key",
        issued_by="ca",
        serial=FILE_SERIAL,
        usages=frozenset({"serverAuth"}),
        issuer_chain=(),
    )
    return Observed(
        FileState(cert_file, 0, 0, 0o644),
        FileState("file", 0, 0, 0o600),
        cert=facts if cert_file == "file" else None,
        key_public_id="file-key",
        chains_to_issuer=True,
        served=served,
    )


def _current(connect="127.0.0.1:443") -> Served:
    return Served(connect, FILE_SERIAL, NOW + timedelta(hours=23), "file-key")


def _old(connect="127.0.0.1:443") -> Served:
    return Served(connect, OLD_SERIAL, NOW + timedelta(minutes=30), "old-key")


def _down(connect="127.0.0.1:443") -> Served:
    return Served(connect, error="Connection refused")


def test_an_endpoint_presenting_the_file_leaf_is_no_drift():
    cert = _cert()
    assert diff(cert, _observed(cert, _current()), NOW) == []


def test_an_endpoint_presenting_another_leaf_owes_the_command_with_the_reason_in_words():
    cert = _cert()
    [drift] = diff(cert, _observed(cert, _old()), NOW)
    assert drift.field == "serve" and drift.action == RUN_HOOK
    assert drift.reason == (
        "127.0.0.1:443 still serves serial 4F1E2D3C4B…, expiring 2026-11-27 12:30Z; "
        "the file holds serial 9A0B1C2D3E…, expiring 2026-11-28 11:00Z"
    )


def test_only_the_stale_endpoints_are_named_when_one_of_two_kept_the_old_leaf():
    cert = _cert(connects=("127.0.0.1:443", "[::1]:443"))
    [drift] = diff(cert, _observed(cert, _current(), _old("[::1]:443")), NOW)
    assert drift.reason.startswith("[::1]:443 still serves") and "127.0.0.1:443" not in drift.reason


def test_an_unreachable_endpoint_is_no_reason_to_rerun_the_command():
    cert = _cert()
    assert diff(cert, _observed(cert, _down()), NOW) == []


def test_without_a_command_a_stale_endpoint_plans_nothing_but_the_state_says_so():
    cert = _cert(command=None)
    observed = _observed(cert, _old())
    plan = plan_cert(cert, observed, NOW)
    assert plan.actions == ()
    served = endpoint_states(observed.served, observed.cert, {}, NOW.isoformat())
    assert cert_state(plan.readiness, None, False, served) == "service stale"


def test_a_new_certificate_makes_the_served_row_moot_the_command_runs_after_it_anyway():
    cert = _cert()
    [drift] = diff(cert, _observed(cert, _old(), cert_file="missing"), NOW)
    assert drift.field == "certificate_file"


def test_an_owed_command_and_a_stale_endpoint_are_one_run_hook_action():
    cert = _cert()
    plan = plan_cert(cert, _observed(cert, _old()), NOW, hook_pending=True)
    [action] = plan.actions
    assert action.action == RUN_HOOK and [d.field for d in action.drifts] == ["hook", "serve"]


def test_a_stale_service_leaves_the_file_ready_and_the_certificate_hook_pending():
    cert = _cert()
    observed = _observed(cert, _old())
    judged = readiness(cert, observed, NOW)
    assert judged.ready and judged.actions == (RUN_HOOK,)
    assert (
        cert_state(judged, None, False, endpoint_states(observed.served, observed.cert, {}, NOW.isoformat()))
        == "hook pending"
    )


def test_an_unreachable_endpoint_makes_an_otherwise_ready_certificate_endpoint_unreachable():
    cert = _cert()
    observed = _observed(cert, _down())
    states = endpoint_states(observed.served, observed.cert, {}, NOW.isoformat())
    assert [e.state for e in states] == ["unreachable"]
    assert cert_state(readiness(cert, observed, NOW), None, False, states) == "endpoint unreachable"


def test_since_moves_only_when_the_endpoint_changes_what_it_presents_or_its_reachability():
    first = remembered(_old(), None, "t1")
    assert first == {"serial": OLD_SERIAL, "not_after": (NOW + timedelta(minutes=30)).isoformat(), "since": "t1"}
    assert remembered(_old(), first, "t2")["since"] == "t1"
    moved = remembered(_current(), first, "t3")
    assert moved["since"] == "t3" and moved["serial"] == FILE_SERIAL
    down = remembered(_down(), moved, "t4")
    assert down == {"error": "Connection refused", "since": "t4"}
    assert remembered(replace(_down(), error="timed out"), down, "t5")["since"] == "t4"  # still unreachable
