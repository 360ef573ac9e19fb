"""`reconcile validate` and `reconcile --plan` through the real CLI, in a subprocess, on real files.

Certificates that are "already deployed" are issued in-process by the embedded CA that lives
in the tmp state folder, exactly where the CLI looks for it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.crypto import generate_key, key_to_pem
from reconciler.issuers import IssueRequest
from reconciler.issuers.local import LocalCA
from reconciler.manifest import load
from reconciler.sans import ordered

REPO = Path(__file__).resolve().parent.parent
ESC = "\x1b["
ACTIONS = {"issue", "reissue", "renew", "rewrite_chain", "write_ca", "chown", "chmod", "run_hook"}


def env_for(extra: dict | None = None, no_color: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_") and k not in ("NO_COLOR", "STEPPATH")}
    env["PYTHONPATH"] = str(REPO)
    env["TERM"] = "xterm"
    env["RECONCILER_ISSUER"] = "local"  # bare arrays use the embedded CA on purpose; object manifests ignore it
    if no_color:
        env["NO_COLOR"] = "1"
    env.update(extra or {})
    return env


def run(
    *args: str, env: dict | None = None, no_color: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        capture_output=True,
        text=True,
        env=env_for(env, no_color),
        timeout=60,
        cwd=cwd,
    )


def run_on_tty(*args: str, env: dict | None = None) -> tuple[int, str]:
    """Run with stdout on a pseudo-terminal; returns (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", *args],
        stdout=slave,
        stderr=subprocess.DEVNULL,
        env=env_for(env, no_color=False),
    )
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            proc.kill()
            raise AssertionError("no output from the CLI on the tty within 30 s")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=30), out.decode()


