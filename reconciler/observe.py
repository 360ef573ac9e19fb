"""observe: what is on disk for each desired certificate. Reads only; never writes.

An unreadable or garbage file is an observation, never a crash. Parsed results are
cached by (device, inode, size, mtime, ctime) of both files and the digest of the trust
anchors, so a steady-state pass costs a `stat` per file; the cache file is written by
the passes that write anyway (`save`), never by `--plan`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reconciler.model import DesiredCert
from reconciler.sans import renormalise

CACHE_VERSION = 2


@dataclass(frozen=True)
class FileState:
    kind: str  # "file" | "missing" | "symlink" | "directory" | "special" | "unreadable"
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    detail: str = ""  # the OS error for "unreadable", the link target for "symlink"
    stamp: tuple = ()  # (dev, ino, size, mtime_ns, ctime_ns) for the cache

    @property
    def present(self) -> bool:
        return self.kind == "file"


@dataclass(frozen=True)
class CertFacts:
    common_name: str | None
    sans: frozenset[str]  # normalised like a desired SAN set (reconciler.sans)
    not_before: datetime
    not_after: datetime
    key_type: str  # "EC P-256", "RSA 2048", "Ed25519"
    public_key_id: str  # sha256 of the SubjectPublicKeyInfo
    issued_by: str | None  # sha256 of the trust certificate that signed it, if any
    serial: str


@dataclass(frozen=True)
class Observed:
    cert_file: FileState
    key_file: FileState
    cert: CertFacts | None = None
    cert_error: str | None = None  # why a present cert file did not parse
    key_public_id: str | None = None
    key_error: str | None = None
    # None: we cannot tell (no trust anchors known for a remote CA)
    chains_to_issuer: bool | None = None

    @property
    def key_matches(self) -> bool:
        return self.cert is not None and self.key_public_id is not None and self.cert.public_key_id == self.key_public_id


# --------------------------------------------------------------------------- trust


@dataclass(frozen=True)
class Trust:
    """The issuer's trust anchors as fingerprint → certificate, plus whether absence means "no"."""

    certs: tuple  # tuple[x509.Certificate, ...]
    fingerprints: tuple[str, ...]
    authoritative: bool  # an empty set means "nothing chains to it" (embedded CA) vs "unknown"
    digest: str = ""  # of the fingerprints: part of every observation cache key

    @classmethod
    def of(cls, certs: list, authoritative: bool) -> "Trust":
        from cryptography.hazmat.primitives import hashes

        fingerprints = tuple(c.fingerprint(hashes.SHA256()).hex() for c in certs)
        digest = hashlib.sha256(",".join(sorted(fingerprints)).encode()).hexdigest()[:16]
        return cls(tuple(certs), fingerprints, authoritative, digest)


# --------------------------------------------------------------------------- files


def stat_file(path: Path, follow_symlink: bool = False) -> FileState:
    try:
        st = os.stat(path) if follow_symlink else os.lstat(path)
    except FileNotFoundError:
        return FileState("missing")
    except NotADirectoryError:
        return FileState("unreadable", detail="a parent of the path is not a directory")
    except OSError as exc:
        return FileState("unreadable", detail=exc.strerror or str(exc))
    kind = "file"
    detail = ""
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
        try:
            detail = os.readlink(path)
        except OSError:
            pass
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif not stat.S_ISREG(st.st_mode):
        kind = "special"
    return FileState(
        kind,
        st.st_uid,
        st.st_gid,
        stat.S_IMODE(st.st_mode),
        detail,
        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
    )


