"""A state folder (or embedded CA folder) that becomes unsafe: refused with one clear line, never a traceback.

Real processes: a `reconcile --watch` whose state folder is made world-writable while it
runs, and `reconcile doctor` over an unsafe state folder and an unsafe embedded CA folder.
"""

from __future__ import annotations

import os
import re
import signal

from helpers import reconcile, write_manifest
from test_watch import entry, manifest_doc, wait_for, watch_factory, write_json  # noqa: F401  (a fixture)


def test_a_state_folder_made_world_writable_under_watch_is_refused_each_pass_and_recovers_when_fixed(
    tmp_path,
    watch_factory,  # noqa: F811  (the fixture imported above)
):
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    write_json(manifest, manifest_doc([entry("svc", out)]))
    w = watch_factory(manifest)
    w.wait_passes(1)
    state = w.state
    os.chmod(state, 0o757)
    (out / "svc.key").unlink()
    w.proc.send_signal(signal.SIGHUP)  # a forced pass: it must refuse, say why, and keep running
    wait_for(lambda: "is not safe" in w.log(), 20, "the refusal to be logged", w)
    w.proc.send_signal(signal.SIGHUP)  # and again on the next pass, every time
    wait_for(lambda: w.log().count("is not safe") >= 2, 20, "the refusal on the next pass", w)
    log = w.log()
    assert "Traceback" not in log and "unexpectedly" not in log, log
    refusal = next(ln for ln in log.splitlines() if "is not safe" in ln)
    assert refusal.startswith("ERROR") and f"chmod go-w {state}" in refusal and "trying again" in refusal, refusal
    assert not (out / "svc.key").exists(), "a pass acted on an unsafe state folder"
    assert w.proc.poll() is None
    os.chmod(state, 0o700)
    w.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (out / "svc.key").exists(), 20, "the key to come back once the folder is safe", w)
    w.stop()


def test_doctor_reports_an_unsafe_state_folder_as_a_failed_check_and_goes_on(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    m = write_manifest(tmp_path / "m.json", {"issuer": {"type": "local"}, "certificates": [entry("a", out)]})
    reconcile("-m", str(m), state_dir=state, check=0)
    os.chmod(state, 0o757)
    proc = reconcile("doctor", "-m", str(m), state_dir=state)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln[:2] in ("✓ ", "✗ ")]
    bad = [ln for ln in lines if ln.startswith("✗") and f"state folder {state}" in ln]
    assert len(bad) == 1 and "is not safe" in bad[0] and f"— chmod go-w {state}" in bad[0], proc.stdout
    # the other checks still ran
    assert any(ln.startswith("✓") and "target folder" in ln for ln in lines), proc.stdout
    assert re.search(r"checks passed; \d+ failed", proc.stderr), proc.stderr


def test_doctor_reports_an_unsafe_embedded_ca_folder_as_a_failed_check(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    m = write_manifest(tmp_path / "m.json", {"issuer": {"type": "local"}, "certificates": [entry("a", out)]})
    reconcile("-m", str(m), state_dir=state, check=0)
    os.chmod(state / "ca", 0o702)
    proc = reconcile("doctor", "-m", str(m), state_dir=state)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln[:2] in ("✓ ", "✗ ")]
    bad = [ln for ln in lines if ln.startswith("✗") and "embedded CA folder" in ln]
    assert len(bad) == 1 and "is not safe" in bad[0] and f"chmod go-w {state / 'ca'}" in bad[0], proc.stdout
    assert not any(ln.startswith("✓") and "embedded CA" in ln for ln in lines), proc.stdout