def write_manifest(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


@pytest.fixture
def site(tmp_path):
    """(manifest path, state dir) with two certificates and one hook, nothing deployed."""
    manifest = write_manifest(
        tmp_path / "etc" / "certificate-manifest.json",
        [
            {
                "common_name": "web.example.com",
                "sans": ["www.example.com", "10.0.0.5"],
                "cert_path": "../tls/web.crt",
                "key_path": "../tls/web.key",
                "post_renewal_command": "systemctl reload nginx",
            },
            {
                "name": "api",
                "common_name": "api.example.com",
                "cert_path": "../tls/api.crt",
                "key_path": "../tls/api.key",
                "permissions": "640",
                "post_renewal_command": "systemctl reload nginx",
            },
        ],
    )
    return manifest, tmp_path / "state"


def deploy(manifest: Path, state: Path, only: str | None = None, sans=None, duration: timedelta | None = None) -> None:
    """Issue every certificate (or `only` one) from the state folder's embedded CA, as `apply` would."""
    ca = LocalCA(state / "ca")
    for cert in load(manifest).certificates:
        if only and cert.name != only:
            continue
        key = generate_key(cert.key)
        request = IssueRequest(
            cert.name,
            cert.common_name,
            tuple(sans or ordered(cert.sans)),
            duration or cert.duration,
            cert.cert_type,
            cert.key,
        )
        issued = ca.issue(request, key)
        for text, data, mode in (
            (cert.cert_path, issued.leaf_pem + (issued.chain_pem if cert.include_ca else b""), cert.cert_mode),
            (cert.key_path, key_to_pem(key), cert.key_mode),
        ):
            path = Path(text)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chmod(path, mode)


def snapshot_tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind, inode, mode, owner, mtime and content."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            content = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[str(p)] = (st.st_mode, st.st_ino, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, content)
    return out


def plan(manifest: Path, state: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run("--plan", "-m", str(manifest), "--state-dir", str(state), *extra, **kw)


def plan_lines(proc: subprocess.CompletedProcess, state: Path) -> list[str]:
    """The plan's lines after the first, which names the issuer."""
    lines = proc.stdout.splitlines()
    assert lines[0] == f"issuer: embedded CA in {state / 'ca'}", proc.stdout
    return lines[1:]


def plan_json(manifest: Path, state: Path, *extra: str) -> tuple[int, dict]:
    proc = plan(manifest, state, "--output", "json", *extra)
    assert proc.stderr == "", proc.stderr
    return proc.returncode, json.loads(proc.stdout)


# --------------------------------------------------------------------------- validate


def test_validate_ok(site):
    manifest, state = site
    proc = run("validate", "-m", str(manifest), "--state-dir", str(state))
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        f"issuer: embedded CA in {state / 'ca'}\nok: 2 certificates\n",
        "",
    )
    assert not state.exists()


def test_validate_ok_singular_and_from_the_environment(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.json", {"certificates": [{"common_name": "a.example", "cert_path": "a.crt", "key_path": "a.key"}]}
    )
    proc = run("validate", env={"RECONCILER_MANIFEST": str(manifest), "RECONCILER_STATE_DIR": str(tmp_path / "state")})
    assert (proc.returncode, proc.stdout) == (
        0,
        f"issuer: embedded CA in {tmp_path / 'state' / 'ca'}\nok: 1 certificate\n",
    )


def test_validate_reports_every_error_with_its_path_and_exits_1(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "certificates": [
                {"common_name": "a.example", "cert_path": "a.crt", "key_path": "a.key", "permisions": "600"},
                {
                    "common_name": "b.example",
                    "cert_path": "a.crt",
                    "key_path": "b.key",
                    "owner": "no-such-user-reconciler",
                },
                {
                    "common_name": "c.example",
                    "cert_path": "c.crt",
                    "key_path": "c.key",
                    "permissions": "644",
                    "sans": ["bad..name"],
                },
            ]
        },
    )
    proc = run("validate", "-m", str(manifest), "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: {manifest} is invalid (5 errors); nothing was changed:"
    body = "\n".join(lines[1:])
    assert '  certificates[0].permisions: unknown field; did you mean "permissions"?' in lines
    assert "  certificates[1].owner: user \"no-such-user-reconciler\" does not exist" in body
    assert "  certificates[1].cert_path: " in body and "is also the cert_path of certificates[0]" in body
    assert (
        '  certificates[2].permissions: "644" would make the private key readable by every user; '
        'set "key_permissions": "600"'
    ) in body
    assert "  certificates[2].sans[0]: 'bad..name' is neither a DNS name nor an IP address" in body
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "content, words",
    [
        ('[\n  {"common_name": "a.example",\n  }\n]', "invalid JSON at line 3, column 3"),
        ("", "is empty"),
        ('{"certificates": [], "certificates": []}', "appears twice"),
    ],
)
def test_validate_unreadable_manifests(tmp_path, content, words):
    manifest = tmp_path / "m.json"
    manifest.write_text(content)
    proc = run("validate", "-m", str(manifest), "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 1 and words in proc.stderr and "(1 error)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_a_missing_manifest_or_a_directory(tmp_path):
    proc = run("validate", "-m", str(tmp_path / "nope.json"), "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = run("validate", "-m", str(tmp_path), "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 1 and "is a directory" in proc.stderr


def test_validate_a_step_ca_manifest_whose_password_file_is_missing(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": {
                "type": "step-ca",
                "url": "https://ca.internal:9000",
                "root": "root.crt",
                "provisioner": "admin",
                "password_file": "missing.txt",
            },
            "certificates": [{"common_name": "a.example", "cert_path": "a.crt", "key_path": "a.key"}],
        },
    )
    proc = run("validate", "-m", str(manifest), "--state-dir", str(tmp_path / "state"))
    assert (proc.returncode, proc.stdout) == (
        0,
        "issuer: step-ca https://ca.internal:9000, provisioner admin\nok: 1 certificate\n",
    )


# --------------------------------------------------------------------------- --plan, text


