"""Issuing N EC P-256 certificates from the embedded CA in one pass, then the converged pass.

Targets (issue 3): >= 300 certificates/s for 1,000; the following pass <= 0.3 s and
zero bytes written.

    .venv/bin/python bench/bench_apply.py [--count 1000] [--workers 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import manifest, run, tree_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        folder, state = Path(tmp), Path(tmp) / "state"
        m = manifest(folder, args.count)
        # the embedded CA is created once, outside the timed pass, as on any real host
        (folder / "warmup").mkdir()
        run(["-m", str(manifest(folder / "warmup", 1))], state)
        wall, code, peak, _ = run(["-m", str(m), "--workers", str(args.workers), "--detailed-exitcode"], state)
        assert code == 2
        print(
            f"issue pass: {args.count} certificates in {wall:.2f} s wall = {args.count / wall:.0f} certificates/s "
            f"(whole process, --workers {args.workers}), peak RSS {peak / 1024:.1f} MB"
        )
        before = tree_state(folder)
        wall2, code2, peak2, blocks = run(["-m", str(m), "--detailed-exitcode"], state)
        assert code2 == 0, "the pass after a converged one must plan nothing"
        changed = [p for p, v in tree_state(folder).items() if before.get(p) != v]
        print(
            f"converged pass: {wall2:.3f} s wall, peak RSS {peak2 / 1024:.1f} MB, "
            f"{blocks} blocks written (ru_oublock), {len(changed)} files changed"
            + (f": {changed[:5]}" if changed else "")
        )


if __name__ == "__main__":
    main()
