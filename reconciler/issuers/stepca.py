"""Smallstep step-ca as an `Issuer`: JWK provisioner one-time tokens, mTLS renew/rekey.

Everything that crosses the network is here, and every answer is checked before it is
believed: a certificate must carry the key we asked for, the names we asked for, and
chain to the root we trust. TLS to the CA is always verified; the only unverified
request is the one-off `/root/<fingerprint>` download of fingerprint-only bootstrap,
whose answer is accepted only when its sha256 matches the configured fingerprint.

Beside it: `stepca_config` (where the CA is, which root), `stepca_jose` (the provisioner
key's JWE), `stepca_doctor` (the checks `reconcile doctor` runs).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler import crypto
from reconciler import sans as sanlib
from reconciler.atomic import write_atomic
from reconciler.faults import fault_point
from reconciler.issuers import IssueRequest, Issued, IssuerError
from reconciler.model import IssuerSpec
from reconciler.statefiles import private_dir

from reconciler.issuers.stepca_config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    fingerprint_of,
    normalise_fingerprint,
    read_step_defaults,
    resolve_spec,
    spec_from_options,
    steppath,
)
from reconciler.issuers.stepca_jose import STEP_PBKDF2_ITERATIONS, _default_alg, decrypt_provisioner_key

log = logging.getLogger("reconciler.issuers.stepca")

__all__ = [
    "StepCA", "build_csr", "decrypt_provisioner_key", "doctor_checks", "fingerprint_of",
    "normalise_fingerprint", "read_step_defaults", "resolve_spec", "spec_from_options", "steppath",
    "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_READ_TIMEOUT", "STEP_PBKDF2_ITERATIONS",
]

TOKEN_LIFETIME = timedelta(minutes=5)
# step-ca checks a one-time token's nbf/iat/exp with go-jose's default leeway of one
# minute (jose.DefaultLeeway); a host whose clock differs from the CA's by more gets its
# tokens refused, and certificates whose validity looks shifted here. Compared with the
# Date header of every answer, the request's own duration allowed for.
CLOCK_LEEWAY = timedelta(minutes=1)
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_MAX_PROVISIONER_PAGES = 1000

# --------------------------------------------------------------------------- small helpers


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    write_atomic(path, data, mode, make_parents=True)


def _load_pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def _request_names(request: IssueRequest) -> tuple[list[str], list[str]]:
    """(DNS names, IP strings) of a request, the common name counted in.

    The token's `sans` and the CSR's SANs come from this one list: step-ca insists they
    match one to one.
    """
    return sanlib.split(sanlib.renormalise([request.common_name, *request.sans]))


def build_csr(request: IssueRequest, key) -> bytes:
    """PEM CSR: subject CN = common name, SANs = the request's DNS and IP names.

    step-ca takes the names from the token's `sans` claim, not from here; the CSR carries
    them anyway so that it describes what we ask for.
    """
    dns, ips = _request_names(request)
    return crypto.build_csr(request.common_name, dns + ips, key)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _walk_causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class _Refused(IssuerError):
    """The CA answered and said no (4xx, or it rejected our client certificate)."""

    status: int = 0


def _refusal_hint(message: str, status: int) -> str:
    text = message.lower()
    if "duration" in text:
        return "shorten the certificate's duration in the manifest, or raise the provisioner's maxTLSCertDuration in ca.json"
    if "not allowed" in text or "policy" in text or "san" in text or "dns name" in text or "ip address" in text:
        return "the provisioner's policy does not allow these names; change the names or the policy in ca.json"
    if status == 401:
        return "the CA did not accept the one-time token: check the provisioner, the host's clock, and the CA's log"
    return "see the step-ca log for the reason"


# --------------------------------------------------------------------------- the issuer


class StepCA:
    """One pass's connection to a step-ca. Thread-safe; create one per pass."""

    def __init__(
        self,
        spec: IssuerSpec,
        state_dir: Path,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_connections: int = 8,
    ):
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.cache_dir = self.state_dir / "step-ca"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.url = (spec.url or "").rstrip("/")
        self._lock = threading.Lock()
        self._key_lock = threading.Lock()
        self._root: tuple[x509.Certificate, bytes, Path] | None = None
        self._client: httpx.Client | None = None
        self._root_lock = threading.Lock()
        self._jwk = None  # the decrypted provisioner key (jwcrypto JWK), memory only
        self._key_error: IssuerError | None = None  # why the key could not be had, this pass
        self._silent_since: IssuerError | None = None  # a connect timeout seen in this pass
        self._clock_error: IssuerError | None = None  # the clocks differ: nothing more is asked this pass
        self._kid: str | None = None
        self._alg: str | None = None
        self._seen_intermediates: set[str] = set()
        self._learned: list[x509.Certificate] = []  # verified intermediates from files, this run
        parts = urlsplit(self.url) if self.url else None
        self.host = (parts.hostname or "") if parts else ""
        self.port = (parts.port or (443 if parts.scheme == "https" else 80)) if parts else 0

    # ---- protocol ---------------------------------------------------------------------------

    def issue(self, request: IssueRequest, key) -> Issued:
        self._check_configured()
        root_cert, root_pem, _ = self._trust_root()
        jwk = self._provisioner_key()
        token = self._token(jwk, request, root_cert)
        body = {
            "csr": build_csr(request, key).decode("ascii"),
            "ott": token,
            "notAfter": _rfc3339(datetime.now(timezone.utc) + request.duration),
        }
        status, data = self._call("POST", "/1.0/sign", json_body=body, what=f"signing {request.name}")
        return self._issued(data, request, key, root_cert, root_pem, "POST /1.0/sign")

    def renew(self, request: IssueRequest, key, current_cert_pem: bytes, current_key) -> Issued:
        self._check_configured()
        try:
            return self._renew_mtls(request, key, current_cert_pem, current_key)
        except _Refused as exc:
            log.info(
                "step-ca would not renew %s over mTLS (%s); issuing it with a one-time token instead",
                request.name,
                exc.args[0],
            )
        return self.issue(request, key)

    def trust_roots(self) -> list[x509.Certificate]:
        roots: list[x509.Certificate] = []
        candidates: list[Path] = []
        if self.spec.root is not None:
            candidates.append(Path(self.spec.root))
        elif self.spec.fingerprint:
            with contextlib.suppress(IssuerError):
                candidates.append(self._cached_root_path(normalise_fingerprint(self.spec.fingerprint)))
        for path in candidates:
            try:
                certs = _load_pem_certs(path.read_bytes())
            except (OSError, ValueError):
                continue
            if self.spec.fingerprint and self.spec.root is None:
                want = normalise_fingerprint(self.spec.fingerprint)
                certs = [c for c in certs if fingerprint_of(c) == want]
            roots.extend(certs[:1])
        if not roots:
            return []
        known = list(roots)
        pending = self._cached_intermediates() + list(self._learned)
        # keep only intermediates that chain to a root we return: a stale cache from
        # another CA must not make foreign certificates look like ours
        progress = True
        while pending and progress:
            progress = False
            for cert in list(pending):
                if any(crypto.issued_by(cert, parent) for parent in known):
                    known.append(cert)
                    pending.remove(cert)
                    progress = True
        return list({fingerprint_of(c): c for c in known}.values())

    def learn_intermediates(self, candidates: list[x509.Certificate], persist: bool) -> int:
        """Adopt the CA certificates found in certificate files on disk (the old script's
        `step ca certificate` bundles the intermediate) that chain by signature to the
        verified root: they are this CA's intermediates as surely as those it sends when it
        signs, and without them a leaf-only file of this CA would look foreign after a
        fresh state folder. step-ca 0.19 serves no intermediates endpoint to ask instead.
        `persist`: cache them like issued ones (a pass); otherwise only for this run (--plan,
        status). Returns how many were learned."""
        known = self.trust_roots()
        if not known:
            return 0
        have = {fingerprint_of(c) for c in known}
        pending = [c for c in candidates if _is_ca(c) and not crypto.issued_by(c, c) and fingerprint_of(c) not in have]
        learned = 0
        progress = True
        while pending and progress:  # an intermediate may be signed by another one found here
            progress = False
            for cert in list(pending):
                if any(crypto.issued_by(cert, parent) for parent in known):
                    pending.remove(cert)
                    known.append(cert)
                    self._learned.append(cert)
                    learned += 1
                    progress = True
        if persist and self._learned:
            self._remember_intermediates(self._learned)
        return learned

    def root_pem(self) -> bytes:
        return self._trust_root()[1]

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        self._jwk = None
        self._key_error = None

    def __enter__(self) -> "StepCA":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- configuration and trust --------------------------------------------------------------

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def _check_configured(self) -> None:
        if not self.url:
            raise IssuerError(
                "step-ca issuer has no URL",
                hint=f'set {self.spec.where("url")} (e.g. "https://ca.internal:9000")',
            )
        if urlsplit(self.url).scheme != "https":
            raise IssuerError(
                f"step-ca URL {self.url} is not https",
                hint="step-ca only speaks HTTPS; write the URL as https://host:port",
            )
        if not self.spec.provisioner:
            raise IssuerError(
                f"no provisioner set for step-ca at {self.url}",
                hint=f"set {self.spec.where('provisioner')} to the name of a JWK provisioner",
            )

    def fetch_root(self) -> None:
        """Have the root in hand: read the file, or download and verify it by its fingerprint
        (cached in the state folder). A pass calls this before it plans; --plan never does."""
        self._check_configured()
        self._trust_root()

    def untrusted_reason(self) -> str:
        """Why trust_roots() is empty, for the plan's note."""
        if self.spec.root is not None:
            return f"the root certificate {self.spec.root} cannot be read"
        if self.spec.fingerprint:
            return (
                f"the root with fingerprint {self.spec.fingerprint[:16]}... has not been downloaded from {self.url} yet; "
                "a pass fetches and verifies it before it plans"
            )
        return "no root certificate or fingerprint is configured"

    def _cached_root_path(self, fp: str) -> Path:
        return self.cache_dir / f"root-{fp}.crt"

    def _root_description(self) -> str:
        if self.spec.root is not None:
            return str(self.spec.root)
        if self.spec.fingerprint:
            with contextlib.suppress(IssuerError):
                return str(self._cached_root_path(normalise_fingerprint(self.spec.fingerprint)))
        return "(none)"

    def _trust_root(self) -> tuple[x509.Certificate, bytes, Path]:
        with self._root_lock:
            if self._root is None:
                self._root = self._load_trust_root()
            return self._root

    def _load_trust_root(self) -> tuple[x509.Certificate, bytes, Path]:
        want = normalise_fingerprint(self.spec.fingerprint) if self.spec.fingerprint else None
        if self.spec.root is not None:
            path = Path(self.spec.root)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise IssuerError(
                    f"step-ca root certificate {path} cannot be read: {exc.strerror or exc}",
                    hint=f"fetch it with `step ca root {path}` or fix {self.spec.where('root')}",
                ) from None
            try:
                cert = _load_pem_certs(data)[0]
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
            return cert, cert.public_bytes(serialization.Encoding.PEM), path
        if want:
            return self._bootstrap_root(want)
        raise IssuerError(
            f"no trust configured for step-ca at {self.url}: neither a root file nor a fingerprint",
            hint=f"set {self.spec.where('root')} to the CA's root certificate, or {self.spec.where('fingerprint')} to its sha256 "
            "(`step certificate fingerprint root_ca.crt`)",
        )

    def _bootstrap_root(self, fp: str) -> tuple[x509.Certificate, bytes, Path]:
        path = self._cached_root_path(fp)
        with contextlib.suppress(OSError, ValueError, IndexError):
            cert = _load_pem_certs(path.read_bytes())[0]
            if fingerprint_of(cert) == fp:
                return cert, cert.public_bytes(serialization.Encoding.PEM), path
        # The one request that is not verified: what it returns is only believed when its
        # sha256 is the fingerprint the operator gave us (what `step ca bootstrap` does).
        url = f"{self.url}/root/{fp}"
        with httpx.Client(verify=False, timeout=self._timeout(), trust_env=False) as client:
            try:
                status, data = self._call("GET", f"/root/{fp}", client=client, what="downloading the root")
            except _Refused as exc:
                if exc.status != 404:
                    raise
                raise IssuerError(
                    f"step-ca at {self.url} has no root with fingerprint {fp}",
                    hint=f"check {self.spec.where('fingerprint')} against `step certificate fingerprint root_ca.crt` on the CA",
                ) from None
        pem = data.get("ca") if isinstance(data, dict) else None
        try:
            cert = _load_pem_certs(pem.encode("ascii"))[0]  # type: ignore[union-attr]
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
                f"check {self.spec.where('fingerprint')} against `step certificate fingerprint root_ca.crt` on the CA",
            )
        pem_bytes = cert.public_bytes(serialization.Encoding.PEM)
        try:
            _atomic_write(path, pem_bytes, 0o644)
        except OSError as exc:
            log.warning("could not cache the step-ca root in %s: %s", path, exc)
        log.info("bootstrapped trust in step-ca at %s: root %s saved to %s", self.url, fp, path)
        return cert, pem_bytes, path

    def _ssl_context(self, client_chain: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
        _, root_pem, _ = self._trust_root()
        ctx = ssl.create_default_context(cadata=root_pem.decode("ascii"))
        if client_chain is not None:
            cert_pem, key_pem = client_chain
            # ssl only loads client credentials from files: a 0600 file in a fresh folder
            # inside the state folder's 0700 private folder (never a shared /tmp), deleted as
            # soon as OpenSSL has read it; a kill in between leaves it for the next pass's sweep
            tmpdir = tempfile.mkdtemp(prefix="mtls-", dir=private_dir(self.state_dir))
            try:
                cred = Path(tmpdir) / "client.pem"
                fd = os.open(cred, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(key_pem + b"\n" + cert_pem)
                fault_point("mtls_credential_written")
                ctx.load_cert_chain(str(cred))
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return ctx

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout, read=self.read_timeout, write=self.read_timeout, pool=self.read_timeout
        )

    def _http(self) -> httpx.Client:
        if self._client is not None:
            return self._client
        ctx = self._ssl_context()
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    verify=ctx,
                    timeout=self._timeout(),
                    limits=httpx.Limits(max_connections=self.max_connections),
                    trust_env=False,
                )
            return self._client

    # ---- HTTP -------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict | None = None,
        client: httpx.Client | None = None,
        what: str,
    ) -> tuple[int, Any]:
        """One request with a total deadline; returns (status, parsed JSON) for 2xx."""
        if self._silent_since is not None:
            # a CA that let a connection attempt time out in this pass is not asked again by
            # every other certificate: each would wait out its own connect timeout
            raise IssuerError(str(self._silent_since.args[0]), self._silent_since.hint, transient=True)
        if self._clock_error is not None:
            raise copy.copy(self._clock_error)
        client = client or self._http()
        label = f"{method} {path}"
        deadline = time.monotonic() + self.connect_timeout + self.read_timeout
        sent = time.time()
        try:
            with client.stream(method, self.url + path, json=json_body, params=params) as resp:
                self._check_clock(resp.headers.get("date"), sent, time.time())
                chunks: list[bytes] = []
                size = 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise IssuerError(
                            f"step-ca at {self.url} sent more than {MAX_RESPONSE_BYTES} bytes for {label}",
                            hint=f"check that {self.spec.where('url')} points at step-ca",
                        )
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("total deadline passed")
                    chunks.append(chunk)
                status = resp.status_code
                raw = b"".join(chunks)
        except IssuerError:
            raise
        except httpx.HTTPError as exc:
            error = self._network_error(exc, label, what)
            if isinstance(exc, httpx.ConnectTimeout):
                self._silent_since = error
            raise error from None
        if status >= 500:
            raise IssuerError(
                f"step-ca at {self.url} failed while {what} ({label}: HTTP {status}): {_ca_message(raw)}",
                hint="a CA-side error; the next pass retries it; see the step-ca log if it persists",
                transient=True,
            )
        if status >= 400:
            message = _ca_message(raw)
            refused = _Refused(
                f"step-ca refused {what} ({label}: HTTP {status}): {message}",
                hint=_refusal_hint(message, status),
            )
            refused.status = status
            raise refused
        if status >= 300:
            raise IssuerError(
                f"step-ca at {self.url} redirected {label} (HTTP {status})",
                hint=f"set {self.spec.where('url')} to the CA's own address, not one that redirects",
            )
        try:
            data = json.loads(raw)
        except ValueError:
            raise IssuerError(
                f"step-ca at {self.url} sent an unreadable answer to {label} (not complete JSON, {len(raw)} bytes)",
                hint=f"check that {self.spec.where('url')} points at step-ca and nothing in between rewrites its answers",
            ) from None
        return status, data

    def _check_clock(self, date: str | None, sent: float, received: float) -> None:
        """Refuse to go on when the CA's clock (its Date header) and ours differ by more than
        CLOCK_LEEWAY. An answer without a usable Date (a proxy, not step-ca) is not judged."""
        from email.utils import parsedate_to_datetime

        try:
            theirs = parsedate_to_datetime(date).timestamp() if date else None
        except (TypeError, ValueError, IndexError, OverflowError):
            theirs = None
        if theirs is None:
            return
        # the Date was made between our send and our receipt, and is truncated to the second
        if theirs + 1 < sent:
            off, word = sent - (theirs + 1), "behind"
        elif theirs > received:
            off, word = theirs - received, "ahead of"
        else:
            return
        if off <= CLOCK_LEEWAY.total_seconds():
            return
        from reconciler.durations import format_duration

        here = datetime.fromtimestamp(received, timezone.utc)
        error = IssuerError(
            f"step-ca at {self.url} and this host disagree on the time by {format_duration(timedelta(seconds=off))}: "
            f"the CA's clock is {word} this host's (its Date header says {date}, this host's clock "
            f"{here:%a, %d %b %Y %H:%M:%S GMT}), more than step-ca's {format_duration(CLOCK_LEEWAY)} token leeway; "
            "refusing to ask for certificates until the clocks agree",
            hint="fix the clock of this host or of the CA host (NTP: `timedatectl set-ntp true`, `chronyc tracking`); "
            "nothing was changed",
        )
        self._clock_error = copy.copy(error)
        raise error

    def _network_error(self, exc: httpx.HTTPError, label: str, what: str) -> IssuerError:
        chain = list(_walk_causes(exc))
        verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
        if verify is not None:
            reason = getattr(verify, "verify_message", None) or str(verify)
            if "not yet valid" in reason or "expired" in reason:
                return IssuerError(
                    f"TLS verification of step-ca at {self.hostport} failed: its certificate is {reason.split('certificate is ')[-1]} "
                    "by this host's clock",
                    hint="this host's clock (or the CA's) is wrong: fix it (NTP: `timedatectl set-ntp true`, "
                    "`chronyc tracking`); if the clocks are right, renew the CA's own TLS certificate",
                )
            return IssuerError(
                f"TLS verification of step-ca at {self.hostport} failed against root {self._root_description()}: {reason}",
                hint="that root (or fingerprint) is not this CA's: fetch the right one with `step ca root`, "
                f"or check {self.spec.where('url')} points at the CA you meant",
            )
        tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
        if tls is not None:
            reason = getattr(tls, "reason", None) or str(tls)
            return _Refused(
                f"step-ca at {self.hostport} broke off the TLS handshake while {what}: {reason}",
                hint="the CA did not accept the client certificate (expired, or not issued by it), "
                "or the port does not speak TLS",
            )
        if isinstance(exc, httpx.ConnectTimeout):
            return IssuerError(
                f"step-ca at {self.hostport} is unreachable: no connection within {self.connect_timeout:g}s",
                hint=f"check the CA container/service is running and the firewall allows port {self.port}",
                transient=True,
            )
        if isinstance(exc, httpx.TimeoutException):
            return IssuerError(
                f"step-ca at {self.hostport} did not answer {label} within {self.read_timeout:g}s",
                hint="the CA is overloaded or stuck; the next pass retries it (--watch retries with backoff)",
                transient=True,
            )
        if any(isinstance(e, socket.gaierror) for e in chain):
            return IssuerError(
                f"step-ca host {self.host} cannot be resolved ({self.hostport})",
                hint=f"check the host name in {self.spec.where('url')} and this host's DNS",
                transient=True,
            )
        if any(isinstance(e, ConnectionRefusedError) for e in chain):
            return IssuerError(
                f"step-ca at {self.hostport} is unreachable: connection refused",
                hint=f"check the CA container/service is running and the firewall allows port {self.port}",
                transient=True,
            )
        if isinstance(exc, httpx.ConnectError):
            return IssuerError(
                f"step-ca at {self.hostport} is unreachable: {exc}",
                hint=f"check the CA container/service is running and the firewall allows port {self.port}",
                transient=True,
            )
        return IssuerError(
            f"connection to step-ca at {self.hostport} broke off during {label}: {exc or type(exc).__name__}",
            hint="a network or CA hiccup; the next pass retries it (--watch retries with backoff)",
            transient=True,
        )

    # ---- provisioner key ----------------------------------------------------------------------

    def _provisioners(self) -> list[dict]:
        found: list[dict] = []
        cursor = ""
        seen: set[str] = set()
        for _ in range(_MAX_PROVISIONER_PAGES):
            params = {"cursor": cursor} if cursor else None
            _, data = self._call("GET", "/provisioners", params=params, what="listing provisioners")
            page = data.get("provisioners") if isinstance(data, dict) else None
            if not isinstance(page, list):
                raise IssuerError(
                    f"step-ca at {self.url} sent a provisioner list without a 'provisioners' array",
                    hint=f"check that {self.spec.where('url')} points at step-ca",
                )
            found.extend(p for p in page if isinstance(p, dict))
            cursor = data.get("nextCursor") or ""
            if not cursor or cursor in seen:
                break
            seen.add(cursor)
        return found

    def _find_provisioner(self) -> dict:
        name = self.spec.provisioner
        everything = self._provisioners()
        named = [p for p in everything if p.get("name") == name]
        jwk = [p for p in named if p.get("type") == "JWK"]
        if jwk:
            return jwk[0]
        if named:
            raise IssuerError(
                f"provisioner '{name}' at {self.url} is of type {named[0].get('type')}, not JWK",
                hint="the reconciler signs with JWK provisioners; add one with `step ca provisioner add NAME --create`",
            )
        listing = ", ".join(f"{p.get('name')} ({p.get('type')})" for p in everything) or "none"
        raise IssuerError(
            f"provisioner '{name}' not found at {self.url}; it has: {listing}",
            hint=f"set {self.spec.where('provisioner')} to one of those (a JWK one)",
        )

    def _read_password(self) -> bytes:
        path = self.spec.password_file
        if path is None:
            raise IssuerError(
                f"no password file set for provisioner '{self.spec.provisioner}'",
                hint=f"set {self.spec.where('password_file')} to a 0600 file "
                "holding the provisioner password",
            )
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IssuerError(
                f"password file {path} cannot be read: {exc.strerror or exc}",
                hint="create it with the provisioner's password (mode 0600, readable by the reconciler's user) "
                f"or fix {self.spec.where('password_file')}",
            ) from None
        password = data.rstrip(b"\r\n")
        if not password:
            raise IssuerError(
                f"password file {path} is empty",
                hint="write the provisioner's password into it",
            )
        return password

    def _provisioner_key(self):
        """The decrypted JWK, decrypted once per instance on first use.

        A failure that needs an operator (wrong password, no password file, no such
        provisioner) is remembered as well: otherwise every certificate of the pass would
        list the provisioners and run PBKDF2 again only to fail the same way. Transient
        failures (CA unreachable) are not remembered; a later certificate may succeed."""
        if self._jwk is not None:
            return self._jwk
        with self._key_lock:
            if self._jwk is None:
                if self._key_error is not None:
                    raise copy.copy(self._key_error)
                try:
                    self._jwk = self._decrypt_provisioner_key()
                except IssuerError as exc:
                    if not exc.transient:
                        self._key_error = copy.copy(exc)
                    raise
            return self._jwk

    def _decrypt_provisioner_key(self):
        password = self._read_password()  # a local mistake is reported before any network
        provisioner = self._find_provisioner()
        name = self.spec.provisioner
        encrypted = provisioner.get("encryptedKey")
        if not isinstance(encrypted, str) or not encrypted:
            raise IssuerError(
                f"provisioner '{name}' at {self.url} publishes no encrypted key",
                hint="the JWK provisioner was added without --create; re-add it with an encrypted key",
            )
        jwk = decrypt_provisioner_key(encrypted, password, name, str(self.spec.password_file))
        del password
        public = provisioner.get("key") if isinstance(provisioner.get("key"), dict) else {}
        kid = public.get("kid")
        if kid and jwk.get("kid") and jwk.get("kid") != kid:
            raise IssuerError(
                f"provisioner '{name}' key id {jwk.get('kid')} does not match its public key {kid}",
                hint="the CA's configuration is inconsistent; re-create the provisioner",
            )
        self._kid = kid or jwk.get("kid")
        self._alg = public.get("alg") or jwk.get("alg")
        return jwk

    def _token(self, jwk, request: IssueRequest, root: x509.Certificate) -> str:
        from jwcrypto import jwt

        now = int(time.time())
        dns, ips = _request_names(request)
        names = dns + ips
        header = {"alg": self._alg or _default_alg(jwk), "kid": self._kid, "typ": "JWT"}
        claims = {
            "iss": self.spec.provisioner,
            "sub": request.common_name,
            "aud": f"{self.url}/1.0/sign",
            "sans": names,
            "sha": fingerprint_of(root),
            "nbf": now,
            "iat": now,
            "exp": now + int(TOKEN_LIFETIME.total_seconds()),
            "jti": secrets.token_hex(32),
        }
        token = jwt.JWT(header=header, claims=claims)
        token.make_signed_token(jwk)
        return token.serialize()

    # ---- renew ------------------------------------------------------------------------------

    def _renew_mtls(self, request: IssueRequest, key, current_cert_pem: bytes, current_key) -> Issued:
        try:
            chain = _load_pem_certs(current_cert_pem)
        except ValueError:
            raise _Refused("the current certificate does not parse") from None
        leaf = chain[0]
        if not crypto.same_public_key(leaf, current_key):
            raise _Refused("the current key does not belong to the current certificate")
        if leaf.not_valid_after_utc <= datetime.now(timezone.utc):
            raise _Refused(f"the current certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
        root_cert, root_pem, _ = self._trust_root()
        rekey = not crypto.same_public_key(key, current_key)
        key_pem = current_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        presented = [c.public_bytes(serialization.Encoding.PEM) for c in chain]
        if len(chain) == 1:  # help the CA build the path when the file holds the leaf only
            presented += [
                c.public_bytes(serialization.Encoding.PEM)
                for c in self._cached_intermediates()
                if crypto.issued_by(leaf, c)
            ]
        ctx = self._ssl_context((b"".join(presented), key_pem))
        del key_pem
        with httpx.Client(verify=ctx, timeout=self._timeout(), trust_env=False) as client:
            if rekey:
                body = {"csr": build_csr(request, key).decode("ascii")}
                _, data = self._call("POST", "/1.0/rekey", json_body=body, client=client, what=f"rekeying {request.name}")
                label = "POST /1.0/rekey"
            else:
                _, data = self._call("POST", "/1.0/renew", client=client, what=f"renewing {request.name}")
                label = "POST /1.0/renew"
        return self._issued(data, request, key, root_cert, root_pem, label)

    # ---- answers ----------------------------------------------------------------------------

    def _issued(
        self, data: Any, request: IssueRequest, key, root: x509.Certificate, root_pem: bytes, label: str
    ) -> Issued:
        def bad(why: str, hint: str = f"check that {self.spec.where('url')} points at step-ca") -> IssuerError:
            return IssuerError(f"step-ca at {self.url} answered {label} for {request.name} with {why}", hint=hint)

        if not isinstance(data, dict):
            raise bad("JSON that is not an object")
        pems = data.get("certChain")
        if not isinstance(pems, list) or not pems:
            pems = [p for p in (data.get("crt"), data.get("ca")) if p]
        if not pems or not all(isinstance(p, str) for p in pems):
            raise bad("no certificate in it")
        try:
            certs = [c for p in pems for c in _load_pem_certs(p.encode("ascii"))]
        except (ValueError, UnicodeEncodeError):
            raise bad("something that is not a PEM certificate") from None
        if not certs:
            raise bad("no certificate in it")
        leaf, intermediates = certs[0], certs[1:]
        if isinstance(data.get("crt"), str):
            try:
                crt = _load_pem_certs(data["crt"].encode("ascii"))[0]
            except (ValueError, IndexError, UnicodeEncodeError):
                raise bad("a 'crt' that is not a PEM certificate") from None
            if crt != leaf:
                raise bad("a 'crt' that differs from the first certificate of 'certChain'")
        if not crypto.same_public_key(leaf, key):
            raise bad("a certificate for a different key than the one requested")
        want = sanlib.renormalise([request.common_name, *request.sans])
        got = crypto.cert_sans(leaf)
        if got != want:
            shown = lambda s: ", ".join(sorted(sanlib.display(x) for x in s)) or "none"  # noqa: E731
            raise bad(
                f"a certificate whose SANs ({shown(got)}) differ from the request ({shown(want)})",
                hint="a provisioner template or policy changes the names; fix it in the CA's ca.json",
            )
        cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns and cns[0] != request.common_name:
            raise bad(f"a certificate for common name {cns[0]!r}, not {request.common_name!r}")
        if leaf.not_valid_after_utc <= datetime.now(timezone.utc):
            raise bad("a certificate that has already expired", hint="check the CA host's clock")
        # drop a root the CA may append, then check every link up to our root
        if intermediates and intermediates[-1] == root:
            intermediates = intermediates[:-1]
        path = [leaf, *intermediates, root]
        for child, parent in zip(path, path[1:]):
            if not crypto.issued_by(child, parent):
                raise bad(
                    f"a certificate that does not chain to the root {self._root_description()}",
                    hint=f"the CA's intermediate is not signed by that root; check {self.spec.where('root')} / {self.spec.where('fingerprint')}",
                )
        self._check_usage(leaf, request, bad)
        self._remember_intermediates(intermediates)
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in intermediates)
        return Issued(leaf.public_bytes(serialization.Encoding.PEM), chain_pem, root_pem)

    @staticmethod
    def _check_usage(leaf: x509.Certificate, request: IssueRequest, bad) -> None:
        try:
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return  # no EKU: usable for anything
        need = ExtendedKeyUsageOID.CLIENT_AUTH if request.cert_type == "client" else ExtendedKeyUsageOID.SERVER_AUTH
        if need not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
            raise bad(
                f"a certificate without the {'clientAuth' if request.cert_type == 'client' else 'serverAuth'} "
                f"extended key usage a {request.cert_type} certificate needs",
                hint="the provisioner's template sets the key usages; give this certificate a provisioner whose "
                "template includes it",
            )

    # ---- intermediates cache ------------------------------------------------------------------

    def _intermediates_dir(self) -> Path:
        return self.cache_dir / "intermediates"

    def _cached_intermediates(self) -> list[x509.Certificate]:
        found: list[x509.Certificate] = []
        folder = self._intermediates_dir()
        try:
            entries = sorted(folder.glob("*.crt"))
        except OSError:
            return found
        for entry in entries:
            with contextlib.suppress(OSError, ValueError):
                found.extend(_load_pem_certs(entry.read_bytes())[:1])
        return found

    def _remember_intermediates(self, certs: list[x509.Certificate]) -> None:
        for cert in certs:
            fp = fingerprint_of(cert)
            with self._lock:
                if fp in self._seen_intermediates:
                    continue
                self._seen_intermediates.add(fp)
            path = self._intermediates_dir() / f"{fp}.crt"
            if path.exists():
                continue
            try:
                _atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            except OSError as exc:
                log.warning("could not cache step-ca intermediate in %s: %s", path, exc)


# --------------------------------------------------------------------------- module helpers


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _ca_message(raw: bytes) -> str:
    """The CA's JSON `message`, or a short, printable piece of whatever it sent."""
    with contextlib.suppress(ValueError):
        data = json.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return " ".join(data["message"].split())
    text = raw[:200].decode("utf-8", "replace")
    return " ".join(text.split()) or "(empty answer)"


# `reconcile doctor`'s checks live beside the client; re-exported for callers of this module
from reconciler.issuers.stepca_doctor import doctor_checks  # noqa: E402,F401
