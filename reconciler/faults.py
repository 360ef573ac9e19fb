"""Fault injection for the crash-consistency tests. Inert unless RECONCILER_FAULT_INJECT is set.

`RECONCILER_FAULT_INJECT=<point>` SIGKILLs the process the first time it reaches
`fault_point("<point>")`; `<point>@N` the N-th time (counted per process, across threads),
so a test can kill a 50-certificate pass after its 1st, 17th or 50th key write.
"""

from __future__ import annotations

import os
import threading

FAULT_ENV = "RECONCILER_FAULT_INJECT"

_counts: dict[str, int] = {}
_lock = threading.Lock()


def fault_point(name: str) -> None:
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
