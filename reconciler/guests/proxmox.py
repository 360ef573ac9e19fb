"""The Proxmox CLI client: `pct`, `qm` and `pvesh` run as subprocesses on the node.

A private key never appears on a command line, on the host or in the guest: containers get
files with `pct push` from a private temporary file on the host (`--perms`, `--user`,
`--group`: created mode 0 and chmod/chown'ed before a byte is written); VMs get them on the
agent's stdin (`qm guest exec --pass-stdin 1`), written by a shell inside under umask 077.
Commands in a VM are judged by the agent's JSON (reconciler.guests.agent), never by qm's
exit status, which is 0 whatever the command did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass

from reconciler.errors import ReconcilerError
from reconciler.guests.agent import GuestRun, run_of

# one call's limit: pct/qm start a Perl interpreter (a second or two on a busy node)
CALL_TIMEOUT = 60.0
# what qm waits for a command inside the VM (its --timeout); the call's own limit is longer
AGENT_TIMEOUT = 30
# `pct status` / `qm status`: running, stopped; qm also reports paused, prelaunch, ...
RUNNING = "running"


class GuestError(ReconcilerError):
    """A guest could not be reached or a command in it failed. `hint`: what to do."""


class GuestMissing(GuestError):
    """No guest with this id on this node (none at all, or it runs on another node)."""


@dataclass(frozen=True)
class Guest:
    id: str
    type: str  # "lxc" | "vm"

    @property
    def tool(self) -> str:
        return "pct" if self.type == "lxc" else "qm"

    def __str__(self) -> str:
        return f"{'container' if self.type == 'lxc' else 'VM'} {self.id}"


class ProxmoxCLI:
    """`env`: the environment the commands run with (tests put stand-ins first in PATH)."""

    def __init__(
        self, env: dict[str, str] | None = None, timeout: float = CALL_TIMEOUT, agent_timeout: int = AGENT_TIMEOUT
    ):
        self.env = env
        self.timeout = timeout
        self.agent_timeout = agent_timeout

    # ------------------------------------------------------------------ processes
    def _call(
        self, argv: list[str], stdin: bytes | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                start_new_session=True,  # a timeout kills pct/qm and whatever they started
            )
        except FileNotFoundError:
            raise GuestError(
                f"{argv[0]} is not installed here", "run the reconciler on the Proxmox node that runs the guest"
            ) from None
        try:
            out, err = proc.communicate(stdin, timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise GuestError(
                f"{' '.join(argv[:3])} did not answer within {timeout or self.timeout:.0f}s",
                "is the node overloaded or the guest hanging?",
            ) from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _checked(
        self, guest: Guest, argv: list[str], stdin: bytes | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        proc = self._call(argv, stdin, timeout)
        if proc.returncode != 0:
            raise _error_of(guest, argv, proc)
        return proc

    # ------------------------------------------------------------------ the guest
    def status(self, guest: Guest) -> str:
        """`running`, `stopped` (or another state qm reports). GuestMissing: not on this node."""
        out = self._checked(guest, [guest.tool, "status", guest.id]).stdout.decode(errors="replace")
        for line in out.splitlines():
            if line.startswith("status:"):
                return line.split(":", 1)[1].strip()
        raise GuestError(f"{guest.tool} status {guest.id} printed no status line: {out.strip()[:200]!r}")

    def agent_ping(self, guest: Guest) -> None:
        """Raises GuestError unless the VM's guest agent answers."""
        self._checked(guest, ["qm", "guest", "cmd", guest.id, "ping"])

    def run(
        self,
        guest: Guest,
        script: str,
        args: tuple[str, ...] = (),
        stdin: bytes | None = None,
        timeout: int | None = None,
    ) -> GuestRun:
        """`/bin/sh -c script sh args...` inside the guest. Arguments travel as argv, never
        spliced into the script; `stdin` (a key) travels on stdin."""
        command = ["/bin/sh", "-c", script, "sh", *args]
        if guest.type == "lxc":
            proc = self._checked(guest, ["pct", "exec", guest.id, "--", *command], stdin, timeout)
            return GuestRun(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
        limit = timeout or self.agent_timeout
        argv = ["qm", "guest", "exec", guest.id, "--timeout", str(limit)]
        if stdin is not None:
            argv += ["--pass-stdin", "1"]
        proc = self._checked(guest, [*argv, "--", *command], stdin, limit + self.timeout)
        return run_of(_parsed(f"qm guest exec {guest.id}", proc.stdout, dict))

    def push(self, guest: Guest, data: bytes, dest: str, user: str | None, group: str | None, mode: int) -> None:
        """`data` into the guest as `dest`, owned user:group (names looked up in the guest)
        with `mode`, never readable beyond `mode` while it is written."""
        if guest.type == "lxc":
            self._push_lxc(guest, data, dest, user, group, mode)
            return
        run = self.run(guest, _WRITE_STDIN, (dest, f"{user or ''}:{group or ''}", f"{mode:o}"), stdin=data)
        if not run.ok:
            raise GuestError(f"writing {dest} in {guest} failed: {run.describe()}", _owner_hint(user, group, run))

    def _push_lxc(self, guest: Guest, data: bytes, dest: str, user: str | None, group: str | None, mode: int) -> None:
        fd, path = tempfile.mkstemp(prefix="reconciler-push-")  # mode 0600: root's own
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            argv = ["pct", "push", guest.id, path, dest, "--perms", f"{mode:04o}"]
            argv += ["--user", user] if user else []
            argv += ["--group", group] if group else []
            self._checked(guest, argv)
        finally:
            os.unlink(path)

    # ------------------------------------------------------------------ the cluster
    def resources(self) -> list[dict]:
        """`pvesh get /cluster/resources --type vm`: every guest of the cluster with its node."""
        return self._json(["pvesh", "get", "/cluster/resources", "--type", "vm", "--output-format", "json"])

    def local_node(self) -> str:
        """The name of the node this runs on, as the cluster knows it."""
        for entry in self._json(["pvesh", "get", "/cluster/status", "--output-format", "json"]):
            if isinstance(entry, dict) and entry.get("type") == "node" and entry.get("local"):
                return str(entry.get("name"))
        raise GuestError("pvesh get /cluster/status names no local node", "is this a Proxmox VE node?")

    def _json(self, argv: list[str]) -> list:
        proc = self._call(argv)
        if proc.returncode != 0:
            raise GuestError(f"{' '.join(argv[:3])} failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
        return _parsed(" ".join(argv[:3]), proc.stdout, list)


# writes stdin to $1 under umask 077, then sets owner ($2, "user:group", either part empty)
# and mode ($3): the file is never readable by others while it holds part of a key
_WRITE_STDIN = """set -e
umask 077
rm -f -- "$1"
cat > "$1"
case "$2" in :) ;; *:) chown -- "${2%:}" "$1" ;; :*) chgrp -- "${2#:}" "$1" ;; *) chown -- "$2" "$1" ;; esac
chmod -- "$3" "$1"
"""


def _parsed(what: str, stdout: bytes, kind: type):
    """The JSON `what` printed, of type `kind` (an agent's answer, pvesh's list)."""
    try:
        data = json.loads(stdout)
    except ValueError:
        raise GuestError(f"{what} printed no JSON: {stdout[:200]!r}") from None
    if not isinstance(data, kind):
        raise GuestError(f"{what} printed {type(data).__name__}, not a JSON {'object' if kind is dict else 'array'}")
    return data


def _owner_hint(user: str | None, group: str | None, run: GuestRun) -> str:
    if "unknown user" in run.err or "unknown group" in run.err or "invalid" in run.err:
        return f"the owner {user or ''}:{group or ''} must exist inside the guest"
    return ""


def _error_of(guest: Guest, argv: list[str], proc: subprocess.CompletedProcess) -> GuestError:
    said = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace").strip()
    said = said.splitlines()[-1] if said else f"exit status {proc.returncode}"
    what = " ".join(argv[:2])
    if "does not exist" in said and "Configuration file" in said:
        return GuestMissing(
            f"{guest} does not exist on this node ({said})", "check guest.id, or whether it migrated to another node"
        )
    if "failed to get uid" in said or "failed to get gid" in said:
        return GuestError(f"{what} into {guest} failed: {said}", "the owner must exist inside the guest")
    if "guest agent" in said:
        return GuestError(
            f"{guest}: {said}", "start qemu-guest-agent inside the VM and enable the agent option (agent: 1)"
        )
    return GuestError(f"{what} {guest.id} failed: {said}")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
