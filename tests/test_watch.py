"""`reconcile --watch`: a real long-running subprocess reacting to saves, damage, timers and signals.

Every wait is bounded: poll a condition for at most N seconds, then fail with the log.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from helpers import REPO, load_cert, reconcile

TMP_MARK = ".reconciler-tmp-"


# --------------------------------------------------------------------------- helpers


def entry(name: str, out: Path, **extra) -> dict:
    return {
        "name": name,
        "common_name": f"{name}.internal.example",
        "cert_path": str(out / f"{name}.crt"),
        "key_path": str(out / f"{name}.key"),
        **extra,
    }


def manifest_doc(entries: list[dict]) -> dict:
    return {"issuer": {"type": "local"}, "certificates": entries}


def wait_for(condition, timeout: float, what: str, watch: "Watch | None" = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            log = watch.log() if watch else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n--- watch log ---\n{log}")
        if watch is not None and watch.proc.poll() is not None:
            raise AssertionError(
                f"reconcile --watch exited with {watch.proc.returncode} while waiting for {what}\n{watch.log()}"
            )
        time.sleep(0.05)


class Watch:
    """A `reconcile --watch` subprocess with its log in a file (never a pipe that can fill up)."""

    def __init__(self, tmp: Path, manifest: Path, *extra: str, env: dict | None = None):
        self.tmp, self.manifest, self.state = tmp, manifest, tmp / "state"
        self.log_path = tmp / f"watch-{time.monotonic_ns()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_") and k != "NOTIFY_SOCKET"}
        # bare-array manifests use the embedded CA on purpose (object manifests ignore the variable)
        full_env.update(NO_COLOR="1", PYTHONPATH=str(REPO), RECONCILER_ISSUER="local", **(env or {}))
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reconciler",
                "-m",
                str(manifest),
                "--state-dir",
                str(self.state),
                "--watch",
                "-vv",
                *extra,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tmp,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def passes(self) -> list[str]:
        return re.findall(r"pass \(([^)]*)\): ", self.log())

    def wait_passes(self, n: int, timeout: float = 20) -> list[str]:
        return wait_for(lambda: len(self.passes()) >= n and self.passes(), timeout, f"{n} passes", self)

    def stop(self, sig=signal.SIGTERM, within: float = 5.0) -> float:
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=within + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"reconcile --watch did not stop within {within + 5}s\n{self.log()}") from None
        took = time.monotonic() - started
        assert rc == 0, f"exit {rc}\n{self.log()}"
        assert took < within, f"took {took:.1f}s to stop\n{self.log()}"
        return took

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def watch_factory(tmp_path):
    started: list[Watch] = []

    def start(manifest: Path, *extra: str, env: dict | None = None) -> Watch:
        w = Watch(tmp_path, manifest, *extra, env=env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


def write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2))


def save_by_rename(path: Path, doc) -> None:
    """vim, sed -i, most IDEs: write a temporary file beside it, rename it over."""
    tmp = path.with_name(f".{path.name}.swp-{random.randrange(1 << 30)}")
    tmp.write_text(json.dumps(doc, indent=2))
    os.rename(tmp, path)


def save_by_truncate_and_write(path: Path, doc) -> None:
    """VS Code: truncate, then write, here in two halves with pauses, so a reader can see an
    empty and a half-written manifest in between."""
    data = json.dumps(doc, indent=2).encode()
    with open(path, "wb") as fh:  # O_TRUNC
        fh.flush()
        time.sleep(0.05)
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(0.05)
        fh.write(data[len(data) // 2 :])


def save_in_place(path: Path, doc) -> None:
    """Overwrite the bytes in place, no truncation (the new document is longer)."""
    data = json.dumps(doc, indent=2).encode()
    assert len(data) >= path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(data)


def key_matches(cert_path: Path, key_path: Path) -> bool:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return load_cert(cert_path).public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def temporaries(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.iterdir() if TMP_MARK in p.name]


@pytest.fixture
def site(tmp_path):
    out = tmp_path / "out"
    manifest = tmp_path / "certificate-manifest.json"
    write_json(manifest, manifest_doc([entry("first", out)]))
    return tmp_path, out, manifest


# --------------------------------------------------------------------------- manifest saves


@pytest.mark.parametrize(
    "save",
    [save_by_rename, save_by_truncate_and_write, save_in_place],
    ids=["rename-over", "truncate-and-write", "write-in-place"],
)
def test_each_way_of_saving_the_manifest_issues_the_new_certificate_in_exactly_one_pass(site, watch_factory, save):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)
    before = len(w.wait_passes(1))

    save(manifest, manifest_doc([entry("first", out), entry("second", out, sans=["alt.internal.example"])]))

    wait_for(lambda: (out / "second.crt").exists() and (out / "second.key").exists(), 5, "the new certificate", w)
    # a pass is logged when it ends, after its files are written
    wait_for(lambda: any("manifest saved" in p for p in w.passes()[before:]), 5, "the pass to be logged", w)
    time.sleep(0.8)  # long enough for any stray second pass (inotify pairs moves within 0.5 s)
    saves = [p for p in w.passes()[before:] if "manifest saved" in p]
    assert len(saves) == 1, w.log()
    assert "is invalid" not in w.log(), "a half-written save must be 'not ready yet', never 'invalid'"
    assert "manifest: added second" in w.log()
    assert key_matches(out / "second.crt", out / "second.key")
    w.stop()


def test_a_changed_entry_is_logged_field_by_field_and_reissued(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)
    serial = load_cert(out / "first.crt").serial_number

    save_by_rename(manifest, manifest_doc([entry("first", out, sans=["extra.internal.example"], duration="48h")]))

    wait_for(lambda: load_cert(out / "first.crt").serial_number != serial, 5, "the reissued certificate", w)
    log = w.log()
    line = next(ln for ln in log.splitlines() if "manifest: changed first" in ln)
    assert "duration" in line and '"24h" → "48h"' in line and "extra.internal.example" in line, line
    w.stop()


def test_invalid_save_keeps_the_last_valid_manifest_and_the_next_valid_save_recovers(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)

    bad = manifest_doc([entry("first", out, colour="blue"), entry("other", out, duration="soon")])
    save_by_rename(manifest, bad)
    wait_for(lambda: "is invalid (2 errors" in w.log(), 5, "the invalid save to be logged", w)
    log = w.log()
    assert "certificates[0].colour" in log and "certificates[1].duration" in log, "every error is logged"

    status = reconcile("status", "-m", str(manifest), "--state-dir", str(w.state))
    assert status.returncode == 1
    assert re.search(
        r"manifest invalid since \d{4}-\d\d-\d\dT[\d:]+\+00:00: certificates\[0\]\.colour", status.stdout
    ), status.stdout

    # still reconciling against the last valid manifest: damage is repaired
    (out / "first.key").unlink()
    wait_for(lambda: (out / "first.key").exists(), 5, "the deleted key to be restored while the manifest is invalid", w)
    assert not (out / "other.crt").exists()

    save_by_rename(manifest, manifest_doc([entry("first", out), entry("third", out)]))
    wait_for(lambda: (out / "third.crt").exists(), 5, "the certificate of the next valid save", w)
    assert "is valid again" in w.log()
    status = reconcile("status", "-m", str(manifest), "--state-dir", str(w.state))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "manifest invalid" not in status.stdout
    w.stop()


def test_a_deleted_manifest_is_treated_as_invalid_and_nothing_is_deleted(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)

    manifest.unlink()
    wait_for(
        lambda: "is invalid" in w.log() and "does not exist" in w.log(), 5, "the missing manifest to be reported", w
    )
    assert (out / "first.crt").exists() and (out / "first.key").exists()

    def recorded_invalid() -> bool:  # the pass records it after logging the error
        manifest_state = json.loads((w.state / "status.json").read_text())["manifest"]
        return manifest_state["valid"] is False and bool(manifest_state["invalid_since"])

    wait_for(recorded_invalid, 5, "the status store to record the invalid manifest", w)

    write_json(manifest, manifest_doc([entry("first", out), entry("back", out)]))
    wait_for(lambda: (out / "back.crt").exists(), 5, "the recreated manifest to be reconciled", w)
    w.stop()


def test_a_watcher_started_with_an_invalid_manifest_uses_the_last_valid_copy(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)
    w.stop()
    assert (w.state / "last-valid-manifest.json").exists()

    manifest.write_text("{ not json")
    w2 = watch_factory(manifest)
    wait_for(lambda: "last valid manifest" in w2.log(), 15, "the fallback to the kept copy", w2)
    (out / "first.crt").unlink()
    wait_for(lambda: (out / "first.crt").exists(), 5, "the certificate restored from the kept copy", w2)
    w2.stop()


# --------------------------------------------------------------------------- damaged files


def test_a_deleted_key_comes_back_and_a_chmodded_key_is_restored(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    key, crt = out / "first.key", out / "first.crt"
    wait_for(lambda: crt.exists() and key.exists(), 15, "the first certificate", w)

    key.unlink()
    wait_for(lambda: key.exists() and crt.exists() and key_matches(crt, key), 5, "the deleted key to come back", w)

    os.chmod(key, 0o644)
    wait_for(lambda: stat.S_IMODE(key.stat().st_mode) == 0o600, 5, "the key mode to be restored", w)
    # the action is logged after it is done: on a busy machine the mode is back before the line
    wait_for(lambda: "chmod" in w.log(), 5, "the chmod to be logged", w)

    serial = load_cert(crt).serial_number
    crt.write_text("not a certificate\n")
    wait_for(
        lambda: b"BEGIN CERTIFICATE" in crt.read_bytes() and load_cert(crt).serial_number != serial,
        5,
        "the replaced certificate to be repaired",
        w,
    )
    w.stop()


def test_a_deleted_or_chmodded_ca_file_comes_back(tmp_path, watch_factory):
    """`ca_path` is a managed file like the certificate and key: its events count too. In a
    folder of its own here, so that folder must be watched for it."""
    out, ca = tmp_path / "out", tmp_path / "shared" / "root.crt"
    manifest = tmp_path / "certificate-manifest.json"
    write_json(manifest, manifest_doc([entry("first", out, ca_path=str(ca))]))
    w = watch_factory(manifest)
    wait_for(lambda: ca.exists() and (out / "first.crt").exists(), 15, "the first certificate and its CA file", w)
    root = ca.read_bytes()

    ca.unlink()
    wait_for(lambda: ca.exists() and ca.read_bytes() == root, 10, "the deleted CA file to come back", w)
    os.chmod(ca, 0o600)
    wait_for(lambda: stat.S_IMODE(ca.stat().st_mode) == 0o644, 10, "the CA file's mode to be restored", w)
    w.stop()


def test_a_damaged_file_behind_an_allowed_symlink_is_repaired(tmp_path, watch_factory):
    """With "allow_symlink": true the writes land at the link's final target (another folder
    here): the target's folder is watched too, and a change there counts like one at the link."""
    out, real = tmp_path / "out", tmp_path / "real"
    out.mkdir()
    real.mkdir()
    for name in ("first.crt", "first.key"):
        (real / name).write_text("placeholder\n")
        (out / name).symlink_to(real / name)
    manifest = tmp_path / "certificate-manifest.json"
    write_json(manifest, manifest_doc([entry("first", out, allow_symlink=True)]))
    w = watch_factory(manifest)
    crt = real / "first.crt"
    wait_for(lambda: b"BEGIN CERTIFICATE" in crt.read_bytes(), 15, "the first certificate, behind the link", w)
    assert (out / "first.crt").is_symlink()
    w.wait_passes(1)

    crt.write_text("")  # truncated where it really lives
    wait_for(lambda: b"BEGIN CERTIFICATE" in crt.read_bytes(), 10, "the truncated target to be repaired", w)
    assert (out / "first.crt").is_symlink()
    w.stop()


