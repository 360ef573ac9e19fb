"""Keys, CSRs and certificate fingerprints: the small amount of cryptography the issuers,
`parse`, `apply` and the serve probe share."""

from __future__ import annotations

import hashlib
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from reconciler.model import KeySpec
from reconciler.sans import from_certificate

CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}


def generate_key(spec: KeySpec):
    if spec.type == "EC":
        return ec.generate_private_key(CURVES[spec.curve or "P-256"]())
    if spec.type == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.size or 2048)
    if spec.type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {spec.type!r}")


def key_to_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(data: bytes):
    return serialization.load_pem_private_key(data, password=None)


def signing_hash(key):
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def general_names(sans) -> list[x509.GeneralName]:
    """`sans` as plain strings (DNS names and IP addresses) → x509 GeneralNames."""
    out: list[x509.GeneralName] = []
    for s in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            out.append(x509.DNSName(s))
    return out


def extended_key_usage(cert_type: str) -> x509.ExtendedKeyUsage:
    return x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH if cert_type == "client" else ExtendedKeyUsageOID.SERVER_AUTH]
    )


def build_csr(common_name: str, sans, key) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName(general_names(sans)), critical=False)
        .sign(key, signing_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def same_public_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_key().public_bytes(*fmt) == b.public_key().public_bytes(*fmt)


def cert_sans(cert: x509.Certificate) -> frozenset[str]:
    """The certificate's SAN set, normalised like a desired one (reconciler.sans)."""
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
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex: how roots and intermediates are named."""
    return cert.fingerprint(hashes.SHA256()).hex()


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """`child` carries `parent`'s name as issuer and verifies under its key."""
    # verify_directly_issued_by compares the names first, in Rust: ~1 us for the usual "no"
    # when trying every anchor, where comparing cryptography's Name objects here took ~5 us
    try:
        child.verify_directly_issued_by(parent)
        return True
    except Exception:  # InvalidSignature, unsupported key types
        return False
