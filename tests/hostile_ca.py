"""A hostile HTTPS "step-ca" for tests: serves a JWK provisioner, then misbehaves on /1.0/sign.

It stands in only for answers a healthy step-ca never gives (truncated JSON, a certificate
for the wrong key or names, silence, an answer that never ends). Shared by the issuer-level
tests (test_stepca_issuer.py) and the CLI-level ones (test_hostile_ca.py, test_secrets.py).
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler.model import IssuerSpec


def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(name: str = "throwaway root"):
    key = ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def sign_leaf(ca_cert, ca_key, public_key, cn: str, dns=(), ips=(), not_after=None, not_before=None):
    now = datetime.now(timezone.utc)
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=1))
        .not_valid_after(not_after or now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def jwk_provisioner(name: str, password: str, kid: str = "test-kid"):
    """(the provisioner's entry as step-ca lists it, its private JWK): an EC P-256 key
    encrypted with `password` the way `step ca provisioner add --create` does."""
    from jwcrypto import jwa, jwe, jwk

    key = jwk.JWK.generate(kty="EC", crv="P-256", kid=kid, alg="ES256")
    before = jwa.default_max_pbkdf2_iterations
    jwa.default_max_pbkdf2_iterations = 100_000
    try:
        token = jwe.JWE(
            key.export_private().encode(),
            json.dumps({"alg": "PBES2-HS256+A128KW", "enc": "A256GCM", "p2c": 100_000, "cty": "jwk+json"}),
        )
        token.add_recipient(jwk.JWK.from_password(password))
        encrypted = token.serialize(compact=True)
    finally:
        jwa.default_max_pbkdf2_iterations = before
    entry = {"type": "JWK", "name": name, "key": json.loads(key.export_public()), "encryptedKey": encrypted}
    return entry, key


class HostileCA:
    """An HTTPS server on 127.0.0.1 that serves a JWK provisioner and then misbehaves on /1.0/sign.

    `mode`: "ok" (a good answer for svc.test + 127.0.0.9, whatever was asked), "truncated",
    "garbage", "html", "server-error", "wrong-key", "wrong-sans", "dns-typed-ip" (127.0.0.9
    as a dNSName, no iPAddress), "stall" (says nothing for 30 s), "endless" (starts an
    answer and never finishes it). `clock_offset`: how far its Date header is off."""

    def __init__(self, tmp_path: Path):
        self.ca_cert, self.ca_key = make_ca("hostile test root")
        server_key = ec_key()
        server_cert = sign_leaf(
            self.ca_cert, self.ca_key, server_key.public_key(), "127.0.0.1", ["localhost"], ["127.0.0.1"]
        )
        self.root_path = tmp_path / "hostile-root.crt"
        self.root_path.write_bytes(pem(self.ca_cert))
        cred = tmp_path / "hostile-server.pem"
        cred.write_bytes(
            pem(server_cert)
            + server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.password_file = tmp_path / "hostile-password"
        self.password_file.write_text("hostile-secret\n")
        self.password = "hostile-secret"
        entry, provisioner_key = jwk_provisioner("admin", self.password, kid="hostile-kid")
        # what only a successful decryption gives: the secret half of the provisioner key
        self.provisioner_secret = json.loads(provisioner_key.export_private())["d"]
        # two pages, so that finding "admin" means following nextCursor
        self.pages = {
            "": {"provisioners": [{"type": "ACME", "name": "acme"}], "nextCursor": "page-2"},
            "page-2": {"provisioners": [entry], "nextCursor": ""},
        }
        self.mode = "ok"
        self.clock_offset = timedelta(0)
        self.release = threading.Event()
        self.last_csr: x509.CertificateSigningRequest | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def date_time_string(self, timestamp=None):
                import email.utils
                import time

                return email.utils.formatdate(
                    (timestamp or time.time()) + outer.clock_offset.total_seconds(), usegmt=True
                )

            def _send(self, status: int, body: bytes, length: int | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.startswith("/provisioners"):
                    query = parse_qs(urlsplit(self.path).query)
                    self._send(200, json.dumps(outer.pages[query.get("cursor", [""])[0]]).encode())
                elif self.path == "/health":
                    self._send(200, b'{"status":"ok"}')
                else:
                    self._send(404, b'{"status":404,"message":"not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                csr = x509.load_pem_x509_csr(body["csr"].encode())
                outer.last_csr = csr
                mode = outer.mode
                if mode == "stall":
                    outer.release.wait(30)
                    return
                if mode == "endless":
                    self.send_response(201)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"crt": "')
                    while not outer.release.wait(0.05):
                        try:
                            self.wfile.write(b"A" * 64)
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                if mode == "truncated":
                    self._send(201, b'{"crt": "-----BEGIN CERTIFICATE-----\\nMIIB')
                    return
                if mode == "garbage":
                    self._send(
                        201, json.dumps({"crt": "hello", "ca": "world", "certChain": ["hello", "world"]}).encode()
                    )
                    return
                if mode == "html":
                    self._send(200, b"<html><body>proxy login</body></html>")
                    return
                if mode == "server-error":
                    self._send(503, b'{"status":503,"message":"database is locked"}')
                    return
                public_key = ec_key().public_key() if mode == "wrong-key" else csr.public_key()
                names = ["svc.test", "other.test"] if mode == "wrong-sans" else ["svc.test"]
                ips = ["127.0.0.9"]
                if mode == "dns-typed-ip":
                    names, ips = ["svc.test", "127.0.0.9"], []
                leaf = sign_leaf(outer.ca_cert, outer.ca_key, public_key, "svc.test", names, ips)
                self._send(
                    201,
                    json.dumps(
                        {
                            "crt": pem(leaf).decode(),
                            "ca": pem(outer.ca_cert).decode(),
                            "certChain": [pem(leaf).decode()],
                        }
                    ).encode(),
                )

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cred))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def spec(self, **changes) -> IssuerSpec:
        values = dict(
            type="step-ca", url=self.url, root=self.root_path, provisioner="admin", password_file=self.password_file
        )
        values.update(changes)
        return IssuerSpec(**values)

    def manifest(self, out: Path, **entry) -> dict:
        """A manifest for this CA asking for exactly what it signs whatever it is asked (svc.test
        + 127.0.0.9), files in `out`; `entry`: more fields of the one certificate."""
        return {
            "issuer": {
                "type": "step-ca",
                "url": self.url,
                "root": str(self.root_path),
                "provisioner": "admin",
                "password_file": str(self.password_file),
            },
            "certificates": [
                {
                    "common_name": "svc.test",
                    "sans": ["127.0.0.9"],
                    "cert_path": str(out / "svc.crt"),
                    "key_path": str(out / "svc.key"),
                    **entry,
                }
            ],
        }

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
