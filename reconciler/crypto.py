"""Keys, CSRs and certificate fingerprints: the small amount of cryptography the issuers,
`parse`, `apply` and the serve probe share."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
from typing import TYPE_CHECKING

from reconciler.model import KeySpec
from reconciler.sans import from_certificate

if TYPE_CHECKING:
    from cryptography import x509

# cryptography is imported inside the functions that use it (here and in every module that
# does), never at the top: it is ~50 ms of imports, and a converged run, which parses no
# certificate (the observation cache answers), should not pay for it
PEM_BEGIN, PEM_END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"


def generate_key(spec: KeySpec):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if spec.type == "EC":
        curve = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}[spec.curve or "P-256"]
        return ec.generate_private_key(curve())
    if spec.type == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.size or 2048)
    if spec.type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {spec.type!r}")


def key_to_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(data: bytes):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(data, password=None)


def signing_hash(key):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def general_names(sans) -> list[x509.GeneralName]:
    """`sans` as plain strings (DNS names and IP addresses) → x509 GeneralNames."""
    from cryptography import x509

    out: list[x509.GeneralName] = []
    for s in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            out.append(x509.DNSName(s))
    return out


def extended_key_usage(cert_type: str) -> x509.ExtendedKeyUsage:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH if cert_type == "client" else ExtendedKeyUsageOID.SERVER_AUTH]
    )


def build_csr(common_name: str, sans, key) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName(general_names(sans)), critical=False)
        .sign(key, signing_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def same_public_key(a, b) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_key().public_bytes(*fmt) == b.public_key().public_bytes(*fmt)


def cert_sans(cert: x509.Certificate) -> frozenset[str]:
    """The certificate's SAN set, normalised like a desired one (reconciler.sans)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    try:
        # by OID: get_extension_for_class tests every extension's value against an ABC
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return frozenset()
    # typed: a dNSName "127.0.0.1" is not the iPAddress a client checks an address against.
    # Exact type tests: GeneralName is an ABC, and isinstance through its metaclass is most
    # of the cost of reading SANs from 10,000 certificates (cryptography builds exact types)
    dns = [n.value for n in ext if type(n) is x509.DNSName]
    ips = [n.value for n in ext if type(n) is x509.IPAddress]
    return from_certificate(dns, ips)


def key_type_of(public_key) -> str:
    """ "EC P-256", "RSA 2048", "Ed25519": how the manifest's key spec describes itself."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384", "secp521r1": "EC P-521"}.get(
            public_key.curve.name, f"EC {public_key.curve.name}"
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__


def public_key_id(public_key) -> str:
    """SHA-256 of the SubjectPublicKeyInfo: a certificate and its key share it."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex: how roots and intermediates are named."""
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def load_certificate(pem: bytes) -> x509.Certificate:
    """The (first) certificate in `pem`; ValueError when there is none."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem)


def pem_fingerprint(pem: bytes) -> str:
    """fingerprint() of the certificate in `pem`. From the bytes alone when they are one
    certificate in plain PEM armour, exactly as to_pem and the embedded CA write it (64
    characters a line): the fingerprint is the SHA-256 of the DER the armour holds. Anything
    else is parsed, so that bytes cryptography would refuse (a stray character or a blank line
    the base64 decoder skips) are never known by the fingerprint of the certificate they
    damage. ValueError when `pem` holds no certificate."""
    body = pem.strip()
    if body.startswith(PEM_BEGIN) and body.endswith(PEM_END):
        try:
            der = base64.b64decode(body[len(PEM_BEGIN) : -len(PEM_END)])
        except binascii.Error:
            der = b""  # not base64: parsing says what is wrong
        if der and _armoured(der) == body:
            return hashlib.sha256(der).hexdigest()
    return fingerprint(load_certificate(pem))


def _armoured(der: bytes) -> bytes:
    """`der` in the PEM armour cryptography writes, without the final newline."""
    text = base64.b64encode(der)
    return b"\n".join([PEM_BEGIN, *(text[i : i + 64] for i in range(0, len(text), 64)), PEM_END])


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """`child` carries `parent`'s name as issuer and verifies under its key."""
    # verify_directly_issued_by compares the names first, in Rust: ~1 us for the usual "no"
    # when trying every anchor, where comparing cryptography's Name objects here took ~5 us
    try:
        child.verify_directly_issued_by(parent)
        return True
    except Exception:  # InvalidSignature, unsupported key types
        return False
