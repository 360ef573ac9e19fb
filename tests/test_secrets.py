"""Secrets never leave: the provisioner password, the decrypted provisioner key and the
private keys the reconciler writes appear in no log line, plan, status (text, JSON or the
store on disk), metrics (file and HTTP), hook environment or error text.

Every command runs with known secrets, against a real step-ca and against the hostile
server (whose refusals produce error text), at every verbosity; then all their output is
searched for every secret, in the forms a leak would take (the password as written, the
key's JWK "d", each base64 line of each private key, the private number in hex/decimal).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from helpers import REPO, figure, reconcile, write_manifest
from hostile_ca import HostileCA


def provisioner_secret(step_ca) -> str:
    """Decrypt the provisioner key the way the reconciler does, to know what must not leak."""
    from jwcrypto import jwa, jwe, jwk

    for p in step_ca.get_json("/provisioners")["provisioners"]:
        if p["name"] == step_ca.provisioner:
            before = jwa.default_max_pbkdf2_iterations
            jwa.default_max_pbkdf2_iterations = 100_000
            try:
                token = jwe.JWE()
                token.deserialize(p["encryptedKey"], key=jwk.JWK.from_password(step_ca.password))
            finally:
                jwa.default_max_pbkdf2_iterations = before
            return json.loads(token.payload)["d"]
    raise AssertionError("provisioner not found")


def key_forms(path: Path) -> list[str]:
    """What a leaked private key would look like in text."""
    data = path.read_bytes()
    lines = [line for line in data.decode().splitlines() if line and not line.startswith("-----")]
    key = serialization.load_pem_private_key(data, None)
    forms = [line for line in lines if len(line) >= 16]
    numbers = key.private_numbers()
    value = getattr(numbers, "private_value", None) or getattr(numbers, "d", None)
    if value:
        forms += [format(value, "x"), str(value)]
    return forms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_watch(m: Path, state: Path, metrics_file: Path, port: int, env: dict) -> tuple[str, str, str]:
    """--watch for one pass, with metrics to a file and over HTTP; then SIGTERM."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    full_env.update(PYTHONPATH=str(REPO), NO_COLOR="1", RECONCILER_STATE_DIR=str(state), **env)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler",
            "-m",
            str(m),
            "--watch",
            "-vv",
            "--log-format",
            "json",
            "--metrics-file",
            str(metrics_file),
            "--metrics-listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    scraped = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (metrics_file.exists() and metrics_file.stat().st_size):
            time.sleep(0.2)
        assert metrics_file.exists(), "the watch loop wrote no metrics"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            scraped = resp.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    return out, err, scraped


def everything_written(*roots: Path) -> str:
    text = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                if p.suffix == ".key" and "out" in p.parts:
                    continue  # the private keys themselves
                text.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(text)


