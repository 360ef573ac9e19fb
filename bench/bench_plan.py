"""`reconcile --plan --output json` as a whole process, over N converged certificates.

Targets (issue 2): 10,000 certificates in <= 1.0 s wall, peak RSS <= 200 MB.
The certificates are made by the reconciler itself (one apply pass), which also warms the
caches in the state folder exactly as a real installation's passes do; the "cold" figure
is the same plan with those caches removed.

    .venv/bin/python bench/bench_plan.py [--sizes 100,1000,10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import manifest, median, run, tree_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(
        f"{'certs':>6}  {'plan wall (median)':>18}  {'peak RSS':>9}  "
        f"{'cold plan':>9}  {'cold RSS':>9}  setup (issue all)"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
            folder, state = Path(tmp), Path(tmp) / "state"
            m = manifest(folder, n)
            setup, _, _, _ = run(["-m", str(m), "--workers", "8"], state)
            before = tree_state(folder / "certs")
            walls, rss = [], []
            for _ in range(args.repeat):
                wall, code, peak, _ = run(["-m", str(m), "--plan", "--output", "json", "--detailed-exitcode"], state)
                assert code == 0, "a converged manifest must plan nothing"
                walls.append(wall)
                rss.append(peak)
            assert tree_state(folder / "certs") == before, "--plan changed the disk"
            shutil.rmtree(state / "cache", ignore_errors=True)
            cold, _, cold_rss, _ = run(["-m", str(m), "--plan", "--output", "json"], state)
            print(
                f"{n:>6}  {median(walls):>16.3f} s  {max(rss) / 1024:>6.1f} MB  "
                f"{cold:>7.3f} s  {cold_rss / 1024:>6.1f} MB  {setup:.1f} s"
            )


if __name__ == "__main__":
    main()
