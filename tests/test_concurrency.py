"""Two `reconcile` processes and a `reconcile --watch`, started together over one manifest.

Every pass holds the state folder's lock, so the three serialise: exactly one of them
makes each change, the others find nothing left to do. inotify on the certificate folder
proves it from the outside: each key and certificate is renamed into place exactly once
per change (never twice in a second for the same change), the hook runs once per change,
and every process exits 0 (the watcher on SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import REPO, cert_sans, figure, write_manifest

N = 20


class Renames:
    """Every rename into the watched folder (how write_atomic lands a file), with its time."""

    def __init__(self, folder: Path):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self.events: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(FileSystemEventHandler):
            def on_moved(self, event):
                with outer.lock:
                    outer.events.append((time.monotonic(), os.path.basename(event.dest_path)))

        self.observer = Observer()
        self.observer.schedule(Handler(), str(folder), recursive=False)
        self.observer.start()

    def take(self) -> list[tuple[float, str]]:
        time.sleep(0.5)  # let inotify deliver what is in flight
        with self.lock:
            out, self.events = self.events, []
        return out

    def stop(self):
        self.observer.stop()
        self.observer.join()


def env_for(state: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    # RECONCILER_ISSUER: the bare-array manifests here use the embedded CA on purpose
    env.update(PYTHONPATH=str(REPO), NO_COLOR="1", RECONCILER_STATE_DIR=str(state), RECONCILER_ISSUER="local")
    return env


def manifest(out: Path, hook_log: Path, version: int) -> list:
    return [
        {
            "common_name": f"c{i}.race.test",
            "sans": [f"v{version}.c{i}.race.test"],
            "cert_path": str(out / f"c{i}.crt"),
            "key_path": str(out / f"c{i}.key"),
            "post_renewal_command": f"echo $$ >> {hook_log}",
        }
        for i in range(N)
    ]


def one_shot(m: Path, state: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", "-m", str(m), "--output", "json", "--lock-timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(state),
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_two_passes_and_a_watcher_serialise_and_write_each_file_once_per_change(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    hook_log = tmp_path / "hooks"
    m = write_manifest(tmp_path / "m.json", manifest(out, hook_log, 0))
    renames = Renames(out)
    watch_err = tmp_path / "watch.log"
    figures = []
    try:
        with open(watch_err, "w") as err:
            # all three at once; the watcher also reconciles on start
            procs = [one_shot(m, state), one_shot(m, state)]
            watcher = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "-m", str(m), "--watch", "--log-format", "json", "-v"],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
                env=env_for(state),
            )
            results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
            assert [r[2] for r in results] == [0, 0], [r[1][-2000:] for r in results]
            wait_for(lambda: '"pass (' in watch_err.read_text(), 60, "the watcher's first pass")

            for version in range(3):
                if version:
                    # a change: the watcher sees the save while two more passes start with it
                    write_manifest(m, manifest(out, hook_log, version))
                    procs = [one_shot(m, state), one_shot(m, state)]
                    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
                    assert [r[2] for r in results] == [0, 0], [r[1][-2000:] for r in results]
                    wait_for(
                        lambda version=version: all(
                            f"v{version}.c{i}.race.test" in cert_sans(out / f"c{i}.crt") for i in range(N)
                        ),
                        60,
                        "the change",
                    )
                time.sleep(1.5)  # the watcher's reaction to everybody's writes, if it had one, lands here
                events = renames.take()
                per_file = Counter(name for _t, name in events if not name.startswith("."))
                assert set(per_file) == {f"c{i}.{ext}" for i in range(N) for ext in ("crt", "key")}, per_file
                twice = {name: n for name, n in per_file.items() if n != 1}
                assert not twice, f"change {version}: written more than once: {twice}"
                changed_by = [r for r in results if json.loads(r[0])["changes"]]
                # the lock let one pass (a one-shot or the watcher) make the change; the rest saw it made
                assert len(changed_by) <= 1, f"change {version}: {len(changed_by)} one-shot passes both made it"
                hooks = hook_log.read_text().splitlines()
                assert len(hooks) == version + 1, f"the hook ran {len(hooks)} times for {version + 1} changes"
                figures.append(
                    {"change": version, "renames": sum(per_file.values()), "one_shots_that_changed": len(changed_by)}
                )
            assert watcher.poll() is None, "the watcher is still running"
            watcher.send_signal(signal.SIGTERM)
            assert watcher.wait(timeout=30) == 0
    finally:
        renames.stop()
        if watcher.poll() is None:
            watcher.kill()
    log = [json.loads(line) for line in watch_err.read_text().splitlines() if line.startswith("{")]
    assert not [e for e in log if e["level"] == "error"], log
    figure(f"concurrency: {json.dumps(figures)}")