def test_plan_of_a_fresh_host(site):
    manifest, state = site
    proc = plan(manifest, state)
    assert proc.returncode == 0, proc.stderr
    lines = plan_lines(proc, state)
    assert lines[0] == "Plan: 2 to issue (0 of 2 unchanged)."
    assert re.fullmatch(r"\s+\+ web\.example\.com\s+issue\s+certificate file missing; key file missing", lines[1])
    assert re.fullmatch(r"\s+\+ api\s+issue\s+certificate file missing; key file missing", lines[2])
    assert lines[3] == "Hooks that would run:"
    assert lines[4] == "  systemctl reload nginx   (for web.example.com, api)"
    assert len(lines) == 5


def test_plan_with_nothing_to_do(site):
    manifest, state = site
    deploy(manifest, state)
    proc = plan(manifest, state, "--detailed-exitcode")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        f"issuer: embedded CA in {state / 'ca'}\nNo changes: 2 certificates match the manifest.\n",
        "",
    )


def test_plan_rows_say_why_in_words(site):
    manifest, state = site
    # a 1-hour certificate is inside a 99 % window from its first minute on
    document = json.loads(manifest.read_text())
    document[1].update(duration="1h", renew_before="99%")
    write_manifest(manifest, document)
    deploy(manifest, state, only="web.example.com", sans=["web.example.com", "www.example.com", "old.example"])
    deploy(manifest, state, only="api")
    os.chmod(manifest.parent.parent / "tls" / "web.key", 0o644)  # suppressed by the reissue
    proc = plan(manifest, state, "--detailed-exitcode")
    assert proc.returncode == 2, proc.stderr
    lines = plan_lines(proc, state)
    assert lines[0] == "Plan: 1 to reissue, 1 to renew (0 of 2 unchanged)."
    assert re.fullmatch(
        r"\s+-/\+ web\.example\.com\s+reissue\s+SANs differ: adds 10\.0\.0\.5, drops old\.example", lines[1]
    ), lines[1]
    assert re.fullmatch(
        r"\s+~ api\s+renew\s+renewal due since [\dhms]+ ago \(window 99% \+ jitter\); expires in (59|58)m\d*s?",
        lines[2],
    ), lines[2]
    assert lines[3:] == ["Hooks that would run:", "  systemctl reload nginx   (for web.example.com, api)"]


def test_plan_of_owner_and_mode_drift_runs_no_hook(site):
    manifest, state = site
    deploy(manifest, state)
    tls = manifest.parent.parent / "tls"
    os.chmod(tls / "web.key", 0o644)
    os.chmod(tls / "api.crt", 0o644)
    proc = plan(manifest, state)
    lines = plan_lines(proc, state)
    assert lines[0] == "Plan: 2 to chmod (0 of 2 unchanged)."
    assert re.fullmatch(r"\s+~ web\.example\.com\s+chmod\s+key mode 0644, want 0600", lines[1])
    assert re.fullmatch(r"\s+~ api\s+chmod\s+certificate mode 0644, want 0640", lines[2])
    assert len(lines) == 3


def test_plan_shows_a_pending_hook_from_the_status_store(site):
    manifest, state = site
    deploy(manifest, state)
    status = state / "status.json"
    status.write_text(json.dumps({"version": 1, "certificates": {"api": {"hook_pending": True}}, "manifest": {}}))
    proc = plan(manifest, state, "--detailed-exitcode")
    assert proc.returncode == 2
    lines = plan_lines(proc, state)
    assert lines[0] == "Plan: 1 to run hook (1 of 2 unchanged)."
    assert re.fullmatch(
        r"\s+! api\s+run_hook\s+the post-renewal command did not succeed after the last deployment", lines[1]
    )
    assert lines[2:] == ["Hooks that would run:", "  systemctl reload nginx   (for api)"]


