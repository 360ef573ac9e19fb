"""The embedded CA: a root and an intermediate in a private folder, created on first use."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from reconciler.atomic import write_atomic
from reconciler.crypto import extended_key_usage, general_names, key_to_pem, signing_hash
from reconciler.issuers import IssueRequest, Issued, IssuerError

ROOT_CERT, ROOT_KEY = "root_ca.crt", "root_ca.key"
INT_CERT, INT_KEY = "intermediate_ca.crt", "intermediate_ca.key"
ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=1825)
BACKDATE = timedelta(minutes=1)  # tolerate a little clock skew between this host and its clients


class LocalCA:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._signer: tuple | None = None
        self._lock = threading.Lock()

    # -- read-only side, for observe/plan

    def trust_roots(self) -> list[x509.Certificate]:
        certs = []
        for name in (ROOT_CERT, INT_CERT):
            try:
                certs.append(x509.load_pem_x509_certificate((self.folder / name).read_bytes()))
            except (OSError, ValueError):
                return []
        return certs

    def close(self) -> None:
        pass

    # -- issuing

    def _ensure(self) -> tuple:
        with self._lock:
            if self._signer is None:
                self._signer = self._load() or self._create()
            return self._signer

    def _load(self) -> tuple | None:
        paths = [self.folder / n for n in (ROOT_CERT, INT_CERT, INT_KEY)]
        if not all(p.exists() for p in paths):
            return None
        try:
            root = x509.load_pem_x509_certificate(paths[0].read_bytes())
            inter = x509.load_pem_x509_certificate(paths[1].read_bytes())
            key = serialization.load_pem_private_key(paths[2].read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise IssuerError(
                f"embedded CA in {self.folder} is damaged: {exc}",
                hint="restore it from backup, or move the folder away to create a new CA (every certificate will be re-issued)",
            ) from None
        return root, inter, key, paths[0].read_bytes(), paths[1].read_bytes()

    def _create(self) -> tuple:
        if any((self.folder / n).exists() for n in (ROOT_CERT, ROOT_KEY, INT_CERT, INT_KEY)):
            raise IssuerError(
                f"embedded CA in {self.folder} is incomplete (some of {ROOT_CERT}, {INT_CERT}, {INT_KEY} are missing)",
                hint="restore the missing files, or move the folder away to create a new CA",
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)
        except OSError as exc:
            raise IssuerError(f"cannot create the embedded CA folder {self.folder}: {exc.strerror}", hint="check --state-dir") from None
        now = datetime.now(timezone.utc)
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Reconciler Embedded Root CA")])
        root = (
            self._ca_builder(root_name, root_name, root_key.public_key(), now, ROOT_LIFETIME, path_length=1)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384())
        )
        int_key = ec.generate_private_key(ec.SECP256R1())
        int_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Reconciler Embedded Intermediate CA")])
        inter = (
            self._ca_builder(int_name, root_name, int_key.public_key(), now, INTERMEDIATE_LIFETIME, path_length=0)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(int_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384())
        )
        pem = serialization.Encoding.PEM
        root_pem, int_pem = root.public_bytes(pem), inter.public_bytes(pem)
        # keys first: a CA whose certificate exists always has its key
        write_atomic(self.folder / ROOT_KEY, key_to_pem(root_key), 0o600)
        write_atomic(self.folder / INT_KEY, key_to_pem(int_key), 0o600)
        write_atomic(self.folder / ROOT_CERT, root_pem, 0o644)
        write_atomic(self.folder / INT_CERT, int_pem, 0o644)
        return root, inter, int_key, root_pem, int_pem

    @staticmethod
    def _ca_builder(subject, issuer, public_key, now, lifetime, path_length):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        )

    def issue(self, request: IssueRequest, key) -> Issued:
        root, inter, int_key, root_pem, int_pem = self._ensure()
        now = datetime.now(timezone.utc)
        not_after = min(now + request.duration, inter.not_valid_after_utc)
        public_key = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)]))
            .issuer_name(inter.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(extended_key_usage(request.cert_type), critical=False)
            .add_extension(x509.SubjectAlternativeName(general_names(request.sans)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(int_key.public_key()), critical=False)
        )
        leaf = builder.sign(int_key, signing_hash(int_key))
        return Issued(leaf.public_bytes(serialization.Encoding.PEM), int_pem, root_pem)

    def renew(self, request: IssueRequest, key, current_cert_pem: bytes, current_key) -> Issued:
        return self.issue(request, key)
