"""HTTPS to one step-ca: TLS verified against the trust root, one deadline per request,
answers size-capped, the CA's clock compared with ours, and every failure turned into an
`IssuerError` that says what failed and what to do.

`transport` is the seam for unit tests: an `httpx.MockTransport` answers in place of a CA
(bad JSON, 5xx, timeouts, a drifting clock); the real step-ca stays for integration tests.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import httpx

from reconciler.durations import format_duration
from reconciler.faults import fault_point
from reconciler.issuers import IssuerError
from reconciler.model import IssuerSpec
from reconciler.statefiles import private_dir

# step-ca checks a one-time token's nbf/iat/exp with go-jose's default leeway of one
# minute (jose.DefaultLeeway); a host whose clock differs from the CA's by more gets its
# tokens refused, and certificates whose validity looks shifted here. Compared with the
# Date header of every answer, the request's own duration allowed for.
CLOCK_LEEWAY = timedelta(minutes=1)
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
UNREACHABLE = "check the CA container/service is running and the firewall allows port {port}"


class Refused(IssuerError):
    """The CA answered and said no (4xx, or it rejected our client certificate)."""

    status: int = 0


def refusal_hint(message: str, status: int) -> str:
    text = message.lower()
    if "duration" in text:
        return (
            "shorten the certificate's duration in the manifest, or raise the provisioner's "
            "maxTLSCertDuration in ca.json"
        )
    if any(word in text for word in ("not allowed", "policy", "san", "dns name", "ip address")):
        return "the provisioner's policy does not allow these names; change the names or the policy in ca.json"
    if status == 401:
        return "the CA did not accept the one-time token: check the provisioner, the host's clock, and the CA's log"
    return "see the step-ca log for the reason"


def ca_message(raw: bytes) -> str:
    """The CA's JSON `message`, or a short, printable piece of whatever it sent."""
    with contextlib.suppress(ValueError):
        data = json.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return " ".join(data["message"].split())
    text = raw[:200].decode("utf-8", "replace")
    return " ".join(text.split()) or "(empty answer)"