def _read(path: Path) -> tuple[bytes | None, str | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, exc.strerror or str(exc)
    try:
        with os.fdopen(fd, "rb") as fh:
            return fh.read(1024 * 1024 + 1), None
    except OSError as exc:
        return None, exc.strerror or str(exc)


# --------------------------------------------------------------------------- parsing


def key_type_of(public_key) -> str:
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
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def parse_cert(data: bytes, trust: Trust) -> tuple[CertFacts | None, str | None]:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.x509.oid import NameOID

    if len(data) > 1024 * 1024:
        return None, "file is larger than 1 MiB; not a certificate"
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return None, "not a PEM X.509 certificate"
    leaf = certs[0]
    try:
        cn_attrs = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cn_attrs[0].value) if cn_attrs else None
        names: list[str] = []
        try:
            ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names += ext.get_values_for_type(x509.DNSName)
            names += (f"IP:{ip}" for ip in ext.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            pass
        public_key = leaf.public_key()
        facts = CertFacts(
            common_name=cn,
            sans=renormalise(names),  # the same canonical form as a desired SAN set
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            key_type=key_type_of(public_key),
            public_key_id=public_key_id(public_key),
            issued_by=_issued_by(leaf, certs[1:], trust),
            serial=format(leaf.serial_number, "x"),
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # UnsupportedAlgorithm: a public key type cryptography cannot load (a foreign file)
        return None, f"certificate does not parse: {exc}"
    return facts, None


def _issued_by(leaf, chain: list, trust: Trust) -> str | None:
    """Fingerprint of the trust certificate `leaf` chains to (directly or through `chain`)."""
    anchors = list(zip(trust.certs, trust.fingerprints))

    def signed_by(cert, issuer) -> bool:
        if cert.issuer != issuer.subject:
            return False
        try:
            cert.verify_directly_issued_by(issuer)
            return True
        except Exception:  # wrong signature, unsupported algorithm: not ours
            return False

    for anchor, fp in anchors:
        if signed_by(leaf, anchor):
            return fp
    for intermediate in chain:
        if signed_by(leaf, intermediate):
            for anchor, fp in anchors:
                if signed_by(intermediate, anchor):
                    return fp
    return None


def parse_key(data: bytes) -> tuple[str | None, str | None]:
    from cryptography.hazmat.primitives import serialization

    if len(data) > 1024 * 1024:
        return None, "file is larger than 1 MiB; not a private key"
    try:
        key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        return None, "private key is encrypted; the reconciler manages unencrypted keys only"
    except (ValueError, Exception) as exc:  # cryptography raises several types for garbage
        return None, "not a PEM private key" if "PEM" in str(exc) or "Could not deserialize" in str(exc) else "not a usable private key"
    return public_key_id(key.public_key()), None


# --------------------------------------------------------------------------- observe


def observe(cert: DesiredCert, trust: Trust, cache: "ObservationCache | None" = None) -> Observed:
    follow = cert.allow_symlink
    cert_file = stat_file(cert.cert_path, follow)
    key_file = stat_file(cert.key_path, follow)
    if cache is not None:
        hit = cache.get(cert, cert_file, key_file, trust)
        if hit is not None:
            return hit
    facts = cert_error = key_id = key_error = None
    if cert_file.present:
        data, err = _read(cert.cert_path)
        if err:
            cert_file = FileState("unreadable", cert_file.uid, cert_file.gid, cert_file.mode, err, cert_file.stamp)
        else:
            facts, cert_error = parse_cert(data, trust)
    if key_file.present:
        data, err = _read(cert.key_path)
        if err:
            key_file = FileState("unreadable", key_file.uid, key_file.gid, key_file.mode, err, key_file.stamp)
        else:
            key_id, key_error = parse_key(data)
    chains = None
    if facts is not None:
        if facts.issued_by is not None:
            chains = True
        elif trust.fingerprints or trust.authoritative:
            chains = False
    observed = Observed(cert_file, key_file, facts, cert_error, key_id, key_error, chains)
    if cache is not None:
        cache.put(cert, observed, trust)
    return observed


def observe_all(certs, trust: Trust, cache: "ObservationCache | None" = None) -> dict[str, Observed]:
    return {c.name: observe(c, trust, cache) for c in certs}


# --------------------------------------------------------------------------- cache


class ObservationCache:
    """Parsed facts keyed by the files' identity; stale or damaged entries are simply re-read."""

    def __init__(self, state_dir: Path | None):
        self.path = state_dir / "cache" / "observed.json" if state_dir else None
        self.entries: dict[str, Any] = {}
        self.dirty = False
        if self.path:
            try:
                raw = json.loads(self.path.read_bytes())
                if raw.get("version") == CACHE_VERSION and isinstance(raw.get("entries"), dict):
                    self.entries = raw["entries"]
            except (OSError, ValueError, AttributeError):
                pass

    @staticmethod
    def _key(cert: DesiredCert) -> str:
        return f"{cert.cert_path}\0{cert.key_path}"

    def get(self, cert: DesiredCert, cert_file: FileState, key_file: FileState, trust: Trust) -> Observed | None:
        row = self.entries.get(self._key(cert))
        if not row or not cert_file.present or not key_file.present:
            return None
        if row[0] != list(cert_file.stamp) or row[1] != list(key_file.stamp) or row[2] != trust.digest:
            return None
        try:
            f = row[3]
            facts = CertFacts(
                f["common_name"],
                frozenset(f["sans"]),
                datetime.fromtimestamp(f["not_before"], timezone.utc),
                datetime.fromtimestamp(f["not_after"], timezone.utc),
                f["key_type"],
                f["public_key_id"],
                f["issued_by"],
                f["serial"],
            )
            return Observed(cert_file, key_file, facts, None, row[4], None, row[5])
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def put(self, cert: DesiredCert, observed: Observed, trust: Trust) -> None:
        key = self._key(cert)
        if observed.cert is None or observed.key_public_id is None:
            if self.entries.pop(key, None) is not None:
                self.dirty = True
            return
        facts = asdict(observed.cert)
        facts["sans"] = sorted(facts["sans"])
        facts["not_before"] = observed.cert.not_before.timestamp()
        facts["not_after"] = observed.cert.not_after.timestamp()
        self.entries[key] = [
            list(observed.cert_file.stamp),
            list(observed.key_file.stamp),
            trust.digest,
            facts,
            observed.key_public_id,
            observed.chains_to_issuer,
        ]
        self.dirty = True

    def save(self, keep: set[str] | None = None) -> None:
        """Write the cache (only from passes that may write). `keep`: names of live entries."""
        if not self.path or not self.dirty:
            return
        from reconciler.atomic import write_atomic

        try:
            data = json.dumps({"version": CACHE_VERSION, "entries": self.entries}, separators=(",", ":")).encode()
            write_atomic(self.path, data, mode=0o600, make_parents=True)
        except OSError:
            pass
