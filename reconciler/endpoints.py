"""Serve endpoints as values: where a service should present a certificate (from the
manifest's `serve`), and what one presented when probed. Pure: no I/O, no clock.

`reconciler.probe` fills `Served` in; the drift chain compares it with the file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

STARTTLS = ("smtp", "imap", "postgres")


@dataclass(frozen=True)
class Endpoint:
    connect: str  # as written: "127.0.0.1:443", "[::1]:5432", "mail.internal:25"
    host: str  # without brackets
    port: int
    server_name: str  # sent as SNI (not sent when it is an IP address)
    starttls: str | None = None  # one of STARTTLS: upgrade a plain connection first


class ConnectError(ValueError):
    """A `connect` value that names no host and port; the message says what is wrong."""


def parse_connect(text: str) -> tuple[str, int]:
    """ "host:port", "1.2.3.4:port" or "[v6]:port" → (host, port). Raises ConnectError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConnectError(f'{text!r} has no port; write host:port, e.g. "127.0.0.1:443" or "[::1]:443"')
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConnectError(f'{text!r}: an IPv6 address goes in brackets, e.g. "[::1]:443"')
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConnectError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ConnectError(f'{text!r}: an IPv6 address goes in brackets, e.g. "[{host}]:{port_text}"')
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConnectError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


@dataclass(frozen=True)
class Served:
    """What one endpoint presented: its leaf's facts, or why there was none (`error`)."""

    connect: str
    serial: str | None = None
    not_after: datetime | None = None
    public_key_id: str | None = None
    error: str | None = None  # unreachable, refused, timed out, no TLS: its own state
    sans: tuple[str, ...] = ()  # the leaf's SANs, as written (DNS names, then addresses)

    @property
    def reachable(self) -> bool:
        return self.error is None

    def presents(self, serial: str, public_key_id: str) -> bool:
        return self.serial == serial and self.public_key_id == public_key_id

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.connect} unreachable: {self.error}"
        return f"{self.connect} serves serial {_short(self.serial)}, expiring {self.not_after:%Y-%m-%d %H:%MZ}"


def _short(serial: str | None) -> str:
    """Enough of a serial to tell two apart in a sentence."""
    s = (serial or "?").upper()
    return s if len(s) <= 12 else s[:10] + "…"


def stale_reason(served: tuple[Served, ...], facts) -> str | None:
    """Why the service did not take the certificate in the file (`facts`: its serial,
    public_key_id, not_after): each reachable endpoint presenting another leaf, in words.
    None: every reachable one presents it (an unreachable one is its own state)."""
    stale = [s for s in served if s.reachable and not s.presents(facts.serial, facts.public_key_id)]
    return (
        "; ".join(
            f"{s.connect} still serves serial {_short(s.serial)}, expiring {s.not_after:%Y-%m-%d %H:%MZ}; "
            f"the file holds serial {_short(facts.serial)}, expiring {facts.not_after:%Y-%m-%d %H:%MZ}"
            for s in stale
        )
        or None
    )


def endpoints_of(
    serve: list[dict], common_name: str, at: Callable[[str], str] = str
) -> tuple[tuple[Endpoint, ...], list[tuple[str, str]]]:
    """A manifest entry's `serve` list (schema-checked) → its endpoints, and the problems as
    (JSON path, message); `at` turns a field under the entry ("serve[1].connect") into its path."""
    endpoints: list[Endpoint] = []
    problems: list[tuple[str, str]] = []
    seen: dict[tuple[str, int, str | None], int] = {}
    for i, item in enumerate(serve):
        try:
            host, port = parse_connect(item["connect"])
        except ConnectError as exc:
            problems.append((at(f"serve[{i}].connect"), str(exc)))
            continue
        starttls = item.get("starttls")
        key = (host.lower(), port, starttls)
        if key in seen:
            problems.append(
                (
                    at(f"serve[{i}].connect"),
                    f"{item['connect']!r} is already serve[{seen[key]}]; list each endpoint once",
                )
            )
            continue
        seen[key] = i
        endpoints.append(Endpoint(item["connect"], host, port, item.get("server_name", common_name), starttls))
    return tuple(endpoints), problems


# --------------------------------------------------------------------------- per-endpoint state

CURRENT, STALE, UNREACHABLE = "current", "stale", "unreachable"
# the certificate's state when its files need nothing but a service does not present them
ENDPOINT_UNREACHABLE, SERVICE_STALE = "endpoint unreachable", "service stale"


@dataclass(frozen=True)
class EndpointState:
    """One endpoint as `status` and the metrics show it."""

    state: str  # CURRENT, STALE or UNREACHABLE
    served: Served
    since: str  # ISO time a pass first saw it so (the status store); now, if none has yet


def remembered(served: Served, before: dict[str, str] | None, stamp: str) -> dict[str, str]:
    """`served` as the status store keeps it, with "since": kept from `before` while the
    endpoint presents the same leaf (or stays unreachable), else `stamp`."""
    if served.error is not None:
        state = {"error": served.error}
    else:
        state = {"serial": served.serial or "", "not_after": served.not_after.isoformat() if served.not_after else ""}
    before = before or {}
    same = ("error" in before) == ("error" in state) and before.get("serial") == state.get("serial")
    return {**state, "since": before["since"] if same and "since" in before else stamp}


def endpoint_states(
    served: tuple[Served, ...], facts, seen: dict[str, dict[str, str]], stamp: str
) -> tuple[EndpointState, ...]:
    """Each endpoint against the certificate in the file (`facts`: its serial and
    public_key_id; None: no usable file); `seen`: the status store's record of them."""
    out = []
    for s in served:
        if not s.reachable:
            state = UNREACHABLE
        elif facts is not None and s.presents(facts.serial, facts.public_key_id):
            state = CURRENT
        else:
            state = STALE
        out.append(EndpointState(state, s, remembered(s, seen.get(s.connect), stamp)["since"]))
    return tuple(out)


def service_state(states: tuple[EndpointState, ...]) -> str | None:
    """What the endpoints add to a certificate whose files need nothing (None: nothing)."""
    if any(e.state == UNREACHABLE for e in states):
        return ENDPOINT_UNREACHABLE
    if any(e.state == STALE for e in states):
        return SERVICE_STALE  # and no post-renewal command to run for it
    return None
