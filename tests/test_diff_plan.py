"""diff and plan: every row of the drift table (docs/design.md), on real certificates and files.

Certificates are issued by the embedded CA (`LocalCA`) into tmp folders, observed with
the real `observe`, and planned with a fixed `now` derived from the certificate itself.
"""

from __future__ import annotations

import base64
import functools
import os
import stat
import tempfile
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.crypto import key_to_pem, pem_fingerprint
from reconciler.durations import format_duration
from reconciler.diff import (
    CHMOD,
    CHOWN,
    DRIFT_TABLE,
    ISSUE,
    REISSUE,
    RENEW,
    REWRITE_CHAIN,
    RUN_HOOK,
    WRITE_CA,
    Blocked,
    diff,
    readiness,
    renewal_due_at,
)
from reconciler.drift_rows import earliest_renewal
from reconciler.issuers import IssueRequest
from reconciler.issuers.local import LocalCA
from reconciler.manifest import build
from reconciler.model import Desired, DesiredCert, FileState, Observed
from reconciler.observe import Trust, observe
from reconciler.plan import make_plan, plan_cert
from reconciler.sans import display

UID, GID = os.getuid(), os.getgid()


# --------------------------------------------------------------------------- fixtures


@functools.cache
def make_key(kind: str, n: int = 0):
    """Keys are slow to make (RSA); each (kind, n) is made once per session."""
    if kind == "EC P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "EC P-384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("RSA "):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind.split()[1]))
    if kind == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


KEY_FIELDS = {
    "EC P-256": {"type": "EC"},
    "EC P-384": {"type": "EC", "curve": "P-384"},
    "RSA 2048": {"type": "RSA", "size": 2048},
    "RSA 3072": {"type": "RSA", "size": 3072},
    "RSA 4096": {"type": "RSA", "size": 4096},
    "Ed25519": {"type": "Ed25519"},
}


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> LocalCA:
    ca = LocalCA(tmp_path_factory.mktemp("ca") / "ca")
    ca._ensure()  # create it now, as a first `apply` would
    return ca


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> LocalCA:
    ca = LocalCA(tmp_path_factory.mktemp("other-ca") / "ca")
    ca._ensure()
    return ca


@pytest.fixture(scope="module")
def trust(ca) -> Trust:
    return Trust.of(ca.trust_pems(), authoritative=True)


def desire(folder: Path, **fields) -> DesiredCert:
    """One entry through the real load+validate, paths relative to `folder`."""
    entry = {"common_name": "svc.example.com", "cert_path": "svc.crt", "key_path": "svc.key", **fields}
    entry = {k: v for k, v in entry.items() if v is not None}
    (cert,) = build([entry], folder / "certificate-manifest.json").certificates
    return cert


def issue(
    ca: LocalCA,
    cert: DesiredCert,
    key=None,
    common_name: str | None = None,
    sans=None,
    duration: timedelta | None = None,
):
    """A certificate from `ca` made to `cert` unless told otherwise: (leaf+chain PEM, key)."""
    key = key if key is not None else make_key(cert.key.describe())
    request = IssueRequest(
        name=cert.name,
        common_name=common_name if common_name is not None else cert.common_name,
        sans=tuple(sans if sans is not None else (display(s) for s in cert.sans)),
        duration=duration or cert.duration,
        cert_type=cert.cert_type,
        key=cert.key,
    )
    issued = ca.issue(request, key)
    return issued.leaf_pem + (issued.chain_pem if cert.include_ca else b""), key