def _walk_causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class StepCATransport:
    """The connection of one pass to one step-ca. Thread-safe.

    `root_pem` and `root_description` are asked lazily (the trust root may have to be
    downloaded first, through this very transport)."""

    def __init__(
        self,
        spec: IssuerSpec,
        state_dir: Path,
        root_pem: Callable[[], bytes],
        root_description: Callable[[], str],
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int = 8,
        transport: httpx.BaseTransport | None = None,
    ):
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.url = (spec.url or "").rstrip("/")
        parts = urlsplit(self.url) if self.url else None
        self.host = (parts.hostname or "") if parts else ""
        self.port = (parts.port or (443 if parts.scheme == "https" else 80)) if parts else 0
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._root_pem = root_pem
        self._root_description = root_description
        self._transport = transport
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._silent_since: IssuerError | None = None  # a connect timeout seen in this pass
        self._clock_error: IssuerError | None = None  # the clocks differ: nothing more is asked this pass

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    # ---- clients ------------------------------------------------------------------------------

    def ssl_context(self, client_chain: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
        """Verification against the trust root; `client_chain` (certificates PEM, key PEM):
        present them for mTLS."""
        ctx = ssl.create_default_context(cadata=self._root_pem().decode("ascii"))
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

    def new_client(self, verify: ssl.SSLContext | bool) -> httpx.Client:
        """A client of its own (mTLS as a certificate, or the unverified root download);
        the caller closes it."""
        return httpx.Client(verify=verify, timeout=self._timeout(), trust_env=False, transport=self._transport)

    def mtls_client(self, chain_pem: bytes, key_pem: bytes) -> httpx.Client:
        return self.new_client(self.ssl_context((chain_pem, key_pem)))

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout, read=self.read_timeout, write=self.read_timeout, pool=self.read_timeout
        )

    def _shared(self) -> httpx.Client:
        if self._client is not None:
            return self._client
        ctx = self.ssl_context()
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    verify=ctx,
                    timeout=self._timeout(),
                    limits=httpx.Limits(max_connections=self.max_connections),
                    trust_env=False,
                    transport=self._transport,
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ---- one request --------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict | None = None,
        client: httpx.Client | None = None,
        what: str,
    ) -> tuple[int, Any]:
        """One request with a total deadline; returns (status, parsed JSON) for 2xx.
        `what` says, for errors, what the request was for ("signing web")."""
        if self._silent_since is not None:
            # a CA that let a connection attempt time out in this pass is not asked again by
            # every other certificate: each would wait out its own connect timeout
            raise IssuerError(self._silent_since.message, self._silent_since.hint, transient=True)
        if self._clock_error is not None:
            raise copy.copy(self._clock_error)
        label = f"{method} {path}"
        try:
            status, raw = self._exchange(client or self._shared(), method, path, json_body, params, label)
        except httpx.HTTPError as exc:
            error = self._network_error(exc, label, what)
            if isinstance(exc, httpx.ConnectTimeout):
                self._silent_since = error
            raise error from None
        return status, self._judge(status, raw, label, what)

    def _exchange(
        self, client: httpx.Client, method: str, path: str, json_body: Any, params: dict | None, label: str
    ) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.connect_timeout + self.read_timeout
        sent = time.time()
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
            return resp.status_code, b"".join(chunks)

    def _judge(self, status: int, raw: bytes, label: str, what: str) -> Any:
        """The parsed answer of a 2xx; an IssuerError saying what the CA meant otherwise."""
        if status >= 500:
            raise IssuerError(
                f"step-ca at {self.url} failed while {what} ({label}: HTTP {status}): {ca_message(raw)}",
                hint="a CA-side error; the next pass retries it; see the step-ca log if it persists",
                transient=True,
            )
        if status >= 400:
            message = ca_message(raw)
            refused = Refused(
                f"step-ca refused {what} ({label}: HTTP {status}): {message}", hint=refusal_hint(message, status)
            )
            refused.status = status
            raise refused
        if status >= 300:
            raise IssuerError(
                f"step-ca at {self.url} redirected {label} (HTTP {status})",
                hint=f"set {self.spec.where('url')} to the CA's own address, not one that redirects",
            )
        try:
            return json.loads(raw)
        except ValueError:
            raise IssuerError(
                f"step-ca at {self.url} sent an unreadable answer to {label} (not complete JSON, {len(raw)} bytes)",
                hint=f"check that {self.spec.where('url')} points at step-ca and nothing in between rewrites "
                "its answers",
            ) from None

    def _check_clock(self, date: str | None, sent: float, received: float) -> None:
        """Refuse to go on when the CA's clock (its Date header) and ours differ by more than
        CLOCK_LEEWAY. An answer without a usable Date (a proxy, not step-ca) is not judged."""
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

    # ---- what went wrong on the way -----------------------------------------------------------

    def _network_error(self, exc: httpx.HTTPError, label: str, what: str) -> IssuerError:
        chain = list(_walk_causes(exc))
        return self._tls_error(chain, what) or self._reach_error(exc, chain, label)

    def _tls_error(self, chain: list[BaseException], what: str) -> IssuerError | None:
        verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
        if verify is not None:
            reason = getattr(verify, "verify_message", None) or str(verify)
            if "not yet valid" in reason or "expired" in reason:
                return IssuerError(
                    f"TLS verification of step-ca at {self.hostport} failed: its certificate is "
                    f"{reason.split('certificate is ')[-1]} by this host's clock",
                    hint="this host's clock (or the CA's) is wrong: fix it (NTP: `timedatectl set-ntp true`, "
                    "`chronyc tracking`); if the clocks are right, renew the CA's own TLS certificate",
                )
            return IssuerError(
                f"TLS verification of step-ca at {self.hostport} failed against root "
                f"{self._root_description()}: {reason}",
                hint="that root (or fingerprint) is not this CA's: fetch the right one with `step ca root`, "
                f"or check {self.spec.where('url')} points at the CA you meant",
            )
        tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
        if tls is not None:
            return Refused(
                f"step-ca at {self.hostport} broke off the TLS handshake while {what}: "
                f"{getattr(tls, 'reason', None) or tls}",
                hint="the CA did not accept the client certificate (expired, or not issued by it), "
                "or the port does not speak TLS",
            )
        return None

    def _reach_error(self, exc: httpx.HTTPError, chain: list[BaseException], label: str) -> IssuerError:
        """A transient error: the CA could not be reached, or did not answer in time."""
        unreachable = UNREACHABLE.format(port=self.port)
        if isinstance(exc, httpx.ConnectTimeout):
            message = f"step-ca at {self.hostport} is unreachable: no connection within {self.connect_timeout:g}s"
            hint = unreachable
        elif isinstance(exc, httpx.TimeoutException):
            message = f"step-ca at {self.hostport} did not answer {label} within {self.read_timeout:g}s"
            hint = "the CA is overloaded or stuck; the next pass retries it (--watch retries with backoff)"
        elif any(isinstance(e, socket.gaierror) for e in chain):
            message = f"step-ca host {self.host} cannot be resolved ({self.hostport})"
            hint = f"check the host name in {self.spec.where('url')} and this host's DNS"
        elif any(isinstance(e, ConnectionRefusedError) for e in chain):
            message, hint = f"step-ca at {self.hostport} is unreachable: connection refused", unreachable
        elif isinstance(exc, httpx.ConnectError):
            message, hint = f"step-ca at {self.hostport} is unreachable: {exc}", unreachable
        else:
            message = f"connection to step-ca at {self.hostport} broke off during {label}: {exc or type(exc).__name__}"
            hint = "a network or CA hiccup; the next pass retries it (--watch retries with backoff)"
        return IssuerError(message, hint=hint, transient=True)
