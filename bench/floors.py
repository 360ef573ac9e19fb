"""The floors the reconciler is measured against: bare scripts doing only the unavoidable work.

Each runs as its own process, like `reconcile`, so both sides pay for an interpreter and its
imports and are measured the same way (wall, CPU, peak RSS from wait4).

    python bench/floors.py parse MANIFEST   read + parse every cert and key, compare public keys
    python bench/floors.py verify MANIFEST CA_DIR
                                            the parse floor, plus checking each certificate's
                                            signature against the CA's intermediate: what any
                                            plan that can tell our certificates from forged
                                            ones must also do (shown for information only)
    python bench/floors.py stat MANIFEST    load the manifest's JSON, lstat every cert and key
    python bench/floors.py issue MANIFEST CA_DIR
                                            generate, sign and write every certificate and key
                                            (EC P-256, the embedded CA's intermediate), as the
                                            reconciler's embedded CA would
    python bench/floors.py durable MANIFEST CA_DIR
                                            the issue floor, plus what a write that survives a
                                            crash and an issuer that checks its own answer must
                                            also do: fsync each file and its folder, verify each
                                            signature (shown for information only)

Paths in the manifest are relative to its folder, as the reconciler reads them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path


def _entries(manifest: Path) -> list[tuple[dict, Path, Path]]:
    base = manifest.parent
    return [(e, base / e["cert_path"], base / e["key_path"]) for e in json.loads(manifest.read_bytes())]


def stat_floor(manifest: Path) -> int:
    for _, cert, key in _entries(manifest):
        os.lstat(cert)
        os.lstat(key)
    return 0


def parse_floor(manifest: Path, ca_dir: Path | None = None) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    issuer = x509.load_pem_x509_certificate((ca_dir / "intermediate_ca.crt").read_bytes()) if ca_dir else None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    mismatched = 0
    for _, cert_path, key_path in _entries(manifest):
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
            mismatched += 1
        if issuer is not None:
            cert.verify_directly_issued_by(issuer)  # raises on a forged one: the floor's certificates are all ours
    return 1 if mismatched else 0


def issue_floor(manifest: Path, ca_dir: Path, durable: bool = False) -> int:
    import ipaddress
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    inter = x509.load_pem_x509_certificate((ca_dir / "intermediate_ca.crt").read_bytes())
    int_key = serialization.load_pem_private_key((ca_dir / "intermediate_ca.key").read_bytes(), password=None)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(int_key.public_key())
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    now = datetime.now(timezone.utc)
    for entry, cert_path, key_path in _entries(manifest):
        names = []
        for san in [entry["common_name"], *entry.get("sans", [])]:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, entry["common_name"])]))
            .issuer_name(inter.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=24))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(aki, critical=False)
            .sign(int_key, hashes.SHA256())
        )
        if durable:
            cert.verify_directly_issued_by(inter)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for path, data, mode in (
            (key_path, key_pem, 0o600),
            (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.write(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if durable:
                folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
    return 0


if __name__ == "__main__":
    what, manifest_path, *rest = sys.argv[1:]
    durable = functools.partial(issue_floor, durable=True)
    floors = {"stat": stat_floor, "parse": parse_floor, "verify": parse_floor, "issue": issue_floor, "durable": durable}
    sys.exit(floors[what](Path(manifest_path), *map(Path, rest)))
