"""Which step-ca we trust: its root (a file, or downloaded once by its fingerprint and
cached), and its intermediates (those it sends when it signs, and those found in certificate
files that chain to the root), cached in `<state-dir>/step-ca/`.

Reads local files only, except the one-off `/root/<fingerprint>` download: the only
unverified request, whose answer is believed only when its sha256 is the configured
fingerprint (what `step ca bootstrap` does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from reconciler import crypto
from reconciler.atomic import write_atomic
from reconciler.issuers import IssuerError
from reconciler.issuers.stepca_config import fingerprint_of, normalise_fingerprint
from reconciler.issuers.stepca_transport import Refused, StepCATransport
from reconciler.model import IssuerSpec

log = logging.getLogger("reconciler.issuers.stepca")

Root = tuple[x509.Certificate, bytes, Path]  # the certificate, its PEM, the file it is in


def load_pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def chain_up(known: list[x509.Certificate], pending: list[x509.Certificate]) -> list[x509.Certificate]:
    """The certificates of `pending` signed by one in `known`, or by one found so (an
    intermediate may be signed by another): each is added to `known` and returned."""
    pending = list(pending)
    found: list[x509.Certificate] = []
    progress = True
    while pending and progress:
        progress = False
        for cert in list(pending):
            if any(crypto.issued_by(cert, parent) for parent in known):
                pending.remove(cert)
                known.append(cert)
                found.append(cert)
                progress = True
    return found


class StepCATrust:
    def __init__(self, spec: IssuerSpec, state_dir: Path, transport: StepCATransport):
        self.spec = spec
        self.cache_dir = Path(state_dir) / "step-ca"
        self.transport = transport
        self._root_lock = threading.Lock()
        self._seen_lock = threading.Lock()
        self._root: Root | None = None
        self._seen_intermediates: set[str] = set()
        self._learned: list[x509.Certificate] = []  # verified intermediates from files, this run

    # ---- the root -----------------------------------------------------------------------------

    def root(self) -> Root:
        """The root in hand: read from its file, or downloaded and verified by its fingerprint
        (cached in the state folder), once per instance."""
        with self._root_lock:
            if self._root is None:
                self._root = self._load_root()
            return self._root

    def root_pem(self) -> bytes:
        return self.root()[1]

    def description(self) -> str:
        """The root's file, for messages; "(none)" before a fingerprint's root is cached."""
        if self.spec.root is not None:
            return str(self.spec.root)
        if self.spec.fingerprint:
            with contextlib.suppress(IssuerError):
                return str(self._cached_root_path(normalise_fingerprint(self.spec.fingerprint)))
        return "(none)"

    def untrusted_reason(self) -> str:
        """Why roots() is empty, for the plan's note."""
        if self.spec.root is not None:
            return f"the root certificate {self.spec.root} cannot be read"
        if self.spec.fingerprint:
            return (
                f"the root with fingerprint {self.spec.fingerprint[:16]}... has not been downloaded from "
                f"{self.transport.url} yet; a pass fetches and verifies it before it plans"
            )
        return "no root certificate or fingerprint is configured"

    def _cached_root_path(self, fp: str) -> Path:
        return self.cache_dir / f"root-{fp}.crt"

    def _load_root(self) -> Root:
        want = normalise_fingerprint(self.spec.fingerprint) if self.spec.fingerprint else None
        if self.spec.root is not None:
            return self._root_file(Path(self.spec.root), want)
        if want:
            return self._bootstrap_root(want)
        raise IssuerError(
            f"no trust configured for step-ca at {self.transport.url}: neither a root file nor a fingerprint",
            hint=f"set {self.spec.where('root')} to the CA's root certificate, or {self.spec.where('fingerprint')} "
            "to its sha256 (`step certificate fingerprint root_ca.crt`)",
        )

    def _root_file(self, path: Path, want: str | None) -> Root:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IssuerError(
                f"step-ca root certificate {path} cannot be read: {exc.strerror or exc}",
                hint=f"fetch it with `step ca root {path}` or fix {self.spec.where('root')}",
            ) from None
        try:
            cert = load_pem_certs(data)[0]
        except (ValueError, IndexError):
            raise IssuerError(
                f"step-ca root certificate {path} is not a PEM certificate",
                hint="it should start with -----BEGIN CERTIFICATE-----; fetch it with `step ca root`",
            ) from None
        if want and fingerprint_of(cert) != want:
            raise IssuerError(
                f"step-ca root certificate {path} has fingerprint {fingerprint_of(cert)}, not the configured {want}",
                hint="the root file and the fingerprint belong to different CAs; fix one of them",
            )
        return cert, to_pem(cert), path

    def _bootstrap_root(self, fp: str) -> Root:
        path = self._cached_root_path(fp)
        with contextlib.suppress(OSError, ValueError, IndexError):
            cert = load_pem_certs(path.read_bytes())[0]
            if fingerprint_of(cert) == fp:
                return cert, to_pem(cert), path
        url = f"{self.transport.url}/root/{fp}"
        where = self.spec.where("fingerprint")
        with self.transport.new_client(verify=False) as client:
            try:
                _, data = self.transport.call("GET", f"/root/{fp}", client=client, what="downloading the root")
            except Refused as exc:
                if exc.status != 404:
                    raise
                raise IssuerError(
                    f"step-ca at {self.transport.url} has no root with fingerprint {fp}",
                    hint=f"check {where} against `step certificate fingerprint root_ca.crt` on the CA",
                ) from None
        pem = data.get("ca") if isinstance(data, dict) else None
        try:
            cert = load_pem_certs(pem.encode("ascii"))[0]  # type: ignore[union-attr]
        except (AttributeError, ValueError, IndexError, UnicodeEncodeError):
            raise IssuerError(
                f"step-ca at {url} did not return a root certificate",
                hint=f"check that {self.spec.where('url')} points at step-ca",
            ) from None
        got = fingerprint_of(cert)
        if got != fp:
            raise IssuerError(
                f"root downloaded from {url} has fingerprint {got}, not the configured {fp}",
                hint="the fingerprint does not belong to this CA (or someone is in the middle); "
                f"check {where} against `step certificate fingerprint root_ca.crt` on the CA",
            )
        try:
            write_atomic(path, to_pem(cert), 0o644, make_parents=True)
        except OSError as exc:
            log.warning("could not cache the step-ca root in %s: %s", path, exc)
        log.info("bootstrapped trust in step-ca at %s: root %s saved to %s", self.transport.url, fp, path)
        return cert, to_pem(cert), path

    # ---- roots and intermediates, for observe and rewrite_chain ------------------------------

    def roots(self) -> list[x509.Certificate]:
        """The root and the intermediates known to chain to it; [] while the root is not at
        hand. Never downloads anything."""
        roots: list[x509.Certificate] = []
        candidates: list[Path] = []
        if self.spec.root is not None:
            candidates.append(Path(self.spec.root))
        elif self.spec.fingerprint:
            with contextlib.suppress(IssuerError):
                candidates.append(self._cached_root_path(normalise_fingerprint(self.spec.fingerprint)))
        for path in candidates:
            try:
                certs = load_pem_certs(path.read_bytes())
            except (OSError, ValueError):
                continue
            if self.spec.fingerprint and self.spec.root is None:
                want = normalise_fingerprint(self.spec.fingerprint)
                certs = [c for c in certs if fingerprint_of(c) == want]
            roots.extend(certs[:1])
        if not roots:
            return []
        known = list(roots)
        # only intermediates that chain to a root we return: a stale cache from another CA
        # must not make foreign certificates look like ours
        chain_up(known, self.cached_intermediates() + list(self._learned))
        return list({fingerprint_of(c): c for c in known}.values())

    def learn(self, candidates: list[x509.Certificate], persist: bool) -> int:
        """Adopt the CA certificates found in certificate files that chain by signature to
        the verified root (see StepCA.learn_intermediates). Returns how many."""
        known = self.roots()
        if not known:
            return 0
        have = {fingerprint_of(c) for c in known}
        pending = [c for c in candidates if is_ca(c) and not crypto.issued_by(c, c) and fingerprint_of(c) not in have]
        learned = chain_up(known, pending)
        self._learned.extend(learned)
        if persist and self._learned:
            self.remember(self._learned)
        return len(learned)

    def _intermediates_dir(self) -> Path:
        return self.cache_dir / "intermediates"

    def cached_intermediates(self) -> list[x509.Certificate]:
        found: list[x509.Certificate] = []
        try:
            entries = sorted(self._intermediates_dir().glob("*.crt"))
        except OSError:
            return found
        for entry in entries:
            with contextlib.suppress(OSError, ValueError):
                found.extend(load_pem_certs(entry.read_bytes())[:1])
        return found

    def remember(self, certs: list[x509.Certificate]) -> None:
        """Cache intermediates the CA sent (or that were learned), once per fingerprint."""
        for cert in certs:
            fp = fingerprint_of(cert)
            with self._seen_lock:
                if fp in self._seen_intermediates:
                    continue
                self._seen_intermediates.add(fp)
            path = self._intermediates_dir() / f"{fp}.crt"
            if path.exists():
                continue
            try:
                write_atomic(path, to_pem(cert), 0o644, make_parents=True)
            except OSError as exc:
                log.warning("could not cache step-ca intermediate in %s: %s", path, exc)
