"""Delivery into Proxmox guests as a stage of the pass, end to end: the real CLI, the
embedded CA, the stand-in pct/qm over busybox chroots."""

from __future__ import annotations

import json
import re
import os
import stat
from pathlib import Path

import pytest

from helpers import reconcile
from proxmox.cluster import Cluster, legacy_entry


def delivers(text: str) -> bool:
    """The plan or result names a `deliver` action (not merely the word "delivery")."""
    return re.search(r"\bdeliver\b", text) is not None


class Site:
    def __init__(self, tmp_path: Path):
        self.base = tmp_path
        self.cluster = Cluster(tmp_path / "pve")
        self.out = tmp_path / "out"
        self.manifest = tmp_path / "m.json"
        self.state = tmp_path / "state"

    def write(self, entries: list[dict]) -> None:
        self.manifest.write_text(json.dumps({"issuer": {"type": "local"}, "certificates": entries}))

    def entry(self, name: str, vmid: int, kind: str = "lxc", **guest) -> dict:
        g = {
            "id": vmid,
            "type": kind,
            "cert_path": f"/etc/nginx/ssl/{name}.crt",
            "key_path": f"/etc/nginx/ssl/{name}.key",
            "owner": "root:www-data",
            "key_permissions": "640",
            "reload": f"echo {name} >> /run/reloads",
        }
        g.update(guest)
        return {
            "name": name,
            "common_name": f"{name}.guest.test",
            "cert_path": str(self.out / f"{name}.crt"),
            "key_path": str(self.out / f"{name}.key"),
            "guest": g,
        }

    def run(self, *args: str, check: int | None = 0, node: str | None = None, env: dict | None = None):
        return reconcile(
            "-m",
            str(self.manifest),
            "--state-dir",
            str(self.state),
            *args,
            env={**self.cluster.env(node), **(env or {})},
            check=check,
        )

    def guest_file(self, vmid: int, path: str) -> Path:
        return self.cluster.rootfs(vmid) / path.lstrip("/")

    def reloads(self, vmid: int) -> list[str]:
        f = self.guest_file(vmid, "/run/reloads")
        return f.read_text().split() if f.exists() else []


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


@pytest.mark.parametrize("kind,vmid", [("lxc", 101), ("vm", 201)])
def test_a_guest_entry_lands_in_its_guest_with_owner_and_mode_and_is_reloaded_once(site, kind, vmid):
    site.cluster.add(vmid, kind)
    site.write([site.entry("web", vmid, kind)])
    first = site.run()
    assert delivers(first.stdout) and "reload" in first.stdout
    key = site.guest_file(vmid, "/etc/nginx/ssl/web.key")
    assert key.read_bytes() == (site.out / "web.key").read_bytes()
    assert site.guest_file(vmid, "/etc/nginx/ssl/web.crt").read_bytes() == (site.out / "web.crt").read_bytes()
    st = key.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 33, 0o640)
    assert site.reloads(vmid) == ["web"]
    # steady state: the guest is looked at, nothing is delivered or reloaded again
    again = site.run("--plan", "--detailed-exitcode", check=0)
    assert not delivers(again.stdout)
    site.run()
    assert site.reloads(vmid) == ["web"]


def test_a_file_changed_inside_the_guest_is_delivered_again(site):
    site.cluster.add(101)
    site.write([site.entry("web", 101)])
    site.run()
    key = site.guest_file(101, "/etc/nginx/ssl/web.key")
    os.chmod(key, 0o644)
    plan = site.run("--plan", "--detailed-exitcode", check=2)
    assert "has mode 0644, want 0640" in plan.stdout
    site.run()
    assert stat.S_IMODE(key.stat().st_mode) == 0o640
    site.guest_file(101, "/etc/nginx/ssl/web.crt").unlink()
    assert "/etc/nginx/ssl/web.crt missing in container 101" in site.run("--plan", check=0).stdout
    site.run()
    assert site.guest_file(101, "/etc/nginx/ssl/web.crt").exists()
    assert site.reloads(101) == ["web", "web", "web"]


