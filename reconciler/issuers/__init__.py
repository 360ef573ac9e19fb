"""The issuer boundary: everything that talks to a CA sits behind `Issuer`.

The planner never imports this package's implementations; `apply` (and `doctor`)
get an `Issuer` from `make_issuer` and hand it `IssueRequest`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from reconciler.defaults import CA_CONNECT_TIMEOUT
from reconciler.errors import ReconcilerError
from reconciler.folders import private_folder_problem

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

    from reconciler.checks import Check
    from reconciler.model import IssuerSpec, KeySpec


class IssuerError(ReconcilerError):
    """A CA could not give us a certificate.

    `str(err)` is one line saying what failed and where, the hint appended.
    `transient` errors (timeouts, 5xx, connection refused) are worth retrying
    with backoff; the others need an operator.
    """

    def __init__(self, message: str, hint: str = "", transient: bool = False):
        super().__init__(message, hint)
        self.transient = transient


class IssuerConfigError(IssuerError):
    """The manifest, flags, environment and defaults.json do not name one usable CA.

    Raised before anything is written: `problem` says what is wrong, `lines` list every
    setting to fix (all of them, not the first) and the ways to fix it."""

    def __init__(self, problem: str, lines: list[str]):
        super().__init__(problem)
        self.lines = lines

    def __str__(self) -> str:
        return "\n".join([self.args[0], *(f"  {line}" for line in self.lines)])


@dataclass(frozen=True)
class IssueRequest:
    """What to ask the CA for. `sans` are normalised and include the common name."""

    name: str
    common_name: str
    sans: tuple[str, ...]
    duration: timedelta
    cert_type: str  # "server" | "client"
    key: "KeySpec"


@dataclass(frozen=True)
class Issued:
    """PEM bytes as the CA returned them: the leaf, the intermediates, the root."""

    leaf_pem: bytes
    chain_pem: bytes
    root_pem: bytes


class Issuer(Protocol):
    def issue(self, request: IssueRequest, key: "CertificateIssuerPrivateKeyTypes") -> Issued:
        """Sign a new certificate for `key` (the CSR is built from request + key). What is
        returned has been checked: the leaf's signature verifies under the first certificate
        of `chain_pem` named as its issuer (apply does not verify it a second time)."""

    def renew(
        self,
        request: IssueRequest,
        key: "CertificateIssuerPrivateKeyTypes",
        current_cert_pem: bytes,
        current_key: "CertificateIssuerPrivateKeyTypes",
    ) -> Issued:
        """Renew a still-valid certificate with unchanged identity.

        May use the current certificate as credentials (step-ca mTLS); falls back
        to `issue` when the CA refuses. `key` is the key the new certificate
        must carry (equal to `current_key` when rotation is off)."""

    def trust_pems(self) -> list[bytes]:
        """Roots (and known intermediates) that certificates of this issuer chain to, each
        one certificate in PEM (parse.Trust parses them only when a signature is checked).

        Reads local files only: never creates a CA, never touches the network.
        An empty list means no certificate can chain to it yet."""

    def root_pem(self) -> bytes:
        """The root certificate `ca_path` files hold (PEM). May set the issuer up as its
        first issuance would: create the embedded CA, fetch a step-ca root by fingerprint."""

    def diagnose(self) -> "list[Check]":
        """`reconcile doctor`'s checks of this issuer, in dependency order, each with a hint
        when it fails. Reads only: creates no CA, asks a CA for no certificate."""

    def close(self) -> None: ...


def make_issuer(spec: "IssuerSpec", state_dir: Path, timeout: float | None = None) -> Issuer:
    """`timeout`: seconds a step-ca request may take in all (connect at most 5 of them)."""
    # the implementations are imported when chosen: they import this module for the shared
    # types, and step-ca's pulls in httpx and jwcrypto, which an embedded-CA host never needs
    if spec.type == "local":
        from reconciler.issuers.local import LocalCA

        folder = spec.dir if spec.dir else state_dir / "ca"
        # its keys sign and its root is written into every ca_path: nobody else may swap it
        problem = private_folder_problem(folder, "embedded CA folder")
        if problem:
            raise IssuerError(problem, hint="nothing was issued")
        return LocalCA(folder)
    if spec.type == "step-ca":
        from reconciler.issuers.stepca import StepCA

        if timeout is None:
            return StepCA(spec, state_dir)
        return StepCA(spec, state_dir, connect_timeout=min(CA_CONNECT_TIMEOUT, timeout), read_timeout=timeout)
    raise ValueError(f"unknown issuer type {spec.type!r}")
