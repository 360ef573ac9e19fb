"""Serve endpoints as values: where a service should present a certificate (from the
manifest's `serve`), and what one presented when probed. Pure: no I/O, no clock.

`reconciler.probe` fills `Served` in; the drift chain compares it with the file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime

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
    """"host:port", "1.2.3.4:port" or "[v6]:port" → (host, port). Raises ConnectError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConnectError(f"{text!r} has no port; write host:port, e.g. \"127.0.0.1:443\" or \"[::1]:443\"")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConnectError(f"{text!r}: an IPv6 address goes in brackets, e.g. \"[::1]:443\"")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConnectError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ConnectError(f"{text!r}: an IPv6 address goes in brackets, e.g. \"[{host}]:{port_text}\"")
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


def stale_reason(served: Served, serial: str, not_after: datetime) -> str:
    """The words of a serve drift: what the service still presents against what the file holds."""
    return (
        f"{served.connect} still serves serial {_short(served.serial)}, expiring {served.not_after:%Y-%m-%d %H:%MZ}; "
        f"the file holds serial {_short(serial)}, expiring {not_after:%Y-%m-%d %H:%MZ}"
    )
