"""--watch and Proxmox guests: a guest that owes a delivery because it is not running is
polled (--guest-poll) and gets its files once it runs; a failed delivery backs off like a
failed hook. The schedule's rules with a fake clock (fast); the whole loop with the
stand-ins."""

from __future__ import annotations

import json

import pytest

from proxmox.cluster import Cluster
from reconciler.schedule import GUEST_POLL, GUEST_POLL_REASON
from test_schedule import cert, run, settle_start
from test_watch import Watch, wait_for

# the schedule fixtures of test_schedule (a fake clock, fake stamps)
from test_schedule import clock, disk, schedule  # noqa: F401  (pytest fixtures)


def test_a_guest_owing_a_delivery_because_it_is_stopped_is_polled_until_it_gets_it(schedule, clock, disk):  # noqa: F811
    settle_start(schedule, clock, disk, cert("web", delivery_waits=True))
    clock.advance(GUEST_POLL - 1)
    assert schedule.next_job() is None
    assert schedule.timeout() == pytest.approx(1)
    clock.advance(1)
    job = schedule.next_job()
    assert job is not None and job.reasons == [GUEST_POLL_REASON]
    run(schedule, cert("web", delivery_ok=True))  # delivered: no more polling
    clock.advance(GUEST_POLL * 3)
    job = schedule.next_job()
    assert job is None or GUEST_POLL_REASON not in job.reasons


def test_a_failed_delivery_is_deferred_with_backoff_and_tried_again_when_it_is_over(schedule, clock, disk):  # noqa: F811
    settle_start(schedule, clock, disk, cert("web"))
    run(schedule, cert("web", delivery_ok=False))
    assert schedule.deferral({"web"}).deliveries == {"web"}
    clock.advance(schedule.deliveries.until["web"] - clock.time() + 0.1)
    job = schedule.next_job()
    assert job is not None and "backoff over" in job.reasons
    assert schedule.deferral({"web"}).deliveries == frozenset()
    run(schedule, cert("web", delivery_ok=True))
    assert "web" not in schedule.deliveries.failures


def test_watch_delivers_to_a_guest_once_it_starts(tmp_path):
    cluster = Cluster(tmp_path / "pve")
    cluster.add(101, "lxc", running=False)
    out = tmp_path / "out"
    manifest = tmp_path / "m.json"
    guest = {
        "id": 101,
        "type": "lxc",
        "cert_path": "/etc/nginx/ssl/web.crt",
        "key_path": "/etc/nginx/ssl/web.key",
        "reload": "echo web >> /run/reloads",
    }
    manifest.write_text(
        json.dumps(
            {
                "issuer": {"type": "local"},
                "certificates": [
                    {
                        "name": "web",
                        "common_name": "web.guest.test",
                        "cert_path": str(out / "web.crt"),
                        "key_path": str(out / "web.key"),
                        "guest": guest,
                    },
                ],
            }
        )
    )
    watch = Watch(tmp_path, manifest, "--guest-poll", "1s", env=cluster.env())
    try:
        watch.wait_passes(1, timeout=60)
        assert "web: delivery to container 101 owed: container 101 is stopped" in watch.log()
        assert not (cluster.rootfs(101) / "etc/nginx/ssl/web.crt").exists()
        cluster.start(101)
        delivered = cluster.rootfs(101) / "etc/nginx/ssl/web.crt"
        wait_for(
            lambda: delivered.exists() and delivered.read_bytes() == (out / "web.crt").read_bytes(),
            60,
            "the delivery after the guest started",
            watch,
        )
        wait_for(
            lambda: any(GUEST_POLL_REASON in p for p in watch.passes()), 60, "the pass that polled the guest", watch
        )
        assert (cluster.rootfs(101) / "run/reloads").read_text().split() == ["web"]
        watch.stop()
    finally:
        watch.close()
