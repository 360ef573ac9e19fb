"""Shared bench helpers: manifests of N certificates, and timing a whole `reconcile` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def manifest(folder: Path, n: int, **extra) -> Path:
    entries = [
        {
            "common_name": f"h{i}.bench.example",
            "sans": [f"alt{i}.bench.example", f"10.{i // 62500}.{i // 250 % 250}.{i % 250}"],
            "cert_path": f"certs/{i // 1000}/h{i}.crt",
            "key_path": f"keys/{i // 1000}/h{i}.key",
            **extra,
        }
        for i in range(n)
    ]
    path = folder / "certificate-manifest.json"
    path.write_text(json.dumps(entries))
    return path


@dataclass(frozen=True)
class Measured:
    """One whole process, as wait4 saw it."""

    wall: float  # seconds
    cpu: float  # seconds, user + system, all threads
    rss: int  # peak RSS, KiB
    blocks: int  # blocks written (ru_oublock)
    code: int


def measure(argv: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0, 2)) -> Measured:
    """Run ARGV to the end; stops the bench with its stderr when it exits outside `ok`."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # stderr is read before the wait so a chatty process cannot block on a full pipe
    err = proc.stderr.read().decode() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err}")
    return Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, usage.ru_oublock, proc.returncode)


# the checkout's compiled modules, outside the checkout: see reconcile()
PYCACHE = Path(tempfile.gettempdir()) / f"reconciler-bench-pycache-{os.getuid()}"


def reconcile(args: list[str], state_dir: Path) -> Measured:
    """`python -m reconciler ARGS` with this checkout on the path and the embedded CA."""
    # the bare-array manifests of make_manifest use the embedded CA on purpose
    env = dict(
        os.environ, RECONCILER_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO), NO_COLOR="1", RECONCILER_ISSUER="local"
    )
    # measured as installed: pip compiles a package when it installs it, as it did every
    # other module both sides import. A checkout run under PYTHONDONTWRITEBYTECODE would
    # compile all of the reconciler's source in every measured run (about 0.12 s of CPU)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return measure([sys.executable, "-m", "reconciler", *args], env)


def run(args: list[str], state_dir: Path) -> tuple[float, int, int, int]:
    """Run `python -m reconciler ARGS`; returns (wall seconds, exit code, peak RSS KiB, blocks written)."""
    m = reconcile(args, state_dir)
    return m.wall, m.code, m.rss, m.blocks


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]
