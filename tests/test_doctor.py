"""`reconcile doctor -m`: one ✓/✗ line per check, a hint on every ✗, exit 1 if any failed.

Through the real CLI, for the embedded CA and for a REAL step-ca (the `step_ca` fixture).
Doctor only looks: it never issues, never creates the CA or the state folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import reconcile, tree_snapshot, write_manifest


def doctor(manifest: Path, state: Path, *extra: str, env=None, password: str | None = None):
    proc = reconcile("doctor", "-m", str(manifest), *extra, state_dir=state, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    if password is not None:
        assert password not in proc.stdout + proc.stderr, "doctor printed the password"
    return proc


def checks(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line[:2] in ("✓ ", "✗ ")]


def failed(proc) -> list[str]:
    return [line for line in checks(proc) if line.startswith("✗ ")]


def line_with(proc, *words: str) -> str:
    hits = [line for line in checks(proc) if all(w in line for w in words)]
    assert len(hits) == 1, f"want one check line with {words}, got {hits}\n{proc.stdout}{proc.stderr}"
    return hits[0]


def entry(out: Path, cn: str, **extra) -> dict:
    return {"common_name": cn, "cert_path": str(out / f"{cn}.crt"), "key_path": str(out / f"{cn}.key"), **extra}


# --------------------------------------------------------------------------- embedded CA


def test_embedded_ca_all_checks_pass_and_doctor_creates_nothing(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    (out / "existing").mkdir(parents=True)
    m = write_manifest(
        tmp_path / "m.json",
        [
            entry(out / "existing", "a.example", owner="nobody", post_renewal_command="cp a b"),
            entry(out / "new" / "deeper", "b.example", post_renewal_command=f"{Path('/bin/true')} --reload"),
            entry(out / "existing", "c.example", post_renewal_command="echo reloaded > /dev/null"),
        ],
    )
    before = tree_snapshot(tmp_path)
    proc = doctor(m, state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not failed(proc)
    assert line_with(proc, "manifest", "is valid (3 certificates)").startswith("✓")
    assert line_with(proc, f"state folder {state} is writable").startswith("✓")
    assert line_with(proc, f"embedded CA in {state / 'ca'} will be created on the first pass").startswith("✓")
    assert line_with(proc, f"target folder {out / 'existing'} exists").startswith("✓")
    assert line_with(proc, f"target folder {out / 'new' / 'deeper'} can be created (under {out})").startswith("✓")
    assert line_with(proc, "a.example: owner nobody exists").startswith("✓")
    assert line_with(proc, "hook program cp is found").startswith("✓")
    assert line_with(proc, "hook program /bin/true is found").startswith("✓")
    assert line_with(proc, "echo").startswith("✓")
    assert "checks passed" in proc.stdout and "failed" not in proc.stdout
    # it only looked
    assert not state.exists() and not (out / "new").exists()
    assert tree_snapshot(tmp_path) == before


def test_embedded_ca_that_exists_is_reported_present(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    m = write_manifest(tmp_path / "m.json", {"issuer": {"type": "local"}, "certificates": [entry(out, "a.example")]})
    reconcile("-m", str(m), state_dir=state, check=0)
    proc = doctor(m, state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert line_with(proc, f"embedded CA in {state / 'ca'} is present").startswith("✓")


def test_a_hook_program_that_is_not_installed_fails_with_a_hint(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    m = write_manifest(
        tmp_path / "m.json",
        [
            entry(out, "a.example", post_renewal_command="RELOAD=1 no-such-reload-tool-xyz --graceful nginx"),
            entry(out, "b.example", post_renewal_command="/opt/nowhere/reload"),
        ],
    )
    proc = doctor(m, state)
    assert proc.returncode == 1
    bad = failed(proc)
    assert len(bad) == 2, proc.stdout
    assert "hook program no-such-reload-tool-xyz not found on PATH" in bad[0]
    assert "hook program /opt/nowhere/reload not found" in bad[1]
    assert all("— install it, or give its full path" in line for line in bad)
    assert "2 failed" in proc.stderr  # the summary goes to stderr when something failed


def test_an_invalid_manifest_is_one_failed_check_pointing_at_validate(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    m = write_manifest(
        tmp_path / "m.json",
        [entry(out, "a.example", owner="no-such-user-xyz"), entry(out, "b.example", permissions="644")],
    )
    proc = doctor(m, state)
    assert proc.returncode == 1
    line = line_with(proc, "is invalid")
    assert line.startswith("✗") and "is invalid" in line
    assert f"run `reconcile validate -m {m}`" in line and "2 errors" in line
    # what does not depend on the manifest is still checked
    assert line_with(proc, "state folder").startswith("✓")


def test_a_state_folder_that_cannot_be_created_fails_with_a_hint(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder's parent should be")
    state, out = blocker / "state", tmp_path / "out"
    m = write_manifest(tmp_path / "m.json", [entry(out, "a.example")])
    proc = doctor(m, state)
    assert proc.returncode == 1, proc.stdout
    line = line_with(proc, f"state folder {state}")
    assert line.startswith("✗") and f"{blocker} is not a folder" in line and "— pass --state-dir" in line


def test_a_target_folder_under_a_file_fails(tmp_path):
    state = tmp_path / "state"
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    m = write_manifest(tmp_path / "m.json", [entry(blocker / "sub", "a.example")])
    proc = doctor(m, state)
    assert proc.returncode == 1
    line = line_with(proc, f"target folder {blocker / 'sub'}")
    assert line.startswith("✗") and f"{blocker} is not a folder" in line and "— fix the path in the manifest" in line


# --------------------------------------------------------------------------- step-ca


def stepca_manifest(tmp: Path, ca, password_file: Path) -> Path:
    issuer = {
        "type": "step-ca",
        "url": ca.url,
        "root": str(ca.root_path),
        "provisioner": ca.provisioner,
        "password_file": str(password_file),
    }
    return write_manifest(tmp / "m.json", {"issuer": issuer, "certificates": [entry(tmp / "out", "svc.example")]})


@pytest.fixture
def stepca_site(tmp_path, step_ca):
    pw = tmp_path / "provisioner.pass"
    pw.write_text(step_ca.password + "\n")
    pw.chmod(0o600)
    empty_step = tmp_path / "no-step"
    empty_step.mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path, tmp_path / "state", pw, {"STEPPATH": str(empty_step)}


def test_step_ca_every_check_passes(stepca_site, step_ca):
    tmp, state, pw, env = stepca_site
    m = stepca_manifest(tmp, step_ca, pw)
    proc = doctor(m, state, env=env, password=step_ca.password)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not failed(proc)
    hostport = f"127.0.0.1:{step_ca.port}"
    for words in (
        ("manifest", "is valid (1 certificate)"),
        ("state folder",),
        (f"TCP: connected to {hostport}",),
        (f"TLS: {hostport} verified against root {step_ca.root_path}",),
        ("health:", "says ok"),
        (f"provisioner '{step_ca.provisioner}' (JWK) is present",),
        (f"password file {pw} is readable",),
        (f"the password in {pw} decrypts the key",),
        ("target folder",),
    ):
        assert line_with(proc, *words).startswith("✓")
    assert not (tmp / "out" / "svc.example.crt").exists()


def test_step_ca_wrong_password_is_a_failed_check_with_a_hint(stepca_site, step_ca):
    tmp, state, pw, env = stepca_site
    wrong = "definitely-wrong-password-42"
    pw.write_text(wrong + "\n")
    proc = doctor(stepca_manifest(tmp, step_ca, pw), state, env=env, password=step_ca.password)
    assert wrong not in proc.stdout + proc.stderr
    assert proc.returncode == 1
    [bad] = failed(proc)
    assert f"cannot be decrypted with the password in {pw}" in bad and "— put the provisioner's password" in bad
    assert line_with(proc, "TLS:").startswith("✓")


def test_step_ca_missing_password_file_is_a_failed_check_naming_it(stepca_site, step_ca):
    tmp, state, pw, env = stepca_site
    pw.unlink()
    proc = doctor(stepca_manifest(tmp, step_ca, pw), state, env=env)
    assert proc.returncode == 1
    [bad] = failed(proc)
    assert f"password file {pw} cannot be read" in bad and "— " in bad


def test_step_ca_stopped_is_a_failed_connection_check_with_a_hint(stepca_site, step_ca):
    tmp, state, pw, env = stepca_site
    m = stepca_manifest(tmp, step_ca, pw)
    step_ca.stop()
    try:
        proc = doctor(m, state, env=env, password=step_ca.password)
    finally:
        step_ca.start()
    assert proc.returncode == 1
    [bad] = failed(proc)
    assert f"TCP: cannot connect to 127.0.0.1:{step_ca.port}" in bad
    assert "— check the CA container/service is running" in bad
    # the local checks still ran
    assert line_with(proc, f"password file {pw} is readable").startswith("✓")
    assert line_with(proc, "target folder").startswith("✓")


def test_step_ca_root_of_another_ca_fails_the_tls_check(stepca_site, step_ca, other_step_ca):
    tmp, state, pw, env = stepca_site
    m = stepca_manifest(tmp, step_ca, pw)
    text = m.read_text().replace(str(step_ca.root_path), str(other_step_ca.root_path))
    m.write_text(text)
    proc = doctor(m, state, env=env, password=step_ca.password)
    assert proc.returncode == 1
    [bad] = failed(proc)
    assert bad.startswith("✗ TLS: verification of") and str(other_step_ca.root_path) in bad and "— " in bad
