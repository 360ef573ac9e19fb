"""Shared test helpers: run the real CLI, snapshot a tree, read certificates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from cryptography import x509

REPO = Path(__file__).resolve().parent.parent

# counts, timings and sizes the tests measured; conftest prints them at the end of the run
FIGURES: list[str] = []


def figure(text: str) -> None:
    """Record one figure for the end-of-run summary, labelled with the running test."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]
    FIGURES.append(f"{test}: {text}" if test else text)


def reconcile(
    *args: str,
    state_dir: Path | None = None,
    env: dict | None = None,
    timeout: float = 120,
    check: int | None = None,
    cwd=None,
    wrap: tuple[str, ...] = (),
):
    """Run `python -m reconciler ARGS` as a real subprocess; returns CompletedProcess.
    `wrap`: a command to run it under, e.g. ("faketime", "-f", "+2d").

    Bare-array manifests get the embedded CA on purpose (RECONCILER_ISSUER=local, which
    object manifests ignore); a test that is about choosing passes it as None, which
    removes a variable."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    full_env["NO_COLOR"] = "1"
    full_env["PYTHONPATH"] = str(REPO)
    full_env["RECONCILER_ISSUER"] = "local"
    if state_dir is not None:
        full_env["RECONCILER_STATE_DIR"] = str(state_dir)
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.run(
        [*wrap, sys.executable, "-m", "reconciler", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )
    if check is not None:
        assert proc.returncode == check, (
            f"exit {proc.returncode}, want {check}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def entry(out: Path, name: str, **extra) -> dict:
    """One manifest entry named `name`, its files in `out`; `extra` adds or overrides fields."""
    return {
        "name": name,
        "common_name": f"{name}.example",
        "cert_path": str(out / f"{name}.crt"),
        "key_path": str(out / f"{name}.key"),
        **extra,
    }


def write_manifest(path: Path, document) -> Path:
    path.write_text(json.dumps(document, indent=2))
    return path


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: (inode, mtime_ns, mode, uid, gid, content)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            content = p.read_bytes() if p.is_file() else None
            out[str(p)] = (st.st_ino, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid, content)
    return out


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def cert_sans(path: Path) -> set[str]:
    ext = load_cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = {str(v) for v in ext.get_values_for_type(x509.DNSName)}
    return dns | {str(v) for v in ext.get_values_for_type(x509.IPAddress)}


def after_issuer(stdout: str) -> str:
    """A command's output without its first line, which names the issuer (checked here)."""
    first, _, rest = stdout.partition("\n")
    assert first.startswith("issuer: "), f"the first line does not name the issuer:\n{stdout}"
    return rest


def run_cli_forked(
    log: Path, argv: list[str], fault: str | None = None, kill_after: float | None = None
) -> tuple[int, str, str]:
    """Fork, run reconciler.cli.main(argv) in the child; SIGKILL at `fault` or after `kill_after` s.
    In-process, so a fault point is hit exactly where the code
    reaches it. `log`: the folder for stdout and stderr. Returns (exit status, or -signal; stdout; stderr)."""
    out, err = log / "stdout", log / "stderr"
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            os.environ.pop("RECONCILER_FAULT_INJECT", None)
            if fault:
                os.environ["RECONCILER_FAULT_INJECT"] = fault
            os.environ["NO_COLOR"] = "1"
            sys.stdout = open(out, "w")
            sys.stderr = open(err, "w")
            fd = os.open(os.devnull, os.O_RDWR)
            os.dup2(fd, 0)
            from reconciler.cli import main

            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return rc, out.read_text(), err.read_text()
