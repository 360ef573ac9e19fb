"""Proof that the service took the new certificate (issue 13), with a real nginx on loopback:
a command that reloads it clears the owed hook; one that exits 0 and reloads nothing is
caught and stays owed until a fixed command reloads; a stopped server is "unreachable", never
a failed command."""

from __future__ import annotations

import json

from helpers import load_cert, reconcile, write_manifest

from reconciler.crypto import public_key_id
from reconciler.probe import await_leaf, probe


def document(server, command: str, settle: str = "60s", name: str = "web") -> dict:
    """A manifest whose one entry is the certificate `server` (tls_servers) presents."""
    serve = {"connect": server.connect, **({"starttls": server.STARTTLS} if server.STARTTLS else {})}
    entry = {
        "name": name,
        "common_name": server.server_name,
        "cert_path": str(server.cert),
        "key_path": str(server.key),
        "post_renewal_command": command,
        "serve": [serve],
        "serve_settle": settle,
    }
    return {"issuer": {"type": "local"}, "certificates": [entry]}


def _manifest(tmp_path, server, command: str, settle: str = "60s"):
    return write_manifest(tmp_path / "m.json", document(server, command, settle))


def _run(tmp_path, manifest, *args, check=None):
    return reconcile(*args, "-m", str(manifest), "--state-dir", str(tmp_path / "state"), check=check)


def _file_serial(server) -> str:
    return format(load_cert(server.cert).serial_number, "x")


def _serves_the_file(server) -> str:
    """The serial the server presents once it serves the file's leaf (60 s at most): after a
    graceful reload an old nginx worker may still answer a connection or two while it drains,
    so one probe right after the pass can meet it. Returns what was served last."""
    cert = load_cert(server.cert)
    return await_leaf(server.endpoint, _file_serial(server), public_key_id(cert.public_key()), settle=60).serial


def _plan(tmp_path, manifest) -> dict:
    return json.loads(_run(tmp_path, manifest, "--plan", "--output", "json", check=0).stdout)


def _status(tmp_path, manifest) -> dict:
    return json.loads(_run(tmp_path, manifest, "status", "--output", "json").stdout)


def test_a_command_that_reloads_nginx_makes_the_probe_match_and_nothing_is_owed(tmp_path, nginx):
    manifest = _manifest(tmp_path, nginx, nginx.reload_command)
    _run(tmp_path, manifest, check=0)  # the stand-in certificate is not the embedded CA's: reissued
    assert _serves_the_file(nginx) == _file_serial(nginx)
    plan = _plan(tmp_path, manifest)
    assert plan["changes"] is False, plan
    assert any("probed 1 serve endpoint" in n for n in plan["notes"]), plan["notes"]
    row = _status(tmp_path, manifest)["certificates"][0]
    assert row["state"] == "ready" and not row["hook_owed"], row
    [endpoint] = row["served"]
    assert (
        endpoint["connect"] == nginx.connect
        and endpoint["state"] == "current"
        and endpoint["serial"] == _file_serial(nginx)
    )
    assert endpoint["sans"] == [nginx.server_name] and endpoint["since"]


def test_a_command_that_exits_0_without_reloading_is_caught_and_retried_until_fixed(tmp_path, nginx):
    old = probe(nginx.endpoint).serial
    manifest = _manifest(tmp_path, nginx, "true", settle="1s")
    first = _run(tmp_path, manifest, check=1)
    assert (
        "did not take the new certificate" in first.stderr and f"{nginx.connect} still serves serial" in first.stderr
    ), first.stderr
    assert probe(nginx.endpoint).serial == old  # nothing reloaded it

    # owed: the plan runs it again, naming what the service still presents
    [cert] = _plan(tmp_path, manifest)["certificates"]
    [action] = cert["actions"]
    assert (
        action["action"] == "run_hook" and f"{nginx.connect} still serves serial {old.upper()[:10]}" in action["reason"]
    ), action
    row = _status(tmp_path, manifest)["certificates"][0]
    assert row["hook_owed"] and row["last_hook"] == "not taken" and row["served"][0]["state"] == "stale", row

    # retried, and still caught; nothing new is issued for it
    serial = _file_serial(nginx)
    _run(tmp_path, manifest, check=1)
    assert _file_serial(nginx) == serial

    # the fix: a command that really reloads; the owed hook runs and clears
    manifest = _manifest(tmp_path, nginx, nginx.reload_command)
    _run(tmp_path, manifest, check=0)
    assert _serves_the_file(nginx) == serial
    assert _plan(tmp_path, manifest)["changes"] is False
    assert not _status(tmp_path, manifest)["certificates"][0]["hook_owed"]