def test_a_key_re_moded_while_a_recheck_pass_ends_is_still_repaired(site, watch_factory):
    """The race a busy machine hit: a file changed after a pass wrote it but before the pass
    re-read it. Its stamp then already holds the damage, so the change's event compares equal;
    only a further pass repairs it. Fault holds put the chmod exactly there, twice: in the
    pass that issues, and in the recheck pass that follows."""
    tmp, out, manifest = site
    holds = tmp / "holds"
    holds.mkdir()
    w = watch_factory(manifest, env={"RECONCILER_FAULT_HOLD": f"before_reobserve:{holds}"})
    key = out / "first.key"

    def held(n: int) -> bool:
        return (holds / f"before_reobserve.{n}.held").exists()

    def release(n: int) -> None:
        (holds / f"before_reobserve.{n}.go").touch()

    wait_for(lambda: held(1), 15, "the first pass to have written its files", w)
    os.chmod(key, 0o644)
    release(1)
    wait_for(lambda: held(2), 10, "the recheck pass to have restored the mode", w)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, w.log()
    os.chmod(key, 0o644)
    for n in range(3, 50):  # from here on, passes run without pausing
        release(n)
    release(2)
    wait_for(lambda: stat.S_IMODE(key.stat().st_mode) == 0o600, 10, "the key mode restored after the recheck pass", w)
    wait_for(lambda: "recheck" in " ".join(w.passes()), 5, "the recheck pass to be logged", w)
    w.stop()


