"""`reconcile` applies the plan: end to end through the CLI, as root, on real files."""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from helpers import cert_sans, load_cert, reconcile, tree_snapshot, write_manifest

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid
WWW = grp.getgrnam("www-data").gr_gid


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.fail("these tests chown to real users (nobody, nogroup, www-data): run them as root (they never skip)")


@pytest.fixture
def site(tmp_path):
    state = tmp_path / "state"
    out = tmp_path / "out"
    return tmp_path, state, out


def bare_manifest(out: Path, **extra) -> list:
    return [
        {
            "common_name": "nginx.internal.example",
            "sans": ["*.internal.example", "10.0.0.111", "2001:DB8::1"],
            "cert_path": str(out / "nginx" / "nginx.crt"),
            "key_path": str(out / "nginx" / "nginx.key"),
            "owner": "root:www-data",
            "permissions": "640",
            **extra,
        },
        {
            "common_name": "svc.internal.example",
            "cert_path": str(out / "svc.crt"),
            "key_path": str(out / "svc.key"),
            "owner": "nobody:nogroup",
        },
    ]


def test_bare_array_with_wildcard_and_ip_sans_converges_and_second_pass_writes_nothing(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", bare_manifest(out))
    first = reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=2)
    assert "2 of 2 issued" in first.stdout

    crt, key = out / "nginx" / "nginx.crt", out / "nginx" / "nginx.key"
    assert cert_sans(crt) == {"*.internal.example", "nginx.internal.example", "10.0.0.111", "2001:db8::1"}
    for p in (crt, key):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, WWW, 0o640)
    svc_key = (out / "svc.key").stat()
    assert (svc_key.st_uid, svc_key.st_gid, stat.S_IMODE(svc_key.st_mode)) == (NOBODY, NOGROUP, 0o600)
    assert stat.S_IMODE((out / "svc.crt").stat().st_mode) == 0o644
    eku = load_cert(crt).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # the embedded CA was created private
    ca = state / "ca"
    assert stat.S_IMODE(ca.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in ca.glob("*.key"))

    before = tree_snapshot(out)
    second = reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=0)
    assert "No changes: 2 certificates match the manifest." in second.stdout
    assert tree_snapshot(out) == before


def test_owner_and_mode_drift_are_repaired_without_reissue_or_hook(site):
    tmp, state, out = site
    marker = tmp / "hook-ran"
    m = write_manifest(tmp / "m.json", bare_manifest(out, post_renewal_command=f"echo x >> {marker}"))
    reconcile("-m", str(m), state_dir=state, check=0)
    assert marker.read_text() == "x\n"
    crt, key = out / "nginx" / "nginx.crt", out / "nginx" / "nginx.key"
    serial, key_bytes = load_cert(crt).serial_number, key.read_bytes()

    os.chown(key, NOBODY, NOGROUP)
    os.chmod(key, 0o644)
    plan = reconcile("-m", str(m), "--plan", "--output", "json", state_dir=state, check=0)
    actions = {c["name"]: [a["action"] for a in c["actions"]] for c in json.loads(plan.stdout)["certificates"]}
    assert actions["nginx.internal.example"] == ["chown", "chmod"]
    assert json.loads(plan.stdout)["hooks"] == []

    reconcile("-m", str(m), state_dir=state, check=0)
    st = key.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, WWW, 0o640)
    assert load_cert(crt).serial_number == serial and key.read_bytes() == key_bytes
    assert marker.read_text() == "x\n", "a chown/chmod must not run the post-renewal command"


def test_hook_gets_its_environment_and_runs_once_for_certificates_that_share_it(site):
    tmp, state, out = site
    log = tmp / "hook.log"
    cmd = (
        'echo "$RECONCILER_COMMON_NAME|$RECONCILER_ACTION|$RECONCILER_SANS|$RECONCILER_CERT_PATH|$RECONCILER_GUEST_ID" '
        f'>> {log}; echo "$RECONCILER_CERTIFICATES" | tr "\\n" , >> {log}; echo >> {log}'
    )
    entries = bare_manifest(out)
    for e in entries:
        e["post_renewal_command"] = cmd
    entries[0]["guest_id"] = "101"
    m = write_manifest(tmp / "m.json", entries)
    reconcile("-m", str(m), state_dir=state, check=0)
    lines = log.read_text().splitlines()
    assert len(lines) == 2, "one run for the shared command"
    cn, action, sans, cert_path, guest = lines[0].split("|")
    assert (cn, action, guest) == ("nginx.internal.example", "issue", "101")
    assert set(sans.split(",")) == {"*.internal.example", "nginx.internal.example", "10.0.0.111", "2001:db8::1"}
    assert cert_path == str(out / "nginx" / "nginx.crt")
    assert lines[1] == "nginx.internal.example,svc.internal.example,"


