"""Benchmark `reconcile --watch` (issue 5). Prints figures; asserts nothing.

    .venv/bin/python bench/bench_watch.py                      # the full run (a few minutes)
    .venv/bin/python bench/bench_watch.py --idle-seconds 10 --big 2000   # quicker

Figures:
  * save → certificate latency: with --certs certificates under management, rename a
    manifest that adds one entry over the old one; time until that certificate is on disk
    (p50 / p95 / max over --saves saves);
  * idle CPU of the watcher over --idle-seconds (utime + stime from /proc);
  * with --big certificates: RSS of the watcher after its first pass, and the duration
    of a resync pass with nothing to do (as the watcher logs it: manifest stat, observe,
    plan, status, metrics).

Everything runs against the embedded CA in a temporary folder; the certificates are issued
by a one-shot `reconcile` first, which is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def entry(i: int | str, out: Path) -> dict:
    return {
        "name": f"c{i}",
        "common_name": f"h{i}.bench.internal",
        "sans": [f"alt{i}.bench.internal"],
        "cert_path": str(out / "certs" / f"c{i}.crt"),
        "key_path": str(out / "private" / f"c{i}.key"),
        "duration": "720h",
        "renew_before": "240h",
    }


def write_manifest(path: Path, entries: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"issuer": {"type": "local"}, "certificates": entries}, indent=1))
    os.rename(tmp, path)  # the way vim and sed -i save


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_") and k != "NOTIFY_SOCKET"}
    e["PYTHONPATH"] = str(REPO)
    return e


def one_shot(manifest: Path, state: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "reconciler", "-m", str(manifest), "--state-dir", str(state), "--workers", "4"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env(),
    )


class Watcher:
    def __init__(self, manifest: Path, state: Path, log: Path, *extra: str):
        self.log_path = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reconciler",
                "-m",
                str(manifest),
                "--state-dir",
                str(state),
                "--watch",
                "-vv",
                *extra,
            ],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=env(),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log()[start:])
            if m:
                return m
            if self.proc.poll() is not None:
                raise SystemExit(f"watcher exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise SystemExit(f"timed out waiting for {pattern!r}:\n{self.log()[-3000:]}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def rss_mb(self) -> tuple[float, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) / 1024  # noqa: E731
        return get("VmRSS"), get("VmHWM")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        self._fh.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def bench_latency_and_idle(root: Path, n: int, saves: int, idle_seconds: float) -> None:
    out, state, manifest = root / "out", root / "state", root / "certificate-manifest.json"
    entries = [entry(i, out) for i in range(n)]
    write_manifest(manifest, entries)
    t = time.monotonic()
    one_shot(manifest, state)
    print(f"setup: {n} certificates issued by a one-shot run in {time.monotonic() - t:.1f}s")

    w = Watcher(manifest, state, root / "watch.log", "--resync", "1h")
    w.wait_log(r"pass \(start\)", 120)
    latencies = []
    for i in range(saves):
        time.sleep(0.5)  # each save on its own: the previous pass and its echo events are over
        entries.append(entry(f"new{i}", out))
        target = out / "certs" / f"cnew{i}.crt"
        started = time.monotonic()
        write_manifest(manifest, entries)
        deadline = started + 10
        while not target.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"save {i}: no certificate after 10 s\n{w.log()[-3000:]}")
            time.sleep(0.002)
        latencies.append(time.monotonic() - started)
    ms = [x * 1000 for x in latencies]
    print(
        f"save → certificate on disk, {n} certificates, {saves} saves: "
        f"p50 {percentile(ms, 0.5):.0f} ms, p95 {percentile(ms, 0.95):.0f} ms, max {max(ms):.0f} ms "
        f"(min {min(ms):.0f} ms, mean {statistics.mean(ms):.0f} ms)"
    )

    time.sleep(2)
    before, t0 = w.cpu_seconds(), time.monotonic()
    time.sleep(idle_seconds)
    used, wall = w.cpu_seconds() - before, time.monotonic() - t0
    print(f"idle CPU over {wall:.0f}s with {n + saves} certificates: {100 * used / wall:.2f} % ({used:.2f} s of CPU)")
    w.stop()


def bench_big(root: Path, n: int, resyncs: int) -> None:
    out, state, manifest = root / "out", root / "state", root / "certificate-manifest.json"
    write_manifest(manifest, [entry(i, out) for i in range(n)])
    t = time.monotonic()
    one_shot(manifest, state)
    print(f"setup: {n} certificates issued by a one-shot run in {time.monotonic() - t:.1f}s")

    w = Watcher(manifest, state, root / "watch-big.log", "--resync", "2s")
    first = w.wait_log(r"pass \(start\): .*?([\d.]+)s\n", 300)
    print(
        "first pass of the watcher (manifest load and validation, observation cache from disk): "
        f"{float(first.group(1)):.2f}s"
    )
    durations = []
    offset = first.end()
    for _ in range(resyncs):
        m = w.wait_log(r"pass \(resync\): 0 changed, 0 failed, .*?([\d.]+)s\n", 30, offset)
        offset += m.end()
        durations.append(float(m.group(1)))
    rss, peak = w.rss_mb()
    print(
        f"{n} certificates: RSS {rss:.0f} MB (peak {peak:.0f} MB); resync pass with nothing to do: "
        f"median {statistics.median(durations):.3f}s, max {max(durations):.3f}s over {len(durations)} passes"
    )
    w.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--certs", type=int, default=1000)
    ap.add_argument("--saves", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--big", type=int, default=10000, help="certificates for the RSS / resync figures (0: skip)")
    ap.add_argument("--resyncs", type=int, default=5)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        bench_latency_and_idle(root / "a", args.certs, args.saves, args.idle_seconds)
        if args.big:
            (root / "b").mkdir()
            bench_big(root / "b", args.big, args.resyncs)


if __name__ == "__main__":
    main()
