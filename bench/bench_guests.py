"""Delivering 100 certificates to 20 Proxmox guests (5 each; half containers, half VMs)
through the stand-in pct/qm over busybox chroots (tests/proxmox), then a resync with
nothing to do, and what that resync costs per guest.

    .venv/bin/python bench/bench_guests.py [--certs 100] [--guests 20] [--workers 4]

The resync's cost per guest is its wall time minus that of the same one-shot pass over
the same certificates without guests, divided by the number of guests: what looking at
a guest (one `pct exec` / `qm guest exec` for all its files) adds. The stand-ins are
Python scripts (about 30-60 ms to start); real pct/qm are Perl (about 0.3-0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from common import REPO, measure, median

sys.path.insert(0, str(REPO / "tests"))
from proxmox.cluster import Cluster  # noqa: E402


def entries(folder: Path, certs: int, guests: int, with_guest: bool) -> list[dict]:
    out = []
    for i in range(certs):
        vmid = 100 + i % guests
        entry = {
            "name": f"c{i}",
            "common_name": f"c{i}.bench.example",
            "cert_path": str(folder / f"c{i}.crt"),
            "key_path": str(folder / f"c{i}.key"),
        }
        if with_guest:
            entry["guest"] = {
                "id": vmid,
                "type": "lxc" if vmid % 2 == 0 else "vm",
                "cert_path": f"/etc/nginx/ssl/c{i}.crt",
                "key_path": f"/etc/nginx/ssl/c{i}.key",
                "owner": "root:www-data",
                "key_permissions": "640",
                "reload": "true",
            }
        out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--certs", type=int, default=100)
    ap.add_argument("--guests", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-guests-") as tmp:
        base = Path(tmp)
        cluster = Cluster(base / "pve")
        for g in range(args.guests):
            vmid = 100 + g
            cluster.add(vmid, "lxc" if vmid % 2 == 0 else "vm")
        env = {**os.environ, **cluster.env(), "PYTHONPATH": str(REPO), "NO_COLOR": "1"}

        def run(name: str, with_guest: bool, *extra: str):
            folder = base / name
            folder.mkdir(exist_ok=True)
            m = folder / "m.json"
            m.write_text(
                json.dumps(
                    {
                        "issuer": {"type": "local", "dir": str(base / "ca")},
                        "certificates": entries(folder / "out", args.certs, args.guests, with_guest),
                    }
                )
            )
            return measure(
                [
                    sys.executable,
                    "-m",
                    "reconciler",
                    "-m",
                    str(m),
                    "--state-dir",
                    str(folder / "state"),
                    "--workers",
                    str(args.workers),
                    "--detailed-exitcode",
                    *extra,
                ],
                env,
            )

        run("warmup", False)  # the embedded CA is made once, outside the timed passes
        plain = run("plain", False)
        first = run("guests", True)
        calls = base / "pve" / "calls.log"
        calls.write_text("")
        resyncs = [run("guests", True) for _ in range(args.repeat)]
        assert all(r.code == 0 for r in resyncs), "the resync after a delivery must find nothing to do"
        looks = len(calls.read_text().splitlines()) // args.repeat
        baseline = median([run("plain", False).wall for _ in range(args.repeat)])
        resync = median([r.wall for r in resyncs])
        print(
            f"first pass: {args.certs} certificates issued and delivered to {args.guests} guests "
            f"in {first.wall:.2f} s wall "
            f"({plain.wall:.2f} s to issue them without guests: delivery adds {first.wall - plain.wall:.2f} s, "
            f"{(first.wall - plain.wall) / args.certs * 1000:.0f} ms per certificate), --workers {args.workers}"
        )
        print(
            f"resync, nothing to do: {resync:.2f} s wall (same pass without guests {baseline:.2f} s), "
            f"{looks} stand-in calls, {(resync - baseline) / args.guests * 1000:.0f} ms per guest "
            f"(median of {args.repeat}); CPU {median([r.cpu for r in resyncs]):.2f} s"
        )


if __name__ == "__main__":
    main()