def test_plan_with_a_path_that_cannot_be_managed_exits_1(site):
    manifest, state = site
    deploy(manifest, state)
    key = manifest.parent.parent / "tls" / "api.key"
    key.unlink()
    key.mkdir()
    proc = plan(manifest, state, "--detailed-exitcode")
    assert proc.returncode == 1
    lines = plan_lines(proc, state)
    assert lines[0] == "Plan: 1 cannot be managed (1 of 2 unchanged)."
    assert re.fullmatch(
        rf"\s+x api\s+error\s+key {re.escape(str(key))} is a directory; point key_path at a file inside it", lines[1]
    )


def test_plan_of_an_invalid_manifest_prints_the_errors_and_exits_1(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.json",
        [{"common_name": "a.example", "cert_path": "a.crt", "key_path": "a.key", "permissions": "644"}],
    )
    proc = plan(manifest, tmp_path / "state", "--detailed-exitcode")
    assert proc.returncode == 1 and proc.stdout == ""
    assert '[0].permissions: "644" would make the private key readable by every user' in proc.stderr
    assert not (tmp_path / "state").exists()


def test_plan_and_watch_do_not_go_together(site):
    manifest, state = site
    proc = run("--plan", "--watch", "-m", str(manifest), "--state-dir", str(state))
    assert proc.returncode == 1 and "do not go together" in proc.stderr


# --------------------------------------------------------------------------- --plan, JSON


def check_contract(data: dict) -> None:
    # issuer and notes were added later, after the original keys
    assert list(data) == ["format_version", "changes", "certificates", "hooks", "issuer", "notes"]
    assert data["issuer"]["type"] in ("local", "step-ca") and data["issuer"]["description"]
    assert isinstance(data["notes"], list)
    assert data["format_version"] == 1 and isinstance(data["changes"], bool)
    for c in data["certificates"]:
        assert set(c) <= {"name", "cert_path", "key_path", "actions", "error"}
        assert {"name", "cert_path", "key_path", "actions"} <= set(c)
        for a in c["actions"]:
            assert set(a) == {"action", "reason", "drift"}
            assert a["action"] in ACTIONS and isinstance(a["reason"], str) and a["reason"]
            assert isinstance(a["drift"], list) and a["drift"]
            for d in a["drift"]:
                assert set(d) == {"field", "observed", "desired"}
    for h in data["hooks"]:
        assert set(h) == {"command", "certificates"}
        assert isinstance(h["command"], str) and isinstance(h["certificates"], list)


def test_plan_json_follows_the_contract(site):
    manifest, state = site
    deploy(manifest, state, only="web.example.com", sans=["web.example.com", "www.example.com"])
    code, data = plan_json(manifest, state)
    assert code == 0
    check_contract(data)
    assert data["changes"] is True
    tls = manifest.parent.parent / "tls"
    web, api = data["certificates"]
    assert (web["name"], web["cert_path"], web["key_path"]) == (
        "web.example.com",
        str(tls / "web.crt"),
        str(tls / "web.key"),
    )
    assert web["actions"] == [
        {
            "action": "reissue",
            "reason": "SANs differ: adds 10.0.0.5",
            "drift": [
                {
                    "field": "sans",
                    "observed": ["web.example.com", "www.example.com"],
                    "desired": ["10.0.0.5", "web.example.com", "www.example.com"],
                }
            ],
        }
    ]
    assert api["name"] == "api" and [a["action"] for a in api["actions"]] == ["issue"]
    assert data["hooks"] == [{"command": "systemctl reload nginx", "certificates": ["web.example.com", "api"]}]


def test_plan_json_with_nothing_to_do(site):
    manifest, state = site
    deploy(manifest, state)
    for extra in ((), ("--detailed-exitcode",)):
        code, data = plan_json(manifest, state, *extra)
        assert code == 0
        check_contract(data)
        assert data["changes"] is False and data["hooks"] == []
        assert [(c["name"], c["actions"]) for c in data["certificates"]] == [("web.example.com", []), ("api", [])]


