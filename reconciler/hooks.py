"""Running post-renewal commands: /bin/sh -c, own process group, timeout, captured output."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

from reconciler.faults import fault_point
from reconciler.model import DesiredCert
from reconciler.sans import ordered

TAIL_LINES = 20
KILL_GRACE = 2.0


@dataclass(frozen=True)
class HookOutcome:
    command: str
    certificates: tuple[str, ...]
    ok: bool
    returncode: int | None
    timed_out: bool
    output_tail: tuple[str, ...]
    seconds: float
    refused: str | None = None  # why it was not run at all

    def describe(self) -> str:
        if self.refused:
            return f"was not run: {self.refused}"
        if self.timed_out:
            return "timed out and was killed"
        if self.returncode is not None and self.returncode < 0:
            return f"was killed by signal {-self.returncode}"
        return "succeeded" if self.ok else f"failed with exit code {self.returncode}"


def hook_environment(certs: list[DesiredCert], actions: dict[str, str], ca_path_default: str = "") -> dict[str, str]:
    """The certificate the command runs for is the first; all are listed in RECONCILER_CERTIFICATES."""
    first = certs[0]
    env = dict(os.environ)
    env.update(
        RECONCILER_COMMON_NAME=first.common_name,
        RECONCILER_CERT_PATH=str(first.cert_path),
        RECONCILER_KEY_PATH=str(first.key_path),
        RECONCILER_CA_PATH=str(first.ca_path) if first.ca_path else ca_path_default,
        RECONCILER_SANS=",".join(ordered(first.sans)),
        RECONCILER_GUEST_ID=first.guest_id or "",
        RECONCILER_GUEST_TYPE=first.guest_type or "",
        RECONCILER_ACTION=actions.get(first.name, ""),
        RECONCILER_CERTIFICATES="\n".join(c.name for c in certs),
    )
    return env


def run_hook(command: str, certs: list[DesiredCert], actions: dict[str, str], timeout: float, cwd=None) -> HookOutcome:
    started = time.monotonic()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=hook_environment(certs, actions),
        cwd=cwd,
        start_new_session=True,  # its own process group, so a timeout kills everything it started
    )
    fault_point("hook_started")
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:  # something escaped the group and holds the pipe
            out = b""
    text = out.decode("utf-8", "replace") if out else ""
    tail = tuple(text.splitlines()[-TAIL_LINES:])
    ok = not timed_out and proc.returncode == 0
    return HookOutcome(command, tuple(c.name for c in certs), ok, proc.returncode, timed_out, tail, time.monotonic() - started)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                # the leader is gone; make sure nothing it started lingers
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        except subprocess.TimeoutExpired:
            continue