def test_no_secret_appears_in_any_output_of_any_command(tmp_path, step_ca):
    out, state = tmp_path / "out", tmp_path / "state"
    env_dump = tmp_path / "hook-env"
    password = step_ca.password
    pw_file = tmp_path / "password"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    issuer = {
        "type": "step-ca",
        "url": step_ca.url,
        "root": str(step_ca.root_path),
        "provisioner": step_ca.provisioner,
        "password_file": str(pw_file),
    }
    entries = [
        {
            "common_name": f"s{i}.secret.test",
            "cert_path": str(out / f"s{i}.crt"),
            "key_path": str(out / f"s{i}.key"),
            "post_renewal_command": f"env > {env_dump}; echo hook ran; cat /dev/null",
            "duration": "1h",
            "renew_before": "10m",
        }
        for i in range(3)
    ]
    entries[2]["key"] = {"type": "RSA", "size": 2048}
    m = write_manifest(tmp_path / "m.json", {"issuer": issuer, "certificates": entries})
    outputs: dict[str, str] = {}

    def run(label: str, *args: str, **kw) -> None:
        proc = reconcile(*args, state_dir=state, timeout=120, **kw)
        outputs[label] = proc.stdout + "\n" + proc.stderr
        assert "Traceback" not in proc.stderr, f"{label}: {proc.stderr[-2000:]}"

    run("validate", "validate", "-m", str(m))
    run("plan", "-m", str(m), "--plan", "-vv")
    run("plan json", "-m", str(m), "--plan", "--output", "json", "--log-format", "json", "-vv")
    run("pass", "-m", str(m), "-vv", "--log-format", "json", "--output", "json")
    keys = [out / f"s{i}.key" for i in range(3)]
    assert all(k.exists() for k in keys), outputs["pass"][-3000:]
    run("status", "status", "-m", str(m))
    run("status json", "status", "-m", str(m), "--output", "json")
    run("doctor", "doctor", "-m", str(m), "-vv")
    # renewal (mTLS) and a forced re-issue of one certificate: more log lines with keys about
    entries[0]["sans"] = ["more.secret.test"]
    write_manifest(m, {"issuer": issuer, "certificates": entries})
    run("reissue", "-m", str(m), "-vv")
    outputs["hook env"] = env_dump.read_text()
    assert "RECONCILER_CERT_PATH" in outputs["hook env"], "the hook ran and dumped its environment"
    # errors: a wrong password, then an unreachable CA, both at full verbosity
    wrong = tmp_path / "wrong"
    wrong.write_text(password[::-1] + "x\n")
    entries[1]["sans"] = ["again.secret.test"]
    write_manifest(m, {"issuer": {**issuer, "password_file": str(wrong)}, "certificates": entries})
    run("wrong password", "-m", str(m), "-vv", "--log-format", "json")
    run("wrong password doctor", "doctor", "-m", str(m), "-vv")
    write_manifest(m, {"issuer": issuer, "certificates": entries})
    w_out, w_err, scraped = run_watch(m, state, tmp_path / "metrics.prom", free_port(), {})
    outputs["watch"] = w_out + w_err
    outputs["metrics file"] = (tmp_path / "metrics.prom").read_text()
    outputs["metrics http"] = scraped
    outputs["state folder"] = everything_written(state)

    secrets = {"provisioner password": [password], "decrypted provisioner key": [provisioner_secret(step_ca)]}
    for k in keys:
        secrets[f"private key {k.name}"] = key_forms(k)
    # positive controls: the search finds each secret where it legitimately is
    assert password in pw_file.read_text()
    for k in keys:
        pem_lines = [f for f in key_forms(k) if f in k.read_text()]
        assert len(pem_lines) >= 3, k
    leaks = [
        f"{what} in {label}"
        for label, text in outputs.items()
        for what, forms in secrets.items()
        for form in forms
        if form in text
    ]
    searched = sum(len(t) for t in outputs.values())
    figure(
        f"secrets: {sum(len(f) for f in secrets.values())} secret strings searched "
        f"in {len(outputs)} outputs ({searched} characters)"
    )
    assert not leaks, "\n".join(sorted(set(leaks)))
    assert outputs["metrics file"].strip() and "reconciler_" in outputs["metrics http"]


@pytest.mark.parametrize("mode", ["garbage", "wrong-key", "wrong-sans", "truncated", "server-error"])
def test_error_text_from_a_hostile_ca_carries_no_secret(tmp_path, mode):
    server = HostileCA(tmp_path)
    try:
        out, state = tmp_path / "out", tmp_path / "state"
        m = write_manifest(tmp_path / "m.json", server.manifest(out))
        server.mode = mode
        proc = reconcile("-m", str(m), "-vv", "--log-format", "json", "--output", "json", state_dir=state, timeout=60)
        status = reconcile("status", "-m", str(m), "--output", "json", state_dir=state, timeout=60)
    finally:
        server.stop()
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr + status.stdout + status.stderr + everything_written(state)
    assert "svc.test" in proc.stderr
    for secret in (server.password, server.provisioner_secret):
        assert secret not in text