def test_failed_hook_exits_1_and_is_retried_alone_until_it_succeeds(site):
    tmp, state, out = site
    gate = tmp / "gate"
    runs = tmp / "runs"
    cmd = f"echo run >> {runs}; test -e {gate} || {{ echo 'nginx: reload failed' >&2; exit 3; }}"
    m = write_manifest(tmp / "m.json", bare_manifest(out, post_renewal_command=cmd)[:1])
    first = reconcile("-m", str(m), state_dir=state)
    assert first.returncode == 1
    assert "failed with exit code 3" in first.stderr and "reload failed" in first.stderr
    serial = load_cert(out / "nginx" / "nginx.crt").serial_number

    plan = json.loads(reconcile("-m", str(m), "--plan", "--output", "json", state_dir=state, check=0).stdout)
    assert [a["action"] for a in plan["certificates"][0]["actions"]] == ["run_hook"]
    status = json.loads(reconcile("status", "-m", str(m), "--output", "json", state_dir=state, check=1).stdout)
    assert status["certificates"][0]["state"] == "hook pending"
    assert status["certificates"][0]["last_hook"] == "failed"

    assert reconcile("-m", str(m), state_dir=state).returncode == 1  # still failing: retried, still pending
    gate.touch()
    reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=2)
    assert runs.read_text().count("run") == 3
    assert load_cert(out / "nginx" / "nginx.crt").serial_number == serial, "a hook retry never re-issues"
    reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=0)
    assert runs.read_text().count("run") == 3


def test_hook_timeout_kills_the_whole_process_group(site):
    tmp, state, out = site
    pidfile = tmp / "child.pid"
    cmd = f"sleep 300 & echo $! > {pidfile}; wait"
    m = write_manifest(tmp / "m.json", bare_manifest(out, post_renewal_command=cmd, hook_timeout="2s")[:1])
    started = time.monotonic()
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    assert time.monotonic() - started < 30
    assert "timed out" in proc.stderr
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hook's child survived the timeout")
    status = json.loads(reconcile("status", "-m", str(m), "--output", "json", state_dir=state, check=1).stdout)
    assert status["certificates"][0]["last_hook"] == "timeout"


@pytest.mark.parametrize("point", ["after_key", "after_cert", "before_hooks"])
def test_a_kill_mid_pass_is_repaired_by_the_next_pass(site, point):
    tmp, state, out = site
    runs = tmp / "runs"
    m = write_manifest(tmp / "m.json", bare_manifest(out, post_renewal_command=f"echo run >> {runs}")[:1])
    reconcile("-m", str(m), state_dir=state, check=0)
    old_key = (out / "nginx" / "nginx.key").read_bytes()
    # force a reissue, and die at `point`
    entries = bare_manifest(out, post_renewal_command=f"echo run >> {runs}")[:1]
    entries[0]["sans"].append("extra.internal.example")
    write_manifest(m, entries)
    killed = reconcile("-m", str(m), state_dir=state, env={"RECONCILER_FAULT_INJECT": point})
    assert killed.returncode == -9
    plan = json.loads(reconcile("-m", str(m), "--plan", "--output", "json", state_dir=state, check=0).stdout)
    actions = [a["action"] for a in plan["certificates"][0]["actions"]]
    if point == "after_key":
        assert (out / "nginx" / "nginx.key").read_bytes() != old_key
        assert actions == ["issue"] and "does not match" in plan["certificates"][0]["actions"][0]["reason"]
    elif point == "after_cert":
        assert actions == ["run_hook"] or actions == [], actions
    else:
        assert actions == ["run_hook"], "a deployed certificate whose hook never ran must not be forgotten"
    reconcile("-m", str(m), state_dir=state, check=0)
    assert "extra.internal.example" in cert_sans(out / "nginx" / "nginx.crt")
    reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=0)
    assert runs.read_text().count("run") == 2, "the hook ran exactly once for the new certificate"
    assert not [p for p in (out / "nginx").iterdir() if ".reconciler-tmp-" in p.name]