def write(path: str | Path, data: bytes, mode: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def deploy(ca: LocalCA, cert: DesiredCert, **kw) -> None:
    """Put a certificate and its key on disk exactly as the manifest wants them."""
    pem, key = issue(ca, cert, **kw)
    write(cert.cert_path, pem, cert.cert_mode)
    write(cert.key_path, key_to_pem(key), cert.key_mode)


def valid_now(observed: Observed) -> datetime:
    """A moment well inside the certificate's life and outside any renewal window."""
    assert observed.cert is not None, observed
    return observed.cert.not_before + timedelta(minutes=5)


def plan_for(cert: DesiredCert, trust: Trust, now: datetime | None = None, hook_pending: bool = False):
    observed = observe(cert, trust)
    return plan_cert(cert, observed, now or valid_now(observed), hook_pending), observed


def actions(plan) -> list[tuple[str, str]]:
    return [(a.action, a.reason) for a in plan.actions]


# --------------------------------------------------------------------------- in sync


def test_a_certificate_made_to_the_manifest_plans_nothing(tmp_path, ca, trust):
    cert = desire(tmp_path, sans=["api.example.com", "10.0.0.5", "2001:DB8::1"], owner=f"{UID}:{GID}")
    deploy(ca, cert)
    plan, observed = plan_for(cert, trust)
    assert observed.chains_to_issuer is True and observed.key_matches
    assert plan.actions == () and plan.error is None
    assert diff(cert, observed, valid_now(observed)) == []


def test_observe_reports_the_facts_of_a_good_certificate(tmp_path, ca, trust):
    cert = desire(tmp_path, sans=["10.0.0.5"], key={"type": "EC", "curve": "P-384"})
    deploy(ca, cert)
    o = observe(cert, trust)
    assert o.cert_file.kind == o.key_file.kind == "file"
    assert (o.cert_file.uid, o.cert_file.mode, o.key_file.mode) == (UID, 0o644, 0o600)
    assert o.cert.common_name == "svc.example.com"
    assert o.cert.sans == frozenset({"svc.example.com", "IP:10.0.0.5"})
    assert o.cert.key_type == "EC P-384"
    assert o.cert.not_after - o.cert.not_before == timedelta(hours=24, minutes=1)  # 1 min backdate
    assert o.cert.issued_by in trust.fingerprints
    assert o.key_public_id == o.cert.public_key_id


# --------------------------------------------------------------------------- issue


def test_missing_certificate_is_issued(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    Path(cert.cert_path).unlink()
    plan, _ = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert actions(plan) == [(ISSUE, "certificate file missing")]


def test_missing_key_is_issued(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    Path(cert.key_path).unlink()
    plan, _ = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert actions(plan) == [(ISSUE, "key file missing")]
    assert [d.field for d in plan.actions[0].drifts] == ["key_file"]


def test_nothing_on_disk_is_one_issue_naming_both_files(tmp_path, trust):
    cert = desire(tmp_path, cert_path="new/dir/a.crt", key_path="new/dir/a.key")
    plan, _ = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert actions(plan) == [(ISSUE, "certificate file missing; key file missing")]


def test_a_path_that_cannot_be_read_is_an_observation_and_issued(tmp_path, ca, trust):
    (tmp_path / "not-a-dir").write_text("x")
    cert = desire(tmp_path, cert_path="not-a-dir/svc.crt")
    deploy(ca, replace(cert, cert_path=str(tmp_path / "elsewhere.crt")))
    plan, observed = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert observed.cert_file.kind == "unreadable"
    assert actions(plan) == [(ISSUE, "certificate file unreadable: a parent of the path is not a directory")]


def test_an_unreadable_file_is_issued(tmp_path):
    """Root reads everything, so the observation itself is made up here: diff is pure."""
    cert = desire(tmp_path)
    observed = Observed(FileState("unreadable", 0, 0, 0o000, "Permission denied"), FileState("file", 0, 0, 0o600))
    plan = plan_cert(cert, observed, datetime.now(timezone.utc))
    assert actions(plan) == [(ISSUE, "certificate file unreadable: Permission denied")]


@pytest.mark.parametrize(
    "garbage, words",
    [
        (b"hello, I am not a certificate\n", "not a PEM X.509 certificate"),
        (b"", "not a PEM X.509 certificate"),
        (os.urandom(2048), "not a PEM X.509 certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM X.509 certificate"),
        (b"x" * (1024 * 1024 + 10), "larger than 1 MiB"),
    ],
)
def test_a_garbage_certificate_is_issued_not_a_crash(tmp_path, ca, trust, garbage, words):
    cert = desire(tmp_path)
    deploy(ca, cert)
    Path(cert.cert_path).write_bytes(garbage)
    plan, observed = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert observed.cert is None and words in observed.cert_error
    assert actions(plan) == [(ISSUE, f"certificate does not parse: {observed.cert_error}")]


@pytest.mark.parametrize("size", [0, 700, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 40_000, 1024 * 1024 + 10])
def test_observe_reads_a_file_whole_up_to_one_byte_past_the_limit(tmp_path, size):
    from reconciler.observe import read
    from reconciler.parse import LIMIT

    path = tmp_path / "f"
    path.write_bytes(data := os.urandom(size))
    assert read(path) == (data[: LIMIT + 1], None)


def test_a_certificate_with_a_key_algorithm_cryptography_cannot_load_is_garbage_not_a_crash(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    pem = Path(cert.cert_path).read_bytes()
    from cryptography import x509

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    id_ec_public_key = bytes.fromhex("06072a8648ce3d0201")
    assert der.count(id_ec_public_key) == 1
    der = der.replace(id_ec_public_key, bytes.fromhex("06072a8648ce3d0209"))  # an unknown OID
    Path(cert.cert_path).write_bytes(
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    )
    plan, observed = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert observed.cert is None and "does not parse" in observed.cert_error
    assert plan.actions[0].action == ISSUE


@pytest.mark.parametrize(
    "garbage, words",
    [
        (b"not a key", "not a PEM private key"),
        (b"", "not a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a"),
    ],
)
def test_a_garbage_key_is_issued_not_a_crash(tmp_path, ca, trust, garbage, words):
    cert = desire(tmp_path)
    deploy(ca, cert)
    Path(cert.key_path).write_bytes(garbage)
    plan, observed = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert observed.key_public_id is None and words in observed.key_error
    assert actions(plan) == [(ISSUE, f"key does not parse: {observed.key_error}")]


def test_an_encrypted_key_is_issued_with_the_reason(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    key = make_key("EC P-256")
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
    )
    Path(cert.key_path).write_bytes(encrypted)
    plan, _ = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert actions(plan) == [
        (ISSUE, "key does not parse: private key is encrypted; the reconciler manages unencrypted keys only")
    ]


def test_a_key_that_does_not_match_the_certificate_is_issued(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    Path(cert.key_path).write_bytes(key_to_pem(make_key("EC P-256", 1)))
    plan, observed = plan_for(cert, trust)
    assert observed.cert is not None and not observed.key_matches
    assert actions(plan) == [(ISSUE, "key does not match the certificate")]


def test_garbage_in_both_files_is_one_issue(tmp_path, trust):
    cert = desire(tmp_path)
    write(cert.cert_path, b"junk", 0o644)
    write(cert.key_path, b"junk", 0o600)
    plan, _ = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert [a.action for a in plan.actions] == [ISSUE]
    assert [d.field for d in plan.actions[0].drifts] == ["certificate", "key"]


# --------------------------------------------------------------------------- reissue


def test_common_name_differs(tmp_path, ca, trust):
    cert = desire(tmp_path, sans=["old.example.com"])
    deploy(ca, cert, common_name="old.example.com")  # SANs still hold both names
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(REISSUE, "common name is 'old.example.com', want 'svc.example.com'")]


def test_san_set_differs_names_what_is_added_and_dropped(tmp_path, ca, trust):
    cert = desire(tmp_path, sans=["www.example.com", "10.0.0.5"])
    deploy(ca, cert, sans=["svc.example.com", "www.example.com", "old.example"])
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(REISSUE, "SANs differ: adds 10.0.0.5, drops old.example")]
    (drift,) = plan.actions[0].drifts
    assert drift.field == "sans"
    assert drift.observed == ["old.example", "svc.example.com", "www.example.com"]
    assert drift.desired == ["10.0.0.5", "svc.example.com", "www.example.com"]


def test_san_only_added_or_only_dropped(tmp_path, ca, trust):
    cert = desire(tmp_path, sans=["2001:db8::1"])
    deploy(ca, cert, sans=["svc.example.com"])
    assert actions(plan_for(cert, trust)[0]) == [(REISSUE, "SANs differ: adds 2001:db8::1")]
    deploy(ca, cert, sans=["svc.example.com", "2001:db8::1", "10.9.9.9"])
    assert actions(plan_for(cert, trust)[0]) == [(REISSUE, "SANs differ: drops 10.9.9.9")]


def test_the_common_name_counts_as_a_san(tmp_path, ca, trust):
    """The shell script dropped the CN from the SAN list: such a certificate is re-issued."""
    cert = desire(tmp_path, sans=["www.example.com"])
    deploy(ca, cert, sans=["www.example.com"])
    assert actions(plan_for(cert, trust)[0]) == [(REISSUE, "SANs differ: adds svc.example.com")]


def test_ip_sans_in_another_spelling_compare_equal(tmp_path, ca, trust):
    """The shell script's first bug: IP SANs never compared equal, so they were re-issued hourly."""
    cert = desire(tmp_path, common_name="Svc.Example.COM", sans=["2001:DB8::1", "10.0.0.5", "WWW.example.com."])
    deploy(ca, cert, sans=["10.0.0.5", "2001:db8:0:0:0:0:0:1", "www.EXAMPLE.com", "svc.example.com"])
    assert plan_for(cert, trust)[0].actions == ()


@pytest.mark.parametrize(
    "have, want",
    [
        ("EC P-256", {"type": "EC", "curve": "P-384"}),
        ("EC P-384", {"type": "EC"}),
        ("Ed25519", {"type": "EC"}),
        ("EC P-256", {"type": "Ed25519"}),
        ("RSA 2048", {"type": "RSA", "size": 4096}),
        ("RSA 2048", {"type": "EC"}),
    ],
)
def test_key_type_differs(tmp_path, ca, trust, have, want):
    cert = desire(tmp_path, key=want)
    deploy(ca, cert, key=make_key(have))
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(REISSUE, f"key type is {have}, want {cert.key.describe()}")]


def test_issued_by_another_ca(tmp_path, other_ca, trust):
    cert = desire(tmp_path)
    deploy(other_ca, cert)
    plan, observed = plan_for(cert, trust)
    assert observed.chains_to_issuer is False
    assert actions(plan) == [(REISSUE, "issued by another CA than the configured issuer")]


def test_trust_anchors_are_known_by_their_pem_fingerprints_and_parsed_only_when_needed(ca):
    root_pem, int_pem = ca.trust_pems()
    trust = Trust.of([root_pem, int_pem], authoritative=True)
    parsed = [x509.load_pem_x509_certificate(p) for p in (root_pem, int_pem)]
    assert trust.fingerprints == tuple(c.fingerprint(hashes.SHA256()).hex() for c in parsed)
    assert "anchors" not in vars(trust)  # the fingerprints alone key the observation cache
    assert trust.root == trust.fingerprints[0]  # the self-signed one, once asked
    # text before the armour, or a second certificate: the first certificate, parsed
    assert pem_fingerprint(b"the embedded root\n" + root_pem) == trust.fingerprints[0]
    assert pem_fingerprint(root_pem + int_pem) == trust.fingerprints[0]


@pytest.mark.parametrize(
    "damaged",
    [b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b""],
    ids=["no-armour", "armoured-garbage", "empty"],
)
def test_a_damaged_ca_certificate_file_is_no_anchor_and_nothing_chains_to_it(tmp_path, ca, damaged):
    cert = desire(tmp_path)
    deploy(ca, cert)
    trust = Trust.of([ca.trust_pems()[0], damaged], authoritative=True)
    assert trust.anchors == () and trust.root is None
    plan, observed = plan_for(cert, trust)
    assert observed.chains_to_issuer is False
    assert actions(plan) == [(REISSUE, "issued by another CA than the configured issuer")]


def test_nothing_chains_to_an_embedded_ca_that_does_not_exist_yet(tmp_path, other_ca):
    cert = desire(tmp_path)
    deploy(other_ca, cert)
    not_yet = LocalCA(tmp_path / "state" / "ca")
    trust = Trust.of(not_yet.trust_pems(), authoritative=True)
    assert trust.anchors == ()
    plan, observed = plan_for(cert, trust)
    assert observed.chains_to_issuer is False
    assert [a.action for a in plan.actions] == [REISSUE]
    assert not (tmp_path / "state").exists()  # looking did not create it


def test_unknown_trust_of_a_remote_ca_is_not_a_drift(tmp_path, other_ca):
    """A step-ca whose root is not known locally yet: we cannot tell, so we do not re-issue."""
    cert = desire(tmp_path)
    deploy(other_ca, cert)
    plan, observed = plan_for(cert, Trust.of([], authoritative=False))
    assert observed.chains_to_issuer is None
    assert plan.actions == ()


def test_a_leaf_without_its_chain_still_chains_to_the_embedded_ca(tmp_path, ca, trust):
    cert = desire(tmp_path)
    pem, key = issue(ca, cert)
    write(cert.cert_path, pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n", 0o644)
    write(cert.key_path, key_to_pem(key), 0o600)
    assert plan_for(cert, trust)[0].actions == ()


def test_several_identity_drifts_are_one_reissue_with_every_reason(tmp_path, other_ca, trust):
    cert = desire(tmp_path, key={"type": "EC", "curve": "P-384"})
    deploy(other_ca, cert, key=make_key("EC P-256"), common_name="old.example.com", sans=["old.example.com"])
    plan, _ = plan_for(cert, trust)
    (action,) = plan.actions
    assert action.action == REISSUE
    assert [d.field for d in action.drifts] == ["common_name", "sans", "key_type", "issuer"]
    assert action.reason == "; ".join(d.reason for d in action.drifts)


def forge(ca: LocalCA, cert: DesiredCert, names=None, not_before: datetime | None = None, lifetime=timedelta(hours=24)):
    """What the embedded CA would never make itself, signed by its real intermediate and
    deployed: other GeneralNames, or a notBefore of a clock that was ahead."""
    import ipaddress as _ip

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    _root, inter, int_key, _root_pem, int_pem = ca._ensure()
    key = make_key(cert.key.describe())
    start = not_before or datetime.now(timezone.utc) - timedelta(minutes=1)
    if names is None:
        names = [
            x509.IPAddress(_ip.ip_address(display(s))) if s.startswith("IP:") else x509.DNSName(s) for s in cert.sans
        ]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cert.common_name)]))
        .issuer_name(inter.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(int_key, hashes.SHA256())
    )
    write(
        cert.cert_path,
        leaf.public_bytes(serialization.Encoding.PEM) + (int_pem if cert.include_ca else b""),
        cert.cert_mode,
    )
    write(cert.key_path, key_to_pem(key), cert.key_mode)


