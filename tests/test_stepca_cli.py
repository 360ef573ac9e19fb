"""`reconcile` against a REAL step-ca, end to end through the CLI (issue 4).

Every run is a `python -m reconciler` subprocess (`helpers.reconcile`); the CA is the
`step_ca` fixture. Each test copies the provisioner password into its own file, so it may
break or delete that copy: the CA itself keeps reading `step_ca.password_file`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from helpers import cert_sans, load_cert, reconcile, tree_snapshot, write_manifest


# --------------------------------------------------------------------------- helpers


def run(ca, *args, secrets=(), **kwargs):
    """`reconcile` that also proves no password leaked into stdout or stderr."""
    proc = reconcile(*args, **kwargs)
    for secret in (ca.password, *secrets):
        assert secret not in proc.stdout and secret not in proc.stderr, (
            f"password leaked:\n{proc.stdout}\n{proc.stderr}"
        )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def password_copy(ca, tmp: Path) -> Path:
    path = tmp / "provisioner.pass"
    path.write_text(ca.password + "\n")
    path.chmod(0o600)
    return path


def issuer_block(ca, password_file: Path, root: Path | None = None) -> dict:
    return {
        "type": "step-ca",
        "url": ca.url,
        "root": str(root or ca.root_path),
        "provisioner": ca.provisioner,
        "password_file": str(password_file),
    }


def entry(out: Path, cn: str, **extra) -> dict:
    return {"common_name": cn, "cert_path": str(out / f"{cn}.crt"), "key_path": str(out / f"{cn}.key"), **extra}


def chains_to(ca, cert_path: Path) -> None:
    """The leaf is signed by the CA's intermediate, which is signed by its root."""
    leaf = load_cert(cert_path)
    intermediate = x509.load_pem_x509_certificate(ca.intermediate_pem())
    root = x509.load_pem_x509_certificate(ca.root_pem())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)


def plan_json(ca, manifest: Path, state: Path, env=None) -> dict:
    proc = run(ca, "-m", str(manifest), "--plan", "--output", "json", state_dir=state, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def actions_of(plan: dict) -> dict[str, list[str]]:
    return {c["name"]: [a["action"] for a in c["actions"]] for c in plan["certificates"]}


def key_bytes(out: Path, cn: str) -> bytes:
    return (out / f"{cn}.key").read_bytes()


@pytest.fixture
def site(tmp_path, step_ca):
    """(tmp, state, out, password file) with STEPPATH pointing at an empty folder, so the
    host's ~/.step never fills in what a test leaves out."""
    empty_step = tmp_path / "no-step"
    empty_step.mkdir()
    return (
        tmp_path,
        tmp_path / "state",
        tmp_path / "out",
        password_copy(step_ca, tmp_path),
        {"STEPPATH": str(empty_step)},
    )


# --------------------------------------------------------------------------- issue, reissue, renew


def test_object_manifest_issues_and_a_san_change_is_planned_then_applied_as_reissue(site, step_ca):
    tmp, state, out, pw, env = site
    cert = entry(out, "web.example", sans=["www.example", "10.1.2.3"], duration="2h", renew_before="30m")
    m = write_manifest(tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})

    # debug logging on: the secrets check in run() covers it too
    run(step_ca, "-m", str(m), "--detailed-exitcode", "-vv", "--log-format", "json", state_dir=state, env=env, check=2)
    crt = out / "web.example.crt"
    assert cert_sans(crt) == {"web.example", "www.example", "10.1.2.3"}
    chains_to(step_ca, crt)
    first_serial = load_cert(crt).serial_number

    cert["sans"] = ["www.example", "10.1.2.3", "api.example"]
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})
    before = tree_snapshot(out)
    plan = plan_json(step_ca, m, state, env)
    assert plan["format_version"] == 1 and plan["changes"] is True
    [c] = plan["certificates"]
    assert [a["action"] for a in c["actions"]] == ["reissue"]
    assert [d["field"] for d in c["actions"][0]["drift"]] == ["sans"]
    assert "api.example" in c["actions"][0]["reason"]
    run(step_ca, "-m", str(m), "--plan", "--detailed-exitcode", state_dir=state, env=env, check=2)
    assert tree_snapshot(out) == before, "--plan wrote something"

    run(step_ca, "-m", str(m), "--detailed-exitcode", state_dir=state, env=env, check=2)
    assert cert_sans(crt) == {"web.example", "www.example", "10.1.2.3", "api.example"}
    assert load_cert(crt).serial_number != first_serial
    chains_to(step_ca, crt)
    assert actions_of(plan_json(step_ca, m, state, env)) == {"web.example": []}