def test_second_reconcile_waits_for_the_lock_then_names_the_holder(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", bare_manifest(out))
    state.mkdir(parents=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        started = time.monotonic()
        proc = reconcile("-m", str(m), "--lock-timeout", "1", state_dir=state)
        assert proc.returncode == 1
        assert f"pid {os.getpid()}" in proc.stderr
        assert 1 <= time.monotonic() - started < 20
        assert not out.exists()
    finally:
        os.close(fd)
    reconcile("-m", str(m), state_dir=state, check=0)


def test_one_certificate_failing_does_not_stop_the_others(site):
    tmp, state, out = site
    out.mkdir()
    (out / "blocker").write_text("a file where a folder should be")
    entries = bare_manifest(out)
    entries[0]["cert_path"] = str(out / "blocker" / "x.crt")
    entries[0]["key_path"] = str(out / "blocker" / "x.key")
    m = write_manifest(tmp / "m.json", entries)
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    assert "nginx.internal.example" in proc.stderr and "blocker" in proc.stderr
    assert (out / "svc.crt").exists() and (out / "svc.key").exists()
    status = json.loads(reconcile("status", "-m", str(m), "--output", "json", state_dir=state, check=1).stdout)
    states = {c["name"]: c["state"] for c in status["certificates"]}
    assert states == {"nginx.internal.example": "error", "svc.internal.example": "ready"}


def test_corrupt_status_store_is_a_warning_and_a_fresh_start(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", bare_manifest(out))
    reconcile("-m", str(m), state_dir=state, check=0)
    (state / "status.json").write_text("{not json")
    proc = reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=0)
    assert "status store" in proc.stderr and "starting afresh" in proc.stderr
    assert json.loads((state / "status.json").read_text())["version"] == 1


def test_include_ca_ca_path_client_type_and_kept_key(site):
    tmp, state, out = site
    entry = {
        "common_name": "client.internal.example",
        "cert_type": "client",
        "include_ca": True,
        "ca_path": str(out / "root.crt"),
        "key": {"type": "EC", "curve": "P-384", "rotation": "never"},
        # a 1-minute lifetime (plus the CA's 1-minute backdate) is always inside a 99 % window
        "duration": "1m",
        "renew_before": "99%",
        "cert_path": str(out / "c.crt"),
        "key_path": str(out / "c.key"),
    }
    m = write_manifest(tmp / "m.json", {"certificates": [entry]})
    reconcile("-m", str(m), state_dir=state, check=0)
    chain = x509.load_pem_x509_certificates((out / "c.crt").read_bytes())
    root = x509.load_pem_x509_certificate((out / "root.crt").read_bytes())
    assert len(chain) == 2
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(root)
    eku = chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key_before = (out / "c.key").read_bytes()
    # a renewal that keeps the key
    proc = reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=2)
    assert "renew" in proc.stdout
    assert (out / "c.key").read_bytes() == key_before
    key = serialization.load_pem_private_key(key_before, None)
    assert load_cert(out / "c.crt").public_key().public_numbers() == key.public_key().public_numbers()


def test_rotation_is_the_default_on_renewal(site):
    tmp, state, out = site
    entry = {
        "common_name": "r.internal.example",
        "duration": "1m",
        "renew_before": "99%",
        "cert_path": str(out / "r.crt"),
        "key_path": str(out / "r.key"),
    }
    m = write_manifest(tmp / "m.json", [entry])
    reconcile("-m", str(m), state_dir=state, check=0)
    before = (out / "r.key").read_bytes()
    reconcile("-m", str(m), state_dir=state, check=0)
    assert (out / "r.key").read_bytes() != before


def test_invalid_manifest_changes_nothing_and_exits_1(site):
    tmp, state, out = site
    entries = bare_manifest(out)
    entries[1]["permisions"] = "600"
    m = write_manifest(tmp / "m.json", entries)
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    assert '[1].permisions: unknown field; did you mean "permissions"?' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not (state / "ca").exists() and not (state / "status.json").exists()


def test_a_one_shot_run_writes_the_textfile_metrics(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", bare_manifest(out))
    prom = tmp / "metrics" / "reconciler.prom"
    prom.parent.mkdir()
    reconcile("-m", str(m), "--metrics-file", str(prom), state_dir=state, check=0)
    text = prom.read_text()
    not_after = int(load_cert(out / "svc.crt").not_valid_after_utc.timestamp())
    assert 'reconciler_certificate_ready{name="svc.internal.example"} 1.0' in text
    series = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert series['reconciler_certificate_not_after_timestamp_seconds{name="svc.internal.example"}'] == not_after
    assert "reconciler_manifest_valid 1.0" in text
    assert 'reconciler_issuance_failures_total{name="nginx.internal.example"} 0.0' in text
