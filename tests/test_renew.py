"""`reconcile renew NAME... | --all`: a new certificate now, whatever the expiry, then the hooks.

Through the real CLI in a subprocess: the embedded CA (object form, `"issuer": {"type":
"local"}`) for the behaviour, and the real step-ca for the protocol a forced renewal uses.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from helpers import after_issuer, entry, load_cert, reconcile, tree_snapshot, write_manifest
from reconciler.diff import CHMOD, RENEW, REISSUE, Drift
from reconciler.model import DesiredCert, KeySpec, RenewBefore
from reconciler.plan import FORCED, Action, CertPlan, HookRun, Plan, force_renewal

LOCAL = {"type": "local"}


@pytest.fixture
def site(tmp_path):
    """Two converged certificates, `a` and `b`, whose hooks append their names to `ran`."""
    out, state, ran = tmp_path / "out", tmp_path / "state", tmp_path / "ran"
    hook = f"echo $RECONCILER_CERTIFICATES >> {ran}"
    m = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": LOCAL,
            "certificates": [entry(out, "a", post_renewal_command=hook), entry(out, "b", post_renewal_command=hook)],
        },
    )
    reconcile("-m", str(m), state_dir=state, check=0)
    ran.unlink()
    return m, state, out, ran


def serial(out: Path, name: str) -> int:
    return load_cert(out / f"{name}.crt").serial_number


def test_renew_issues_a_new_certificate_and_key_now_and_runs_the_hook(site):
    m, state, out, ran = site
    before = {n: (serial(out, n), (out / f"{n}.key").read_bytes()) for n in "ab"}
    proc = reconcile("renew", "a", "-m", str(m), "--detailed-exitcode", state_dir=state, check=2)
    lines = after_issuer(proc.stdout).splitlines()
    assert lines[0] == "Applied: 1 of 1 renewed (1 of 2 unchanged).", proc.stdout
    assert re.fullmatch(r"\s+~ a\s+renew\s+forced by `reconcile renew`", lines[1]), lines[1]
    assert serial(out, "a") != before["a"][0]
    assert (out / "a.key").read_bytes() != before["a"][1], "rotation is the default: a new key"
    assert (serial(out, "b"), (out / "b.key").read_bytes()) == before["b"], "b was not named"
    assert ran.read_text().split() == ["a"]
    # nothing is left owed: the next pass has nothing to do
    assert (
        after_issuer(reconcile("-m", str(m), "--plan", state_dir=state, check=0).stdout)
        == "No changes: 2 certificates match the manifest.\n"
    )


def test_renew_keeps_the_key_when_its_rotation_is_never(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    m = write_manifest(
        tmp_path / "m.json",
        {"issuer": LOCAL, "certificates": [entry(out, "k", key={"type": "EC", "curve": "P-384", "rotation": "never"})]},
    )
    reconcile("-m", str(m), state_dir=state, check=0)
    key, old = (out / "k.key").read_bytes(), serial(out, "k")
    reconcile("renew", "k", "-m", str(m), state_dir=state, check=0)
    assert serial(out, "k") != old
    assert (out / "k.key").read_bytes() == key


def test_renew_all_renews_every_certificate_and_runs_each_hook_once(site):
    m, state, out, ran = site
    old = {n: serial(out, n) for n in "ab"}
    proc = reconcile("renew", "--all", "-m", str(m), state_dir=state, check=0)
    assert after_issuer(proc.stdout).splitlines()[0] == "Applied: 2 of 2 renewed (0 of 2 unchanged)."
    assert all(serial(out, n) != old[n] for n in "ab")
    assert ran.read_text().split() == ["a", "b"], "one run of the shared command, for both"


def test_renew_plan_shows_what_would_happen_and_changes_nothing(site):
    m, state, out, ran = site
    before = tree_snapshot(out), tree_snapshot(state)
    proc = reconcile("renew", "--plan", "b", "-m", str(m), "--detailed-exitcode", state_dir=state, check=2)
    lines = after_issuer(proc.stdout).splitlines()
    assert lines[0] == "Plan: 1 to renew (1 of 2 unchanged)."
    assert re.fullmatch(r"\s+~ b\s+renew\s+forced by `reconcile renew`", lines[1])
    assert lines[2:] == ["Hooks that would run:", f"  echo $RECONCILER_CERTIFICATES >> {ran}   (for b)"]
    data = json.loads(
        reconcile("renew", "--plan", "b", "-m", str(m), "--output", "json", state_dir=state, check=0).stdout
    )
    assert {c["name"]: [a["action"] for a in c["actions"]] for c in data["certificates"]} == {"a": [], "b": ["renew"]}
    assert (tree_snapshot(out), tree_snapshot(state)) == before
    assert not ran.exists()


def test_renew_keeps_the_other_drift_fixes_of_the_pass(site):
    m, state, out, ran = site
    os.chmod(out / "b.key", 0o644)
    (out / "a.crt").unlink()  # a renew of a certificate that is gone is an issue
    proc = reconcile("renew", "a", "-m", str(m), "--plan", state_dir=state, check=0)
    lines = after_issuer(proc.stdout).splitlines()
    assert lines[0] == "Plan: 1 to issue, 1 to chmod (0 of 2 unchanged).", proc.stdout
    assert re.fullmatch(r"\s+\+ a\s+issue\s+forced by `reconcile renew`; certificate file missing", lines[1]), lines[1]
    assert re.fullmatch(r"\s+~ b\s+chmod\s+key mode 0644, want 0600", lines[2]), lines[2]
    reconcile("renew", "a", "-m", str(m), state_dir=state, check=0)
    assert (out / "a.crt").exists() and (out / "b.key").stat().st_mode & 0o777 == 0o600


def test_renew_of_an_unknown_name_does_nothing_and_lists_the_known_ones(site):
    m, state, out, ran = site
    before = tree_snapshot(out), tree_snapshot(state)
    proc = reconcile("renew", "a", "nope", "-m", str(m), state_dir=state)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert 'no certificate named "nope"' in proc.stderr and "known: a, b" in proc.stderr, proc.stderr
    assert str(m) in proc.stderr
    assert (tree_snapshot(out), tree_snapshot(state)) == before
    assert not ran.exists()
    plan = reconcile("renew", "--plan", "nope", "-m", str(m), state_dir=state)
    assert plan.returncode == 1 and 'no certificate named "nope"' in plan.stderr


@pytest.mark.parametrize("args", [(), ("a", "--all")])
def test_renew_without_names_or_all_or_with_both_is_a_usage_error(site, args):
    m, state, out, ran = site
    before = tree_snapshot(out)
    proc = reconcile("renew", *args, "-m", str(m), state_dir=state)
    assert proc.returncode == 2 and "usage: reconcile renew" in proc.stderr
    assert "name the certificates to renew, or --all" in proc.stderr
    assert tree_snapshot(out) == before


def test_renew_help_answers_the_obvious_questions():
    text = reconcile("renew", "--help", check=0).stdout
    for words in (
        "whatever",
        "--all",
        "--plan",
        "new key",
        '"rotation": "never"',
        "post_renewal_command",
        "unknown",
        "Exit codes",
        "reconcile status",
    ):
        assert words in text, words
    assert "renew" in reconcile("--help", check=0).stdout


# --------------------------------------------------------------------------- the transformation


def desired(name: str, hook: str | None = "reload") -> DesiredCert:
    return DesiredCert(
        name=name,
        common_name=name,
        sans=frozenset({name}),
        cert_path=f"/x/{name}.crt",
        key_path=f"/x/{name}.key",
        owner=None,
        uid=None,
        gid=None,
        cert_mode=0o644,
        key_mode=0o600,
        renew_before=RenewBefore(fixed=timedelta(hours=12)),
        duration=timedelta(hours=24),
        key=KeySpec(),
        post_renewal_command=hook,
        hook_timeout=timedelta(seconds=30),
        include_ca=False,
        ca_path=None,
        cert_type="server",
    )


def test_force_renewal_turns_the_chosen_plans_into_one_content_action_and_leaves_the_rest():
    chmod = Action(
        CHMOD, "key mode 0644, want 0600", (Drift("key_mode", CHMOD, "key mode 0644, want 0600", "0644", "0600"),)
    )
    sans = Action(REISSUE, "SANs differ: adds x", (Drift("sans", REISSUE, "SANs differ: adds x"),))
    plans = (
        CertPlan(desired("a"), (chmod,)),
        CertPlan(desired("b"), (sans,)),
        CertPlan(desired("c"), (chmod,)),
        CertPlan(desired("d"), (), "blocked"),
    )
    plan = Plan(plans, ())
    forced = force_renewal(plan, frozenset({"a", "b", "d"}))
    a, b, c, d = forced.certificates
    assert [(x.action, x.reason) for x in a.actions] == [(RENEW, FORCED)], "the write sets owner and mode anyway"
    assert [(x.action, x.reason) for x in b.actions] == [(REISSUE, f"{FORCED}; SANs differ: adds x")]
    assert c == plans[2] and d == plans[3], "not chosen, or cannot be managed: as planned"
    assert forced.hooks == (HookRun("reload", ("a", "b")),)
    assert plan.certificates == plans, "pure: the plan it was given is unchanged"


# --------------------------------------------------------------------------- against the real step-ca


def test_renew_against_step_ca_goes_over_mtls_without_the_password_file(tmp_path, step_ca):
    out, state = tmp_path / "out", tmp_path / "state"
    empty_step = tmp_path / "no-step"
    empty_step.mkdir()
    env = {"STEPPATH": str(empty_step)}
    pw = tmp_path / "provisioner.pass"
    pw.write_text(step_ca.password + "\n")
    pw.chmod(0o600)
    issuer = {
        "type": "step-ca",
        "url": step_ca.url,
        "root": str(step_ca.root_path),
        "provisioner": step_ca.provisioner,
        "password_file": str(pw),
    }
    certs = [
        entry(out, "fresh", duration="2h", renew_before="30m"),
        entry(out, "kept", duration="2h", renew_before="30m", key={"type": "EC", "rotation": "never"}),
    ]
    m = write_manifest(tmp_path / "m.json", {"issuer": issuer, "certificates": certs})
    reconcile("-m", str(m), state_dir=state, env=env, check=0)
    old = {n: (load_cert(out / f"{n}.crt"), (out / f"{n}.key").read_bytes()) for n in ("fresh", "kept")}
    assert old["fresh"][0].not_valid_after_utc - datetime.now(timezone.utc) > timedelta(hours=1), (
        "far from its renewal window"
    )

    pw.unlink()  # a forced renewal of a valid certificate needs no provisioner: the certificate is the credential
    log_before = step_ca.log_path.read_text(errors="replace")
    proc = reconcile("renew", "--all", "-m", str(m), "--detailed-exitcode", state_dir=state, env=env, check=2)
    assert after_issuer(proc.stdout).splitlines()[0] == "Applied: 2 of 2 renewed (0 of 2 unchanged).", (
        proc.stdout + proc.stderr
    )
    for n in ("fresh", "kept"):
        assert load_cert(out / f"{n}.crt").serial_number != old[n][0].serial_number
    assert (out / "fresh.key").read_bytes() != old["fresh"][1]
    assert (out / "kept.key").read_bytes() == old["kept"][1]
    new_log = step_ca.log_path.read_text(errors="replace")[len(log_before) :]
    calls = {
        n: [line for line in new_log.splitlines() if f"subject={n}.example" in line and "status=201" in line]
        for n in ("fresh", "kept")
    }
    assert calls["fresh"] and all("path=/1.0/rekey" in line for line in calls["fresh"]), new_log[-2000:]
    assert calls["kept"] and all("path=/1.0/renew" in line for line in calls["kept"]), new_log[-2000:]
