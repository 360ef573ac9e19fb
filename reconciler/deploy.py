"""Deploying one certificate's plan: the key and certificate (issue, reissue, renew), a
rewritten chain, the CA file, owner and mode. Carries out the actions it is given and
never re-decides them; what any CA returns is checked before it is written.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.crypto import (
    PEM_BEGIN,
    cert_sans,
    fingerprint,
    generate_key,
    key_to_pem,
    key_type_of,
    load_certificate,
    load_key,
    public_key_id,
    same_public_key,
)
from reconciler.diff import CHMOD, CHOWN, RENEW, REWRITE_CHAIN, WRITE_CA
from reconciler.folders import Folder
from reconciler.issuers import Issued, IssueRequest, Issuer, IssuerError
from reconciler.model import CA_MODE, DesiredCert, Written
from reconciler.parse import ParsedCert, content_digest, parse_leaf
from reconciler.plan import Action, CertPlan
from reconciler.sans import ordered
from reconciler.targets import DeployError, Targets, fix_metadata, open_target, os_error, read

if TYPE_CHECKING:
    from cryptography import x509


def deploy(
    cert_plan: CertPlan, issuer: Issuer, pending_dirs: set[Path] | None, manager: str | None
) -> tuple[bool, Written | None]:
    """Carry out `cert_plan`: (whether a file's content changed, the new certificate and key
    as written, already parsed). Raises DeployError, IssuerError or OSError. `manager`: our
    state folder's identity (reconciler.managed), marked on every file written; a file
    marked by another state folder is refused."""
    cert = cert_plan.cert
    if cert_plan.content_action is not None:
        return True, _deploy_content(cert, cert_plan.content_action.action, issuer, pending_dirs, manager)
    kinds = {a.action: a for a in cert_plan.actions}
    files = []
    if REWRITE_CHAIN in kinds:
        files.append(("cert", cert.cert_path, _rewritten_chain(cert, kinds[REWRITE_CHAIN], issuer), cert.cert_mode))
    if WRITE_CA in kinds and cert.ca_path is not None:
        files.append(("ca", cert.ca_path, issuer.root_pem(), CA_MODE))
    if files:
        with Targets(cert, manager) as targets:
            targets.write(files, pending_dirs)
    if CHOWN in kinds or CHMOD in kinds:
        fix_metadata(cert, CHOWN in kinds, CHMOD in kinds, manager)
    return bool(files), None


def _deploy_content(
    cert: DesiredCert, action: str, issuer: Issuer, pending_dirs: set[Path] | None, manager: str | None
) -> Written:
    with Targets(cert, manager) as targets:
        # every target is checked before the CA is asked: a folder, an immutable file or
        # another state folder's file fails here, with nothing issued and nothing replaced
        targets.check("key", cert.key_path)
        targets.check("cert", cert.cert_path)
        if cert.ca_path is not None:
            targets.check("ca", cert.ca_path)
        current = _current_key(cert, action, targets.existing("key"))
        reuse = (
            cert.key.rotation == "never"
            and current is not None
            and key_type_of(current.public_key()) == cert.key.describe()
        )
        key = current if reuse else generate_key(cert.key)
        request = IssueRequest(cert.name, cert.common_name, ordered(cert.sans), cert.duration, cert.cert_type, cert.key)
        old_cert = targets.existing("cert")
        if action == RENEW and current is not None and old_cert is not None:
            issued = issuer.renew(request, key, read(*old_cert), current)
        else:
            issued = issuer.issue(request, key)
        body = issued.leaf_pem.rstrip(b"\n") + b"\n"
        if cert.include_ca and issued.chain_pem:
            body += issued.chain_pem.rstrip(b"\n") + b"\n"
        key_id = public_key_id(key.public_key())
        parsed, signer = _parsed_answer(cert, key_id, key, issued, body)
        written = Written(content_digest(body), signer, parsed=parsed)
        # key first, then certificate: a crash in between shows as a key mismatch next pass
        files = [("cert", cert.cert_path, body, cert.cert_mode)]
        if not reuse:
            key_pem = key_to_pem(key)
            files.insert(0, ("key", cert.key_path, key_pem, cert.key_mode))
            written = Written(written.cert_digest, signer, content_digest(key_pem), key_id, parsed)
        if cert.ca_path is not None and issued.root_pem:
            files.append(("ca", cert.ca_path, issued.root_pem, CA_MODE))
        targets.write(files, pending_dirs)
        return written


def _parsed_answer(
    cert: DesiredCert, key_id: str, key, issued: Issued, body: bytes
) -> tuple[ParsedCert | None, str | None]:
    """The certificate file's bytes parsed as re-observing them would (parse.parse_leaf),
    once the CA's answer is checked, and the leaf's signer. The parse is the check: the key
    and the names must be the ones asked for. Any other answer (or one that does not
    parse) is judged by _check_issued, which says what is wrong in the CA's terms; the pass
    then reads back what it wrote, unparsed here (None)."""
    # the file's first certificate is the answer's leaf only when the leaf field holds one
    parsed, _why = parse_leaf(body) if PEM_BEGIN in issued.leaf_pem else (None, None)
    if parsed is None or parsed.facts["public_key_id"] != key_id or parsed.facts["sans"] != cert.sans:
        return None, _signer(_check_issued(cert, key, issued.leaf_pem), issued)
    signer = _signer(parsed.leaf, issued)
    return replace(parsed, signer=signer), signer


def _signer(leaf: x509.Certificate, issued: Issued) -> str | None:
    """The fingerprint of the chain's certificate named as the leaf's issuer: the issuer
    verified the leaf's signature under it before it answered (the Issuer protocol)."""
    return next((fp for subject, fp in _chain_names(issued.chain_pem) if subject == leaf.issuer), None)