def test_every_field_takes_effect_against_step_ca_and_chain_and_ca_file_need_no_issuance(site, step_ca):
    tmp, state, out, pw, env = site
    cert = entry(out, "fields.example", duration="2h", renew_before="30m")
    m = write_manifest(tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    crt = out / "fields.example.crt"
    leaf = load_cert(crt)
    key = key_bytes(out, "fields.example")
    assert len(x509.load_pem_x509_certificates(crt.read_bytes())) == 1

    # the chain and the root come from what the issuer already knows: no password needed
    pw.unlink()
    cert.update(include_ca=True, ca_path=str(out / "root.crt"))
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})
    assert actions_of(plan_json(step_ca, m, state, env)) == {"fields.example": ["rewrite_chain", "write_ca"]}
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    chain = x509.load_pem_x509_certificates(crt.read_bytes())
    assert chain[0] == leaf and key_bytes(out, "fields.example") == key
    assert chain[1:] == [x509.load_pem_x509_certificate(step_ca.intermediate_pem())]
    assert (out / "root.crt").read_bytes().strip() == step_ca.root_pem().strip()

    # step-ca's template gives both usages: a changed cert_type is already satisfied
    cert.update(cert_type="client")
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})
    assert actions_of(plan_json(step_ca, m, state, env)) == {"fields.example": []}

    # a changed duration re-issues now, not at the next (lifetime-copying) renewal
    password_copy(step_ca, tmp)
    cert.update(duration="3h", renew_before="30m")
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})
    assert actions_of(plan_json(step_ca, m, state, env)) == {"fields.example": ["reissue"]}
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    renewed = load_cert(crt)
    assert abs(renewed.not_valid_after_utc - renewed.not_valid_before_utc - timedelta(hours=3)) < timedelta(minutes=2)
    assert actions_of(plan_json(step_ca, m, state, env)) == {"fields.example": []}


def test_routine_renewal_goes_over_mtls_without_the_password_file_and_rotates_the_key(site, step_ca):
    tmp, state, out, pw, env = site
    # 5m asked, 6m granted (1m backdate): "99%" puts every pass inside the window, jitter or not
    cert = entry(out, "renew.example", sans=["10.7.7.7"], duration="5m", renew_before="99%")
    m = write_manifest(tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    old_cert, old_key = load_cert(out / "renew.example.crt"), key_bytes(out, "renew.example")

    pw.unlink()  # renewal must not need the provisioner: the certificate is the credential
    assert actions_of(plan_json(step_ca, m, state, env)) == {"renew.example": ["renew"]}
    log_before = step_ca.log_path.read_text(errors="replace")
    proc = run(step_ca, "-m", str(m), "--detailed-exitcode", state_dir=state, env=env, check=2)
    assert "renew" in proc.stdout

    new_cert = load_cert(out / "renew.example.crt")
    assert new_cert.serial_number != old_cert.serial_number
    assert key_bytes(out, "renew.example") != old_key, "rotation is the default: a renewal brings a new key"
    assert cert_sans(out / "renew.example.crt") == {"renew.example", "10.7.7.7"}
    chains_to(step_ca, out / "renew.example.crt")
    # the CA saw an mTLS rekey for this subject, not a token-signed /sign
    new_log = step_ca.log_path.read_text(errors="replace")[len(log_before) :]
    calls = [ln for ln in new_log.splitlines() if "subject=renew.example" in ln and "status=201" in ln]
    assert calls and all("path=/1.0/rekey" in ln for ln in calls), new_log[-2000:]


# --------------------------------------------------------------------------- password problems


def test_wrong_password_fails_only_what_needs_the_provisioner_and_leaves_files_alone(site, step_ca):
    tmp, state, out, pw, env = site
    ok = entry(out, "ok.example", duration="2h", renew_before="30m")
    m = write_manifest(tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [ok]})
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    before = tree_snapshot(out)

    wrong = "not-the-provisioner-password-123"
    pw.write_text(wrong + "\n")
    new = [entry(out, f"new{i}.example") for i in range(5)]
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [ok, *new]})
    log_mark = len(step_ca.log_path.read_text(errors="replace"))
    proc = run(step_ca, "-m", str(m), "-vv", state_dir=state, env=env, secrets=(wrong,), check=1)
    failures = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("  ")]
    assert sorted(ln.split(":")[0] for ln in failures) == [e["common_name"] for e in new], proc.stderr
    for line in failures:
        assert f"cannot be decrypted with the password in {pw}" in line and "hint:" in line
    assert tree_snapshot(out) == before
    assert not any(Path(e["cert_path"]).exists() or Path(e["key_path"]).exists() for e in new)
    # the failure is found once per pass, not once per certificate
    log = step_ca.log_path.read_text(errors="replace")[log_mark:]
    assert log.count("path=/provisioners ") == 1, log[-3000:]