def test_a_file_damaged_after_every_repair_is_rechecked_with_backoff_not_in_a_hot_loop(site, watch_factory):
    tmp, out, manifest = site
    holds = tmp / "holds"
    holds.mkdir()
    w = watch_factory(manifest, env={"RECONCILER_FAULT_HOLD": f"before_reobserve:{holds}"})
    key = out / "first.key"
    for n in range(1, 5):  # another program re-modes the key at the end of every pass
        wait_for(lambda n=n: (holds / f"before_reobserve.{n}.held").exists(), 15, f"pass {n} to have written", w)
        os.chmod(key, 0o644)
        (holds / f"before_reobserve.{n}.go").touch()
    wait_for(lambda: "keeps changing after every pass" in w.log(), 10, "the backoff warning", w)
    # three rechecks at once, then the next look is ~10 s away, not a pass per event
    assert w.passes() == ["start", "recheck", "recheck", "recheck"], w.log()
    time.sleep(2)
    assert len(w.passes()) == 4, w.log()
    for n in range(5, 10):
        (holds / f"before_reobserve.{n}.go").touch()
    w.stop()


def test_our_own_writes_do_not_trigger_further_passes(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)
    save_by_rename(manifest, manifest_doc([entry("first", out), entry("second", out)]))
    wait_for(lambda: (out / "second.crt").exists(), 5, "the new certificate", w)
    count = len(w.wait_passes(2))
    time.sleep(1.5)
    assert len(w.passes()) == count, w.log()
    w.stop()