def test_a_stopped_guest_owes_its_delivery_and_gets_it_once_it_runs(site):
    site.cluster.add(101, running=False)
    site.write([site.entry("web", 101)])
    plan = site.run("--plan", check=0)
    assert "(container 101 stopped: owed)" in plan.stdout
    first = site.run(check=0)  # owed is not failed
    assert "owed" in first.stdout + first.stderr
    assert not site.guest_file(101, "/etc/nginx/ssl/web.key").exists()
    status = reconcile(
        "status", "-m", str(site.manifest), "--state-dir", str(site.state), env=site.cluster.env(), check=1
    )
    assert "delivery owed" in status.stdout and "(container 101 stopped: owed)" in status.stdout
    rows = json.loads(
        reconcile(
            "status",
            "--output",
            "json",
            "-m",
            str(site.manifest),
            "--state-dir",
            str(site.state),
            env=site.cluster.env(),
        ).stdout
    )
    (row,) = rows["certificates"]
    assert (
        row["state"] == "delivery owed" and row["guest"]["owed"] == "container 101 is stopped; delivered once it runs"
    )
    site.cluster.start(101)
    site.run()
    assert site.guest_file(101, "/etc/nginx/ssl/web.key").read_bytes() == (site.out / "web.key").read_bytes()
    assert site.reloads(101) == ["web"]


def test_an_in_guest_reload_that_fails_is_owed_and_retried_until_it_succeeds(site):
    site.cluster.add(101)
    site.write([site.entry("web", 101, reload="cat /etc/nginx/ready && echo web >> /run/reloads")])
    failed = site.run(check=1)
    assert "cat: can't open '/etc/nginx/ready'" in failed.stdout + failed.stderr
    assert site.guest_file(101, "/etc/nginx/ssl/web.key").exists()  # delivered; only the reload is owed
    plan = site.run("--plan", check=0)
    assert "reload" in plan.stdout and "did not succeed" in plan.stdout and not delivers(plan.stdout)
    site.guest_file(101, "/etc/nginx/ready").write_text("")
    site.run()
    assert site.reloads(101) == ["web"]
    assert "No changes" in site.run("--plan", check=0).stdout


def test_two_certificates_for_one_guest_each_land_and_the_guest_is_looked_at_once(site):
    site.cluster.add(101)
    site.write([site.entry("web", 101), site.entry("api", 101)])
    site.run()
    for name in ("web", "api"):
        assert (
            site.guest_file(101, f"/etc/nginx/ssl/{name}.key").read_bytes() == (site.out / f"{name}.key").read_bytes()
        )
    assert sorted(site.reloads(101)) == ["api", "web"]
    calls = site.cluster.root / "calls.log"
    calls.write_text("")
    site.run("--plan")
    looks = [c for c in map(json.loads, calls.read_text().splitlines()) if c[:2] == ["pct", "exec"]]
    assert len(looks) == 1


def test_one_reload_command_runs_once_per_guest_for_every_certificate_that_owes_it(site):
    site.cluster.add(101)
    shared = "echo nginx >> /run/reloads"
    site.write([site.entry("web", 101, reload=shared), site.entry("api", 101, reload=shared)])
    site.run()
    assert site.reloads(101) == ["nginx"]


def test_a_vm_whose_agent_does_not_answer_fails_its_delivery_with_the_fix_and_keeps_it_owed(site):
    site.cluster.add(201, "vm")
    site.cluster.lose_agent(201)
    site.write([site.entry("web", 201, "vm")])
    failed = site.run(check=1)
    said = failed.stdout + failed.stderr
    assert "QEMU guest agent is not running" in said and "qemu-guest-agent" in said
    site.cluster.lose_agent(201, False)
    site.run()
    assert site.reloads(201) == ["web"]


def test_the_published_legacy_manifest_shape_works_with_its_hooks_unchanged(site):
    site.cluster.add(101, "lxc")
    site.cluster.add(201, "vm")
    mv = (
        "mv /tmp/cert.pem /etc/ssl/{0}.crt && mv /tmp/key.pem /etc/ssl/{0}.key "
        "&& mv /tmp/ca.pem /etc/ssl/certs/root.crt"
    )
    site.write(
        [
            legacy_entry(site.out, "ct", 101, "lxc", f"pct exec 101 -- bash -c '{mv.format('ct')}'", include_ca=True),
            legacy_entry(
                site.out, "vm", 201, "vm", f"qm guest exec 201 -- bash -c '{mv.format('vm')}'", include_ca=True
            ),
        ]
    )
    site.run()
    for vmid, name in ((101, "ct"), (201, "vm")):
        assert site.guest_file(vmid, f"/etc/ssl/{name}.key").read_bytes() == (site.out / f"{name}.key").read_bytes()
        assert b"BEGIN CERTIFICATE" in site.guest_file(vmid, "/etc/ssl/certs/root.crt").read_bytes()
        assert not site.guest_file(vmid, "/tmp/key.pem").exists()
    assert not delivers(site.run("--plan", check=0).stdout)