def test_missing_password_file_is_one_line_naming_the_path_and_the_rest_still_converges(site, step_ca):
    tmp, state, out, pw, env = site
    valid = entry(out, "valid.example", duration="2h", renew_before="30m")
    due = entry(out, "due.example", duration="5m", renew_before="99%")
    m = write_manifest(tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [valid, due]})
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    due_serial = load_cert(out / "due.example.crt").serial_number
    pw.unlink()

    # nothing needs the provisioner: no password file is no problem
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [valid]})
    before = tree_snapshot(out)
    run(step_ca, "-m", str(m), "--detailed-exitcode", state_dir=state, env=env, check=0)
    assert tree_snapshot(out) == before

    # a new certificate needs a token: it alone fails; a renewal (mTLS) still goes through
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [valid, due, entry(out, "fresh.example")]})
    proc = run(step_ca, "-m", str(m), state_dir=state, env=env, check=1)
    summary = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("  ")]
    assert len(summary) == 1 and summary[0].startswith("fresh.example:"), proc.stderr
    assert f"password file {pw} cannot be read" in summary[0] and "hint:" in summary[0]
    assert "\n" not in summary[0]
    assert not (out / "fresh.example.crt").exists() and not (out / "fresh.example.key").exists()
    after = tree_snapshot(out)
    for name in ("valid.example.crt", "valid.example.key"):
        assert after[str(out / name)] == before[str(out / name)]
    assert load_cert(out / "due.example.crt").serial_number != due_serial, "the renewal should have continued"


# --------------------------------------------------------------------------- the CA goes away


def test_ca_stopped_fails_the_pass_naming_host_port_and_the_next_pass_converges(site, step_ca):
    tmp, state, out, pw, env = site
    first = entry(out, "first.example", duration="2h", renew_before="30m")
    m = write_manifest(tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [first]})
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    more = [entry(out, f"n{i}.example", sans=[f"10.0.9.{i}"]) for i in range(4)]
    write_manifest(m, {"issuer": issuer_block(step_ca, pw), "certificates": [first, *more]})
    before = tree_snapshot(out)

    step_ca.stop()
    try:
        proc = run(step_ca, "-m", str(m), state_dir=state, env=env, check=1)
    finally:
        step_ca.start()
    hostport = f"127.0.0.1:{step_ca.port}"
    failures = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("  ")]
    assert len(failures) == 4, proc.stderr
    for line in failures:
        assert hostport in line and "unreachable" in line and "hint:" in line and "running" in line, line
    assert tree_snapshot(out) == before, "a failed pass must not touch existing files"

    run(step_ca, "-m", str(m), "--detailed-exitcode", state_dir=state, env=env, check=2)
    for e in more:
        chains_to(step_ca, Path(e["cert_path"]))
    assert tree_snapshot(out)[str(out / "first.example.crt")] == before[str(out / "first.example.crt")]
    assert not any(actions_of(plan_json(step_ca, m, state, env)).values())


