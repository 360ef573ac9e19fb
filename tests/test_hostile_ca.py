"""A hostile or broken CA, at the level of a whole pass through the CLI.

tests/test_stepca_issuer.py proves the issuer rejects each bad answer; here a pass against
the same hostile server (tests/hostile_ca.py) must keep the old key and certificate
byte-for-byte, leave no temporary file, exit 1 with an error naming the CA and what was
wrong, and end within the timeout: a 30-second stall or an answer that never ends cannot
hold a pass longer than --ca-timeout. A real step-ca is made to fail for real where it can
be: stopped, or asked with the wrong provisioner password.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from helpers import cert_sans, reconcile, tree_snapshot, write_manifest
from hostile_ca import HostileCA, make_ca
from reconciler.atomic import is_temporary

TIMEOUT = 2.0  # --ca-timeout for these passes
SLACK = 8.0  # interpreter start-up, key decryption (100,000 PBKDF2 rounds), TLS


@pytest.fixture
def hostile(tmp_path):
    server = HostileCA(tmp_path)
    yield server
    server.stop()


def hostile_manifest(path: Path, server: HostileCA, out: Path, key: dict) -> Path:
    return write_manifest(path, server.manifest(out, key=key))


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("truncated", "sent an unreadable answer to POST /1.0/sign (not complete JSON"),
        ("html", "sent an unreadable answer to POST /1.0/sign"),
        ("garbage", "not a PEM certificate"),
        ("wrong-key", "different key"),
        ("wrong-sans", "other.test"),
        ("impostor", "does not chain to the root"),
        ("server-error", "HTTP 503"),
        ("stall", f"did not answer POST /1.0/sign within {TIMEOUT:g}s"),
        ("endless", f"did not answer POST /1.0/sign within {TIMEOUT:g}s"),
    ],
)
def test_a_pass_against_a_hostile_ca_keeps_the_old_files_and_exits_1_within_the_timeout(
    tmp_path, hostile, mode, expected
):
    out, state = tmp_path / "out", tmp_path / "state"
    m = hostile_manifest(tmp_path / "m.json", hostile, out, {"type": "EC", "curve": "P-256"})
    reconcile("-m", str(m), state_dir=state, check=0)
    old = tree_snapshot(out)
    # a new key type forces a re-issue, through POST /1.0/sign
    hostile_manifest(m, hostile, out, {"type": "EC", "curve": "P-384"})
    genuine = hostile.ca_cert, hostile.ca_key
    if mode == "impostor":  # signs with a CA the client does not trust
        hostile.ca_cert, hostile.ca_key = make_ca("impostor")
    else:
        hostile.mode = mode
    started = time.monotonic()
    proc = reconcile("-m", str(m), "--ca-timeout", str(TIMEOUT), state_dir=state, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "svc.test" in proc.stderr, "the error names the certificate"
    assert elapsed < 2 * TIMEOUT + SLACK, f"{mode}: the pass took {elapsed:.1f}s"
    assert tree_snapshot(out) == old, "the old key and certificate are untouched"
    assert not [n for n in os.listdir(out) if is_temporary(n)]
    status = json.loads((state / "status.json").read_text())
    assert expected.split(" (")[0][:30] in status["certificates"]["svc.test"]["last_error"]
    # the CA behaves again: the next pass converges
    hostile.mode = "ok"
    hostile.ca_cert, hostile.ca_key = genuine
    reconcile("-m", str(m), state_dir=state, check=0)
    assert tree_snapshot(out) != old
    assert cert_sans(out / "svc.crt") == {"svc.test", "127.0.0.9"}


def test_a_30_second_stall_cannot_hold_a_pass_past_the_default_timeout_budget(tmp_path, hostile):
    """No --ca-timeout given: RECONCILER_CA_TIMEOUT sets it; the server stalls for 30 s."""
    out, state = tmp_path / "out", tmp_path / "state"
    m = hostile_manifest(tmp_path / "m.json", hostile, out, {"type": "EC"})
    hostile.mode = "stall"
    started = time.monotonic()
    proc = reconcile("-m", str(m), state_dir=state, env={"RECONCILER_CA_TIMEOUT": "3"}, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1 and "within 3s" in proc.stderr, proc.stderr
    assert elapsed < 6 + SLACK, elapsed
    assert not out.exists() or not list(out.iterdir())


# --------------------------------------------------------------------------- a real step-ca


def stepca_manifest(path: Path, step_ca, out: Path, password_file: Path, sans: list[str]) -> Path:
    return write_manifest(
        path,
        {
            "issuer": {
                "type": "step-ca",
                "url": step_ca.url,
                "root": str(step_ca.root_path),
                "provisioner": step_ca.provisioner,
                "password_file": str(password_file),
            },
            "certificates": [
                {
                    "common_name": "real.test",
                    "sans": sans,
                    "cert_path": str(out / "real.crt"),
                    "key_path": str(out / "real.key"),
                }
            ],
        },
    )


def test_a_stopped_step_ca_keeps_the_old_files_and_fails_fast(tmp_path, step_ca):
    out, state = tmp_path / "out", tmp_path / "state"
    m = stepca_manifest(tmp_path / "m.json", step_ca, out, Path(step_ca.password_file), [])
    reconcile("-m", str(m), state_dir=state, check=0)
    old = tree_snapshot(out)
    stepca_manifest(m, step_ca, out, Path(step_ca.password_file), ["extra.real.test"])
    step_ca.stop()
    try:
        started = time.monotonic()
        proc = reconcile("-m", str(m), "--ca-timeout", "3", state_dir=state, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        step_ca.start()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is unreachable" in proc.stderr, proc.stderr
    assert elapsed < 3 + 5 + SLACK
    assert tree_snapshot(out) == old
    reconcile("-m", str(m), state_dir=state, check=0)
    assert "extra.real.test" in cert_sans(out / "real.crt")


def test_a_wrong_provisioner_password_keeps_the_old_files_and_says_which_file(tmp_path, step_ca):
    out, state = tmp_path / "out", tmp_path / "state"
    m = stepca_manifest(tmp_path / "m.json", step_ca, out, Path(step_ca.password_file), [])
    reconcile("-m", str(m), state_dir=state, check=0)
    old = tree_snapshot(out)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    stepca_manifest(m, step_ca, out, wrong, ["extra.real.test"])
    proc = reconcile("-m", str(m), state_dir=state, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot be decrypted with the password in {wrong}" in proc.stderr
    assert "not-the-password" not in proc.stderr + proc.stdout
    assert tree_snapshot(out) == old