def test_a_service_restarted_on_an_old_certificate_owes_the_command_again(tmp_path, nginx):
    """No file changed, no hook owed: only the probe knows the service went back."""
    manifest = _manifest(tmp_path, nginx, nginx.reload_command)
    _run(tmp_path, manifest, check=0)
    current = (nginx.cert.read_bytes(), nginx.key.read_bytes())
    old_cert, old_key = nginx.base / "old.crt", nginx.base / "old.key"
    from tls_servers import self_signed

    self_signed(old_cert, old_key, nginx.server_name)
    nginx.cert.write_bytes(old_cert.read_bytes())
    nginx.key.write_bytes(old_key.read_bytes())
    nginx.stop()
    nginx.start()  # serves the old pair, then the files are put back without a reload
    nginx.cert.write_bytes(current[0])
    nginx.key.write_bytes(current[1])
    [cert] = _plan(tmp_path, manifest)["certificates"]
    assert [a["action"] for a in cert["actions"]] == ["run_hook"], cert
    _run(tmp_path, manifest, check=0)
    assert _serves_the_file(nginx) == _file_serial(nginx)


def test_a_stopped_server_is_unreachable_not_a_failed_command(tmp_path, nginx):
    manifest = _manifest(tmp_path, nginx, "true")
    nginx.stop()
    done = _run(tmp_path, manifest, check=0)  # issued, the command ran; the service is down
    assert "did not take" not in done.stderr
    plan = _plan(tmp_path, manifest)
    assert plan["changes"] is False, plan
    assert any("1 unreachable" in n and nginx.connect in n for n in plan["notes"]), plan["notes"]
    row = _status(tmp_path, manifest)["certificates"][0]
    assert not row["hook_owed"], row
    [endpoint] = row["served"]
    assert endpoint["state"] == "unreachable" and "refused" in endpoint["error"].lower(), endpoint
    assert row["state"] == "endpoint unreachable", row


def test_metrics_show_the_served_expiry_per_endpoint_while_the_file_is_fresh(tmp_path, nginx):
    stand_in = load_cert(nginx.cert).not_valid_after_utc
    manifest = _manifest(tmp_path, nginx, "true", settle="1s")
    metrics = tmp_path / "metrics.prom"
    _run(tmp_path, manifest, "--metrics-file", str(metrics), check=1)  # the command reloads nothing
    labels = f'{{endpoint="{nginx.connect}",name="web"}}'
    values = dict(line.rsplit(" ", 1) for line in metrics.read_text().splitlines() if not line.startswith("#"))
    # the service still presents the stand-in, whose expiry is what an alert must see
    assert float(values[f"reconciler_served_certificate_not_after_timestamp_seconds{labels}"]) == stand_in.timestamp()
    assert float(values[f"reconciler_served_certificate_current{labels}"]) == 0
    assert float(values[f"reconciler_serve_endpoint_up{labels}"]) == 1
    assert (
        float(values['reconciler_certificate_not_after_timestamp_seconds{name="web"}'])
        == load_cert(nginx.cert).not_valid_after_utc.timestamp()
    )


def test_doctor_probes_every_endpoint_once(tmp_path, nginx):
    from tls_servers import free_port

    manifest = _manifest(tmp_path, nginx, nginx.reload_command)
    _run(tmp_path, manifest, check=0)
    healthy = _run(tmp_path, manifest, "doctor", check=0)
    assert f"✓ web: {nginx.connect} presents the certificate in {nginx.cert}" in healthy.stdout, healthy.stdout
    down = f"127.0.0.1:{free_port()}"
    document = json.loads(manifest.read_text())
    document["certificates"][0]["serve"].append({"connect": down})
    manifest.write_text(json.dumps(document))
    sick = _run(tmp_path, manifest, "doctor", check=1)
    assert f"✗ web: {down} unreachable: " in sick.stdout and "start the service" in sick.stdout, sick.stdout


def test_a_postfix_reload_is_confirmed_over_smtp_starttls(tmp_path, postfix):
    manifest = _manifest(tmp_path, postfix, postfix.reload_command)
    _run(tmp_path, manifest, check=0)
    assert _serves_the_file(postfix) == _file_serial(postfix)
    [endpoint] = _status(tmp_path, manifest)["certificates"][0]["served"]
    assert endpoint["state"] == "current", endpoint
