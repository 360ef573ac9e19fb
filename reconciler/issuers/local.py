"""The embedded CA: a root and an intermediate in a private folder, created on first use.

Before it signs anything, the CA on disk is checked: its keys belong to its certificates,
the intermediate is signed by the root, and both are valid now. A CA that fails is never
used and never replaced on its own: a damaged CA would issue certificates that fail
verification on every pass, and a new one would silently re-issue every certificate.
"""

from __future__ import annotations

import copy
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from reconciler.atomic import write_atomic
from reconciler.checks import Check, writable_folder
from reconciler.crypto import extended_key_usage, general_names, key_to_pem, same_public_key, signing_hash
from reconciler.durations import format_duration
from reconciler.issuers import IssueRequest, Issued, IssuerError

ROOT_CERT, ROOT_KEY = "root_ca.crt", "root_ca.key"
INT_CERT, INT_KEY = "intermediate_ca.crt", "intermediate_ca.key"
ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=1825)
BACKDATE = timedelta(minutes=1)  # as step-ca does: tolerate a little clock skew between this host and its clients
RESTORE = (
    "restore it from backup, or move the folder away to create a new CA (every certificate will be re-issued); "
    "it is never replaced on its own"
)


class LocalCA:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._signer: tuple | None = None
        self._refusal: IssuerError | None = None
        self._lock = threading.Lock()

    # -- read-only side, for observe/plan

    def trust_pems(self) -> list[bytes]:
        pems = []
        for name in (ROOT_CERT, INT_CERT):
            try:
                pems.append((self.folder / name).read_bytes())
            except OSError:
                return []
        return pems

    def close(self) -> None:
        pass

    def exists(self) -> bool:
        return any((self.folder / n).exists() for n in (ROOT_CERT, ROOT_KEY, INT_CERT, INT_KEY))

    def check(self, now: datetime | None = None) -> IssuerError | None:
        """Why this CA cannot issue now (damaged, incomplete, not valid at `now`), for
        `doctor`; None when it can, or when it does not exist yet. Reads only."""
        try:
            loaded = self._load(now)
            if loaded is None and self.exists():
                raise self._incomplete()
        except IssuerError as exc:
            return exc
        return None

    def diagnose(self) -> list[Check]:
        problem = self.check()
        if problem is not None:
            return [Check(False, problem.message, problem.hint)]
        if self.exists():
            return [Check(True, f"embedded CA in {self.folder} is present (keys match, the chain verifies, valid now)")]
        can = writable_folder(self.folder, "embedded CA folder")
        return [can._replace(what=f"embedded CA in {self.folder} will be created on the first pass") if can.ok else can]

    def root_pem(self) -> bytes:
        return self._ensure()[3]

    # -- issuing

    def _ensure(self) -> tuple:
        with self._lock:
            if self._signer is None:
                if self._refusal is not None:  # every certificate of the pass gets the same answer
                    raise copy.copy(self._refusal)
                try:
                    self._signer = self._load() or self._create()
                except IssuerError as exc:
                    self._refusal = copy.copy(exc)
                    raise
            return self._signer

    def _load(self, now: datetime | None = None) -> tuple | None:
        # cryptography is imported where it is used, never at the top (see crypto.py): a
        # converged run reads the CA's certificates as bytes only (trust_pems)
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        paths = [self.folder / n for n in (ROOT_CERT, INT_CERT, INT_KEY)]
        if not all(p.exists() for p in paths):
            return None
        root_pem, root = self._read(ROOT_CERT, x509.load_pem_x509_certificate)
        int_pem, inter = self._read(INT_CERT, x509.load_pem_x509_certificate)
        _, key = self._read(INT_KEY, lambda data: serialization.load_pem_private_key(data, password=None))
        root_key = None
        if (self.folder / ROOT_KEY).exists():  # may be kept offline; checked when it is here
            _, root_key = self._read(ROOT_KEY, lambda data: serialization.load_pem_private_key(data, password=None))
        self._verify(root, inter, key, root_key, now or datetime.now(timezone.utc))
        return root, inter, key, root_pem, int_pem

    def _read(self, name: str, parse) -> tuple[bytes, object]:
        path = self.folder / name
        try:
            data = path.read_bytes()
            return data, parse(data)
        except OSError as exc:
            why = exc.strerror or str(exc)
        except (ValueError, TypeError) as exc:
            why = f"does not parse ({str(exc).split('.')[0]})"
        raise IssuerError(f"embedded CA in {self.folder} is damaged: {path} {why}", hint=RESTORE)

    def _verify(self, root, inter, int_key, root_key, now: datetime) -> None:
        def damaged(what: str) -> IssuerError:
            return IssuerError(f"embedded CA in {self.folder} is damaged: {what}", hint=RESTORE)

        for name, cert, key in ((INT_KEY, inter, int_key), (ROOT_KEY, root, root_key)):
            if key is not None and not same_public_key(cert, key):
                raise damaged(f"{self.folder / name} does not belong to {name[: -len('.key')]}.crt (another key)")
        for child, parent, what in (
            (root, root, f"{ROOT_CERT} is not a self-signed root"),
            (inter, root, f"{INT_CERT} is not signed by {ROOT_CERT}"),
        ):
            try:
                child.verify_directly_issued_by(parent)
            except Exception:  # wrong signature, wrong issuer name, unsupported algorithm
                raise damaged(what) from None
        for name, cert in ((ROOT_CERT, root), (INT_CERT, inter)):
            if now < cert.not_valid_before_utc:
                raise IssuerError(
                    f"embedded CA certificate {self.folder / name} is not valid until "
                    f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%MZ} "
                    f"(in {format_duration(cert.not_valid_before_utc - now)}): "
                    "it was made while this host's clock was ahead, or the clock has jumped backwards; "
                    "certificates issued from it now would not verify",
                    hint="fix this host's clock (NTP: `timedatectl status`); "
                    "if the clock is right now, wait until then, "
                    f"or move {self.folder} away to create a new CA (every certificate will be re-issued)",
                )
            if now >= cert.not_valid_after_utc:
                raise IssuerError(
                    f"embedded CA certificate {self.folder / name} "
                    f"expired on {cert.not_valid_after_utc:%Y-%m-%dT%H:%MZ}",
                    hint=f"check this host's clock (NTP); if it is right, move {self.folder} away to create a new CA "
                    "(every certificate will be re-issued)",
                )

    def _incomplete(self) -> IssuerError:
        return IssuerError(
            f"embedded CA in {self.folder} is incomplete (some of {ROOT_CERT}, {INT_CERT}, {INT_KEY} are missing)",
            hint="restore the missing files, or move the folder away to create a new CA",
        )

    def _create(self) -> tuple:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        if self.exists():
            raise self._incomplete()
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)
        except OSError as exc:
            raise IssuerError(
                f"cannot create the embedded CA folder {self.folder}: {exc.strerror}", hint="check --state-dir"
            ) from None
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
        from cryptography import x509

        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        )

    def issue(self, request: IssueRequest, key) -> Issued:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

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
        # what any CA returns is checked before it is believed, this one too: the Issuer
        # protocol says the leaf verifies under the chain's certificate named as its issuer
        # (so re-observing it need not verify it again). Its key and names are checked by
        # deploy, as every issuer's answer is: not here a second time
        try:
            leaf.verify_directly_issued_by(inter)
        except Exception:
            raise IssuerError(
                f"embedded CA in {self.folder} made a certificate for {request.name} that does not verify", hint=RESTORE
            ) from None
        return Issued(leaf.public_bytes(serialization.Encoding.PEM), int_pem, root_pem)

    def renew(self, request: IssueRequest, key, current_cert_pem: bytes, current_key) -> Issued:
        return self.issue(request, key)
