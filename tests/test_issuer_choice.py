"""Which CA a manifest means (issue 9 §2): a bare array takes its issuer from flags >
RECONCILER_* > `$STEPPATH/config/defaults.json`, or from `--issuer local` chosen on
purpose; with none of them nothing happens. Every output names the issuer, every
missing step-ca setting is reported at once, and with fingerprint-only trust a
certificate from another CA is never taken for one of ours.

Every run is a real `python -m reconciler` subprocess; the CA is the real step-ca of
tests/stepca_ca.py wherever a certificate is issued.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from helpers import load_cert, reconcile, write_manifest
from test_stepca_cli import password_copy

# the harness default (RECONCILER_ISSUER=local) switched off: these tests choose
NO_CHOICE = {"RECONCILER_ISSUER": None}


def entry(out: Path, cn: str, **extra) -> dict:
    return {"common_name": cn, "cert_path": str(out / f"{cn}.crt"), "key_path": str(out / f"{cn}.key"), **extra}


def steppath_with(tmp: Path, defaults: dict | None) -> Path:
    """A real STEPPATH folder; `defaults` is written to config/defaults.json when given."""
    path = tmp / "step"
    (path / "config").mkdir(parents=True)
    if defaults is not None:
        (path / "config" / "defaults.json").write_text(json.dumps(defaults))
    return path


def issued_by_step_ca(ca, cert_path: Path) -> bool:
    leaf = load_cert(cert_path)
    intermediate = x509.load_pem_x509_certificate(ca.intermediate_pem())
    try:
        leaf.verify_directly_issued_by(intermediate)
    except Exception:
        return False
    return True


def fingerprint_only(step_ca, password_file: Path) -> dict:
    """An issuer object that knows the step-ca's root only by its fingerprint."""
    return {
        "type": "step-ca",
        "url": step_ca.url,
        "fingerprint": step_ca.fingerprint,
        "provisioner": step_ca.provisioner,
        "password_file": str(password_file),
    }


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


# --------------------------------------------------------------------------- bare arrays


def test_bare_array_with_only_step_defaults_json_issues_from_that_step_ca_not_the_embedded_ca(tmp_path, step_ca):
    """The reported bug: no flags, no environment, a `defaults.json` as `step ca bootstrap`
    writes it (plus provisioner and password-file, which step reads from there too)."""
    pw = password_copy(step_ca, tmp_path)
    steppath = steppath_with(
        tmp_path,
        {
            "ca-url": step_ca.url,
            "fingerprint": step_ca.fingerprint,
            "root": str(step_ca.root_path),
            "provisioner": step_ca.provisioner,
            "password-file": str(pw),
        },
    )
    out, state = tmp_path / "out", tmp_path / "state"
    m = write_manifest(tmp_path / "m.json", [entry(out, "web.example")])

    proc = reconcile("-m", str(m), state_dir=state, env={**NO_CHOICE, "STEPPATH": str(steppath)})
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert issued_by_step_ca(step_ca, out / "web.example.crt"), "issued by another CA than the step-ca of defaults.json"
    assert not (state / "ca").exists(), "the embedded CA was created"
    assert proc.stdout.splitlines()[0] == f"issuer: step-ca {step_ca.url}, provisioner {step_ca.provisioner}"