def test_a_dns_typed_ip_does_not_count_as_the_ip_san_asked_for(tmp_path, ca, trust):
    """A certificate with DNS:127.0.0.1 and no iPAddress "matched" a manifest asking for
    127.0.0.1; TLS clients reject it for that address."""
    from cryptography import x509

    cert = desire(tmp_path, common_name="svc.example.com", sans=["127.0.0.1"])
    forge(ca, cert, names=[x509.DNSName("svc.example.com"), x509.DNSName("127.0.0.1")])
    plan, observed = plan_for(cert, trust)
    assert observed.chains_to_issuer is True and observed.key_matches
    assert actions(plan) == [(REISSUE, "SANs differ: adds 127.0.0.1, drops DNS:127.0.0.1")]


# --------------------------------------------------------------------------- not yet valid


def test_a_certificate_not_yet_valid_is_reissued_saying_the_clock_may_have_jumped(tmp_path, ca, trust):
    """Issued while the clock was ahead: every TLS client says "certificate is not yet
    valid", and it was counted as ready."""
    cert = desire(tmp_path)
    now = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
    forge(ca, cert, not_before=datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc))
    plan, observed = plan_for(cert, trust, now=now)
    assert observed.chains_to_issuer is True
    assert actions(plan) == [
        (REISSUE, "not valid until 2026-12-01T10:00Z (in 3d); the clock may have jumped backwards")
    ]
    (drift,) = plan.actions[0].drifts
    assert (drift.field, drift.observed, drift.desired) == (
        "not_before",
        "2026-12-01T10:00:00+00:00",
        "at or before 2026-11-28T10:00:00+00:00",
    )


def test_a_certificate_valid_from_this_very_second_is_ready(tmp_path, ca, trust):
    cert = desire(tmp_path)
    start = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    forge(ca, cert, not_before=start)
    assert plan_for(cert, trust, now=start)[0].actions == ()
    assert [a.action for a in plan_for(cert, trust, now=start - timedelta(seconds=1))[0].actions] == [REISSUE]


def test_the_cached_observation_keeps_the_future_not_before(tmp_path, ca, trust):
    from reconciler.observe import ObservationCache

    cert = desire(tmp_path)
    start = datetime.now(timezone.utc) + timedelta(days=2)
    forge(ca, cert, not_before=start)
    cache = ObservationCache(tmp_path / "state")
    observe(cert, trust, cache)
    cache.save()
    hit = observe(cert, trust, ObservationCache(tmp_path / "state"))
    assert [d.field for d in diff(cert, hit, datetime.now(timezone.utc))] == ["not_before"]


