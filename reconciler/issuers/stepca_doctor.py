"""`reconcile doctor`'s checks of a step-ca issuer, in dependency order."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from reconciler.issuers import IssuerError
from reconciler.issuers.stepca_config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT
from reconciler.model import IssuerSpec

def doctor_checks(
    spec: IssuerSpec, state_dir: Path, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> list[tuple[bool, str, str]]:
    """(ok, what was checked, hint) for `reconcile doctor`, in dependency order.

    A check whose prerequisite failed is not run; the password file is checked regardless.
    """
    from reconciler.issuers.stepca import StepCA, decrypt_provisioner_key  # the client, at call time

    results: list[tuple[bool, str, str]] = []
    ca = StepCA(spec, state_dir, connect_timeout=connect_timeout, read_timeout=read_timeout)

    def ok(what: str) -> None:
        results.append((True, what, ""))

    def fail(what: str, hint: str) -> None:
        results.append((False, what, hint))

    def password_check() -> bytes | None:
        try:
            password = ca._read_password()
        except IssuerError as exc:
            fail(exc.args[0], exc.hint)
            return None
        ok(f"password file {spec.password_file} is readable")
        return password

    try:
        try:
            ca._check_configured()
        except IssuerError as exc:
            fail(exc.args[0], exc.hint)
            password_check()
            return results
        host, port = ca.host, ca.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = sorted({i[4][0] for i in infos})
            ok(f"DNS: {host} resolves to {', '.join(addresses)}")
        except OSError as exc:
            fail(f"DNS: {host} cannot be resolved ({exc})", f"check the host name in {spec.where('url')} and this host's DNS")
            password_check()
            return results
        try:
            with socket.create_connection((host, port), timeout=connect_timeout):
                pass
            ok(f"TCP: connected to {ca.hostport}")
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            fail(
                f"TCP: cannot connect to {ca.hostport} ({reason})",
                f"check the CA container/service is running and the firewall allows port {port}",
            )
            password_check()
            return results
        try:
            ctx = ca._ssl_context()
            with socket.create_connection((host, port), timeout=connect_timeout) as sock:
                sock.settimeout(read_timeout)
                with ctx.wrap_socket(sock, server_hostname=host) as tls:
                    version = tls.version()
            ok(f"TLS: {ca.hostport} verified against root {ca._root_description()} ({version})")
        except IssuerError as exc:
            fail(f"TLS: {exc.args[0]}", exc.hint)
            password_check()
            return results
        except ssl.SSLCertVerificationError as exc:
            fail(
                f"TLS: verification of {ca.hostport} failed against root {ca._root_description()}: "
                f"{exc.verify_message or exc}",
                "that root (or fingerprint) is not this CA's: fetch the right one with `step ca root`",
            )
            password_check()
            return results
        except (OSError, ssl.SSLError) as exc:
            fail(f"TLS: handshake with {ca.hostport} failed: {exc}", "check that the port is step-ca's HTTPS port")
            password_check()
            return results
        try:
            _, data = ca._call("GET", "/health", what="checking health")
            status = data.get("status") if isinstance(data, dict) else None
            if status == "ok":
                ok(f"health: GET {ca.url}/health says ok")
            else:
                said = f"says {status!r}" if status is not None else "gives no status"
                fail(f"health: GET {ca.url}/health {said}", "see the step-ca log")
        except IssuerError as exc:
            fail(f"health: {exc.args[0]}", exc.hint)
        try:
            provisioner = ca._find_provisioner()
            ok(f"provisioner '{spec.provisioner}' ({provisioner.get('type') or 'type not given'}) is present")
        except IssuerError as exc:
            fail(exc.args[0], exc.hint)
            password_check()
            return results
        password = password_check()
        if password is not None:
            try:
                decrypt_provisioner_key(
                    provisioner.get("encryptedKey") or "", password, str(spec.provisioner), str(spec.password_file)
                )
                ok(f"the password in {spec.password_file} decrypts the key of provisioner '{spec.provisioner}'")
            except IssuerError as exc:
                fail(exc.args[0], exc.hint)
        return results
    finally:
        ca.close()
