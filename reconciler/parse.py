"""parse: what a certificate file and a key file say, and whether the certificate chains to
the issuer's trust anchors. Bytes in, facts out: no I/O (observe reads the files).

Garbage is an answer ("not a PEM X.509 certificate"), never an exception.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

from reconciler.crypto import (
    cert_sans,
    fingerprint,
    issued_by,
    key_type_of,
    load_certificate,
    pem_fingerprint,
    public_key_id,
)
from reconciler.model import CertFacts, DesiredCert, Written

# nothing the reconciler manages is this large; a bigger file is not read further
LIMIT = 1024 * 1024


@lru_cache(maxsize=1)
def _usage_names() -> dict:
    from cryptography.x509.oid import ExtendedKeyUsageOID  # not at the top: see crypto.py

    return {
        ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
        ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "any",
    }


# the few distinct usage sets, one object each: 50,000 certificates share two or three
_USAGE_SETS: dict[frozenset[str], frozenset[str]] = {}


@dataclass(frozen=True)
class Trust:
    """The issuer's trust anchors (Issuer.trust_pems) by fingerprint, plus whether absence means "no".

    Only the fingerprints are worked out up front, from the PEM's bytes: they key every
    observation cache row, and a converged run needs nothing else. The certificates are
    parsed, and the root found, the first time a leaf's signature is checked or a `ca_path`
    compared: a warm run never imports cryptography (~50 ms of a 10,000-entry plan)."""

    pems: tuple[bytes, ...]
    fingerprints: tuple[str, ...]
    authoritative: bool  # an empty set means "nothing chains to it" (embedded CA) vs "unknown"
    digest: str = ""  # of the fingerprints: part of every observation cache key
    # anchor fingerprint → its intermediates up to the root, and a file's intermediate
    # (by fingerprint) → the anchor it chains to: the same for every leaf they signed, so
    # worked out once per pass (signature checks are most of a cold plan)
    paths: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    via: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, pems: list[bytes], authoritative: bool) -> "Trust":
        try:
            fingerprints = tuple(pem_fingerprint(p) for p in pems)
        except ValueError:  # a damaged CA file: nothing can be shown to chain to it (`anchors`)
            pems, fingerprints = [], ()
        digest = hashlib.sha256(",".join(sorted(fingerprints)).encode()).hexdigest()[:16]
        if not fingerprints and not authoritative:
            # "cannot tell" (chains_to_issuer None), where an embedded CA not made yet means
            # "nothing chains to it" (False): the same empty set, other facts
            digest = "unknown"
        return cls(tuple(pems), fingerprints, authoritative, digest)

    @cached_property
    def anchors(self) -> tuple[tuple[Any, str], ...]:
        """(certificate, fingerprint) of each anchor; none when one does not parse (a
        damaged CA file: nothing can be shown to chain to it)."""
        try:
            return tuple(zip((load_certificate(p) for p in self.pems), self.fingerprints, strict=True))
        except ValueError:
            return ()

    @cached_property
    def root(self) -> str | None:
        """Fingerprint of the self-signed anchor: what a `ca_path` file should hold."""
        return next((fp for c, fp in self.anchors if issued_by(c, c)), None)

    def root_for(self, cert: DesiredCert) -> str | None:
        """Observed.issuer_root: the root, for an entry with a file that holds it
        (DesiredCert.holds_root); None for the others, whose observation parses nothing."""
        return self.root if cert.holds_root else None


def content_digest(data: bytes) -> str:
    """How apply names the bytes it wrote (model.Written) and observe recognises them."""
    return hashlib.sha256(data).hexdigest()


def parse_cert(data: bytes, trust: Trust, written: Written | None = None) -> tuple[CertFacts | None, str | None]:
    """`written`: what apply just wrote; for exactly those bytes the leaf's signature, which
    the issuer verified, is not checked again."""
    parsed, error = parse_leaf(data, written)
    return parsed.checked(trust) if parsed is not None else (None, error)


@dataclass(frozen=True)
class ParsedCert:
    """A certificate file's facts but the three its signature check gives (`checked`): apart,
    so that deploy, which checks the CA's answer itself, hands its parse on (Written.parsed)
    and the read-back after the pass does not parse the same bytes again."""

    leaf: Any  # x509.Certificate
    chain: list
    chain_fps: tuple[str, ...]
    signer: str | None  # Written.signer, for exactly the bytes apply wrote
    facts: dict[str, Any]  # CertFacts' other fields

    def checked(self, trust: Trust, **same: Any) -> tuple[CertFacts | None, str | None]:
        """`same`: objects equal to some of `facts` (the manifest's SAN set), to keep instead."""
        from cryptography.exceptions import UnsupportedAlgorithm

        try:
            issuer, issuer_chain, signer_not_after = _issuer_path(
                self.leaf, self.chain, self.chain_fps, trust, self.signer
            )
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # an issuer name that does not parse
            return None, f"certificate does not parse: {exc}"
        facts = CertFacts(
            **{**self.facts, **same}, issued_by=issuer, issuer_chain=issuer_chain, signer_not_after=signer_not_after
        )
        return facts, None


def parse_leaf(data: bytes, written: Written | None = None) -> tuple[ParsedCert | None, str | None]:
    """Everything parse_cert finds but whether the leaf chains to the issuer: (ParsedCert,
    None) or (None, why the bytes are no certificate)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.x509.oid import NameOID

    if len(data) > LIMIT:
        return None, "file is larger than 1 MiB; not a certificate"
    ours = written is not None and content_digest(data) == written.cert_digest
    if ours and written is not None and isinstance(written.parsed, ParsedCert):
        return written.parsed, None  # deploy parsed exactly these bytes when it checked them
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return None, "not a PEM X.509 certificate"
    leaf, chain = certs[0], certs[1:]
    try:
        cn_attrs = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        public_key = leaf.public_key()
        chain_fps = tuple(fingerprint(c) for c in chain)
        facts = dict(
            common_name=str(cn_attrs[0].value) if cn_attrs else None,
            sans=cert_sans(leaf),  # the same canonical form as a desired SAN set
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            key_type=key_type_of(public_key),
            public_key_id=public_key_id(public_key),
            serial=format(leaf.serial_number, "x"),
            usages=_usages(leaf),
            chain=chain_fps,
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # UnsupportedAlgorithm: a public key type cryptography cannot load (a foreign file)
        return None, f"certificate does not parse: {exc}"
    signer = written.signer if written is not None and ours else None
    return ParsedCert(leaf, chain, chain_fps, signer, facts), None


def _usages(leaf) -> frozenset[str]:
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    names = _usage_names()
    try:
        ekus = leaf.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value  # by OID, as cert_sans
        found = frozenset(names[u] for u in ekus if u in names)
    except x509.ExtensionNotFound:
        found = frozenset({"any"})  # no EKU: usable for anything
    return _USAGE_SETS.setdefault(found, found)


def _issuer_path(
    leaf, chain: list, chain_fps: tuple[str, ...], trust: Trust, signer: str | None = None
) -> tuple[str | None, tuple[str, ...] | None, datetime | None]:
    """(fingerprint of the trust certificate `leaf` chains to, directly or through `chain`;
    the issuer's intermediates from the leaf up to its root, as fingerprints; when the
    certificate that signed the leaf expires). The chain is built from the issuer's own
    certificates, never from the file: it is what the file should hold with include_ca.
    The leaf's own signature is checked every time (unless `signer`: the anchor whose
    signature on it the issuer verified before it answered); what lies above it, once per pass."""
    anchors = trust.anchors
    for anchor, fp in anchors:
        if (fp == signer and leaf.issuer == anchor.subject) or issued_by(leaf, anchor):
            if fp not in trust.paths:
                trust.paths[fp] = _up_to_root(anchor, fp, anchors)
            return fp, trust.paths[fp], anchor.not_valid_after_utc
    for intermediate, ifp in zip(chain, chain_fps, strict=True):
        if issued_by(leaf, intermediate):
            if ifp not in trust.via:
                trust.via[ifp] = next((fp for anchor, fp in anchors if issued_by(intermediate, anchor)), None)
            if trust.via[ifp] is not None:
                return trust.via[ifp], None, intermediate.not_valid_after_utc
    return None, None, None


def _up_to_root(cert, fp: str, anchors: tuple) -> tuple[str, ...] | None:
    path: list[str] = []
    for _ in range(len(anchors) + 1):  # a loop among the anchors cannot run forever
        if issued_by(cert, cert):
            return tuple(path)
        path.append(fp)
        parent = next(((a, f) for a, f in anchors if a is not cert and issued_by(cert, a)), None)
        if parent is None:
            return None
        cert, fp = parent
    return None


def parse_key(data: bytes) -> tuple[str | None, str | None]:
    """(the public key's id, None) or (None, why it is not a usable private key)."""
    from cryptography.hazmat.primitives import serialization

    if len(data) > LIMIT:
        return None, "file is larger than 1 MiB; not a private key"
    try:
        key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        return None, "private key is encrypted; the reconciler manages unencrypted keys only"
    except (ValueError, Exception) as exc:  # cryptography raises several types for garbage
        return None, "not a PEM private key" if "PEM" in str(exc) or "Could not deserialize" in str(
            exc
        ) else "not a usable private key"
    return public_key_id(key.public_key()), None


def pem_certificates(data: bytes) -> list | None:
    """Every certificate in a PEM file (a CA file, a bundle), or None when it holds none."""
    from cryptography import x509

    if len(data) > LIMIT:
        return None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return None
