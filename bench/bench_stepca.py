"""Issuing N certificates from a local, real step-ca in one pass, then renewing them all.

Starts its own step-ca (tests/stepca_ca.py), runs `reconcile -m` as a whole process with
the CLI's default --workers, and prints certificates/s for both passes. It also checks that
the provisioner key is decrypted once per pass, not once per certificate, two ways: a
counter around `decrypt_provisioner_key` inside the reconcile process, and the CA's own
access log (`GET /provisioners` requests, which only the key's first use makes).

    .venv/bin/python bench/bench_stepca.py [--count 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from stepca_ca import build_harness, start_ca  # noqa: E402

# Runs the real CLI (`reconciler.cli.main`, its default arguments) with counters around the
# provisioner-key decryption and the provisioner listing; they come back as the last
# stderr line, so stdout stays the CLI's own.
LAUNCHER = r"""
import json, sys, threading, time
import reconciler.issuers.stepca_provisioner as provisioner
counts = {"decrypt": 0, "decrypt_seconds": 0.0, "provisioner_listings": 0}
lock = threading.Lock()
real_decrypt, real_list = provisioner.decrypt_provisioner_key, provisioner.Provisioner.listing
def decrypt(*a, **k):
    t = time.perf_counter()
    try:
        return real_decrypt(*a, **k)
    finally:
        with lock:
            counts["decrypt"] += 1
            counts["decrypt_seconds"] += time.perf_counter() - t
def listing(self):
    with lock:
        counts["provisioner_listings"] += 1
    return real_list(self)
provisioner.decrypt_provisioner_key, provisioner.Provisioner.listing = decrypt, listing
from reconciler.cli import main
try:
    code = main(sys.argv[1:])
finally:
    sys.stderr.write("\nBENCH-COUNTS " + json.dumps(counts) + "\n")
sys.exit(code)
"""


def manifest(folder: Path, n: int, ca, password_file: Path) -> Path:
    issuer = {
        "type": "step-ca",
        "url": ca.url,
        "root": str(ca.root_path),
        "provisioner": ca.provisioner,
        "password_file": str(password_file),
    }
    entries = [
        {
            "common_name": f"h{i}.bench.example",
            "sans": [f"alt{i}.bench.example", f"10.{i // 62500}.{i // 250 % 250}.{i % 250}"],
            "cert_path": f"certs/h{i}.crt",
            "key_path": f"keys/h{i}.key",
            # 5m asked (6m granted with step-ca's 1m backdate); "99%" makes the next pass renew all
            "duration": "5m",
            "renew_before": "99%",
        }
        for i in range(n)
    ]
    path = folder / "certificate-manifest.json"
    path.write_text(json.dumps({"issuer": issuer, "certificates": entries}))
    return path


def run_pass(m: Path, state: Path, env_extra: dict) -> tuple[float, int, dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update(RECONCILER_STATE_DIR=str(state), PYTHONPATH=str(REPO), NO_COLOR="1", **env_extra)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "-m", str(m), "--detailed-exitcode"],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - started
    counts_line = [ln for ln in proc.stderr.splitlines() if ln.startswith("BENCH-COUNTS ")]
    counts = json.loads(counts_line[-1].split(" ", 1)[1]) if counts_line else {}
    if proc.returncode not in (0, 2):
        raise SystemExit(f"reconcile failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall, proc.returncode, counts, proc.stdout


def ca_requests(log_path: Path, offset: int) -> dict[str, int]:
    """Requests per path in the CA log since `offset` (step-ca logs `path=/1.0/sign status=201`)."""
    text = log_path.read_text(errors="replace")[offset:]
    out: dict[str, int] = {}
    for line in text.splitlines():
        for word in line.split():
            if word.startswith("path="):
                out[word[5:]] = out.get(word[5:], 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()
    n = args.count
    build_harness()
    with tempfile.TemporaryDirectory(prefix="bench-stepca-") as tmp:
        tmp = Path(tmp)
        ca = start_ca(tmp / "ca")
        try:
            folder, state = tmp / "site", tmp / "state"
            folder.mkdir()
            (tmp / "no-step").mkdir()
            password_file = tmp / "provisioner.pass"
            password_file.write_text(ca.password + "\n")
            password_file.chmod(0o600)
            m = manifest(folder, n, ca, password_file)
            env = {"STEPPATH": str(tmp / "no-step")}

            mark = len(ca.log_path.read_text(errors="replace"))
            wall, code, counts, _ = run_pass(m, state, env)
            assert code == 2, "the issue pass must make changes"
            reqs = ca_requests(ca.log_path, mark)
            issued = reqs.get("/1.0/sign", 0)
            print(
                f"issue pass: {n} certificates in {wall:.2f} s wall = {n / wall:.0f} certificates/s "
                f"(whole process, default --workers); CA saw {issued} POST /1.0/sign"
            )
            print(
                f"  provisioner key decrypted {counts.get('decrypt')} time(s) "
                f"({counts.get('decrypt_seconds', 0):.3f} s), provisioner list fetched "
                f"{counts.get('provisioner_listings')} time(s); "
                f"CA log: {reqs.get('/provisioners', 0)} GET /provisioners"
            )
            once = counts.get("decrypt") == 1 and reqs.get("/provisioners", 0) == 1
            print(f"  decrypted once per pass: {'yes' if once else 'NO'}")

            mark = len(ca.log_path.read_text(errors="replace"))
            wall, code, counts, _ = run_pass(m, state, env)
            assert code == 2, "the renew pass must make changes"
            reqs = ca_requests(ca.log_path, mark)
            renewed = reqs.get("/1.0/rekey", 0) + reqs.get("/1.0/renew", 0)
            print(
                f"renew pass: {n} certificates in {wall:.2f} s wall = {n / wall:.0f} certificates/s "
                f"(mTLS: {reqs.get('/1.0/rekey', 0)} POST /1.0/rekey, {reqs.get('/1.0/renew', 0)} /1.0/renew, "
                f"{reqs.get('/1.0/sign', 0)} /1.0/sign); provisioner key decrypted {counts.get('decrypt')} time(s)"
            )
            assert renewed == n, f"expected {n} mTLS renewals, CA saw {reqs}"
        finally:
            ca.stop()


if __name__ == "__main__":
    main()
