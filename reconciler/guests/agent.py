"""What a command run inside a guest reports. Pure: no I/O.

`qm guest exec` exits 0 whatever the command inside the VM did: the result is the agent's
JSON answer (`exitcode`, `exited`, `out-data`, `err-data`; `signal` when killed; only `pid`
when qm's --timeout ran out first). `pct exec` passes the command's exit status through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# what is kept of a command's stderr in a message: its last line says what went wrong
_ERR_CHARS = 300


@dataclass(frozen=True)
class GuestRun:
    """One command's result inside a guest."""

    exitcode: int | None  # None: it did not finish (qm's timeout) or was killed
    out: str = ""
    err: str = ""
    signal: int | None = None
    pid: int | None = None  # the agent's pid of a command still running when qm gave up

    @property
    def ok(self) -> bool:
        return self.exitcode == 0

    def describe(self) -> str:
        if self.pid is not None and self.exitcode is None:
            return f"did not finish before qm's --timeout (still running in the guest as pid {self.pid})"
        if self.signal is not None:
            return f"was killed by signal {self.signal} inside the guest"
        text = f"exitcode {self.exitcode} inside the guest"
        err = self.err.strip()
        return text + (f": {err[-_ERR_CHARS:]}" if err else "")


def parse_exec_answers(text: str) -> list[GuestRun]:
    """Every agent answer `qm guest exec` printed in `text` (a hook may run several), in order.
    Anything else in the output (the hook's own lines, qm's warnings) is skipped."""
    decoder = json.JSONDecoder()
    runs: list[GuestRun] = []
    at = text.find("{")
    while at != -1:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at = text.find("{", at + 1)
            continue
        if isinstance(value, dict) and ("exited" in value or "pid" in value):
            runs.append(run_of(value))
        at = text.find("{", end)
    return runs


def run_of(answer: dict) -> GuestRun:
    """One agent answer as a GuestRun."""
    out, err = str(answer.get("out-data", "")), str(answer.get("err-data", ""))
    if not answer.get("exited"):
        return GuestRun(None, out, err, pid=_int(answer.get("pid")))
    if "signal" in answer:
        return GuestRun(None, out, err, signal=_int(answer.get("signal")))
    code = _int(answer.get("exitcode"))
    return GuestRun(code if code is not None else -1, out, err)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def exec_hook_failure(command: str, output: str) -> str | None:
    """Why a post-renewal command that starts with `qm guest exec` failed inside its VM,
    judged from the answers it printed; None when every answer says the command succeeded
    (or it printed none: its output went elsewhere, and qm's own exit status stands)."""
    if not command.lstrip().startswith("qm guest exec"):
        return None
    failed = [r for r in parse_exec_answers(output) if not r.ok]
    return failed[0].describe() if failed else None
