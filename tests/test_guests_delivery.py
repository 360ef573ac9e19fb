"""The delivery stage against the Proxmox stand-ins: files land atomically inside real
busybox chroots with owner and mode, never with a key on a command line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from proxmox.cluster import Cluster
from reconciler.guestfacts import GuestSpec, legacy_spec
from reconciler.guests.deliver import deliver, look, reload
from reconciler.guests.proxmox import GuestError, ProxmoxCLI

KEY = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRETSECRETSECRET\n"
    b"-----END PRIVATE KEY-----\n"
)
CERT = b"-----BEGIN CERTIFICATE-----\nMIIBcert\n-----END CERTIFICATE-----\n"
CA = b"-----BEGIN CERTIFICATE-----\nMIIBroot\n-----END CERTIFICATE-----\n"


@pytest.fixture
def cluster(tmp_path):
    return Cluster(tmp_path / "pve")


def cli_for(cluster: Cluster, **kw) -> ProxmoxCLI:
    return ProxmoxCLI(env={**os.environ, **cluster.env()}, **kw)


def spec(kind="lxc", vmid="101", **kw) -> GuestSpec:
    base = dict(
        cert_path="/etc/nginx/ssl/nginx.crt",
        key_path="/etc/nginx/ssl/nginx.key",
        ca_path="/etc/ssl/certs/internal-root.crt",
        owner="root:www-data",
        cert_mode=0o644,
        key_mode=0o640,
        reload="touch /run/nginx.reloaded",
    )
    base.update(kw)
    return GuestSpec(vmid, kind, **base)


def in_guest(cluster, vmid, path) -> os.stat_result:
    return os.lstat(cluster.rootfs(int(vmid)) / path.lstrip("/"))


@pytest.mark.parametrize("kind,vmid", [("lxc", "101"), ("vm", "201")])
def test_files_land_in_the_guest_with_owner_and_mode_and_the_reload_runs_there(cluster, kind, vmid):
    cluster.add(int(vmid), kind)
    s = spec(kind, vmid)
    record = deliver(cli_for(cluster), s, {"cert": CERT, "key": KEY, "ca": CA})
    root = cluster.rootfs(int(vmid))
    assert (root / "etc/nginx/ssl/nginx.key").read_bytes() == KEY
    assert (root / "etc/nginx/ssl/nginx.crt").read_bytes() == CERT
    assert (root / "etc/ssl/certs/internal-root.crt").read_bytes() == CA
    key = in_guest(cluster, vmid, s.key_path)
    assert (key.st_uid, key.st_gid, key.st_mode & 0o7777) == (0, 33, 0o640)
    assert in_guest(cluster, vmid, s.cert_path).st_mode & 0o7777 == 0o644
    assert record[s.key_path] == {"sha256": hashlib.sha256(KEY).hexdigest(), "owner": "root:www-data", "mode": 0o640}
    assert not list((root / "etc/nginx/ssl").glob(".*"))  # no temporary file left behind
    assert reload(cli_for(cluster), s).ok
    assert (root / "run/nginx.reloaded").exists()


@pytest.mark.parametrize("kind,vmid", [("lxc", "101"), ("vm", "201")])
def test_a_key_is_never_on_a_command_line(cluster, kind, vmid):
    cluster.add(int(vmid), kind)
    deliver(cli_for(cluster), spec(kind, vmid), {"cert": CERT, "key": KEY})
    calls = (cluster.root / "calls.log").read_text()
    assert "SECRETSECRET" not in calls
    assert any(
        json.loads(line)[:2] == (["pct", "push"] if kind == "lxc" else ["qm", "guest"]) for line in calls.splitlines()
    )


@pytest.mark.parametrize("kind,vmid", [("lxc", "101"), ("vm", "201")])
def test_look_reports_each_file_digest_owner_and_mode_in_one_command(cluster, kind, vmid):
    cluster.add(int(vmid), kind)
    s = spec(kind, vmid)
    deliver(cli_for(cluster), s, {"cert": CERT, "key": KEY})
    before = len((cluster.root / "calls.log").read_text().splitlines())
    view = look(cli_for(cluster), s, [s.key_path, s.cert_path, "/etc/nowhere"])
    assert len((cluster.root / "calls.log").read_text().splitlines()) == before + 1
    assert view.state == "running"
    key = view.files[s.key_path]
    assert (key.sha256, key.user, key.group, key.mode) == (hashlib.sha256(KEY).hexdigest(), "root", "www-data", 0o640)
    assert view.files["/etc/nowhere"].sha256 is None


def test_look_tells_a_stopped_guest_a_missing_one_and_a_vm_whose_agent_is_silent(cluster):
    cluster.add(101, "lxc", running=False)
    cluster.add(201, "vm")
    cluster.lose_agent(201)
    cli = cli_for(cluster)
    assert look(cli, spec("lxc", "101"), ["/x"]).state == "stopped"
    assert look(cli, spec("lxc", "999"), ["/x"]).state == "missing"
    silent = look(cli, spec("vm", "201"), ["/x"])
    assert (
        silent.state == "unreachable"
        and "QEMU guest agent is not running" in silent.detail
        and "qemu-guest-agent" in silent.detail
    )


def test_an_owner_unknown_inside_the_guest_is_a_clear_error_and_nothing_moves(cluster):
    cluster.add(101, "lxc")
    with pytest.raises(GuestError) as err:
        deliver(cli_for(cluster), spec(owner="root:nosuchgroup"), {"cert": CERT, "key": KEY})
    assert "nosuchgroup" in str(err.value) and "must exist inside the guest" in str(err.value)
    assert not (cluster.rootfs(101) / "etc/nginx/ssl/nginx.key").exists()


def test_a_missing_target_folder_in_the_guest_is_a_clear_error(cluster):
    cluster.add(201, "vm")
    with pytest.raises(GuestError) as err:
        deliver(cli_for(cluster), spec("vm", "201", key_path="/etc/nope/x.key"), {"cert": CERT, "key": KEY})
    assert "/etc/nope" in str(err.value)


def test_a_reload_failing_inside_a_vm_is_reported_with_its_stderr(cluster):
    cluster.add(201, "vm")
    cluster.fail_inside(201)
    run = reload(cli_for(cluster), spec("vm", "201"))
    assert not run.ok and run.describe() == "exitcode 1 inside the guest: boom"


def test_a_hanging_guest_command_is_cut_off(cluster):
    cluster.add(201, "vm")
    cluster.hang(201)
    run = reload(cli_for(cluster, agent_timeout=1), spec("vm", "201"))
    assert not run.ok and "did not finish" in run.describe()


def test_legacy_delivery_writes_the_old_scripts_tmp_files_with_the_key_kept_to_root(cluster):
    cluster.add(101, "lxc")
    s = legacy_spec("101", "lxc", include_ca=True)
    deliver(cli_for(cluster), s, {"cert": CERT, "key": KEY, "ca": CA})
    root = cluster.rootfs(101)
    assert (root / "tmp/cert.pem").read_bytes() == CERT and (root / "tmp/ca.pem").read_bytes() == CA
    assert os.lstat(root / "tmp/key.pem").st_mode & 0o777 == 0o600


@pytest.mark.parametrize("point", ["guest_pushed@1", "guest_pushed@2", "guest_renamed@1"])
@pytest.mark.parametrize("kind,vmid", [("lxc", "101"), ("vm", "201")])
def test_a_kill_during_delivery_leaves_no_half_written_or_readable_key(cluster, tmp_path, point, kind, vmid):
    cluster.add(int(vmid), kind)
    s = spec(kind, vmid)
    root = cluster.rootfs(int(vmid))
    old_key = b"-----BEGIN PRIVATE KEY-----\nOLD\n-----END PRIVATE KEY-----\n"
    deliver(cli_for(cluster), s, {"cert": CERT, "key": old_key})
    script = (
        "import os, sys; sys.path[:0] = sys.argv[1:3]\n"
        "from proxmox.cluster import Cluster\n"
        "from reconciler.guests.deliver import deliver\n"
        "from reconciler.guests.proxmox import ProxmoxCLI\n"
        "from reconciler.guestfacts import GuestSpec\n"
        f"s = GuestSpec(**{dict(vars(s))!r})\n"
        f"deliver(ProxmoxCLI(env=dict(os.environ)), s, {{'cert': {CERT!r}, 'key': {KEY!r}}})\n"
    )
    env = {**os.environ, **cluster.env(), "RECONCILER_FAULT_INJECT": point}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script, repo, os.path.join(repo, "tests")], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    key = root / "etc/nginx/ssl/nginx.key"
    assert key.read_bytes() in (old_key, KEY)  # the old key or the new one, whole
    for leftover in (root / "etc/nginx/ssl").glob(".nginx.key*"):
        assert leftover.stat().st_mode & 0o007 == 0, leftover  # a temporary key is never readable by others
    # the next delivery finishes the job
    deliver(cli_for(cluster), s, {"cert": CERT, "key": KEY})
    assert key.read_bytes() == KEY and not list((root / "etc/nginx/ssl").glob(".*"))
