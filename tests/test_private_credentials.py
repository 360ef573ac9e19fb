"""The step-ca mTLS renewal needs the current private key as a file for a moment (OpenSSL
loads client credentials only from files). It lives in the state folder's 0700 `private`
folder, never in a shared /tmp, and what a killed pass leaves there is swept by the next."""

from __future__ import annotations

import os
import signal
import stat

from helpers import load_cert, reconcile, write_manifest
from test_stepca_cli import entry, issuer_block, password_copy


def test_a_kill_during_mtls_renewal_leaves_the_key_only_in_the_private_state_folder_and_the_next_pass_sweeps_it(
    tmp_path, step_ca
):
    out, state, tmp = tmp_path / "out", tmp_path / "state", tmp_path / "tmp"
    tmp.mkdir()
    env = {"STEPPATH": str(tmp_path), "TMPDIR": str(tmp)}
    pw = password_copy(step_ca, tmp_path)
    # 5m asked, 6m granted: "99%" puts every pass inside the renewal window
    cert = entry(out, "renew.example", duration="5m", renew_before="99%")
    m = write_manifest(tmp_path / "m.json", {"issuer": issuer_block(step_ca, pw), "certificates": [cert]})
    reconcile("-m", str(m), state_dir=state, env=env, check=0)
    first = load_cert(out / "renew.example.crt").serial_number
    # what an older version left in /tmp after such a kill: swept too (it is ours)
    legacy = tmp / "reconciler-mtls-abcd1234"
    legacy.mkdir(mode=0o700)
    (legacy / "client.pem").write_bytes(b"old credential")

    proc = reconcile("-m", str(m), state_dir=state, env={**env, "RECONCILER_FAULT_INJECT": "mtls_credential_written"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = sorted(p for p in tmp.rglob("*") if p.name == "client.pem" and legacy not in p.parents)
    assert left == [], f"the current key was left in the shared temporary folder: {left}"
    [cred] = list((state / "private").rglob("client.pem"))
    assert b"PRIVATE KEY" in cred.read_bytes()
    assert stat.S_IMODE(os.stat(state / "private").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cred.parent).st_mode) == 0o700 and stat.S_IMODE(os.stat(cred).st_mode) == 0o600

    proc = reconcile("-m", str(m), state_dir=state, env=env, check=0)
    assert "a credential left by an interrupted pass" in proc.stderr and str(cred.parent) in proc.stderr, proc.stderr
    assert list((state / "private").iterdir()) == [] and not legacy.exists()
    assert load_cert(out / "renew.example.crt").serial_number != first
    assert not list(tmp.iterdir())
