"""probe: which certificate a running service presents (the manifest's `serve`).

Observation, not trust: the TLS handshake accepts any certificate and any name, because the
question is only *which* leaf the service presents. Nothing is sent beyond what the handshake
(and, for STARTTLS, the plain-text upgrade) needs, and every connection has a short timeout.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import Callable, Iterable, NamedTuple

from reconciler.endpoints import Endpoint, Served, stale_reason
from reconciler.sans import display, ordered
from reconciler.checks import Check
from reconciler.crypto import cert_sans, public_key_id
from reconciler.parse import pem_certificates

PROBE_TIMEOUT = 5.0  # seconds for one endpoint: connect, upgrade and handshake together
PROBE_WORKERS = 8
RETRY_EVERY = 0.25  # seconds between probes while a reloaded service settles
POSTGRES_SSL_REQUEST = struct.pack("!II", 8, 80877103)


class ProbeError(Exception):
    """Why an endpoint presented no certificate; becomes Served.error."""


def _context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # any leaf the service presents is worth seeing, however weak its key or old its TLS
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def _reply(sock: socket.socket, buffer: bytearray, last_line: Callable[[bytes], bool]) -> bytes:
    """Read lines until `last_line` says the reply is complete; bounded, never past it (the
    bytes after the reply belong to the TLS handshake)."""
    lines = b""
    while True:
        while b"\n" not in buffer:
            chunk = sock.recv(1)  # one byte at a time: nothing of the handshake may be consumed
            if not chunk:
                raise ProbeError(f"the server closed the connection after {lines[-200:]!r}")
            buffer += chunk
            if len(buffer) > 4096:
                raise ProbeError("the server sent a line longer than 4 KiB; not the protocol expected")
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        lines += line + b"\n"
        if last_line(line):
            return lines


def _smtp_done(line: bytes) -> bool:
    return len(line) < 4 or line[3:4] != b"-"  # "250-..." continues, "250 ..." ends


def _expect(reply: bytes, prefix: bytes, what: str) -> None:
    last = reply.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
    if not last.startswith(prefix):
        raise ProbeError(f"{what}: the server answered {last[:200].decode(errors='replace')!r}")


def _starttls_smtp(sock: socket.socket) -> None:
    buf = bytearray()
    _expect(_reply(sock, buf, _smtp_done), b"220", "SMTP greeting")
    sock.sendall(b"EHLO reconciler.probe\r\n")
    _expect(_reply(sock, buf, _smtp_done), b"250", "EHLO")
    sock.sendall(b"STARTTLS\r\n")
    _expect(_reply(sock, buf, _smtp_done), b"220", "STARTTLS")


def _starttls_imap(sock: socket.socket) -> None:
    buf = bytearray()
    _expect(_reply(sock, buf, lambda line: True), b"* OK", "IMAP greeting")
    sock.sendall(b"p1 STARTTLS\r\n")
    _expect(_reply(sock, buf, lambda line: line.startswith(b"p1 ")), b"p1 OK", "STARTTLS")


def _starttls_postgres(sock: socket.socket) -> None:
    sock.sendall(POSTGRES_SSL_REQUEST)
    answer = sock.recv(1)
    if answer != b"S":
        raise ProbeError(
            "the PostgreSQL server does not offer TLS (ssl = off)"
            if answer == b"N"
            else f"not a PostgreSQL server (answered {answer!r})"
        )


UPGRADES: dict[str, Callable[[socket.socket], None]] = {
    "smtp": _starttls_smtp,
    "imap": _starttls_imap,
    "postgres": _starttls_postgres,
}


def _handshake(endpoint: Endpoint, timeout: float) -> bytes:
    """The DER leaf the endpoint presents."""
    with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
        if endpoint.starttls:
            UPGRADES[endpoint.starttls](raw)
        sni = None if _is_address(endpoint.server_name) else endpoint.server_name
        with _context().wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ProbeError("the TLS handshake completed without a server certificate")
    return der


def _is_address(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _served(connect: str, der: bytes) -> Served:
    from cryptography import x509  # not at the top: see crypto.py

    leaf = x509.load_der_x509_certificate(der)
    sans = tuple(display(s) for s in ordered(cert_sans(leaf)))
    return Served(
        connect, format(leaf.serial_number, "x"), leaf.not_valid_after_utc, public_key_id(leaf.public_key()), sans=sans
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT) -> Served:
    """What `endpoint` presents now; an unreachable one is a Served with its error."""
    try:
        der = _handshake(endpoint, timeout)
        return _served(endpoint.connect, der)
    except (OSError, ProbeError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
        return Served(endpoint.connect, error=_why(exc))


def probe_all(wanted: Iterable[tuple[str, Endpoint]], timeout: float = PROBE_TIMEOUT) -> dict[str, tuple[Served, ...]]:
    """(certificate name, endpoint) pairs → name → what each of its endpoints serves, in
    order. In parallel: a pass waits for the slowest endpoint, not for their sum."""
    pairs = list(wanted)
    out: dict[str, list[Served]] = {}
    if not pairs:
        return {}
    with ThreadPoolExecutor(min(PROBE_WORKERS, len(pairs)), thread_name_prefix="probe") as pool:
        for (name, _), served in zip(pairs, pool.map(lambda p: probe(p[1], timeout), pairs), strict=True):
            out.setdefault(name, []).append(served)
    return {name: tuple(s) for name, s in out.items()}


def await_leaf(
    endpoint: Endpoint,
    serial: str,
    public_key_id: str,
    settle: float,
    timeout: float = PROBE_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> Served:
    """Probe until the endpoint presents the leaf (`serial`, `public_key_id`) or `settle`
    seconds have passed (a reload takes effect asynchronously); the last observation."""
    deadline = clock() + settle
    while True:
        served = probe(endpoint, timeout)
        if served.presents(serial, public_key_id) or clock() >= deadline:
            return served
        pause(min(RETRY_EVERY, max(0.0, deadline - clock())))


def observe_served(certs, observed: dict, timeout: float = PROBE_TIMEOUT) -> tuple[dict, str | None]:
    """`observed` with what every `serve` endpoint of `certs` presents now, and a note for
    the plan saying that they were probed (None: no entry has an endpoint)."""
    served = probe_all(((c.name, e) for c in certs for e in c.serve), timeout)
    if not served:
        return observed, None
    out = {name: replace(o, served=served[name]) if name in served else o for name, o in observed.items()}
    every = [s for found in served.values() for s in found]
    down = [s.describe() for s in every if not s.reachable]
    note = f"probed {len(every)} serve endpoint{'s' if len(every) != 1 else ''} (a TLS handshake each, read-only)"
    if down:
        note += f"; {len(down)} unreachable: " + "; ".join(down[:5]) + (" …" if len(down) > 5 else "")
    return out, note


class FileLeaf(NamedTuple):
    serial: str
    public_key_id: str
    not_after: datetime


def file_leaf(path) -> FileLeaf | None:
    """The leaf in a certificate file, as a probe compares it; None: none readable, or a
    file that does not parse whole (as observe reads it: parse.parse_leaf)."""
    try:
        with open(path, "rb") as fh:
            certs = pem_certificates(fh.read())
    except OSError:
        return None
    if not certs:
        return None
    leaf = certs[0]
    return FileLeaf(format(leaf.serial_number, "x"), public_key_id(leaf.public_key()), leaf.not_valid_after_utc)


class ReloadCheck:
    """After a post-renewal command exited 0: did the services take the new certificate?

    Called with the certificates the command ran for, it waits until every `serve` endpoint
    presents the leaf now in its file, at most the entry's `serve_settle`, and returns why the
    command did not take (None: every reachable endpoint presents it; an unreachable one is its
    own state, never the command's failure). `served` keeps what each endpoint presented last."""

    def __init__(self, timeout: float = PROBE_TIMEOUT):
        self.timeout = timeout
        self.served: dict[str, tuple[Served, ...]] = {}

    def __call__(self, certs) -> str | None:
        waits = []
        for c in certs:
            leaf = file_leaf(c.cert_path) if c.serve else None
            if leaf is not None:
                waits += [(c.name, e, leaf, c.serve_settle.total_seconds()) for e in c.serve]
        if not waits:
            return None

        def settle(wait) -> Served:
            _name, endpoint, leaf, seconds = wait
            return await_leaf(endpoint, leaf.serial, leaf.public_key_id, seconds, self.timeout)

        with ThreadPoolExecutor(min(PROBE_WORKERS, len(waits)), thread_name_prefix="probe") as pool:
            found = list(pool.map(settle, waits))
        served: dict[str, list[Served]] = {}
        stale: list[str] = []
        for (name, _endpoint, leaf, _seconds), s in zip(waits, found, strict=True):
            served.setdefault(name, []).append(s)
            stale += filter(None, [stale_reason((s,), leaf)])
        self.served.update({name: tuple(s) for name, s in served.items()})
        return "; ".join(stale) or None


STALE_HINT = "the service did not reload; the next pass runs post_renewal_command again"
NO_COMMAND_HINT = "reload the service; a post_renewal_command that does would run after each renewal"


def doctor_checks(certs, timeout: float = PROBE_TIMEOUT) -> list[Check]:
    """`reconcile doctor`: every `serve` endpoint probed once, one Check each."""
    certs = [c for c in certs if c.serve]
    served = probe_all(((c.name, e) for c in certs for e in c.serve), timeout)
    checks = []
    for c in certs:
        leaf = file_leaf(c.cert_path)
        for s in served.get(c.name, ()):
            stale = stale_reason((s,), leaf) if leaf is not None else None
            if not s.reachable:
                checks.append(
                    Check(False, f"{c.name}: {s.describe()}", "start the service, or correct serve[].connect")
                )
            elif stale:
                checks.append(
                    Check(False, f"{c.name}: {stale}", STALE_HINT if c.post_renewal_command else NO_COMMAND_HINT)
                )
            elif leaf is None:
                checks.append(Check(True, f"{c.name}: {s.describe()} (no certificate in {c.cert_path} yet)", ""))
            else:
                checks.append(Check(True, f"{c.name}: {s.connect} presents the certificate in {c.cert_path}", ""))
    return checks