@pytest.mark.parametrize("command", ["pass", "plan", "validate", "status", "doctor"])
def test_bare_array_with_no_issuer_configured_is_an_error_that_says_how_to_configure_one(tmp_path, command):
    steppath = steppath_with(tmp_path, None)  # the folder exists, defaults.json does not
    out, state = tmp_path / "out", tmp_path / "state"
    m = write_manifest(tmp_path / "m.json", [entry(out, "web.example")])
    args = {"pass": [], "plan": ["--plan"], "validate": ["validate"], "status": ["status"], "doctor": ["doctor"]}[
        command
    ]
    if args and args[0] in ("validate", "status", "doctor"):
        argv = [args[0], "-m", str(m)]
    else:
        argv = ["-m", str(m), *args]

    proc = reconcile(*argv, state_dir=state, env={**NO_CHOICE, "STEPPATH": str(steppath), "HOME": str(tmp_path)})
    no_traceback(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "no issuer" in text
    for way in (
        "--ca-url",
        "RECONCILER_CA_URL",
        "ca-url",
        "--root",
        "RECONCILER_ROOT",
        "--fingerprint",
        "RECONCILER_FINGERPRINT",
        "fingerprint",
        "--provisioner",
        "RECONCILER_PROVISIONER",
        "--password-file",
        "RECONCILER_PASSWORD_FILE",
        str(steppath / "config" / "defaults.json"),
        "--issuer local",
        "RECONCILER_ISSUER=local",
        '{"issuer": {"type": "local"}',
    ):
        assert way in text, f"{way!r} missing from:\n{text}"
    assert not out.exists(), "a certificate folder was created"
    assert not state.exists(), "the state folder was created"


def test_steppath_defaults_to_home_dot_step_like_the_step_cli(tmp_path, step_ca):
    pw = password_copy(step_ca, tmp_path)
    home = tmp_path / "home"
    (home / ".step" / "config").mkdir(parents=True)
    (home / ".step" / "config" / "defaults.json").write_text(
        json.dumps({"ca-url": step_ca.url, "fingerprint": step_ca.fingerprint, "root": str(step_ca.root_path)})
    )
    m = write_manifest(tmp_path / "m.json", [entry(tmp_path / "out", "web.example")])
    env = {**NO_CHOICE, "STEPPATH": None, "HOME": str(home)}
    proc = reconcile(
        "-m",
        str(m),
        "--plan",
        "--provisioner",
        step_ca.provisioner,
        "--password-file",
        str(pw),
        state_dir=tmp_path / "state",
        env=env,
    )
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"issuer: step-ca {step_ca.url}, provisioner {step_ca.provisioner}"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_issuer_local_chooses_the_embedded_ca_on_purpose_even_with_a_defaults_json(tmp_path, step_ca, how):
    steppath = steppath_with(tmp_path, {"ca-url": step_ca.url, "fingerprint": step_ca.fingerprint})
    out, state = tmp_path / "out", tmp_path / "state"
    m = write_manifest(tmp_path / "m.json", [entry(out, "web.example")])
    env = {"STEPPATH": str(steppath), **({"RECONCILER_ISSUER": "local"} if how == "env" else NO_CHOICE)}
    args = ["--issuer", "local"] if how == "flag" else []

    proc = reconcile("-m", str(m), *args, state_dir=state, env=env)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"issuer: embedded CA in {state / 'ca'}"
    assert not issued_by_step_ca(step_ca, out / "web.example.crt")
    assert (state / "ca").is_dir()


def test_issuer_step_ca_with_nothing_configured_lists_every_missing_setting_at_once(tmp_path):
    steppath = steppath_with(tmp_path, None)
    m = write_manifest(tmp_path / "m.json", [entry(tmp_path / "out", "web.example")])
    env = {**NO_CHOICE, "STEPPATH": str(steppath)}
    for argv in (["-m", str(m)], ["validate", "-m", str(m)], ["doctor", "-m", str(m)]):
        proc = reconcile(*argv, "--issuer", "step-ca", state_dir=tmp_path / "state", env=env)
        no_traceback(proc)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        text = proc.stdout + proc.stderr
        for line in (
            "URL: --ca-url, RECONCILER_CA_URL or ca-url",
            "trust: --root, RECONCILER_ROOT or root",
            "--fingerprint, RECONCILER_FINGERPRINT or fingerprint",
            "provisioner: --provisioner, RECONCILER_PROVISIONER or provisioner",
            "password file: --password-file, RECONCILER_PASSWORD_FILE or password-file",
        ):
            assert line in text, f"{line!r} missing from {argv[0]}:\n{text}"
        assert "issuer.root" not in text and "None" not in text, text
        assert not (tmp_path / "out").exists()


def test_a_flag_wins_over_the_environment_which_wins_over_defaults_json(tmp_path):
    steppath = steppath_with(
        tmp_path, {"ca-url": "https://from-defaults:9000", "provisioner": "from-defaults", "fingerprint": "ab" * 32}
    )
    m = write_manifest(tmp_path / "m.json", [entry(tmp_path / "out", "web.example")])
    env = {
        **NO_CHOICE,
        "STEPPATH": str(steppath),
        "RECONCILER_CA_URL": "https://from-env:9000",
        "RECONCILER_PROVISIONER": "from-env",
        "RECONCILER_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    proc = reconcile(
        "-m", str(m), "--plan", "--output", "json", "--provisioner", "from-flag", state_dir=tmp_path / "state", env=env
    )
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    issuer = json.loads(proc.stdout)["issuer"]
    assert issuer["type"] == "step-ca"
    assert issuer["url"] == "https://from-env:9000"
    assert issuer["provisioner"] == "from-flag"
    assert issuer["fingerprint"] == "ab" * 32


def test_issuer_flag_that_contradicts_the_object_manifest_is_an_error(tmp_path):
    out = tmp_path / "out"
    m = write_manifest(tmp_path / "m.json", {"issuer": {"type": "local"}, "certificates": [entry(out, "web.example")]})
    proc = reconcile("-m", str(m), "--issuer", "step-ca", state_dir=tmp_path / "state", env=NO_CHOICE)
    no_traceback(proc)
    assert proc.returncode == 1
    assert "--issuer step-ca contradicts" in proc.stderr and '"type": "local"' in proc.stderr, proc.stderr
    assert not out.exists() and not (tmp_path / "state").exists()
    # agreeing with the manifest is fine
    reconcile("-m", str(m), "--issuer", "local", state_dir=tmp_path / "state", env=NO_CHOICE, check=0)


def test_issuer_local_with_step_ca_flags_is_an_error_not_a_guess(tmp_path):
    m = write_manifest(tmp_path / "m.json", [entry(tmp_path / "out", "web.example")])
    proc = reconcile(
        "-m", str(m), "--issuer", "local", "--ca-url", "https://ca:9000", state_dir=tmp_path / "state", env=NO_CHOICE
    )
    no_traceback(proc)
    assert proc.returncode == 1
    assert "--ca-url" in proc.stderr and "--issuer local" in proc.stderr, proc.stderr
    assert not (tmp_path / "state").exists()


def test_object_manifest_missing_step_ca_settings_name_the_manifest_fields(tmp_path):
    steppath = steppath_with(tmp_path, None)
    m = write_manifest(
        tmp_path / "m.json", {"issuer": {"type": "step-ca"}, "certificates": [entry(tmp_path / "out", "a.example")]}
    )
    for argv in (["-m", str(m)], ["validate", "-m", str(m)], ["doctor", "-m", str(m)], ["-m", str(m), "--plan"]):
        proc = reconcile(*argv, state_dir=tmp_path / "state", env={**NO_CHOICE, "STEPPATH": str(steppath)})
        no_traceback(proc)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        text = proc.stdout + proc.stderr
        for name in ("issuer.url", "issuer.root", "issuer.fingerprint", "issuer.provisioner", "issuer.password_file"):
            assert name in text, f"{name} missing from {argv}:\n{text}"
        assert "--ca-url" not in text and "None" not in text, text


# --------------------------------------------------------------------------- the issuer in every output


def test_every_output_names_the_issuer_up_front(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    m = write_manifest(tmp_path / "m.json", {"issuer": {"type": "local"}, "certificates": [entry(out, "web.example")]})
    line = f"issuer: embedded CA in {state / 'ca'}"
    plan = reconcile("-m", str(m), "--plan", state_dir=state, env=NO_CHOICE, check=0)
    assert plan.stdout.splitlines()[0] == line
    first = reconcile("-m", str(m), state_dir=state, env=NO_CHOICE, check=0)
    assert first.stdout.splitlines()[0] == line
    again = reconcile("-m", str(m), state_dir=state, env=NO_CHOICE, check=0)
    assert again.stdout.splitlines()[0] == line and "No changes" in again.stdout
    status = reconcile("status", "-m", str(m), state_dir=state, env=NO_CHOICE, check=0)
    assert status.stdout.splitlines()[0] == line
    doctor = reconcile("doctor", "-m", str(m), state_dir=state, env=NO_CHOICE, check=0)
    assert doctor.stdout.splitlines()[0] == line
    validate = reconcile("validate", "-m", str(m), state_dir=state, env=NO_CHOICE, check=0)
    assert line in validate.stdout

    want = {"type": "local", "dir": str(state / "ca"), "description": f"embedded CA in {state / 'ca'}"}
    plan_json = json.loads(
        reconcile("-m", str(m), "--plan", "--output", "json", state_dir=state, env=NO_CHOICE, check=0).stdout
    )
    assert plan_json["issuer"] == want and plan_json["format_version"] == 1 and plan_json["notes"] == []
    assert {"changes", "certificates", "hooks"} <= set(plan_json)
    pass_json = json.loads(reconcile("-m", str(m), "--output", "json", state_dir=state, env=NO_CHOICE, check=0).stdout)
    assert pass_json["issuer"] == want and "result" in pass_json
    status_json = json.loads(
        reconcile("status", "-m", str(m), "--output", "json", state_dir=state, env=NO_CHOICE, check=0).stdout
    )
    assert status_json["issuer"] == want and status_json["format_version"] == 1 and "certificates" in status_json


def test_doctor_names_the_step_ca_and_never_prints_none(tmp_path, step_ca):
    pw = password_copy(step_ca, tmp_path)
    m = write_manifest(tmp_path / "m.json", [entry(tmp_path / "out", "web.example")])
    env = {**NO_CHOICE, "STEPPATH": str(steppath_with(tmp_path, None))}
    args = [
        "--ca-url",
        step_ca.url,
        "--fingerprint",
        step_ca.fingerprint,
        "--provisioner",
        step_ca.provisioner,
        "--password-file",
        str(pw),
    ]
    doctor = reconcile("doctor", "-m", str(m), *args, state_dir=tmp_path / "state", env=env)
    no_traceback(doctor)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert doctor.stdout.splitlines()[0] == f"issuer: step-ca {step_ca.url}, provisioner {step_ca.provisioner}"
    assert "None" not in doctor.stdout + doctor.stderr


# --------------------------------------------------------------------------- fingerprint-only trust


def test_fingerprint_only_a_certificate_from_another_ca_is_never_a_match_and_a_pass_reissues_it(tmp_path, step_ca):
    """A certificate from the embedded CA sits where step-ca's should be; the issuer gives
    only the root's fingerprint and the root has never been downloaded."""
    out, state = tmp_path / "out", tmp_path / "state"
    cert = entry(out, "web.example")
    m = write_manifest(tmp_path / "m.json", {"issuer": {"type": "local"}, "certificates": [cert]})
    reconcile("-m", str(m), state_dir=tmp_path / "other-state", check=0)
    assert not issued_by_step_ca(step_ca, out / "web.example.crt")
    shutil.rmtree(tmp_path / "other-state")  # that reconciler is gone: its files may be taken over

    pw = password_copy(step_ca, tmp_path)
    issuer = fingerprint_only(step_ca, pw)
    write_manifest(m, {"issuer": issuer, "certificates": [cert]})
    env = {**NO_CHOICE, "STEPPATH": str(steppath_with(tmp_path, None))}

    plan = reconcile("-m", str(m), "--plan", "--detailed-exitcode", state_dir=state, env=env)
    no_traceback(plan)
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert "No changes" not in plan.stdout
    assert "cannot check the issuer" in plan.stdout and "a pass fetches" in plan.stdout, plan.stdout
    data = json.loads(reconcile("-m", str(m), "--plan", "--output", "json", state_dir=state, env=env, check=0).stdout)
    assert data["changes"] is True and data["notes"], data
    [action] = data["certificates"][0]["actions"]
    assert action["action"] == "reissue" and action["drift"][0]["field"] == "issuer"
    assert not state.exists() or not list(state.rglob("root-*.crt")), "--plan contacted the CA"

    applied = reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, env=env)
    no_traceback(applied)
    assert applied.returncode == 2, applied.stdout + applied.stderr
    assert "issued by another CA" in applied.stdout, applied.stdout
    assert issued_by_step_ca(step_ca, out / "web.example.crt")
    assert (state / "step-ca" / f"root-{step_ca.fingerprint}.crt").is_file()

    # the verified root is cached now: --plan checks for real and finds a match
    after = reconcile("-m", str(m), "--plan", "--detailed-exitcode", state_dir=state, env=env)
    assert after.returncode == 0 and "No changes" in after.stdout, after.stdout + after.stderr


def test_fingerprint_only_a_pass_checks_a_step_ca_certificate_for_real_and_leaves_it_alone(tmp_path, step_ca):
    """The file carries its chain (include_ca), so the fetched root is all it takes to check it."""
    out, pw = tmp_path / "out", password_copy(step_ca, tmp_path)
    issuer = fingerprint_only(step_ca, pw)
    m = write_manifest(
        tmp_path / "m.json", {"issuer": issuer, "certificates": [entry(out, "web.example", include_ca=True)]}
    )
    env = {**NO_CHOICE, "STEPPATH": str(steppath_with(tmp_path, None))}
    reconcile("-m", str(m), state_dir=tmp_path / "first", env=env, check=0)
    before = (out / "web.example.crt").read_bytes()
    # a fresh state folder (the first one lost): no cached root, so the pass must fetch it before it plans
    shutil.rmtree(tmp_path / "first")
    again = reconcile("-m", str(m), "--detailed-exitcode", state_dir=tmp_path / "second", env=env)
    assert again.returncode == 0 and "No changes" in again.stdout, again.stdout + again.stderr
    assert (out / "web.example.crt").read_bytes() == before