def test_ca_stopped_in_the_middle_of_a_pass_keeps_what_was_done_and_the_next_pass_finishes(site, step_ca):
    tmp, state, out, pw, env = site
    entries = [entry(out, f"mid{i:02d}.example") for i in range(60)]
    m = write_manifest(tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": entries})
    first_cert = Path(entries[0]["cert_path"])

    def stop_after_the_first_certificate():
        deadline = time.monotonic() + 60
        while not first_cert.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        step_ca.stop()

    stopper = threading.Thread(target=stop_after_the_first_certificate)
    stopper.start()
    try:
        # one worker: the pass is still issuing when the CA goes away
        proc = run(step_ca, "-m", str(m), "--workers", "1", state_dir=state, env=env, check=1)
    finally:
        stopper.join()
        step_ca.start()
    written = {e["name"] if "name" in e else e["common_name"] for e in entries if Path(e["cert_path"]).exists()}
    failed = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("  ")]
    assert written and failed, proc.stderr
    assert len(written) + len(failed) == len(entries)
    for line in failed:
        assert f"127.0.0.1:{step_ca.port}" in line and "hint:" in line, line
    for e in entries:  # no half-written pair: a certificate is there with its key, or neither is
        crt, key = Path(e["cert_path"]), Path(e["key_path"])
        if crt.exists():
            chains_to(step_ca, crt)
            assert key.exists()
        else:
            assert not key.exists(), f"{key} written without its certificate"
    kept = tree_snapshot(out)

    run(step_ca, "-m", str(m), "--detailed-exitcode", state_dir=state, env=env, check=2)
    after = tree_snapshot(out)
    for path, facts in kept.items():
        assert after[path] == facts, f"{path} was rewritten although it was already converged"
    assert all(Path(e["cert_path"]).exists() for e in entries)
    assert not any(actions_of(plan_json(step_ca, m, state, env)).values())


# --------------------------------------------------------------------------- the CA says no


def test_a_root_of_another_ca_is_a_tls_trust_error_and_nothing_is_written(site, step_ca, other_step_ca):
    tmp, state, out, pw, env = site
    m = write_manifest(
        tmp / "m.json",
        {"issuer": issuer_block(step_ca, pw, root=other_step_ca.root_path), "certificates": [entry(out, "t.example")]},
    )
    proc = run(step_ca, "-m", str(m), state_dir=state, env=env, check=1)
    assert (
        f"TLS verification of step-ca at 127.0.0.1:{step_ca.port} failed against root {other_step_ca.root_path}"
        in proc.stderr
    )
    assert "hint:" in proc.stderr
    assert not out.exists()