def test_a_legacy_entry_of_a_stopped_guest_owes_delivery_and_hook_and_runs_both_once_it_starts(site):
    site.cluster.add(101, "lxc", running=False)
    site.write([legacy_entry(site.out, "ct", 101, "lxc", "pct exec 101 -- sh -c 'mv /tmp/cert.pem /etc/ssl/ct.crt'")])
    site.run(check=0)
    site.cluster.start(101)
    site.run()
    assert site.guest_file(101, "/etc/ssl/ct.crt").read_bytes() == (site.out / "ct.crt").read_bytes()


STEPS = ["guest_pushed@1", "guest_pushed@2", "guest_renamed@1", "before_hooks@1"]


@pytest.mark.parametrize("point", STEPS)
def test_a_kill_at_any_delivery_step_is_finished_by_the_next_pass_and_reloads_at_least_once(site, point):
    site.cluster.add(101)
    site.write([site.entry("web", 101)])
    killed = site.run(check=None, env={"RECONCILER_FAULT_INJECT": point})
    assert killed.returncode == -9, killed.stderr
    site.run()
    assert site.guest_file(101, "/etc/nginx/ssl/web.key").read_bytes() == (site.out / "web.key").read_bytes()
    assert "web" in site.reloads(101)
    assert not delivers(site.run("--plan", check=0).stdout)


def test_validate_shows_the_guest_object_a_legacy_entry_means_and_warns_of_shared_tmp_files(site):
    site.write(
        [
            legacy_entry(site.out, "a", 101, "lxc", "pct exec 101 -- true", include_ca=True),
            legacy_entry(site.out, "b", 101, "lxc", "pct exec 101 -- true"),
        ]
    )
    out = reconcile("validate", "-m", str(site.manifest), "--state-dir", str(site.state), check=0).stdout
    assert (
        '"guest": {"id": 101, "type": "lxc", "cert_path": "/tmp/cert.pem", "key_path": "/tmp/key.pem", '
        '"ca_path": "/tmp/ca.pem"}'
    ) in out
    assert "warning: a, b all deliver to /tmp/cert.pem and /tmp/key.pem in lxc/101" in out


@pytest.mark.parametrize(
    "guest,where,words",
    [
        ({"key_permissions": "644"}, "certificates[0].guest.key_permissions", "readable by every user of the guest"),
        ({"cert_path": "etc/x.crt"}, "certificates[0].guest.cert_path", "is not valid"),
        ({"type": "qemu"}, "certificates[0].guest.type", "qemu"),
        ({"key_path": "/etc/nginx/ssl/web.crt"}, "certificates[0].guest", "three different files"),
    ],
)
def test_a_bad_guest_object_is_a_clear_error_naming_its_field(site, guest, where, words):
    site.write([site.entry("web", 101, **guest)])
    proc = reconcile("validate", "-m", str(site.manifest), "--state-dir", str(site.state), check=1)
    assert where in proc.stderr and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_guest_object_beside_legacy_guest_fields_is_refused(site):
    entry = site.entry("web", 101)
    entry.update(guest_id=101, guest_type="lxc")
    site.write([entry])
    proc = reconcile("validate", "-m", str(site.manifest), "--state-dir", str(site.state), check=1)
    assert "either the guest object or the legacy guest_id + guest_type" in proc.stderr


def test_doctor_checks_each_guest_runs_its_agent_answers_and_its_target_folders_exist(site):
    site.cluster.add(101, "lxc")
    site.cluster.add(102, "lxc", running=False)
    site.cluster.add(201, "vm")
    site.cluster.lose_agent(201)
    site.write(
        [
            site.entry("a", 101, key_path="/etc/nope/a.key", owner="nginx:ssl-users"),
            site.entry("b", 102),
            site.entry("c", 201, "vm"),
            site.entry("d", 999),
        ]
    )
    proc = reconcile(
        "doctor", "-m", str(site.manifest), "--state-dir", str(site.state), env=site.cluster.env(), check=1
    )
    out = proc.stdout
    assert "✓ pct is present" in out and "✓ qm is present" in out
    assert "✓ container 101 exists and runs" in out
    assert "✓ container 101: target folder /etc/nginx/ssl exists" in out
    assert "✗ container 101: target folder /etc/nope does not exist" in out
    assert (
        "✓ container 101: owner user nginx exists" in out
        and "✗ container 101: owner group ssl-users does not exist in the guest" in out
    )
    assert "✗ container 102 is stopped" in out and "pct start 102" in out
    assert "✗ VM 201: QEMU guest agent is not running" in out and "agent: 1" in out
    assert "✗ container 999 does not exist on this node" in out