def test_observe_all_answers_as_one_file_at_a_time(tmp_path, ca, other_ca, trust):
    """observe_all looks every certificate up first and then reads and checks those the
    cache cannot answer for: each is seen as observe sees it alone, in the manifest's order,
    and a foreign certificate, whose intermediate carries our intermediate's very name, is
    never ours."""
    from reconciler import observe as stage

    entries = [
        {"name": f"c{i}", "common_name": f"c{i}.example.com", "cert_path": f"c{i}.crt", "key_path": f"c{i}.key"}
        for i in range(12)
    ]
    certs = build(entries, tmp_path / "certificate-manifest.json").certificates
    for i, cert in enumerate(certs):
        if i % 4 == 3:
            write(cert.cert_path, b"not a certificate", 0o644)
        else:
            deploy(other_ca if i % 4 == 1 else ca, cert)
        if i % 4 == 2:
            Path(cert.key_path).unlink()
    one_by_one = {c.name: observe(c, trust) for c in certs}
    observed = stage.observe_all(certs, trust)
    assert list(observed) == [c.name for c in certs]
    assert observed == one_by_one
    assert [o.chains_to_issuer for o in observed.values()][:4] == [True, False, True, None]


# --------------------------------------------------------------------------- EKU and lifetime


def test_a_server_certificate_where_the_manifest_asks_for_a_client_one_is_reissued(tmp_path, ca, trust):
    cert = desire(tmp_path, cert_type="client")
    deploy(ca, replace(cert, cert_type="server"))
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(REISSUE, "extended key usage is serverAuth, a client certificate needs clientAuth")]
    assert [(d.field, d.observed, d.desired) for d in plan.actions[0].drifts] == [
        ("cert_type", ["serverAuth"], "clientAuth")
    ]


def test_a_client_certificate_where_the_manifest_asks_for_a_server_one_is_reissued(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, replace(cert, cert_type="client"))
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(REISSUE, "extended key usage is clientAuth, a server certificate needs serverAuth")]


def signed_leaf(ca: LocalCA, cert: DesiredCert, usages: list | None) -> bytes:
    """A leaf from `ca` with the given extended key usages (None: no EKU extension at all)."""
    _root, inter, int_key, _root_pem, _int_pem = ca._ensure()
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cert.common_name)]))
        .issuer_name(inter.subject)
        .public_key(make_key(cert.key.describe()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + cert.duration)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(display(s)) for s in cert.sans]), critical=False)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(int_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("cert_type", ["server", "client"])
@pytest.mark.parametrize(
    "usages",
    [
        [
            x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
        ],  # step-ca's default template
        [x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
        None,
    ],
    ids=["both", "any", "no-eku"],
)
def test_a_certificate_usable_for_both_serves_either_cert_type(tmp_path, ca, trust, cert_type, usages):
    """step-ca gives every certificate both usages whatever we ask: that is no drift, or a
    step-ca certificate would be re-issued on every pass."""
    cert = desire(tmp_path, cert_type=cert_type)
    write(cert.cert_path, signed_leaf(ca, cert, usages), 0o644)
    write(cert.key_path, key_to_pem(make_key(cert.key.describe())), 0o600)
    assert plan_for(cert, trust)[0].actions == ()


def test_a_lifetime_other_than_the_duration_is_reissued(tmp_path, ca, trust):
    cert = desire(tmp_path)  # 24h
    deploy(ca, cert, duration=timedelta(hours=1))
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(REISSUE, "lifetime is 1h1m, want 24h")]
    assert [(d.field, d.observed, d.desired) for d in plan.actions[0].drifts] == [("duration", "1h1m", "24h")]
    deploy(ca, cert, duration=timedelta(hours=48))
    assert actions(plan_for(cert, trust)[0]) == [(REISSUE, "lifetime is 2d1m, want 24h")]


@pytest.mark.parametrize(
    "duration, issued, drifts",
    [
        # the CA's 1-minute backdate, and up to 2 minutes either way, are no drift
        ("10m", timedelta(minutes=10), False),
        ("10m", timedelta(minutes=8, seconds=30), False),
        ("10m", timedelta(minutes=11, seconds=30), True),
        ("10m", timedelta(minutes=6, seconds=30), True),
        # longer lifetimes: 1 % of the duration (14m24s of 24h, 1h40m48s of 7d)
        ("24h", timedelta(hours=24, minutes=13), False),
        ("24h", timedelta(hours=24, minutes=14), True),
        ("24h", timedelta(hours=23, minutes=40), True),
        ("7d", timedelta(days=7, minutes=99), False),
        ("7d", timedelta(days=7, minutes=102), True),
    ],
)
def test_the_lifetime_tolerates_the_cas_backdate(tmp_path, ca, trust, duration, issued, drifts):
    cert = desire(tmp_path, duration=duration, renew_before="10%")
    deploy(ca, cert, duration=issued)
    plan, _ = plan_for(cert, trust)
    assert [a.action for a in plan.actions] == ([REISSUE] if drifts else [])


def test_a_lifetime_the_embedded_ca_capped_at_its_intermediate_is_no_drift(tmp_path, ca, trust):
    """Asking for longer than the CA can give would otherwise re-issue on every pass."""
    cert = desire(tmp_path, duration="3650d", renew_before="10%")
    deploy(ca, cert)
    observed = observe(cert, trust)
    assert observed.cert.not_after - observed.cert.not_before < timedelta(days=1900)
    assert plan_cert(cert, observed, valid_now(observed)).actions == ()


def test_identity_drifts_are_listed_in_table_order(tmp_path, other_ca, trust):
    cert = desire(tmp_path, key={"type": "EC", "curve": "P-384"}, cert_type="client")
    deploy(
        other_ca,
        replace(cert, cert_type="server"),
        key=make_key("EC P-256"),
        common_name="old.example.com",
        sans=["old.example.com"],
        duration=timedelta(hours=2),
    )
    (action,) = plan_for(cert, trust)[0].actions
    assert [d.field for d in action.drifts] == ["common_name", "sans", "key_type", "cert_type", "duration", "issuer"]


# --------------------------------------------------------------------------- the chain in the certificate file


def pems(data: bytes) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(data)]


def fingerprint(pem: bytes) -> str:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


def test_include_ca_asks_for_the_chain_the_file_lacks(tmp_path, ca, trust):
    cert = desire(tmp_path, include_ca=True)
    deploy(ca, replace(cert, include_ca=False))
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(REWRITE_CHAIN, "the certificate file lacks the CA chain include_ca asks for")]
    (drift,) = plan.actions[0].drifts
    intermediate = x509.load_pem_x509_certificate(ca.trust_pems()[1]).fingerprint(hashes.SHA256()).hex()
    assert (drift.field, drift.observed, drift.desired) == ("chain", [], [intermediate])
    assert plan.content_action is None


def test_a_chain_the_manifest_does_not_ask_for_is_dropped(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, replace(cert, include_ca=True))
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [
        (REWRITE_CHAIN, "the certificate file holds a CA chain (1 certificate) that include_ca: false leaves out")
    ]
    assert plan.actions[0].drifts[0].desired == []