# --------------------------------------------------------------------------- signals


def test_sighup_forces_a_pass(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)
    count = len(w.wait_passes(1))
    w.proc.send_signal(signal.SIGHUP)
    passes = w.wait_passes(count + 1, timeout=5)
    assert "SIGHUP" in passes[-1], passes
    w.stop()


def test_sigterm_during_a_pass_lets_the_write_finish_leaves_no_temporary_files_and_exits_0(tmp_path, watch_factory):
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    # RSA 4096 keys take about half a second each: a pass long enough to interrupt
    slow = [entry(f"slow{i:02d}", out, key={"type": "RSA", "size": 4096}) for i in range(16)]
    write_json(manifest, manifest_doc(slow))
    w = watch_factory(manifest, "--workers", "1")
    wait_for(lambda: len(list(out.glob("*.crt"))) >= 2, 30, "the pass to be under way", w)

    took = w.stop(signal.SIGTERM, within=5.0)

    assert temporaries(out) == [], "no temporary file is left behind"
    certs = sorted(p.stem for p in out.glob("*.crt"))
    keys = sorted(p.stem for p in out.glob("*.key"))
    assert 0 < len(certs) < 16, f"the pass was interrupted, not finished ({len(certs)} written in {took:.1f}s)"
    for name in certs:
        assert key_matches(out / f"{name}.crt", out / f"{name}.key"), name
    assert set(keys) - set(certs) == set(), "a certificate is written whole (key and certificate) or not at all"
    # the next start picks up where it stopped
    rest = reconcile("-m", str(manifest), "--state-dir", str(w.state), timeout=120)
    assert rest.returncode == 0, rest.stderr
    assert len(list(out.glob("*.crt"))) == 16