@functools.lru_cache(maxsize=16)
def _chain_names(chain_pem: bytes) -> tuple[tuple[x509.Name, str], ...]:
    """(subject, fingerprint) of each certificate of a CA's chain. Every answer of one CA
    carries the same chain: it is parsed once, not once per certificate issued."""
    from cryptography import x509  # not at the top: see crypto.py

    try:
        chain = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
    except ValueError:
        raise IssuerError("the CA returned a chain that is not PEM certificates", hint="check the CA's logs") from None
    return tuple((c.subject, fingerprint(c)) for c in chain)


def _current_key(cert: DesiredCert, action: str, key_file: tuple[Folder, str] | None):
    """The key on disk when this deployment may keep it (rotation "never") or renew with it;
    None when there is none or it does not load (a new key is made)."""
    if key_file is None or (cert.key.rotation != "never" and action != RENEW):
        return None
    try:
        return load_key(read(*key_file))
    except (OSError, ValueError, TypeError):
        return None


def _check_issued(cert: DesiredCert, key, leaf_pem: bytes) -> x509.Certificate:
    """Never deploy what we did not ask for: the CA's answer must carry our key and our
    names. Returns the leaf, parsed."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificates(leaf_pem)[0]
    except ValueError:
        raise IssuerError(
            "the CA returned something that is not a PEM certificate", hint="check the CA's logs"
        ) from None
    if not same_public_key(leaf, key):
        raise IssuerError(
            "the CA returned a certificate for another key than the one requested", hint="check the CA's logs"
        )
    try:
        got = cert_sans(leaf)
    except ValueError as exc:
        raise IssuerError(
            f"the CA returned a certificate whose SANs do not parse: {exc}", hint="check the CA's logs"
        ) from None
    if got != cert.sans:
        raise IssuerError(
            f"the CA returned a certificate for other SANs ({', '.join(sorted(got))}) than requested",
            hint="check the CA's policy for this provisioner",
        )
    return leaf


def _rewritten_chain(cert: DesiredCert, action: Action, issuer: Issuer) -> bytes:
    """The certificate file's leaf as it is, followed by the chain the plan names (by
    fingerprint), taken from the certificates the issuer knows: no CA is contacted."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    (drift,) = action.drifts
    try:
        folder, name = open_target(cert, "cert", cert.cert_path)
        with folder:
            leaf = x509.load_pem_x509_certificates(read(folder, name))[0]
    except ValueError:
        raise DeployError(
            f"cannot rewrite the chain of {cert.cert_path}: it no longer holds a certificate "
            "(the next pass re-issues it)"
        ) from None
    except OSError as exc:
        raise DeployError(os_error(exc, "read", cert.cert_path)) from None
    known = {}
    for pem in issuer.trust_pems():
        try:
            c = load_certificate(pem)
        except ValueError:  # damaged since the plan was made: no certificate the issuer knows
            continue
        known[fingerprint(c)] = c
    missing = [fp for fp in drift.desired if fp not in known]
    if missing:
        raise DeployError(
            f"cannot rewrite the chain of {cert.cert_path}: the issuer no longer knows certificate {missing[0]} "
            "of it (the next pass plans again)"
        )
    pem = serialization.Encoding.PEM
    return b"".join(c.public_bytes(pem) for c in [leaf, *(known[fp] for fp in drift.desired)])
