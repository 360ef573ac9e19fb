"""The one duration parser: "90s", "90m", "12h", "2d", "1w", "1h30m"."""

from __future__ import annotations

import re
from datetime import timedelta
from functools import lru_cache

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"^(?:\d+[smhdw])+$")
MAX_SECONDS = 100 * 366 * 86400


class DurationError(ValueError):
    pass


@lru_cache(maxsize=256)  # a manifest repeats the same few strings thousands of times
def parse_duration(text: str) -> timedelta:
    if not isinstance(text, str) or not _WHOLE.match(text):
        raise DurationError(
            f"{text!r} is not a duration; write a number and a unit, e.g. \"90m\", \"12h\", \"2d\" or \"1h30m\""
        )
    parts = _PART.findall(text)
    # a number no certificate lifetime needs (and one Python's int() or timedelta refuses)
    if any(len(n.lstrip("0")) > 12 for n, _ in parts):
        raise DurationError(
            f"{text[:40]!r}{'…' if len(text) > 40 else ''} is longer than any certificate lives; use at most 100 years"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds > MAX_SECONDS:
        raise DurationError(
            f"{text[:40]!r}{'…' if len(text) > 40 else ''} is longer than any certificate lives; use at most 100 years"
        )
    if seconds <= 0:
        raise DurationError(f"{text!r} is zero; a duration must be longer than that")
    return timedelta(seconds=seconds)


@lru_cache(maxsize=256)
def parse_share(text: str) -> float:
    """ "33%" → 0.33; a share of a certificate's lifetime, strictly between 0 and 100 %."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", text) if isinstance(text, str) else None
    if not m or not 0 < float(m.group(1)) < 100:
        raise DurationError(f"{text!r} is not a share of the lifetime; write e.g. \"33%\" (between 0 and 100)")
    return float(m.group(1)) / 100


def format_duration(delta: timedelta) -> str:
    """Compact, two most significant units: 3h12m, 2d4h, 45s; negatives get a minus."""
    total = int(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size or (unit == "s" and not parts):
            parts.append(f"{total // size}{unit}")
            total %= size
        if len(parts) == 2:
            break
    return sign + "".join(parts)