def test_systemd_is_told_ready_after_the_first_pass_and_stopping_on_sigterm(site, watch_factory):
    import socket

    tmp, out, manifest = site
    address = str(tmp / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(15)
        w = watch_factory(manifest, env={"NOTIFY_SOCKET": address})
        messages = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(sock.recv(4096).decode())
        assert (out / "first.crt").exists(), "READY=1 only once the first pass has put the certificates in place"
        w.stop()
        while not any(m.startswith("STOPPING=1") for m in messages):
            messages.append(sock.recv(4096).decode())
    assert any(m.startswith("STATUS=1 of 1 certificates ready") for m in messages), messages


def test_poll_mode_notices_a_save_and_a_deleted_key(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest, "--poll")
    wait_for(lambda: (out / "first.key").exists(), 15, "the first certificate", w)
    w.wait_passes(1)
    save_by_rename(manifest, manifest_doc([entry("first", out), entry("polled", out)]))
    wait_for(lambda: (out / "polled.crt").exists(), 5, "the new certificate, seen by polling", w)
    (out / "first.key").unlink()
    wait_for(lambda: (out / "first.key").exists(), 5, "the deleted key, seen by polling", w)
    w.stop()


def test_sigterm_during_a_slow_hook_exits_0_within_5s_and_the_hook_runs_at_the_next_start(tmp_path, watch_factory):
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    marker, pidfile, done = tmp_path / "hook-started", tmp_path / "hook.pid", tmp_path / "hook-done"
    hook = f"if [ -e {marker} ]; then touch {done}; else touch {marker}; echo $$ > {pidfile}; sleep 30; fi"
    write_json(manifest, manifest_doc([entry("svc", out, post_renewal_command=hook)]))
    w = watch_factory(manifest)
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "the slow hook to start", w)
        w.stop(signal.SIGTERM, within=5.0)
        assert "a pass is still busy" in w.log()
        status = json.loads((w.state / "status.json").read_text())
        assert status["certificates"]["svc"]["hook_pending"] is True
    finally:
        if pidfile.exists() and pidfile.read_text().strip():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)  # the hook has its own process group
            except ProcessLookupError:
                pass
    w2 = watch_factory(manifest)
    wait_for(done.exists, 15, "the pending hook to run at the next start", w2)
    w2.stop()


def test_sigint_exits_0_when_idle(site, watch_factory):
    tmp, out, manifest = site
    w = watch_factory(manifest)
    wait_for(lambda: (out / "first.crt").exists(), 15, "the first certificate", w)
    w.wait_passes(1)
    w.stop(signal.SIGINT, within=2.0)


# --------------------------------------------------------------------------- metrics


def _families(text: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, sample.labels.get("name", ""))] = sample.value
    return out


