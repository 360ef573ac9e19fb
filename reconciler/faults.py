"""Fault injection for the crash-consistency and race tests. Inert unless
RECONCILER_FAULT_INJECT or RECONCILER_FAULT_HOLD is set.

`RECONCILER_FAULT_INJECT=<point>` SIGKILLs the process the first time it reaches
`fault_point("<point>")`; `<point>@N` the N-th time (counted per process, across threads),
so a test can kill a 50-certificate pass after its 1st, 17th or 50th key write.

`RECONCILER_FAULT_HOLD=<point>:<folder>` pauses at every `fault_point("<point>")`: the N-th
arrival creates `<folder>/<point>.N.held` and waits (at most a minute) for the test to create
`<folder>/<point>.N.go`, so a test can change a file at exactly that moment of a pass.
"""

from __future__ import annotations

import os
import threading

FAULT_ENV = "RECONCILER_FAULT_INJECT"
HOLD_ENV = "RECONCILER_FAULT_HOLD"
HOLD_LIMIT = 60.0

_counts: dict[str, int] = {}
_lock = threading.Lock()


def fault_point(name: str) -> None:
    if os.environ.get(HOLD_ENV):
        _hold(name, os.environ[HOLD_ENV])
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == (int(nth) if nth.isdigit() else 1)
    if hit:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _hold(name: str, spec: str) -> None:
    point, _, folder = spec.partition(":")
    if point != name or not folder:
        return
    with _lock:
        _counts["hold:" + name] = n = _counts.get("hold:" + name, 0) + 1
    import time

    base = os.path.join(folder, f"{name}.{n}")
    with open(base + ".held", "w"):
        pass
    deadline = time.monotonic() + HOLD_LIMIT
    while not os.path.exists(base + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)