@pytest.mark.parametrize("extra", ["foreign intermediate", "root appended", "intermediate twice"])
def test_a_stale_or_foreign_chain_is_rewritten(tmp_path, ca, other_ca, trust, extra):
    cert = desire(tmp_path, include_ca=True)
    pem, key = issue(ca, cert)
    leaf, intermediate = pems(pem)
    chain = {
        "foreign intermediate": other_ca.trust_pems()[1],
        "root appended": intermediate + ca.trust_pems()[0],
        "intermediate twice": intermediate + intermediate,
    }[extra]
    write(cert.cert_path, leaf + chain, 0o644)
    write(cert.key_path, key_to_pem(key), 0o600)
    plan, observed = plan_for(cert, trust)
    assert observed.chains_to_issuer is True
    assert actions(plan) == [
        (
            REWRITE_CHAIN,
            "the CA chain in the certificate file is not the issuer's (a stale or foreign certificate in it)",
        )
    ]
    assert plan.actions[0].drifts[0].desired == [fingerprint(intermediate)]


def test_a_chain_is_not_judged_when_the_issuers_chain_is_unknown(tmp_path, ca):
    """A step-ca whose intermediates are not known here yet: a leaf-only file is not called wrong."""
    cert = desire(tmp_path, include_ca=True)
    deploy(ca, replace(cert, include_ca=False))
    assert plan_for(cert, Trust.of([], authoritative=False))[0].actions == ()
    # but a chain the manifest does not ask for is always known to be wrong
    plain = desire(tmp_path)
    deploy(ca, replace(plain, include_ca=True))
    assert [a.action for a in plan_for(plain, Trust.of([], authoritative=False))[0].actions] == [REWRITE_CHAIN]


def test_a_new_certificate_carries_the_right_chain_so_no_rewrite_is_planned_beside_it(tmp_path, ca, trust):
    cert = desire(tmp_path, include_ca=True, sans=["www.example.com"])
    deploy(ca, replace(cert, include_ca=False), sans=["svc.example.com"])
    plan, _ = plan_for(cert, trust)
    assert [a.action for a in plan.actions] == [REISSUE]


# --------------------------------------------------------------------------- ca_path


def test_a_missing_ca_file_is_written_without_a_new_certificate(tmp_path, ca, trust):
    cert = desire(tmp_path, ca_path="ca.crt")
    deploy(ca, cert)
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(WRITE_CA, f"CA file {cert.ca_path} missing")]
    assert plan.content_action is None


@pytest.mark.parametrize("content", ["another root", "garbage", "the intermediate", "root and more"])
def test_a_ca_file_holding_something_else_than_the_issuers_root_is_written(tmp_path, ca, other_ca, trust, content):
    cert = desire(tmp_path, ca_path="ca.crt")
    deploy(ca, cert)
    root, intermediate = ca.trust_pems()
    data = {
        "another root": other_ca.trust_pems()[0],
        "garbage": b"not a certificate\n",
        "the intermediate": intermediate,
        "root and more": root + intermediate,
    }[content]
    write(cert.ca_path, data, 0o644)
    plan, _ = plan_for(cert, trust)
    reason = (
        "does not hold a PEM certificate"
        if content == "garbage"
        else "holds another certificate than the issuer's root"
    )
    assert actions(plan) == [(WRITE_CA, f"CA file {cert.ca_path} {reason}")]


def test_a_ca_file_holding_the_issuers_root_plans_nothing(tmp_path, ca, trust):
    cert = desire(tmp_path, ca_path="ca.crt")
    deploy(ca, cert)
    write(cert.ca_path, ca.trust_pems()[0], 0o644)
    plan, observed = plan_for(cert, trust)
    assert plan.actions == ()
    assert observed.ca_file.kind == "file"


@pytest.mark.root  # chowns the files to 4242:4343
def test_a_ca_file_with_another_mode_or_owner_is_chmodded_and_chowned(tmp_path, ca, trust):
    cert = desire(tmp_path, ca_path="ca.crt", owner="4242:4343")
    deploy(ca, cert)
    for p in (cert.cert_path, cert.key_path):
        os.chown(p, 4242, 4343)
    write(cert.ca_path, ca.trust_pems()[0], 0o600)
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [
        (CHOWN, f"CA file owner {UID}:{GID}, want 4242:4343 (4242:4343)"),
        (CHMOD, "CA file mode 0600, want 0644"),
    ]
    assert [d.field for a in plan.actions for d in a.drifts] == ["ca_owner", "ca_mode"]


def test_a_symlink_at_the_ca_path_is_an_error(tmp_path, ca, trust):
    cert = desire(tmp_path, ca_path="ca.crt")
    deploy(ca, cert)
    write(tmp_path / "real-ca.crt", ca.trust_pems()[0], 0o644)
    Path(cert.ca_path).symlink_to(tmp_path / "real-ca.crt")
    plan, _ = plan_for(cert, trust)
    assert plan.actions == () and "ca " + str(cert.ca_path) + " is a symlink" in plan.error


def test_a_ca_file_of_an_unknown_root_is_not_judged_but_a_missing_one_is_written(tmp_path, ca, other_ca):
    cert = desire(tmp_path, ca_path="ca.crt")
    deploy(ca, cert)
    unknown = Trust.of([], authoritative=False)
    assert [a.action for a in plan_for(cert, unknown)[0].actions] == [WRITE_CA]
    write(cert.ca_path, other_ca.trust_pems()[0], 0o644)
    assert plan_for(cert, unknown)[0].actions == ()


# --------------------------------------------------------------------------- renew


