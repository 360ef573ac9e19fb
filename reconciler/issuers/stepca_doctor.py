"""`StepCA.diagnose()`: `reconcile doctor`'s checks of a step-ca issuer, in dependency order.

Configuration, DNS, TCP, TLS against the trust root, then the CA's health, the provisioner,
the password file and whether it decrypts the provisioner's key. A check whose prerequisite
failed is not run; the password file, a local matter, is checked regardless. Only the
client's public parts are used.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Callable, TypeVar

from reconciler.checks import Check
from reconciler.issuers import IssuerError

if TYPE_CHECKING:  # pragma: no cover
    from reconciler.issuers.stepca import StepCA

T = TypeVar("T")


def diagnose(ca: "StepCA") -> list[Check]:
    results: list[Check] = []
    prerequisites: tuple[Callable[["StepCA"], Check | None], ...] = (_configured, _dns, _tcp, _tls)
    for step in prerequisites:
        check = step(ca)
        if check is not None:
            results.append(check)
            if not check.ok:
                return results + [_password(ca)[0]]
    results.append(_health(ca))
    found, entry = _provisioner(ca)
    results.append(found)
    password_check, password = _password(ca)
    if entry is None:
        return results + [password_check]
    results.append(password_check)
    if password is not None:
        results.append(_decrypts(ca, entry, password))
    return results


def _failed(exc: IssuerError, prefix: str = "") -> Check:
    return Check(False, prefix + exc.message, exc.hint)


def _configured(ca: "StepCA") -> Check | None:
    try:
        ca.check_configured()
    except IssuerError as exc:
        return _failed(exc)
    return None


def _dns(ca: "StepCA") -> Check:
    host, port = ca.transport.host, ca.transport.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return Check(
            False,
            f"DNS: {host} cannot be resolved ({exc})",
            f"check the host name in {ca.spec.where('url')} and this host's DNS",
        )
    addresses = sorted({str(i[4][0]) for i in infos})
    return Check(True, f"DNS: {host} resolves to {', '.join(addresses)}")


def _tcp(ca: "StepCA") -> Check:
    t = ca.transport
    try:
        with socket.create_connection((t.host, t.port), timeout=t.connect_timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Check(
            False,
            f"TCP: cannot connect to {t.hostport} ({reason})",
            f"check the CA container/service is running and the firewall allows port {t.port}",
        )
    return Check(True, f"TCP: connected to {t.hostport}")


def _tls(ca: "StepCA") -> Check:
    t = ca.transport
    try:
        ctx = t.ssl_context()
        with socket.create_connection((t.host, t.port), timeout=t.connect_timeout) as sock:
            sock.settimeout(t.read_timeout)
            with ctx.wrap_socket(sock, server_hostname=t.host) as tls:
                version = tls.version()
    except IssuerError as exc:  # the root itself could not be had
        return _failed(exc, "TLS: ")
    except ssl.SSLCertVerificationError as exc:
        return Check(
            False,
            f"TLS: verification of {t.hostport} failed against root {ca.trust.description()}: "
            f"{exc.verify_message or exc}",
            "that root (or fingerprint) is not this CA's: fetch the right one with `step ca root`",
        )
    except (OSError, ssl.SSLError) as exc:
        return Check(
            False, f"TLS: handshake with {t.hostport} failed: {exc}", "check that the port is step-ca's HTTPS port"
        )
    return Check(True, f"TLS: {t.hostport} verified against root {ca.trust.description()} ({version})")


def _health(ca: "StepCA") -> Check:
    try:
        _, data = ca.transport.call("GET", "/health", what="checking health")
    except IssuerError as exc:
        return _failed(exc, "health: ")
    status = data.get("status") if isinstance(data, dict) else None
    if status == "ok":
        return Check(True, f"health: GET {ca.url}/health says ok")
    said = f"says {status!r}" if status is not None else "gives no status"
    return Check(False, f"health: GET {ca.url}/health {said}", "see the step-ca log")


def _attempt(get: Callable[[], T], says: Callable[[T], str]) -> tuple[Check, T | None]:
    """(✓ what `says` about the value, the value), or (✗ the IssuerError, None)."""
    try:
        value = get()
    except IssuerError as exc:
        return _failed(exc), None
    return Check(True, says(value)), value


def _provisioner(ca: "StepCA") -> tuple[Check, dict | None]:
    def says(entry: dict) -> str:
        return f"provisioner '{ca.spec.provisioner}' ({entry.get('type') or 'type not given'}) is present"

    return _attempt(ca.provisioner.find, says)


def _password(ca: "StepCA") -> tuple[Check, bytes | None]:
    return _attempt(ca.provisioner.read_password, lambda _: f"password file {ca.spec.password_file} is readable")


def _decrypts(ca: "StepCA", entry: dict, password: bytes) -> Check:
    spec = ca.spec
    says = f"the password in {spec.password_file} decrypts the key of provisioner '{spec.provisioner}'"
    return _attempt(lambda: ca.provisioner.decrypt(entry, password), lambda _: says)[0]
