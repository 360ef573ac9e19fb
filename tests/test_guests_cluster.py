"""One manifest for a Proxmox cluster: two simulated nodes share the manifest's folder and
the cluster's configuration (the stand-ins' /etc/pve); each has its own disk (a private
mount namespace binds its own folder over the certificate folder) and state folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from proxmox.cluster import Cluster


class Nodes:
    def __init__(self, base: Path):
        self.base = base
        self.cluster = Cluster(base / "pve", node="pve1")
        (base / "pve" / "pve" / "nodes" / "pve2").mkdir(parents=True)
        self.shared = base / "shared"  # the manifest's folder, the same on both nodes
        self.shared.mkdir()
        self.out = base / "out"  # each node sees its own disk here
        self.out.mkdir()
        self.manifest = self.shared / "m.json"

    def disk(self, node: str) -> Path:
        path = self.base / "disks" / node
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, node: str, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        env.update(self.cluster.env(node), PYTHONPATH=str(REPO), NO_COLOR="1", RECONCILER_PROXMOX_CLUSTER="1")
        argv = [
            sys.executable,
            "-m",
            "reconciler",
            "-m",
            str(self.manifest),
            "--state-dir",
            str(self.base / "state" / node),
            *args,
        ]
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        proc = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", str(self.disk(node)), str(self.out), *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def reloads(self, vmid: int) -> list[str]:
        f = self.cluster.rootfs(vmid) / "run" / "reloads"
        return f.read_text().split() if f.exists() else []


@pytest.fixture
def nodes(tmp_path):
    return Nodes(tmp_path)


def entry(out: Path, name: str, **extra) -> dict:
    return {
        "name": name,
        "common_name": f"{name}.cluster.test",
        "cert_path": str(out / f"{name}.crt"),
        "key_path": str(out / f"{name}.key"),
        **extra,
    }


def test_each_node_acts_on_its_share_and_a_migrated_guest_is_taken_over_by_its_new_node(nodes):
    nodes.cluster.add(101, "lxc", node="pve1")
    guest = {
        "id": 101,
        "type": "lxc",
        "cert_path": "/etc/nginx/ssl/web.crt",
        "key_path": "/etc/nginx/ssl/web.key",
        "reload": "echo web >> /run/reloads",
    }
    nodes.manifest.write_text(
        json.dumps(
            {
                "issuer": {"type": "local", "dir": str(nodes.shared / "ca")},
                "certificates": [
                    entry(nodes.out, "web", guest=guest),
                    entry(nodes.out, "one", node="pve1"),
                    entry(nodes.out, "two", node="pve2"),
                ],
            }
        )
    )
    plan = nodes.run("pve1", "--plan").stdout
    assert "left to another node: two: marked for node pve2" in plan
    nodes.run("pve1")
    nodes.run("pve2")
    assert sorted(p.name for p in nodes.disk("pve1").iterdir()) == ["one.crt", "one.key", "web.crt", "web.key"]
    assert sorted(p.name for p in nodes.disk("pve2").iterdir()) == ["two.crt", "two.key"]
    assert nodes.reloads(101) == ["web"]
    web = nodes.cluster.rootfs(101) / "etc/nginx/ssl/web.crt"
    assert web.read_bytes() == (nodes.disk("pve1") / "web.crt").read_bytes()

    nodes.cluster.migrate(101, "lxc", "pve2")
    left = nodes.run("pve1", "--plan").stdout
    assert "left to another node: web: container 101 runs on pve2" in left
    calls = nodes.cluster.root / "calls.log"
    calls.write_text("")
    nodes.run("pve1")
    assert not [c for c in map(json.loads, calls.read_text().splitlines()) if c[0] == "pct"], (
        "pve1 must leave the guest alone"
    )
    nodes.run("pve2")
    assert web.read_bytes() == (nodes.disk("pve2") / "web.crt").read_bytes()
    assert nodes.reloads(101) == ["web", "web"]
    status = json.loads((nodes.base / "state" / "pve2" / "status.json").read_text())
    assert status["certificates"]["web"]["delivery"]["node"] == "pve2"
    assert "No changes" in nodes.run("pve2", "--plan").stdout
