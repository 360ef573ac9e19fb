"""Backoff for `--watch`: when to try again after a failure. Decides times only.

Per key (a certificate name, or "the CA"): 10 s after the first failure, doubling up to
10 min, each delay jittered by ±20 % so certificates that failed together do not retry
together; a success forgets the key. Times are wall-clock seconds (time.time()).
"""

from __future__ import annotations

import random

BASE = 10.0
CAP = 600.0
JITTER = 0.2


def delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `failures`-th failure in a row (failures >= 1)."""
    raw = min(CAP, BASE * 2 ** max(0, failures - 1))
    spread = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return min(CAP, max(BASE, raw * spread))


class Backoff:
    def __init__(self, rng: random.Random | None = None):
        self.failures: dict[str, int] = {}
        self.until: dict[str, float] = {}
        self._rng = rng or random.Random()

    def failed(self, key: str, now: float) -> float:
        """Record a failure; returns the delay before the next attempt."""
        n = self.failures.get(key, 0) + 1
        self.failures[key] = n
        wait = delay(n, self._rng)
        self.until[key] = now + wait
        return wait

    def succeeded(self, key: str) -> bool:
        """Forget `key`; True if it was backing off."""
        self.until.pop(key, None)
        return self.failures.pop(key, None) is not None

    def forget(self, keys) -> None:
        for key in keys:
            self.succeeded(key)

    def retain(self, keys: set[str]) -> None:
        for key in [k for k in self.failures if k not in keys]:
            self.succeeded(key)

    def waiting(self, now: float) -> frozenset[str]:
        """Keys whose next attempt is still in the future."""
        return frozenset(k for k, t in self.until.items() if t > now)

    def active(self, key: str) -> bool:
        return key in self.failures

    def next_at(self, now: float) -> float | None:
        """The earliest future retry time, if any."""
        future = [t for t in self.until.values() if t > now]
        return min(future) if future else None

    def clear(self) -> None:
        self.failures.clear()
        self.until.clear()
