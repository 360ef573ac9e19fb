"""The embedded CA refuses to issue from a CA that cannot make certificates that verify.

A damaged CA (another key in intermediate_ca.key, an intermediate not signed by the root,
a CA made while the clock was ahead) used to issue anyway: every pass re-issued, ran the
hook and exited 0 while the certificates failed verification, and `doctor` said ✓.
Real files, the real CLI, the real clock moved with faketime (issue 10 §6, §8).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import load_cert, reconcile, write_manifest
from reconciler.crypto import key_to_pem
from reconciler.issuers import IssueRequest, IssuerError
from reconciler.issuers.local import INT_CERT, INT_KEY, ROOT_CERT, ROOT_KEY, LocalCA
from reconciler.model import KeySpec

FAKETIME = shutil.which("faketime")


def request(name: str = "svc.example") -> IssueRequest:
    return IssueRequest(name, name, (name, "127.0.0.1"), timedelta(hours=24), "server", KeySpec())


def site(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A manifest with one certificate whose hook counts its runs; (manifest, state, hook log)."""
    out, log = tmp_path / "out", tmp_path / "hook.log"
    manifest = write_manifest(
        tmp_path / "m.json",
        [
            {
                "common_name": "svc.example",
                "sans": ["127.0.0.1"],
                "cert_path": str(out / "svc.crt"),
                "key_path": str(out / "svc.key"),
                "post_renewal_command": f"echo ran >> {log}",
            }
        ],
    )
    return manifest, tmp_path / "state", log


def hook_runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def openssl_verify(ca: Path, leaf: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca / ROOT_CERT), "-untrusted", str(ca / INT_CERT), str(leaf)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def ask_for_another_name(manifest: Path) -> None:
    doc = json.loads(manifest.read_text())
    doc[0]["sans"].append("www.svc.example")
    manifest.write_text(json.dumps(doc))


# --------------------------------------------------------------------------- damaged


