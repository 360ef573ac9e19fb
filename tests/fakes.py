"""A fake issuer and an in-process pass, so apply's tests run in milliseconds without root
subprocesses or a step-ca.

`FakeIssuer` implements the `Issuer` protocol for real: it holds a root and an
intermediate CA in memory and signs with cryptography, so what it returns parses, chains
and is checked exactly like a real CA's answer. What it cannot do is fail the way a real
CA fails over the network: that stays with the step-ca integration tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reconciler.apply import ApplyContext, Result, apply
from reconciler.apply_reporter import ApplyReporter
from reconciler.crypto import extended_key_usage, general_names, signing_hash
from reconciler.issuers import IssueRequest, Issued, IssuerError
from reconciler.manifest import load
from reconciler.model import Desired
from reconciler.observe import Trust, observe_all
from reconciler.plan import Plan, make_plan
from reconciler.status import StatusStore

PEM = serialization.Encoding.PEM
BACKDATE = timedelta(minutes=1)


def _ca(name: str, key, issuer_name: x509.Name | None, signer, now: datetime, path_length: int) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .sign(signer, hashes.SHA256())
    )


class FakeIssuer:
    """A CA in memory. `refuse`: certificate name → the error its issue and renew raise (a
    CA that says no); `other_sans`: names signed instead of those requested (a CA whose
    policy rewrites them); `tamper`: rewrites each answer. `requests` lists every request it
    was sent, renewals included."""

    def __init__(
        self,
        refuse: dict[str, IssuerError] | None = None,
        other_sans: tuple[str, ...] | None = None,
        tamper: Callable[[Issued], Issued] | None = None,
    ):
        now = datetime.now(timezone.utc)
        self._root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _ca("Fake Root CA", self._root_key, None, self._root_key, now, 1)
        self._int_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = _ca("Fake Intermediate CA", self._int_key, self.root.subject, self._root_key, now, 0)
        self.refuse = dict(refuse or {})
        self.other_sans = other_sans
        self.tamper = tamper  # rewrites each answer: a CA (or a path to it) that garbles it
        self.requests: list[IssueRequest] = []
        self.closed = False

    def issue(self, request: IssueRequest, key) -> Issued:
        self.requests.append(request)
        if request.name in self.refuse:
            raise self.refuse[request.name]
        now = datetime.now(timezone.utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + request.duration)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(extended_key_usage(request.cert_type), critical=False)
            .add_extension(x509.SubjectAlternativeName(general_names(self.other_sans or request.sans)), critical=False)
            .sign(self._int_key, signing_hash(self._int_key))
        )
        issued = Issued(leaf.public_bytes(PEM), self.intermediate.public_bytes(PEM), self.root.public_bytes(PEM))
        return self.tamper(issued) if self.tamper else issued

    def renew(self, request: IssueRequest, key, current_cert_pem: bytes, current_key) -> Issued:
        return self.issue(request, key)

    def trust_pems(self) -> list[bytes]:
        return [self.root.public_bytes(PEM), self.intermediate.public_bytes(PEM)]

    def root_pem(self) -> bytes:
        return self.root.public_bytes(PEM)

    def close(self) -> None:
        self.closed = True


def desired_from(tmp: Path, entries: list[dict]) -> Desired:
    """The manifest `entries` (a bare array) as the loader builds it."""
    path = tmp / "certificate-manifest.json"
    path.write_text(json.dumps(entries))
    return load(path)


@dataclass
class InProcessPass:
    """Observe, plan and apply in this process against a FakeIssuer, as `run_pass` would
    (without its lock, sweep and re-observation). The status store is the real one, saved
    when apply asks and at the end."""

    state: Path
    issuer: FakeIssuer = field(default_factory=FakeIssuer)

    def plan(
        self, desired: Desired, status: StatusStore | None = None, now: datetime | None = None
    ) -> tuple[Plan, dict[str, str | None]]:
        status = status or StatusStore(self.state)
        observed = observe_all(desired.certificates, Trust.of(self.issuer.trust_pems(), authoritative=True))
        serials = {name: (o.cert.serial if o.cert else None) for name, o in observed.items()}
        return make_plan(desired, observed, now or datetime.now(timezone.utc), status.hooks_pending(serials)), serials

    def run(self, desired: Desired, now: datetime | None = None, **options) -> tuple[Plan, Result, StatusStore]:
        """`now`: the time the plan is made for; `options`: ApplyContext fields (cancelled,
        skip_hooks, refuse_hooks, workers...)."""
        status = StatusStore(self.state)
        plan, serials = self.plan(desired, status, now)
        ctx = ApplyContext(self.issuer, serials=serials, cwd=desired.manifest_path.parent, **options)
        result = apply(plan, ctx, ApplyReporter(status, progress=False))
        status.save()  # as run_pass does at its end: a failed hook's run is recorded too
        return plan, result, status
