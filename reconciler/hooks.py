"""Running post-renewal commands: /bin/sh -c, own process group, timeout, captured output.

The output goes to an unnamed temporary file, not a pipe: a command that starts a daemon
in the background (which keeps the inherited stdout open) has finished when its shell
exits, not when every descendant closes the pipe. The output is redacted (private-key
PEM blocks, the provisioner password) before anything logs or stores it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from reconciler.defaults import ENVIRON
from reconciler.faults import fault_point
from reconciler.guests.agent import exec_hook_failure
from reconciler.model import DesiredCert
from reconciler.sans import ordered

TAIL_LINES = 20
KILL_GRACE = 2.0
TAIL_BYTES = 64 * 1024  # what is kept of a chatty command's output: the tail is what matters
REDACTED = "[REDACTED]"

# a block, or a block cut off at the end of the output (a command that printed half a key)
_KEY_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)
# the end of a block whose beginning is before what was kept
_KEY_TAIL = re.compile(r"\A(?:(?!-----BEGIN ).)*?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.S)
# a marker left over when stdout and stderr interleave two copies of one key
_KEY_MARKER = re.compile(r"-----(?:BEGIN|END) [A-Z0-9 ]*PRIVATE KEY-----")
# shorter base64 lines (a key's last one) are too likely to occur in ordinary output
_MIN_BODY_LINE = 16


def redact(text: str, secrets: tuple[bytes, ...] = ()) -> str:
    """`text` without private keys (whole, encrypted, cut off at either end) or `secrets`."""
    text = _KEY_TAIL.sub(REDACTED, text)
    text = _KEY_BLOCK.sub(REDACTED, text)
    text = _KEY_MARKER.sub(REDACTED, text)
    for secret in secrets:
        value = secret.decode("utf-8", "replace")
        if value:
            text = text.replace(value, REDACTED)
    return text


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
    # exited 0, but a `serve` endpoint still presents the old certificate (reconciler.probe)
    not_taken: str | None = None
    inside: str | None = None  # how it failed inside a guest while qm itself exited 0

    def describe(self) -> str:
        if self.refused:
            return f"was not run: {self.refused}"
        if self.not_taken:
            return f"exited 0 but the service did not take the new certificate: {self.not_taken}"
        if self.inside:
            return f"failed: {self.inside} (qm guest exec exited 0)"
        if self.timed_out:
            return "timed out and was killed"
        if self.returncode is not None and self.returncode < 0:
            return f"was killed by signal {-self.returncode}"
        return "succeeded" if self.ok else f"failed with exit code {self.returncode}"


def hook_environment(certs: list[DesiredCert], actions: dict[str, str], ca_path_default: str = "") -> dict[str, str]:
    """The certificate the command runs for is the first; all are listed in RECONCILER_CERTIFICATES."""
    first = certs[0]
    env = dict(ENVIRON)  # the command sees the reconciler's own environment, plus what it runs for
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


def run_hook(
    command: str,
    certs: list[DesiredCert],
    actions: dict[str, str],
    timeout: float,
    cwd=None,
    secrets: tuple[bytes, ...] = (),
) -> HookOutcome:
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:  # unnamed (O_TMPFILE), mode 0600: nobody else can open it
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=hook_environment(certs, actions),
            cwd=cwd,
            start_new_session=True,  # its own process group, so a timeout kills everything it started
        )
        fault_point("hook_started")
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        text = _tail(out)
    tail = tuple(redact(text, secrets + _key_bodies(certs)).splitlines()[-TAIL_LINES:])
    # qm exits 0 whatever the command in the VM did: its JSON answer says
    inside = None if timed_out or proc.returncode != 0 else exec_hook_failure(command, text)
    if inside:
        inside = redact(inside, secrets + _key_bodies(certs))
    ok = not timed_out and proc.returncode == 0 and inside is None
    return HookOutcome(
        command,
        tuple(c.name for c in certs),
        ok,
        proc.returncode,
        timed_out,
        tail,
        time.monotonic() - started,
        inside=inside,
    )


def _key_bodies(certs: list[DesiredCert]) -> tuple[bytes, ...]:
    """The base64 lines of the keys this hook runs for: a command that prints a key without
    its BEGIN/END lines (grep -v -- -----) leaks it just the same."""
    lines: list[bytes] = []
    for c in certs:
        try:
            with open(c.key_path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        lines += [
            line.strip()
            for line in data.splitlines()
            if len(line.strip()) >= _MIN_BODY_LINE and not line.startswith(b"-----")
        ]
    return tuple(lines)


def _tail(out) -> str:
    size = os.fstat(out.fileno()).st_size
    out.seek(max(0, size - TAIL_BYTES))
    data = out.read(TAIL_BYTES)
    return data.decode("utf-8", "replace")


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


def secrets_of(spec) -> tuple[bytes, ...]:
    """What must never appear in stored hook output besides keys: the provisioner password."""
    if getattr(spec, "password_file", None) is None:
        return ()
    try:
        password = spec.password_file.read_bytes().rstrip(b"\r\n")
    except OSError:
        return ()
    return (password,) if password else ()