def go_duration(text: str) -> float:
    """Seconds in a Go time.Duration string such as 48h0m59.5s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(h|ms|m|µs|us|ns|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_a_duration_above_the_provisioner_maximum_quotes_the_cas_refusal(site, step_ca):
    tmp, state, out, pw, env = site
    m = write_manifest(
        tmp / "m.json",
        {
            "issuer": issuer_block(step_ca, pw),
            "certificates": [entry(out, "long.example", duration="48h", renew_before="33%")],
        },
    )
    proc = run(step_ca, "-m", str(m), state_dir=state, env=env, check=1)
    assert "HTTP 403" in proc.stderr
    # step-ca measures the request from its own clock (plus its 1m backdate), so a busy machine
    # asks for 48h0m59.8s or 48h1m0.2s: the figure is checked within a minute, not to the letter
    found = re.search(
        r"requested duration of (\S+) is more than the authorized maximum certificate duration of 24h1m0s", proc.stderr
    )
    assert found, proc.stderr
    assert abs(go_duration(found.group(1)) - (48 * 3600 + 60)) <= 60, found.group(1)
    assert "maxTLSCertDuration" in proc.stderr  # the hint says where to change it
    assert not out.exists()


# --------------------------------------------------------------------------- the clocks differ


@pytest.mark.parametrize("offset", ["+10m", "-10m"])
def test_a_host_clock_off_from_the_cas_by_more_than_the_token_leeway_refuses_plainly_and_writes_nothing(
    site, step_ca, offset
):
    """This host's clock moved with faketime, the real step-ca's not: the pass says the
    clocks differ and how to fix it, instead of step-ca's bare "token not yet valid" or
    certificates that look not yet valid here (issue 10 §6)."""
    import shutil

    faketime = shutil.which("faketime")
    assert faketime, "faketime is not installed; scripts/install --test installs it"
    tmp, state, out, pw, env = site
    m = write_manifest(
        tmp / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [entry(out, "clock.example")]}
    )
    proc = run(step_ca, "-m", str(m), state_dir=state, env=env, wrap=(faketime, "-f", offset))
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said
    assert "clock" in said and "NTP" in said, said
    assert not out.exists() or not any(out.iterdir())
    # with the clocks agreeing again, the same state converges
    run(step_ca, "-m", str(m), state_dir=state, env=env, check=0)
    chains_to(step_ca, out / "clock.example.crt")


# --------------------------------------------------------------------------- bare array, three ways to name the CA


def bare_entries(out: Path) -> list:
    return [
        {
            "common_name": "edge.example",
            "sans": ["*.edge.example", "10.20.30.40", "2001:DB8::40"],
            "cert_path": str(out / "edge" / "edge.crt"),
            "key_path": str(out / "edge" / "edge.key"),
            "permissions": "640",
            "key_permissions": "600",
        },
        {
            "common_name": "10.20.30.41",
            "name": "by-ip",
            "sans": ["ip-only.example"],
            "cert_path": str(out / "ip.crt"),
            "key_path": str(out / "ip.key"),
        },
    ]


@pytest.mark.parametrize("how", ["flags", "env", "defaults.json"])
def test_bare_array_with_wildcard_and_ip_sans_converges_then_a_second_pass_writes_nothing(site, step_ca, how):
    tmp, state, out, pw, env = site
    m = write_manifest(tmp / "m.json", bare_entries(out))
    args: list[str] = []
    env = dict(env, RECONCILER_ISSUER=None)  # no choice made: the step-ca settings alone decide
    if how == "flags":
        args = [
            "--ca-url",
            step_ca.url,
            "--root",
            str(step_ca.root_path),
            "--provisioner",
            step_ca.provisioner,
            "--password-file",
            str(pw),
        ]
    elif how == "env":
        env.update(
            RECONCILER_CA_URL=step_ca.url,
            RECONCILER_ROOT=str(step_ca.root_path),
            RECONCILER_PROVISIONER=step_ca.provisioner,
            RECONCILER_PASSWORD_FILE=str(pw),
        )
    else:  # URL and root from $STEPPATH/config/defaults.json (as `step ca bootstrap` writes it)
        assert json.loads((step_ca.steppath / "config" / "defaults.json").read_text())["ca-url"] == step_ca.url
        env["STEPPATH"] = str(step_ca.steppath)
        args = ["--provisioner", step_ca.provisioner, "--password-file", str(pw)]

    first = run(step_ca, "-m", str(m), *args, "--detailed-exitcode", state_dir=state, env=env, check=2)
    assert "2 of 2 issued" in first.stdout
    assert cert_sans(out / "edge" / "edge.crt") == {"edge.example", "*.edge.example", "10.20.30.40", "2001:db8::40"}
    assert cert_sans(out / "ip.crt") == {"10.20.30.41", "ip-only.example"}
    for crt in (out / "edge" / "edge.crt", out / "ip.crt"):
        chains_to(step_ca, crt)
    assert oct((out / "edge" / "edge.key").stat().st_mode & 0o777) == "0o600"
    assert oct((out / "edge" / "edge.crt").stat().st_mode & 0o777) == "0o640"

    files, state_files = tree_snapshot(out), tree_snapshot(state)
    plan = json.loads(
        run(step_ca, "-m", str(m), *args, "--plan", "--output", "json", state_dir=state, env=env, check=0).stdout
    )
    assert plan["changes"] is False and not any(actions_of(plan).values())
    second = run(step_ca, "-m", str(m), *args, "--detailed-exitcode", state_dir=state, env=env, check=0)
    assert "No changes" in second.stdout
    assert tree_snapshot(out) == files, "a converged pass must not rewrite certificates or keys"
    assert tree_snapshot(state) == state_files, "a pass with nothing to do writes nothing, not even state"
