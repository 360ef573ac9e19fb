"""A post-renewal command that runs `qm guest exec` is judged by the agent's JSON answer,
not by qm's exit status: qm exits 0 whatever the command inside the VM did."""

from __future__ import annotations

import json

import pytest

from helpers import reconcile
from proxmox.cluster import Cluster, legacy_entry


@pytest.fixture
def cluster(tmp_path):
    return Cluster(tmp_path / "pve")


def _run(tmp_path, cluster, entries, *args, check=None):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"issuer": {"type": "local"}, "certificates": entries}))
    return reconcile("-m", str(manifest), "--state-dir", str(tmp_path / "state"), *args, env=cluster.env(), check=check)


def test_a_qm_guest_exec_hook_whose_command_fails_in_the_vm_is_a_failed_hook(tmp_path, cluster):
    cluster.add(201, "vm")
    cluster.fail_inside(201)  # qm prints {"exitcode": 1, "exited": 1, "err-data": "boom"} and exits 0
    entry = legacy_entry(tmp_path / "out", "web", 201, "vm", "qm guest exec 201 -- sh -c 'touch /run/reloaded'")
    proc = _run(tmp_path, cluster, [entry], check=1)
    said = proc.stdout + proc.stderr
    assert "succeeded" not in said
    assert "exitcode 1 inside the guest: boom" in said
    # owed: the next pass runs it again, and once the VM's command succeeds it is settled
    cluster.fail_inside(201, False)
    again = _run(tmp_path, cluster, [entry])
    assert again.returncode == 0, again.stderr
    assert "succeeded" in again.stdout + again.stderr
    assert (cluster.rootfs(201) / "run" / "reloaded").exists()


def test_a_qm_guest_exec_hook_that_succeeds_in_the_vm_succeeds(tmp_path, cluster):
    cluster.add(201, "vm")
    entry = legacy_entry(tmp_path / "out", "web", 201, "vm", "qm guest exec 201 -- sh -c 'echo reloaded'")
    proc = _run(tmp_path, cluster, [entry], check=0)
    assert "succeeded" in proc.stdout + proc.stderr


def test_a_qm_guest_exec_hook_cut_off_by_its_timeout_is_a_failed_hook(tmp_path, cluster):
    cluster.add(201, "vm")
    # at its --timeout qm warns "timeout reached, returning pid", prints {"pid": N} and exits 0
    entry = legacy_entry(tmp_path / "out", "web", 201, "vm", "qm guest exec 201 --timeout 1 -- sh -c 'sleep 60'")
    proc = _run(tmp_path, cluster, [entry], check=1)
    assert "did not finish before qm's --timeout" in proc.stdout + proc.stderr
