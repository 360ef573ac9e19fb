"""What a post-renewal command prints is kept (its tail, in the log and status.json) without
the secrets it may print: private keys and the provisioner password. And a command has
finished when its shell exits, even if a daemon it started keeps the output open."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import reconcile, write_manifest
from test_secrets import key_forms
from test_stepca_cli import issuer_block, password_copy


def entry(out: Path, name: str, command: str, **extra) -> dict:
    return {
        "name": name,
        "common_name": f"{name}.hooks.test",
        "cert_path": str(out / f"{name}.crt"),
        "key_path": str(out / f"{name}.key"),
        "post_renewal_command": command,
        **extra,
    }


def leaks(text: str, forms: list[str]) -> list[str]:
    return [f for f in forms if f in text] + (["PRIVATE KEY"] if "PRIVATE KEY" in text else [])


def test_a_hook_that_prints_the_key_and_the_password_has_both_redacted_in_the_log_and_status(tmp_path, step_ca):
    out, state = tmp_path / "out", tmp_path / "state"
    pw = password_copy(step_ca, tmp_path)
    # the key, then the password, then a failure: the error log line carries the last lines
    m = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": issuer_block(step_ca, pw),
            "certificates": [
                entry(out, "leaky", f'cat "$RECONCILER_KEY_PATH"; echo "password: $(cat {pw})"; exit 3'),
            ],
        },
    )
    proc = reconcile("-m", str(m), "-vv", state_dir=state, env={"STEPPATH": str(tmp_path)}, check=1)
    forms = key_forms(out / "leaky.key") + [step_ca.password]
    status = (state / "status.json").read_text()
    record = json.loads(status)["certificates"]["leaky"]["hook"]
    assert record["result"] == "failed" and record["returncode"] == 3
    assert "[REDACTED]" in record["output_tail"] and "password: [REDACTED]" in record["output_tail"], record
    assert leaks(status, forms) == []
    assert leaks(proc.stdout + proc.stderr, forms) == [], proc.stderr
    assert "password: [REDACTED]" in proc.stderr


def test_whole_encrypted_and_cut_off_keys_are_redacted_from_hook_output(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    other = ec.generate_private_key(ec.SECP384R1())
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret-passphrase"),
        )
    )
    plain = tmp_path / "plain.pem"
    plain.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    commands = {
        "whole": 'cat "$RECONCILER_KEY_PATH"; echo after',
        "encrypted": f"echo before; cat {encrypted}",
        "head": f"head -n 3 {plain}",  # a BEGIN with no END
        "tail": f"tail -n 3 {plain}; echo after",  # an END with no BEGIN
    }
    m = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": {"type": "local"},
            "certificates": [entry(out, name, f"{cmd}; exit 1") for name, cmd in commands.items()],
        },
    )
    proc = reconcile("-m", str(m), "-vv", state_dir=state, check=1)
    status = (state / "status.json").read_text()
    records = json.loads(status)["certificates"]
    forms = key_forms(plain) + key_forms(out / "whole.key")
    forms += [line for line in encrypted.read_text().splitlines() if not line.startswith("-----")]
    assert leaks(status, forms) == [] and leaks(proc.stderr, forms) == [], proc.stderr
    assert records["whole"]["hook"]["output_tail"] == ["[REDACTED]", "after"]
    assert records["encrypted"]["hook"]["output_tail"] == ["before", "[REDACTED]"]
    assert records["head"]["hook"]["output_tail"] == ["[REDACTED]"]
    assert records["tail"]["hook"]["output_tail"] == ["[REDACTED]", "after"]


def test_a_hook_whose_background_child_keeps_stdout_open_succeeds_when_its_shell_exits(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    pidfile = tmp_path / "daemon.pid"
    # a reload that starts a helper in the background, which inherits stdout and outlives the
    # hook by far; the timeout is short so the old behaviour (wait for EOF) shows as "timed out"
    command = f"sleep 300 & echo $! > {pidfile}; echo reloaded"
    m = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": {"type": "local"},
            "certificates": [
                entry(out, "svc", command, hook_timeout="10s"),
            ],
        },
    )
    try:
        proc = reconcile("-m", str(m), state_dir=state, timeout=120)
        hook = json.loads((state / "status.json").read_text())["certificates"]["svc"]["hook"]
        assert (proc.returncode, hook["result"], hook["returncode"], hook["output_tail"]) == (
            0,
            "ok",
            0,
            ["reloaded"],
        ), proc.stderr
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    assert "No changes" in reconcile("-m", str(m), state_dir=state, check=0).stdout


def test_a_key_printed_with_crlf_across_stdout_and_stderr_or_without_its_markers_is_redacted(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    commands = {
        "crlf": "sed 's/$/\\r/' \"$RECONCILER_KEY_PATH\"",
        "interleaved": 'while IFS= read -r l; do echo "$l"; echo "$l" >&2; done < "$RECONCILER_KEY_PATH"',
        "halves": 'head -n 2 "$RECONCILER_KEY_PATH"; tail -n +3 "$RECONCILER_KEY_PATH" >&2',
        "body": 'grep -v -- ----- "$RECONCILER_KEY_PATH"; echo after',  # the base64 alone, no PEM markers
    }
    m = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": {"type": "local"},
            "certificates": [entry(out, name, f"{cmd}; exit 1") for name, cmd in commands.items()],
        },
    )
    proc = reconcile("-m", str(m), "-vv", state_dir=state, check=1)
    status = (state / "status.json").read_text()
    records = json.loads(status)["certificates"]
    for name in commands:
        forms = key_forms(out / f"{name}.key")
        tail = "\n".join(records[name]["hook"]["output_tail"])
        assert leaks(tail, forms) == [], (name, tail)
        assert "[REDACTED]" in tail, (name, tail)
    forms = [f for name in commands for f in key_forms(out / f"{name}.key")]
    assert leaks(status, forms) == [] and leaks(proc.stdout + proc.stderr, forms) == [], proc.stderr
    assert records["body"]["hook"]["output_tail"][-1] == "after"