def test_metrics_endpoint_and_file_carry_the_right_values(tmp_path, watch_factory):
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    write_json(
        manifest, manifest_doc([entry("good", out), entry("hooked", out, post_renewal_command="echo failing; exit 3")])
    )
    prom = tmp_path / "textfile" / "reconciler.prom"
    prom.parent.mkdir()
    w = watch_factory(manifest, "--metrics-listen", "127.0.0.1:0", "--metrics-file", str(prom))
    port = int(
        wait_for(
            lambda: re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics", w.log()),
            15,
            "the metrics address",
            w,
        ).group(1)
    )
    wait_for(lambda: prom.exists() and "reconciler_hook_failures_total" in prom.read_text(), 15, "the metrics file", w)

    served = _families(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    written = _families(prom.read_text())
    not_after = load_cert(out / "good.crt").not_valid_after_utc.timestamp()
    for m in (served, written):
        assert m[("reconciler_certificate_not_after_timestamp_seconds", "good")] == pytest.approx(not_after)
        renewal = m[("reconciler_certificate_renewal_timestamp_seconds", "good")]
        # default renew_before 12h of a 24h (+1 min backdate) lifetime, minus up to 5 % jitter
        assert not_after - 12 * 3600 - 0.05 * 86460 - 1 <= renewal <= not_after - 12 * 3600
        assert m[("reconciler_certificate_ready", "good")] == 1
        assert m[("reconciler_certificate_ready", "hooked")] == 0, "its post-renewal command failed"
        assert m[("reconciler_hook_failures_total", "hooked")] == 1
        assert m[("reconciler_hook_failures_total", "good")] == 0
        assert m[("reconciler_issuance_failures_total", "good")] == 0
        assert m[("reconciler_manifest_valid", "")] == 1
        assert m[("reconciler_pass_duration_seconds_count", "")] >= 1
        assert m[("reconciler_last_pass_timestamp_seconds", "")] == pytest.approx(time.time(), abs=30)

    save_by_rename(manifest, {"certificates": "nope"})
    wait_for(
        lambda: _families(prom.read_text()).get(("reconciler_manifest_valid", "")) == 0,
        5,
        "manifest_valid 0 in the file",
        w,
    )
    served = _families(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert served[("reconciler_manifest_valid", "")] == 0
    w.stop()


def test_the_pass_log_systemd_metrics_and_status_agree_that_a_blocked_certificate_is_not_ready(tmp_path, watch_factory):
    """One outcome per pass: a certificate whose path cannot be managed (here a folder where
    the certificate file should be) is "error" in `reconcile status`, 0 in the ready gauge,
    and not counted ready in the pass log or systemd's status line."""
    import socket

    out = tmp_path / "out"
    (out / "blocked.crt").mkdir(parents=True)
    manifest = tmp_path / "m.json"
    write_json(manifest, manifest_doc([entry("good", out), entry("blocked", out)]))
    prom = tmp_path / "reconciler.prom"
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        w = watch_factory(manifest, "--metrics-file", str(prom), env={"NOTIFY_SOCKET": address})
        messages: list[str] = []
        while not any(m.startswith("STATUS=") for m in messages):
            messages.append(sock.recv(4096).decode())
    w.wait_passes(1)
    assert re.search(r"pass \([^)]*\): 1 changed, 1 failed, 1 of 2 ready", w.log()), w.log()
    assert any(m.startswith("STATUS=1 of 2 certificates ready") for m in messages), messages
    gauges = _families(prom.read_text())
    assert (gauges[("reconciler_certificate_ready", "good")], gauges[("reconciler_certificate_ready", "blocked")]) == (
        1,
        0,
    )
    w.stop()
    proc = reconcile("status", "-m", str(manifest), "--state-dir", str(w.state), "--output", "json")
    states = {r["name"]: r["state"] for r in json.loads(proc.stdout)["certificates"]}
    assert (proc.returncode, states) == (1, {"good": "ready", "blocked": "error"})


# --------------------------------------------------------------------------- timers and backoff


def test_a_failed_hook_is_retried_after_a_backoff_without_any_event(tmp_path, watch_factory):
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    marker = tmp_path / "failed-once"
    hook = f"if [ -e {marker} ]; then echo reloaded; else touch {marker}; exit 1; fi"
    write_json(manifest, manifest_doc([entry("svc", out, post_renewal_command=hook)]))
    w = watch_factory(manifest)
    wait_for(lambda: marker.exists(), 15, "the hook's first (failing) run", w)
    failed_at = time.monotonic()
    wait_for(lambda: re.search(r"hook .* succeeded", w.log()), 20, "the hook to be retried", w)
    waited = time.monotonic() - failed_at
    assert 7 <= waited <= 16, f"first retry after {waited:.1f}s; want 10 s ± 20 % jitter"
    w.stop()


def test_a_short_lived_certificate_renews_on_its_timer_without_any_event(tmp_path, watch_factory):
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    write_json(manifest, manifest_doc([entry("brief", out, duration="2m", renew_before="1m")]))
    w = watch_factory(manifest, "--resync", "1h")
    crt = out / "brief.crt"
    wait_for(lambda: crt.exists(), 15, "the first certificate", w)
    first = load_cert(crt)
    # embedded CA: 1 min backdated, so lifetime 3 min; due 1 min before expiry minus <= 9 s jitter
    due = first.not_valid_after_utc.timestamp() - 60
    wait_for(
        lambda: load_cert(crt).serial_number != first.serial_number, max(5, due - time.time()) + 10, "the renewal", w
    )
    renewed_at = time.time()
    assert due - 10 <= renewed_at <= due + 3, f"renewed {renewed_at - due:+.1f}s from the deadline"
    # the pass is logged when it ends, a moment after the certificate is in place
    wait_for(lambda: "renewal due" in w.passes()[-1], 10, "the renewal pass in the log", w)
    w.stop()


# --------------------------------------------------------------------------- pure helpers


def test_backoff_doubles_from_10s_to_10min_with_jitter_and_resets_on_success():
    from reconciler.backoff import Backoff, delay

    rng = random.Random(1)
    for n, nominal in [(1, 10), (2, 20), (3, 40), (6, 320), (7, 600), (30, 600)]:
        d = delay(n, rng)
        assert max(10, nominal * 0.8) <= d <= min(600, nominal * 1.2), (n, d)
    b = Backoff(rng)
    b.failed("x", 1000.0)
    assert b.waiting(1001.0) == {"x"} and b.waiting(1013.0) == frozenset()
    b.succeeded("x")
    assert b.waiting(1001.0) == frozenset() and b.next_at(1001.0) is None


def test_deferral_leaves_backed_off_certificates_and_hooks_for_later_and_limits_ca_calls():
    from datetime import datetime, timezone

    from reconciler.manifest import build
    from reconciler.observe import FileState, Observed
    from reconciler.passes import Deferral, defer
    from reconciler.plan import make_plan

    doc = [entry(n, Path("/nonexistent"), post_renewal_command="true") for n in ("a", "b", "c")]
    desired = build(doc, Path("/nonexistent/m.json"))
    missing = Observed(FileState("missing"), FileState("missing"))
    plan = make_plan(desired, {c.name: missing for c in desired.certificates}, datetime.now(timezone.utc))
    assert [bool(p.actions) for p in plan.certificates] == [True, True, True]

    deferred = defer(plan, Deferral(certificates=frozenset({"b"})))
    assert [bool(p.actions) for p in deferred.certificates] == [True, False, True]
    assert deferred.hooks[0].certificates == ("a", "c")

    probe = defer(plan, Deferral(issue_limit=1))
    assert [bool(p.actions) for p in probe.certificates] == [True, False, False]
    assert [bool(p.actions) for p in defer(plan, Deferral(issue_limit=0)).certificates] == [False, False, False]


# --------------------------------------------------------------------------- an unreachable CA


def test_an_unreachable_ca_is_probed_by_one_certificate_at_a_time_and_everything_goes_when_it_answers(
    tmp_path, watch_factory, step_ca_factory
):
    ca = step_ca_factory(start=False)  # created, not running: connection refused
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    issuer = {
        "type": "step-ca",
        "url": ca.url,
        "root": str(ca.root_path),
        "provisioner": ca.provisioner,
        "password_file": str(ca.password_file),
    }
    write_json(manifest, {"issuer": issuer, "certificates": [entry(n, out) for n in ("one", "two", "three")]})
    w = watch_factory(manifest)
    failures = lambda: len(re.findall(r": issue failed: ", w.log()))  # noqa: E731

    wait_for(lambda: "the CA does not answer" in w.log(), 20, "the outage to be noticed", w)
    assert failures() == 3, "the first pass tries every due certificate"
    wait_for(lambda: "the CA still does not answer" in w.log(), 20, "the first probe", w)
    assert failures() == 4, "a probe is one certificate, not one failure per certificate"

    ca.start()
    wait_for(
        lambda: all((out / f"{n}.crt").exists() for n in ("one", "two", "three")),
        35,
        "every certificate once the CA answers",
        w,
    )
    wait_for(lambda: "the CA answers again" in w.log(), 5, "the recovery to be logged (after the pass's writes)", w)
    assert failures() == 4
    w.stop()
