"""Smallstep step-ca as an `Issuer`: JWK provisioner one-time tokens, mTLS renew/rekey.

Every answer is checked before it is believed: a certificate must carry the key we asked
for, the names we asked for, and chain to the root we trust. TLS to the CA is always
verified (the root's one-off download by fingerprint aside: see stepca_trust).

The client is split by concern: `stepca_transport` (HTTPS, deadlines, what a failure
means), `stepca_trust` (the root and the intermediates), `stepca_provisioner` (the JWK key
and its tokens), `stepca_config` (where the CA is, which root), `stepca_jose` (the key's
JWE), `stepca_doctor` (the checks behind `diagnose()`). This module issues and renews.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler import crypto
from reconciler import sans as sanlib
from reconciler.checks import Check
from reconciler.defaults import CA_CONNECT_TIMEOUT, CA_TIMEOUT
from reconciler.issuers import IssueRequest, Issued, IssuerError
from reconciler.issuers.stepca_doctor import diagnose
from reconciler.issuers.stepca_provisioner import Provisioner
from reconciler.issuers.stepca_transport import Refused, StepCATransport
from reconciler.issuers.stepca_trust import StepCATrust, load_pem_certs, to_pem
from reconciler.model import IssuerSpec

log = logging.getLogger("reconciler.issuers.stepca")

Bad = Callable[..., IssuerError]  # (why, hint=...) -> the error saying the CA's answer is wrong


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


class StepCA:
    """One pass's connection to a step-ca. Thread-safe; create one per pass.

    `transport`: an httpx transport to talk through instead of the network (unit tests)."""

    def __init__(
        self,
        spec: IssuerSpec,
        state_dir: Path,
        *,
        connect_timeout: float = CA_CONNECT_TIMEOUT,
        read_timeout: float = CA_TIMEOUT,
        max_connections: int = 8,
        transport: httpx.BaseTransport | None = None,
    ):
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.transport = StepCATransport(
            spec,
            self.state_dir,
            self.root_pem,
            lambda: self.trust.description(),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
            transport=transport,
        )
        self.trust = StepCATrust(spec, self.state_dir, self.transport)
        self.provisioner = Provisioner(spec, self.transport)
        self.url = self.transport.url

    # ---- the Issuer protocol ------------------------------------------------------------------

    def issue(self, request: IssueRequest, key) -> Issued:
        self.check_configured()
        root_cert, root_pem, _ = self.trust.root()
        dns, ips = _request_names(request)
        body = {
            "csr": build_csr(request, key).decode("ascii"),
            "ott": self.provisioner.token(request.common_name, dns + ips, root_cert),
            "notAfter": _rfc3339(datetime.now(timezone.utc) + request.duration),
        }
        _, data = self.transport.call("POST", "/1.0/sign", json_body=body, what=f"signing {request.name}")
        return self._issued(data, request, key, "POST /1.0/sign")

    def renew(self, request: IssueRequest, key, current_cert_pem: bytes, current_key) -> Issued:
        self.check_configured()
        try:
            return self._renew_mtls(request, key, current_cert_pem, current_key)
        except Refused as exc:
            log.info(
                "step-ca would not renew %s over mTLS (%s); issuing it with a one-time token instead",
                request.name,
                exc.message,
            )
        return self.issue(request, key)

    def trust_pems(self) -> list[bytes]:
        return [to_pem(c) for c in self.trust.roots()]

    def learn_intermediates(self, candidates: list[x509.Certificate], persist: bool) -> int:
        """Adopt the CA certificates found in certificate files on disk (the old script's
        `step ca certificate` bundles the intermediate) that chain by signature to the
        verified root: they are this CA's intermediates as surely as those it sends when it
        signs, and without them a leaf-only file of this CA would look foreign after a
        fresh state folder. step-ca 0.19 serves no intermediates endpoint to ask instead.
        `persist`: cache them like issued ones (a pass); otherwise only for this run (--plan,
        status). Returns how many were learned."""
        return self.trust.learn(candidates, persist)

    def root_pem(self) -> bytes:
        return self.trust.root_pem()

    def diagnose(self) -> list[Check]:
        return diagnose(self)

    def close(self) -> None:
        self.transport.close()
        self.provisioner.forget()

    def __enter__(self) -> "StepCA":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- configuration ------------------------------------------------------------------------

    def check_configured(self) -> None:
        """An https URL and a provisioner name, or an IssuerError saying which to set."""
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
        self.check_configured()
        self.trust.root()

    def untrusted_reason(self) -> str:
        """Why trust_pems() is empty, for the plan's note."""
        return self.trust.untrusted_reason()

    # ---- renew --------------------------------------------------------------------------------

    def _renew_mtls(self, request: IssueRequest, key, current_cert_pem: bytes, current_key) -> Issued:
        try:
            chain = load_pem_certs(current_cert_pem)
        except ValueError:
            raise Refused("the current certificate does not parse") from None
        leaf = chain[0]
        if not crypto.same_public_key(leaf, current_key):
            raise Refused("the current key does not belong to the current certificate")
        if leaf.not_valid_after_utc <= datetime.now(timezone.utc):
            raise Refused(f"the current certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
        self.trust.root()
        rekey = not crypto.same_public_key(key, current_key)
        key_pem = current_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        presented = [to_pem(c) for c in chain]
        if len(chain) == 1:  # help the CA build the path when the file holds the leaf only
            presented += [to_pem(c) for c in self.trust.cached_intermediates() if crypto.issued_by(leaf, c)]
        client = self.transport.mtls_client(b"".join(presented), key_pem)
        del key_pem
        with client:
            if rekey:
                body = {"csr": build_csr(request, key).decode("ascii")}
                label = "POST /1.0/rekey"
                _, data = self.transport.call(
                    "POST", "/1.0/rekey", json_body=body, client=client, what=f"rekeying {request.name}"
                )
            else:
                label = "POST /1.0/renew"
                _, data = self.transport.call("POST", "/1.0/renew", client=client, what=f"renewing {request.name}")
        return self._issued(data, request, key, label)

    # ---- the CA's answer ----------------------------------------------------------------------

    def _issued(self, data: Any, request: IssueRequest, key, label: str) -> Issued:
        """The answer to a sign/renew/rekey as an `Issued`, once every check holds: the
        certificate is for our key, our names and our common name, valid, with the usage
        the request needs, and chains link by link to our root."""

        def bad(why: str, hint: str = f"check that {self.spec.where('url')} points at step-ca") -> IssuerError:
            return IssuerError(f"step-ca at {self.url} answered {label} for {request.name} with {why}", hint=hint)

        root, root_pem, _ = self.trust.root()
        leaf, intermediates = _answer_certificates(data, bad)
        _check_leaf(leaf, request, key, bad)
        # drop a root the CA may append, then check every link up to our root
        if intermediates and intermediates[-1] == root:
            intermediates = intermediates[:-1]
        path = [leaf, *intermediates, root]
        for child, parent in zip(path, path[1:], strict=False):
            if not crypto.issued_by(child, parent):
                raise bad(
                    f"a certificate that does not chain to the root {self.trust.description()}",
                    hint=f"the CA's intermediate is not signed by that root; check {self.spec.where('root')} / "
                    f"{self.spec.where('fingerprint')}",
                )
        _check_usage(leaf, request, bad)
        self.trust.remember(intermediates)
        return Issued(to_pem(leaf), b"".join(to_pem(c) for c in intermediates), root_pem)


def _answer_certificates(data: Any, bad: Bad) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """(leaf, the certificates after it) from `certChain`, or from `crt` + `ca`; a `crt`
    beside a `certChain` must be the chain's first certificate."""
    if not isinstance(data, dict):
        raise bad("JSON that is not an object")
    pems = data.get("certChain")
    if not isinstance(pems, list) or not pems:
        pems = [p for p in (data.get("crt"), data.get("ca")) if p]
    if not pems or not all(isinstance(p, str) for p in pems):
        raise bad("no certificate in it")
    try:
        certs = [c for p in pems for c in load_pem_certs(p.encode("ascii"))]
    except (ValueError, UnicodeEncodeError):
        raise bad("something that is not a PEM certificate") from None
    if not certs:
        raise bad("no certificate in it")
    if isinstance(data.get("crt"), str):
        try:
            crt = load_pem_certs(data["crt"].encode("ascii"))[0]
        except (ValueError, IndexError, UnicodeEncodeError):
            raise bad("a 'crt' that is not a PEM certificate") from None
        if crt != certs[0]:
            raise bad("a 'crt' that differs from the first certificate of 'certChain'")
    return certs[0], certs[1:]


def _check_leaf(leaf: x509.Certificate, request: IssueRequest, key, bad: Bad) -> None:
    if not crypto.same_public_key(leaf, key):
        raise bad("a certificate for a different key than the one requested")
    want = sanlib.renormalise([request.common_name, *request.sans])
    got = crypto.cert_sans(leaf)
    if got != want:

        def shown(names) -> str:
            return ", ".join(sorted(sanlib.display(x) for x in names)) or "none"

        raise bad(
            f"a certificate whose SANs ({shown(got)}) differ from the request ({shown(want)})",
            hint="a provisioner template or policy changes the names; fix it in the CA's ca.json",
        )
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns and cns[0] != request.common_name:
        raise bad(f"a certificate for common name {cns[0]!r}, not {request.common_name!r}")
    if leaf.not_valid_after_utc <= datetime.now(timezone.utc):
        raise bad("a certificate that has already expired", hint="check the CA host's clock")


def _check_usage(leaf: x509.Certificate, request: IssueRequest, bad: Bad) -> None:
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