def test_another_valid_key_in_intermediate_ca_key_is_refused_naming_the_file(tmp_path):
    ca = LocalCA(tmp_path / "ca")
    ca.issue(request(), ec.generate_private_key(ec.SECP256R1()))  # creates it, sound
    (tmp_path / "ca" / INT_KEY).write_bytes(key_to_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(IssuerError) as err:
        LocalCA(tmp_path / "ca").issue(request(), ec.generate_private_key(ec.SECP256R1()))
    message = str(err.value)
    assert str(tmp_path / "ca" / INT_KEY) in message and "does not belong to" in message and INT_CERT in message
    assert "restore" in err.value.hint and "never" in err.value.hint
    assert not err.value.transient


def test_another_valid_key_in_root_ca_key_is_refused(tmp_path):
    LocalCA(tmp_path / "ca")._ensure()
    (tmp_path / "ca" / ROOT_KEY).write_bytes(key_to_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(IssuerError, match=f"{ROOT_KEY} does not belong to {ROOT_CERT}"):
        LocalCA(tmp_path / "ca").issue(request(), ec.generate_private_key(ec.SECP256R1()))


def test_an_intermediate_not_signed_by_the_root_is_refused(tmp_path):
    LocalCA(tmp_path / "ca")._ensure()
    LocalCA(tmp_path / "other")._ensure()
    shutil.copy(tmp_path / "other" / ROOT_CERT, tmp_path / "ca" / ROOT_CERT)
    shutil.copy(tmp_path / "other" / ROOT_KEY, tmp_path / "ca" / ROOT_KEY)
    with pytest.raises(IssuerError, match=f"{INT_CERT} is not signed by {ROOT_CERT}"):
        LocalCA(tmp_path / "ca").issue(request(), ec.generate_private_key(ec.SECP256R1()))


def test_a_file_of_the_ca_that_does_not_parse_is_named(tmp_path):
    LocalCA(tmp_path / "ca")._ensure()
    (tmp_path / "ca" / INT_CERT).write_text("garbage\n")
    with pytest.raises(IssuerError) as err:
        LocalCA(tmp_path / "ca").issue(request(), ec.generate_private_key(ec.SECP256R1()))
    assert str(tmp_path / "ca" / INT_CERT) in str(err.value)


def test_a_damaged_ca_fails_every_pass_keeps_the_old_files_and_runs_no_hook(tmp_path):
    """The issue's reproduction: every pass re-issued, ran the hook, exited 0."""
    manifest, state, log = site(tmp_path)
    reconcile("-m", str(manifest), state_dir=state, check=0)
    assert hook_runs(log) == 1
    crt, key = tmp_path / "out" / "svc.crt", tmp_path / "out" / "svc.key"
    before = (crt.read_bytes(), key.read_bytes())
    (state / "ca" / INT_KEY).write_bytes(key_to_pem(ec.generate_private_key(ec.SECP256R1())))
    ask_for_another_name(manifest)
    for _ in range(3):
        proc = reconcile("-m", str(manifest), state_dir=state)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert str(state / "ca" / INT_KEY) in proc.stdout + proc.stderr
    assert hook_runs(log) == 1
    assert (crt.read_bytes(), key.read_bytes()) == before
    assert openssl_verify(state / "ca", crt).returncode == 0  # the old certificate is still good


def test_doctor_fails_a_damaged_embedded_ca_with_what_to_do(tmp_path):
    manifest, state, _ = site(tmp_path)
    reconcile("-m", str(manifest), state_dir=state, check=0)
    ok = reconcile("doctor", "-m", str(manifest), state_dir=state, check=0)
    assert f"✓ embedded CA in {state / 'ca'} is present" in ok.stdout
    (state / "ca" / INT_KEY).write_bytes(key_to_pem(ec.generate_private_key(ec.SECP256R1())))
    proc = reconcile("doctor", "-m", str(manifest), state_dir=state, check=1)
    (line,) = [
        ln for ln in proc.stdout.splitlines() if "embedded CA" in ln and not ln.startswith("issuer: ")
    ]  # not the issuer line
    assert line.startswith("✗ ") and INT_KEY in line and "does not belong to" in line and "restore" in line


def test_doctor_fails_an_incomplete_embedded_ca_instead_of_promising_to_create_it(tmp_path):
    manifest, state, _ = site(tmp_path)
    reconcile("-m", str(manifest), state_dir=state, check=0)
    (state / "ca" / INT_CERT).unlink()
    proc = reconcile("doctor", "-m", str(manifest), state_dir=state, check=1)
    (line,) = [
        ln for ln in proc.stdout.splitlines() if "embedded CA" in ln and not ln.startswith("issuer: ")
    ]  # not the issuer line
    assert line.startswith("✗ ") and "incomplete" in line


# --------------------------------------------------------------------------- the clock


def test_the_embedded_ca_backdates_its_own_certificates_and_its_leaves_by_a_minute(tmp_path):
    ca = LocalCA(tmp_path / "ca")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    issued = ca.issue(request(), ec.generate_private_key(ec.SECP256R1()))
    after = datetime.now(timezone.utc)
    for cert in (x509.load_pem_x509_certificate(p) for p in (issued.leaf_pem, issued.chain_pem, issued.root_pem)):
        assert before - timedelta(minutes=1, seconds=1) <= cert.not_valid_before_utc <= after - timedelta(minutes=1)


def test_a_ca_made_while_the_clock_was_ahead_is_refused_saying_so_and_the_leaves_are_not_ready(tmp_path):
    """Made with the clock 2 days ahead, then the clock comes back: the leaves are 'not yet
    valid' (openssl says so), the planner says so, and the CA refuses to issue more."""
    assert FAKETIME, "faketime is not installed; scripts/install --test installs it"
    manifest, state, log = site(tmp_path)
    reconcile("-m", str(manifest), state_dir=state, check=0, wrap=(FAKETIME, "-f", "+2d"))
    crt = tmp_path / "out" / "svc.crt"
    assert load_cert(crt).not_valid_before_utc > datetime.now(timezone.utc) + timedelta(days=1)
    assert "not yet valid" in openssl_verify(state / "ca", crt).stdout + openssl_verify(state / "ca", crt).stderr
    plan = reconcile("--plan", "-m", str(manifest), state_dir=state)
    assert "the clock may have jumped backwards" in plan.stdout, plan.stdout + plan.stderr
    proc = reconcile("-m", str(manifest), state_dir=state)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    said = proc.stdout + proc.stderr
    assert (
        f"{state / 'ca' / ROOT_CERT} is not valid until" in said
        or f"{state / 'ca' / INT_CERT} is not valid until" in said
    ), said
    assert "clock" in said and "NTP" in said
    assert hook_runs(log) == 1  # only the pass that issued under the fast clock ran it