def test_plan_json_error_entry_and_exit_code(site):
    manifest, state = site
    (manifest.parent.parent / "tls" / "web.crt").mkdir(parents=True)
    code, data = plan_json(manifest, state, "--detailed-exitcode")
    assert code == 1
    check_contract(data)
    web = data["certificates"][0]
    assert web["actions"] == [] and "is a directory" in web["error"]


@pytest.mark.parametrize("detailed, want", [((), 0), (("--detailed-exitcode",), 2)])
def test_detailed_exitcode_is_2_only_when_changes_are_planned(site, detailed, want):
    manifest, state = site
    assert plan(manifest, state, *detailed).returncode == want
    assert plan(manifest, state, "--output", "json", *detailed).returncode == want


# --------------------------------------------------------------------------- colour


def test_no_escape_codes_when_piped_even_without_no_color(site):
    manifest, state = site
    proc = plan(manifest, state, no_color=False)
    assert proc.returncode == 0 and ESC not in proc.stdout and "+ web.example.com" in proc.stdout


def test_colour_on_a_tty(site):
    manifest, state = site
    code, out = run_on_tty("--plan", "-m", str(manifest), "--state-dir", str(state))
    assert code == 0
    assert f"{ESC}32m" in out and "web.example.com" in out


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_colour_on_a_tty_with_no_color_or_a_dumb_terminal(site, env):
    manifest, state = site
    code, out = run_on_tty("--plan", "-m", str(manifest), "--state-dir", str(state), env=env)
    assert code == 0 and "web.example.com" in out
    assert ESC not in out


def test_json_never_has_colour_even_on_a_tty(site):
    manifest, state = site
    code, out = run_on_tty("--plan", "--output", "json", "-m", str(manifest), "--state-dir", str(state))
    assert code == 0 and ESC not in out
    json.loads(out)


# --------------------------------------------------------------------------- --plan writes nothing


def test_plan_on_a_fresh_host_creates_nothing_not_even_the_state_folder(site, tmp_path):
    manifest, state = site
    before = snapshot_tree(tmp_path)
    for extra in ((), ("--output", "json"), ("--detailed-exitcode",)):
        plan(manifest, state, *extra)
    run("validate", "-m", str(manifest), "--state-dir", str(state))
    assert snapshot_tree(tmp_path) == before
    assert not state.exists()
    assert not (manifest.parent.parent / "tls").exists()


def test_plan_with_drift_changes_no_file_and_no_state(site, tmp_path):
    manifest, state = site
    deploy(manifest, state, only="web.example.com", duration=timedelta(hours=1))
    deploy(manifest, state, only="api")
    tls = manifest.parent.parent / "tls"
    os.chmod(tls / "api.key", 0o644)
    (state / "status.json").write_text(
        json.dumps({"version": 1, "certificates": {"api": {"hook_pending": True}}, "manifest": {}})
    )
    before = snapshot_tree(tmp_path)
    assert plan(manifest, state, "--detailed-exitcode").returncode == 2
    assert plan(manifest, state, "--output", "json").returncode == 0
    assert snapshot_tree(tmp_path) == before
    assert not (state / "cache").exists() and not list(state.glob("*.lock"))


def test_plan_of_a_step_ca_manifest_never_contacts_the_ca(tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": {
                "type": "step-ca",
                "url": f"https://127.0.0.1:{port}",
                "root": "root.crt",
                "provisioner": "admin",
                "password_file": "pw.txt",
            },
            "certificates": [{"common_name": "a.example", "cert_path": "a.crt", "key_path": "a.key"}],
        },
    )
    state = tmp_path / "state"
    before = snapshot_tree(tmp_path)
    try:
        proc = plan(manifest, state, "--detailed-exitcode")
        assert proc.returncode == 2, proc.stderr
        assert "+ a.example" in proc.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert snapshot_tree(tmp_path) == before and not state.exists()