def test_expired(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    observed = observe(cert, trust)
    plan = plan_cert(cert, observed, observed.cert.not_after + timedelta(hours=2, minutes=5))
    assert actions(plan) == [(RENEW, "expired 2h5m ago")]


def test_expiring_this_very_second_counts_as_expired(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    observed = observe(cert, trust)
    assert actions(plan_cert(cert, observed, observed.cert.not_after)) == [(RENEW, "expired 0s ago")]


def test_inside_the_fixed_renewal_window(tmp_path, ca, trust):
    cert = desire(tmp_path)  # renew_before 12h
    deploy(ca, cert)
    observed = observe(cert, trust)
    now = observed.cert.not_after - timedelta(hours=3, minutes=12)
    due = renewal_due_at(cert, observed.cert.not_before, observed.cert.not_after)
    since = format_duration(now - due)
    assert actions(plan_cert(cert, observed, now)) == [
        (RENEW, f"renewal due since {since} ago (window 12h + jitter); expires in 3h12m")
    ]


def test_outside_the_fixed_renewal_window(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    observed = observe(cert, trust)
    # window 12h, plus at most 5 % of the lifetime (72m) of jitter
    now = observed.cert.not_after - timedelta(hours=13, minutes=13)
    assert plan_cert(cert, observed, now).actions == ()


def test_inside_and_outside_a_share_of_the_lifetime(tmp_path, ca, trust):
    cert = desire(tmp_path, renew_before="33%")  # of 24h1m: 7h55m
    deploy(ca, cert)
    observed = observe(cert, trust)
    now = observed.cert.not_after - timedelta(hours=5)
    since = format_duration(now - renewal_due_at(cert, observed.cert.not_before, observed.cert.not_after))
    assert actions(plan_cert(cert, observed, now)) == [
        (RENEW, f"renewal due since {since} ago (window 33% + jitter); expires in 5h")
    ]
    # 7h55m + 5 % of 24h1m (1h12m) = 9h07m
    assert plan_cert(cert, observed, observed.cert.not_after - timedelta(hours=9, minutes=10)).actions == ()


def test_renewal_jitter_is_stable_earlier_never_later_and_within_5_percent(tmp_path):
    cert = desire(tmp_path)
    not_before = datetime(2030, 1, 1, tzinfo=timezone.utc)
    not_after = not_before + timedelta(hours=24)
    dues = []
    for i in range(50):
        c = replace(cert, name=f"c{i}")
        due = renewal_due_at(c, not_before, not_after)
        assert due == renewal_due_at(c, not_before, not_after)
        assert not_after - timedelta(hours=12) - timedelta(hours=24) * 0.05 <= due <= not_after - timedelta(hours=12)
        dues.append(due)
    assert len(set(dues)) > 40  # a fleet does not renew in the same second


@pytest.mark.parametrize("renew_before", ["12h", "33%"])
def test_the_renewal_row_is_due_from_the_jittered_moment_on_exactly(tmp_path, ca, trust, renew_before):
    """The row skips the digest before the earliest moment any jitter allows: that shortcut
    never hides a due renewal, nor makes one due early."""
    cert = desire(tmp_path, renew_before=renew_before)
    deploy(ca, cert)
    observed = observe(cert, trust)
    facts = observed.cert
    for i in range(40):
        c = replace(cert, name=f"c{i}")
        due = renewal_due_at(c, facts.not_before, facts.not_after)
        assert earliest_renewal(c, facts.not_before, facts.not_after) <= due
        assert plan_cert(c, observed, due - timedelta(microseconds=1)).actions == ()
        assert [a.action for a in plan_cert(c, observed, due).actions] == [RENEW]
        assert plan_cert(c, observed, due - timedelta(minutes=1)).readiness.renewal_at == due


def test_identity_drift_wins_over_expiry(tmp_path, ca, trust):
    cert = desire(tmp_path, sans=["www.example.com"])
    deploy(ca, cert, sans=["svc.example.com"])
    observed = observe(cert, trust)
    for now in (observed.cert.not_after + timedelta(hours=1), observed.cert.not_after - timedelta(hours=1)):
        drifts = diff(cert, observed, now)
        assert [d.action for d in drifts] == [REISSUE]
        assert [a.action for a in plan_cert(cert, observed, now).actions] == [REISSUE]


# --------------------------------------------------------------------------- owner and mode


def test_owner_differs_is_a_chown_only(tmp_path, ca, trust):
    cert = desire(tmp_path, owner="4242:4343")
    deploy(ca, cert)
    plan, _ = plan_for(cert, trust)
    assert [a.action for a in plan.actions] == [CHOWN]
    assert plan.actions[0].reason == (
        f"certificate owner {UID}:{GID}, want 4242:4343 (4242:4343); key owner {UID}:{GID}, want 4242:4343 (4242:4343)"
    )
    assert [d.field for d in plan.actions[0].drifts] == ["certificate_owner", "key_owner"]
    assert plan.content_action is None


def test_owner_with_a_user_only_leaves_the_group_alone(tmp_path, ca, trust):
    cert = desire(tmp_path, owner="4242")
    deploy(ca, cert)
    plan, _ = plan_for(cert, trust)
    assert [a.action for a in plan.actions] == [CHOWN]
    assert plan.actions[0].drifts[0].desired == f"4242:{GID}"
    assert plan_for(desire(tmp_path, owner=str(UID)), trust)[0].actions == ()


def test_key_mode_differs_is_a_chmod_only(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    os.chmod(cert.key_path, 0o644)
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(CHMOD, "key mode 0644, want 0600")]


def test_certificate_and_key_mode_differ(tmp_path, ca, trust):
    cert = desire(tmp_path, permissions="640")
    deploy(ca, cert)
    os.chmod(cert.cert_path, 0o644)
    os.chmod(cert.key_path, 0o600)
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(CHMOD, "certificate mode 0644, want 0640; key mode 0600, want 0640")]


def test_owner_and_mode_differ_are_chown_then_chmod(tmp_path, ca, trust):
    cert = desire(tmp_path, owner="4242:4343")
    deploy(ca, cert)
    os.chmod(cert.key_path, 0o640)
    plan, _ = plan_for(cert, trust)
    assert [a.action for a in plan.actions] == [CHOWN, CHMOD]


def test_special_mode_bits_count_as_a_mode_difference(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    os.chmod(cert.cert_path, 0o4644)
    plan, _ = plan_for(cert, trust)
    assert actions(plan) == [(CHMOD, "certificate mode 4644, want 0644")]


@pytest.mark.parametrize("content_drift", ["missing_key", "expired", "sans"])
def test_a_content_action_suppresses_chown_and_chmod(tmp_path, ca, trust, content_drift):
    """The new files are written with the right owner and mode anyway."""
    cert = desire(tmp_path, owner="4242:4343", sans=["www.example.com"])
    deploy(ca, cert, sans=["svc.example.com"] if content_drift == "sans" else None)
    os.chmod(cert.cert_path, 0o600)
    observed = observe(cert, trust)
    now = valid_now(observed)
    if content_drift == "missing_key":
        Path(cert.key_path).unlink()
        observed = observe(cert, trust)
    elif content_drift == "expired":
        now = observed.cert.not_after + timedelta(minutes=1)
    plan = plan_cert(cert, observed, now)
    assert len(plan.actions) == 1
    assert plan.actions[0].action in (ISSUE, REISSUE, RENEW)
    assert not [d for d in plan.actions[0].drifts if d.action in (CHOWN, CHMOD)]


# --------------------------------------------------------------------------- hooks


def test_a_pending_hook_is_run_when_nothing_else_changes(tmp_path, ca, trust):
    cert = desire(tmp_path, post_renewal_command="systemctl reload nginx")
    deploy(ca, cert)
    plan, _ = plan_for(cert, trust, hook_pending=True)
    assert [a.action for a in plan.actions] == [RUN_HOOK]
    assert "did not succeed" in plan.actions[0].reason
    assert plan.runs_hook


def test_a_pending_hook_comes_after_chown_and_chmod(tmp_path, ca, trust):
    cert = desire(tmp_path, post_renewal_command="systemctl reload nginx")
    deploy(ca, cert)
    os.chmod(cert.key_path, 0o640)
    plan, _ = plan_for(cert, trust, hook_pending=True)
    assert [a.action for a in plan.actions] == [CHMOD, RUN_HOOK]


def test_a_pending_hook_folds_into_a_content_action(tmp_path, trust):
    cert = desire(tmp_path, post_renewal_command="systemctl reload nginx")
    plan, _ = plan_for(cert, trust, now=datetime.now(timezone.utc), hook_pending=True)
    assert [a.action for a in plan.actions] == [ISSUE]
    assert plan.runs_hook


def test_a_pending_hook_whose_command_was_removed_plans_nothing(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    plan, _ = plan_for(cert, trust, hook_pending=True)
    assert plan.actions == () and not plan.runs_hook


def test_chown_or_chmod_alone_runs_no_hook(tmp_path, ca, trust):
    cert = desire(tmp_path, post_renewal_command="systemctl reload nginx")
    deploy(ca, cert)
    os.chmod(cert.key_path, 0o640)
    plan, _ = plan_for(cert, trust)
    assert [a.action for a in plan.actions] == [CHMOD]
    assert not plan.runs_hook


def test_hooks_run_once_per_distinct_command_in_manifest_order(tmp_path, ca, trust):
    entries = [
        {
            "name": "a",
            "common_name": "a.example.com",
            "cert_path": "a.crt",
            "key_path": "a.key",
            "post_renewal_command": "systemctl reload nginx",
        },
        {
            "name": "b",
            "common_name": "b.example.com",
            "cert_path": "b.crt",
            "key_path": "b.key",
            "post_renewal_command": "systemctl reload postfix",
        },
        {
            "name": "c",
            "common_name": "c.example.com",
            "cert_path": "c.crt",
            "key_path": "c.key",
            "post_renewal_command": "systemctl reload nginx",
        },
        {
            "name": "d",
            "common_name": "d.example.com",
            "cert_path": "d.crt",
            "key_path": "d.key",
            "post_renewal_command": "systemctl reload nginx",
        },
        {"name": "e", "common_name": "e.example.com", "cert_path": "e.crt", "key_path": "e.key"},
        {
            "name": "f",
            "common_name": "f.example.com",
            "cert_path": "f.crt",
            "key_path": "f.key",
            "post_renewal_command": "systemctl reload haproxy",
        },
    ]
    desired = build(entries, tmp_path / "certificate-manifest.json")
    by_name = {c.name: c for c in desired.certificates}
    for name in ("c", "d", "f"):
        deploy(ca, by_name[name])
    os.chmod(by_name["f"].key_path, 0o640)  # chmod only: no hook
    observed = {c.name: observe(c, trust) for c in desired.certificates}
    now = valid_now(observed["c"])
    plan = make_plan(desired, observed, now, hooks_pending=frozenset({"d"}))
    assert [(p.cert.name, [a.action for a in p.actions]) for p in plan.certificates] == [
        ("a", [ISSUE]),
        ("b", [ISSUE]),
        ("c", []),
        ("d", [RUN_HOOK]),
        ("e", [ISSUE]),
        ("f", [CHMOD]),
    ]
    assert [(h.command, h.certificates) for h in plan.hooks] == [
        ("systemctl reload nginx", ("a", "d")),
        ("systemctl reload postfix", ("b",)),
    ]
    assert plan.changes and plan.errors == ()


def test_a_plan_with_nothing_to_do_has_no_changes_and_no_hooks(tmp_path, ca, trust):
    cert = desire(tmp_path, post_renewal_command="true")
    deploy(ca, cert)
    desired = Desired(
        issuer=build([], tmp_path / "m.json").issuer, certificates=(cert,), manifest_path=tmp_path / "m.json"
    )
    observed = {cert.name: observe(cert, trust)}
    plan = make_plan(desired, observed, valid_now(observed[cert.name]))
    assert not plan.changes and plan.hooks == () and plan.errors == ()


# --------------------------------------------------------------------------- paths that cannot be managed


def test_a_symlink_at_the_cert_path_is_an_error(tmp_path, ca, trust):
    cert = desire(tmp_path)
    real = replace(cert, cert_path=str(tmp_path / "real.crt"))
    deploy(ca, real)
    Path(cert.cert_path).symlink_to(tmp_path / "real.crt")
    plan, observed = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert observed.cert_file.kind == "symlink"
    assert plan.actions == ()
    assert "is a symlink to" in plan.error and str(tmp_path / "real.crt") in plan.error
    assert '"allow_symlink": true' in plan.error


def test_a_symlink_is_followed_when_allowed(tmp_path, ca, trust):
    cert = desire(tmp_path, allow_symlink=True)
    real = replace(cert, cert_path=str(tmp_path / "real.crt"), key_path=str(tmp_path / "real.key"))
    deploy(ca, real)
    Path(cert.cert_path).symlink_to("real.crt")
    Path(cert.key_path).symlink_to("real.key")
    plan, _ = plan_for(cert, trust)
    assert plan.actions == () and plan.error is None


def test_a_directory_at_the_key_path_is_an_error(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    Path(cert.key_path).unlink()
    Path(cert.key_path).mkdir()
    plan, _ = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert plan.actions == ()
    assert plan.error == f"key {cert.key_path} is a directory; point key_path at a file inside it"


def test_a_fifo_at_the_cert_path_is_an_error_and_is_never_opened(tmp_path, trust):
    cert = desire(tmp_path)
    os.mkfifo(cert.cert_path)
    plan, observed = plan_for(cert, trust, now=datetime.now(timezone.utc))
    assert observed.cert_file.kind == "special"
    assert "device, FIFO or socket" in plan.error


def test_an_error_certificate_shows_in_the_plan_errors_and_runs_no_hook(tmp_path, ca, trust):
    entries = [
        {
            "name": "bad",
            "common_name": "a.example.com",
            "cert_path": "a.crt",
            "key_path": "a.key",
            "post_renewal_command": "x",
        },
        {"name": "new", "common_name": "b.example.com", "cert_path": "b.crt", "key_path": "b.key"},
    ]
    desired = build(entries, tmp_path / "certificate-manifest.json")
    (tmp_path / "a.crt").mkdir()
    observed = {c.name: observe(c, trust) for c in desired.certificates}
    plan = make_plan(desired, observed, datetime.now(timezone.utc), hooks_pending=frozenset({"bad"}))
    assert [p.cert.name for p in plan.errors] == ["bad"]
    assert plan.hooks == ()
    assert plan.changes  # "new" is to be issued


# --------------------------------------------------------------------------- readiness: the same rows


def test_a_certificate_made_to_the_manifest_is_ready_with_nothing_pending(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    observed = observe(cert, trust)
    r = readiness(cert, observed, valid_now(observed))
    assert (r.ready, r.problem, r.pending) == (True, None, ())
    assert r.not_after == observed.cert.not_after
    assert r.renewal_at == renewal_due_at(cert, observed.cert.not_before, observed.cert.not_after)


def test_a_renewal_due_leaves_a_still_valid_certificate_ready(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    observed = observe(cert, trust)
    r = readiness(cert, observed, observed.cert.not_after - timedelta(hours=1))
    assert r.ready and r.problem is None
    assert r.actions == (RENEW,)


def test_an_expired_certificate_is_not_ready_and_says_since_when(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    observed = observe(cert, trust)
    r = readiness(cert, observed, observed.cert.not_after + timedelta(minutes=3))
    assert not r.ready and r.problem == "expired 3m ago"
    assert r.actions == (RENEW,)


@pytest.mark.parametrize("change", ["cert_missing", "garbage_key", "other_sans", "other_ca", "not_yet_valid"])
def test_a_certificate_that_is_not_the_one_asked_for_is_not_ready(tmp_path, ca, other_ca, trust, change):
    cert = desire(tmp_path)
    now = None
    if change == "other_sans":
        deploy(ca, cert, sans=["svc.example.com", "old.example.com"])
    elif change == "other_ca":
        deploy(other_ca, cert)
    else:
        deploy(ca, cert)
    if change == "cert_missing":
        Path(cert.cert_path).unlink()
    elif change == "garbage_key":
        Path(cert.key_path).write_bytes(b"not a key")
    observed = observe(cert, trust)
    if change == "not_yet_valid":
        now = observed.cert.not_before - timedelta(hours=1)
    r = readiness(cert, observed, now or (valid_now(observed) if observed.cert else datetime.now(timezone.utc)))
    want = {
        "cert_missing": "certificate file missing",
        "garbage_key": "key does not parse: not a PEM private key",
        "other_sans": "SANs differ: drops old.example.com",
        "other_ca": "issued by another CA than the configured issuer",
        "not_yet_valid": "not valid until",
    }[change]
    assert not r.ready and r.problem.startswith(want), r


def test_a_wrong_mode_chain_or_owed_hook_leaves_the_certificate_ready_with_work_pending(tmp_path, ca, trust):
    cert = desire(tmp_path, include_ca=True, post_renewal_command="true")
    pem, key = issue(ca, replace(cert, include_ca=False))  # the leaf alone: the chain is missing
    write(cert.cert_path, pem, 0o600)
    write(cert.key_path, key_to_pem(key), cert.key_mode)
    observed = observe(cert, trust)
    r = readiness(cert, observed, valid_now(observed), hook_owed=True)
    assert r.ready and r.problem is None
    # the rewritten chain runs the hook anyway: the owed hook is moot, as in the plan
    assert r.actions == (REWRITE_CHAIN, CHMOD)
    deploy(ca, cert)  # with its chain and mode: only the owed hook is left
    observed = observe(cert, trust)
    r = readiness(cert, observed, valid_now(observed), hook_owed=True)
    assert r.ready and r.actions == (RUN_HOOK,)


def test_a_path_that_cannot_be_managed_is_not_ready_and_names_why(tmp_path, ca, trust):
    cert = desire(tmp_path)
    deploy(ca, cert)
    Path(cert.key_path).unlink()
    Path(cert.key_path).mkdir()
    observed = observe(cert, trust)
    r = readiness(cert, observed, datetime.now(timezone.utc))
    assert not r.ready and r.problem == f"key {cert.key_path} is a directory; point key_path at a file inside it"
    with pytest.raises(Blocked):
        diff(cert, observed, datetime.now(timezone.utc))


def test_the_plan_carries_the_readiness_of_the_same_walk(tmp_path, ca, trust):
    """plan_cert walks the rows once for both: its readiness is readiness()'s, and a
    certificate is ready exactly when its plan asks for no new certificate other than the
    renewal of a valid one."""
    cases = {"ok": {}, "sans": {"sans": ["x.example.com"]}, "mode": {"key_permissions": "640"}, "missing": {}}
    for name, fields in cases.items():
        cert = desire(tmp_path / name, **fields)
        deploy(ca, desire(tmp_path / name))
        if name == "missing":
            Path(cert.key_path).unlink()
        observed = observe(cert, trust)
        base = observed.cert.not_before if observed.cert else datetime.now(timezone.utc)
        for now in (base + timedelta(minutes=5), base + timedelta(hours=23), base + timedelta(days=2)):
            plan = plan_cert(cert, observed, now)
            assert plan.readiness == readiness(cert, observed, now), (name, now)
            content = plan.content_action
            expected_ready = content is None or (content.action == RENEW and not any(d.expired for d in content.drifts))
            assert plan.readiness.ready == expected_ready, (name, now, plan)


def test_each_row_of_the_drift_table_is_a_named_check_in_table_order():
    """Adding a row is adding one function to DRIFT_TABLE: pin the order the docs give."""
    assert [row.__name__ for row in DRIFT_TABLE] == [
        "cert_file",
        "key_file",
        "cert_parses",
        "key_parses",
        "key_matches",
        "common_name",
        "sans",
        "key_type",
        "cert_type",
        "duration",
        "issuer",
        "not_yet_valid",
        "expired",
        "renewal_due",
        "chain",
        "ca_file",
        "cert_owner",
        "key_owner",
        "ca_owner",
        "cert_mode",
        "key_mode",
        "ca_mode",
        "guest_copy",
        "guest_reload",
        "hook",
        "served",
    ]


# --------------------------------------------------------------------------- property: made to manifest → nothing to do

_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
_TLD = st.from_regex(r"\A[a-z]{2,6}\Z")


@st.composite
def dns_names(draw):
    labels = draw(st.lists(_LABEL, min_size=1, max_size=3))
    name = ".".join([*labels, draw(_TLD)])
    if draw(st.booleans()) and len(labels) >= 1:
        name = "*." + name
    return name


@st.composite
def spelled(draw, canonical: str, kind: str, for_manifest: bool):
    """Another spelling of the same name: case, trailing dot, IPv6 forms, brackets."""
    import ipaddress

    if kind == "dns":
        mask = draw(st.lists(st.booleans(), min_size=len(canonical), max_size=len(canonical)))
        text = "".join(c.upper() if up else c for c, up in zip(canonical, mask, strict=True))
        return text + ("." if draw(st.booleans()) else "")
    ip = ipaddress.ip_address(canonical)
    if kind == "v4":
        return str(ip)
    forms = [ip.compressed, ip.exploded, ip.compressed.upper(), ip.exploded.upper()]
    text = draw(st.sampled_from(forms))
    if for_manifest and draw(st.booleans()):
        text = f"[{text}]"
    return text


@st.composite
def manifests(draw):
    cn = draw(dns_names().filter(lambda n: not n.startswith("*")))
    extra = draw(
        st.lists(
            st.one_of(
                dns_names().map(lambda n: ("dns", n)),
                st.ip_addresses(v=4).map(lambda ip: ("v4", str(ip))),
                st.ip_addresses(v=6).map(lambda ip: ("v6", str(ip))),
            ),
            max_size=6,
            unique_by=lambda x: x[1],
        )
    )
    names = [("dns", cn), *extra]
    manifest_sans = [draw(spelled(n, k, True)) for k, n in extra]
    cert_sans = [draw(spelled(n, k, False)) for k, n in names]
    cert_sans = draw(st.permutations(cert_sans))
    key = draw(st.sampled_from(sorted(KEY_FIELDS)))
    cert_mode = draw(st.sampled_from(["644", "640", "444", "0600"]))
    key_mode = draw(st.sampled_from(["600", "640", "400", "0600"]))
    renew_before = draw(st.sampled_from(["12h", "90m", "33%", "1h30m"]))
    return {
        "entry": {
            "common_name": draw(spelled(cn, "dns", True).filter(lambda s: not s.endswith("."))),
            "sans": manifest_sans,
            "cert_path": "tls/cert.pem",
            "key_path": "tls/key.pem",
            "owner": draw(st.sampled_from([f"{UID}:{GID}", str(UID)])),
            "cert_permissions": cert_mode,
            "key_permissions": key_mode,
            "renew_before": renew_before,
            "key": KEY_FIELDS[key],
        },
        "cert_sans": cert_sans,
        "key": key,
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(case=manifests())
def test_a_certificate_made_exactly_to_the_manifest_plans_nothing(ca, trust, case):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (cert,) = build([case["entry"]], folder / "certificate-manifest.json").certificates
        pem, key = issue(ca, cert, key=make_key(case["key"]), sans=case["cert_sans"])
        write(cert.cert_path, pem, cert.cert_mode)
        write(cert.key_path, key_to_pem(key), cert.key_mode)
        observed = observe(cert, trust)
        assert stat.S_IMODE(os.stat(cert.key_path).st_mode) == cert.key_mode
        now = valid_now(observed)
        assert diff(cert, observed, now) == []
        plan = plan_cert(cert, observed, now)
        assert plan.actions == () and plan.error is None
