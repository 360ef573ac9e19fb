"""StepCA against a real step-ca (the `step_ca` fixture) and against a hostile HTTPS server.

No mock of the CA: what step-ca says here is what it says in production. The hostile
server stands in only for answers a healthy step-ca never gives (truncated JSON, a
certificate for the wrong key, silence).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler.issuers import IssueRequest, IssuerError
from reconciler.issuers.stepca import StepCA, build_csr
from reconciler.issuers.stepca_config import resolve_spec, spec_from_options
from reconciler.model import IssuerSpec, KeySpec

from hostile_ca import HostileCA as _Hostile, ec_key, make_ca, pem, sign_leaf


# --------------------------------------------------------------------------- helpers


def doctor_checks(spec: IssuerSpec, state_dir) -> list:
    """`reconcile doctor`'s checks of a step-ca issuer: the issuer's own diagnose()."""
    with StepCA(spec, state_dir) as ca:
        return ca.diagnose()


def request_for(
    common_name: str, *sans: str, duration=timedelta(hours=1), cert_type="server", name=None
) -> IssueRequest:
    from reconciler.sans import san_set, ordered

    return IssueRequest(
        name=name or common_name,
        common_name=common_name,
        sans=ordered(san_set(common_name, list(sans))),
        duration=duration,
        cert_type=cert_type,
        key=KeySpec(),
    )


def spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)) | {str(i) for i in ext.get_values_for_type(x509.IPAddress)}


def verify_chain(leaf_pem: bytes, chain_pem: bytes, root_pem: bytes) -> None:
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    chain = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
    root = x509.load_pem_x509_certificate(root_pem)
    path = [leaf, *chain, root]
    for child, parent in pairwise(path):
        child.verify_directly_issued_by(parent)


# --------------------------------------------------------------------------- configuration (no network)


def write_defaults(steppath: Path, **values) -> None:
    (steppath / "config").mkdir(parents=True, exist_ok=True)
    (steppath / "config" / "defaults.json").write_text(json.dumps(values))


def test_resolve_spec_fills_url_and_trust_pair_from_step_defaults(tmp_path):
    write_defaults(
        tmp_path, **{"ca-url": "https://ca.test:9000", "root": str(tmp_path / "root.crt"), "fingerprint": "ab" * 32}
    )
    env = {"STEPPATH": str(tmp_path)}
    spec = resolve_spec(IssuerSpec(type="step-ca", provisioner="admin"), env)
    assert spec.url == "https://ca.test:9000"
    assert spec.root == tmp_path / "root.crt"
    assert spec.fingerprint == "ab" * 32
    assert spec.provisioner == "admin"


def test_resolve_spec_never_mixes_a_manifest_root_with_the_defaults_fingerprint(tmp_path):
    write_defaults(tmp_path, **{"ca-url": "https://other:9000", "root": "/other.crt", "fingerprint": "cd" * 32})
    spec = IssuerSpec(type="step-ca", url="https://ca.test", root=Path("/mine.crt"))
    resolved = resolve_spec(spec, {"STEPPATH": str(tmp_path)})
    assert resolved.url == "https://ca.test"
    assert resolved.root == Path("/mine.crt")
    assert resolved.fingerprint is None


def test_resolve_spec_without_defaults_file_changes_nothing(tmp_path):
    spec = IssuerSpec(type="step-ca", url="https://ca.test")
    assert resolve_spec(spec, {"STEPPATH": str(tmp_path / "absent")}) == spec
    assert resolve_spec(IssuerSpec(type="local"), {"STEPPATH": str(tmp_path)}) == IssuerSpec(type="local")


def test_resolve_spec_uses_home_dot_step_when_steppath_unset(tmp_path):
    write_defaults(tmp_path / ".step", **{"ca-url": "https://home:9000"})
    assert resolve_spec(IssuerSpec(type="step-ca"), {"HOME": str(tmp_path)}).url == "https://home:9000"


def test_spec_from_options_prefers_flags_then_env_then_defaults(tmp_path):
    write_defaults(
        tmp_path,
        **{"ca-url": "https://defaults:9000", "root": "/defaults.crt", "fingerprint": "ef" * 32, "provisioner": "dflt"},
    )
    env = {
        "STEPPATH": str(tmp_path),
        "RECONCILER_CA_URL": "https://env:9000",
        "RECONCILER_PROVISIONER": "env-prov",
        "RECONCILER_PASSWORD_FILE": "/env/pw",
    }
    spec = spec_from_options("https://flag:9000", None, None, None, None, env)
    assert spec.type == "step-ca"
    assert spec.url == "https://flag:9000"
    assert spec.provisioner == "env-prov"
    assert spec.password_file == Path("/env/pw")
    assert spec.root == Path("/defaults.crt") and spec.fingerprint == "ef" * 32
    spec = spec_from_options(None, None, "12" * 32, "flag-prov", "/flag/pw", env)
    assert spec.url == "https://env:9000"
    assert spec.fingerprint == "12" * 32 and spec.root is None
    assert spec.provisioner == "flag-prov" and spec.password_file == Path("/flag/pw")


def test_csr_carries_common_name_and_split_dns_and_ip_sans():
    key = ec_key()
    req = request_for("svc.example.com", "10.0.0.7", "*.svc.example.com", "::1")
    csr = x509.load_pem_x509_csr(build_csr(req, key))
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "svc.example.com"
    ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(ext.get_values_for_type(x509.DNSName)) == {"svc.example.com", "*.svc.example.com"}
    assert set(ext.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    }
    assert spki(csr.public_key()) == spki(key.public_key())
    assert csr.is_signature_valid


def test_missing_url_and_missing_trust_are_reported_before_any_network(tmp_path):
    with pytest.raises(IssuerError, match="no URL"):
        StepCA(IssuerSpec(type="step-ca", provisioner="p"), tmp_path).issue(request_for("a.test"), ec_key())
    ca = StepCA(IssuerSpec(type="step-ca", url="https://127.0.0.1:1", provisioner="p"), tmp_path)
    with pytest.raises(IssuerError, match="neither a root file nor a fingerprint") as err:
        ca.issue(request_for("a.test"), ec_key())
    assert not err.value.transient
    assert ca.trust_pems() == []


def test_trust_pems_is_empty_when_nothing_is_on_disk(tmp_path):
    ca = StepCA(IssuerSpec(type="step-ca", url="https://127.0.0.1:1", fingerprint="ab" * 32), tmp_path)
    assert ca.trust_pems() == []
    assert not (tmp_path / "step-ca").exists()


# --------------------------------------------------------------------------- a hostile HTTPS server


@pytest.fixture
def hostile(tmp_path):
    server = _Hostile(tmp_path)
    yield server
    server.stop()


def test_provisioners_are_found_across_pages_and_listed_when_missing(hostile, tmp_path):
    with StepCA(hostile.spec(provisioner="nobody"), tmp_path / "state") as ca:
        with pytest.raises(IssuerError, match=r"'nobody' not found .*; it has: acme \(ACME\), admin \(JWK\)"):
            ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())
    with StepCA(hostile.spec(provisioner="acme"), tmp_path / "state") as ca:
        with pytest.raises(IssuerError, match="'acme' .* is of type ACME, not JWK"):
            ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())


def test_hostile_server_baseline_answer_is_accepted(hostile, tmp_path):
    import jwcrypto.jwa

    cap = jwcrypto.jwa.default_max_pbkdf2_iterations
    key = ec_key()
    with StepCA(hostile.spec(), tmp_path / "state") as ca:
        issued = ca.issue(request_for("svc.test", "127.0.0.9"), key)
    assert jwcrypto.jwa.default_max_pbkdf2_iterations == cap  # lifted only while decrypting
    assert x509.load_pem_x509_certificate(issued.leaf_pem).subject.rfc4514_string() == "CN=svc.test"
    assert issued.chain_pem == b""
    verify_chain(issued.leaf_pem, issued.chain_pem, issued.root_pem)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("truncated", "unreadable answer"),
        ("html", "unreadable answer"),
        ("garbage", "not a PEM certificate"),
        ("wrong-key", "different key"),
        ("wrong-sans", r"SANs \(.*other.test.*\) differ"),
        # 127.0.0.9 as a DNS name: TLS clients reject it for the address (issue 10 §7)
        ("dns-typed-ip", r"SANs \(DNS:127.0.0.9, svc.test\) differ from the request \(127.0.0.9, svc.test\)"),
    ],
)
def test_garbage_answers_are_rejected(hostile, tmp_path, mode, expected):
    hostile.mode = mode
    with StepCA(hostile.spec(), tmp_path / "state") as ca:
        with pytest.raises(IssuerError, match=expected) as err:
            ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())
    assert not err.value.transient
    assert "hostile-secret" not in str(err.value)
    assert not (tmp_path / "state" / "step-ca" / "intermediates").exists()


@pytest.mark.parametrize("offset", [timedelta(minutes=10), -timedelta(minutes=10), timedelta(days=3)])
def test_a_ca_whose_clock_differs_by_more_than_the_token_leeway_is_refused_before_signing(hostile, tmp_path, offset):
    """step-ca refuses tokens more than a minute off, and certificates from a CA on
    another time look not yet valid or expired here: the clocks are compared first."""
    hostile.clock_offset = offset
    with StepCA(hostile.spec(), tmp_path / "state") as ca:
        with pytest.raises(IssuerError) as err:
            ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())
        with pytest.raises(IssuerError, match="clock"):  # the next certificate is told without asking again
            ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())
    message = str(err.value)
    assert "clock" in message and "Date" in message and "1m" in message, message
    assert ("the CA's clock is ahead of" if offset > timedelta(0) else "the CA's clock is behind") in message
    assert "NTP" in err.value.hint
    assert not err.value.transient
    assert hostile.last_csr is None  # refused before anything was signed


def test_a_ca_clock_within_the_token_leeway_is_fine(hostile, tmp_path):
    hostile.clock_offset = timedelta(seconds=40)
    with StepCA(hostile.spec(), tmp_path / "state") as ca:
        ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())


def test_a_certificate_from_another_ca_is_rejected(hostile, tmp_path):
    hostile.ca_cert, hostile.ca_key = make_ca("impostor")  # signs leaves, but the client trusts the old root
    with StepCA(hostile.spec(), tmp_path / "state") as ca:
        with pytest.raises(IssuerError, match="does not chain to the root"):
            ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())


def test_server_errors_are_transient_and_quote_the_ca(hostile, tmp_path):
    hostile.mode = "server-error"
    with StepCA(hostile.spec(), tmp_path / "state") as ca:
        with pytest.raises(IssuerError, match="HTTP 503.*database is locked") as err:
            ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())
    assert err.value.transient


def test_stalled_server_times_out_within_the_configured_deadline(hostile, tmp_path):
    hostile.mode = "stall"
    ca = StepCA(hostile.spec(), tmp_path / "state", connect_timeout=1, read_timeout=1)
    ca.provisioner.key()  # decrypting the key is not part of the deadline under test
    started = time.monotonic()
    with pytest.raises(IssuerError, match=r"did not answer POST /1.0/sign within 1s") as err:
        ca.issue(request_for("svc.test", "127.0.0.9"), ec_key())
    elapsed = time.monotonic() - started
    ca.close()
    assert err.value.transient
    assert elapsed < 3, elapsed


def test_the_provisioner_key_is_decrypted_once_per_instance_even_when_concurrent(hostile, tmp_path, monkeypatch):
    from reconciler.issuers import stepca_provisioner

    calls = []
    real = stepca_provisioner.decrypt_provisioner_key

    def counting(*args):
        calls.append(1)
        time.sleep(0.2)
        return real(*args)

    monkeypatch.setattr(stepca_provisioner, "decrypt_provisioner_key", counting)
    ca = StepCA(hostile.spec(), tmp_path / "state")
    errors = []

    def one(i):
        try:
            ca.issue(request_for("svc.test", "127.0.0.9", name=f"c{i}"), ec_key())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ca.close()
    assert errors == []
    assert len(calls) == 1


def test_doctor_against_the_hostile_server_passes_every_check(hostile, tmp_path):
    results = doctor_checks(hostile.spec(), tmp_path / "state")
    assert all(ok for ok, _, _ in results), results
    assert len(results) == 7


def test_doctor_names_the_unreachable_port(tmp_path):
    spec = IssuerSpec(
        type="step-ca",
        url="https://127.0.0.1:9",
        root=tmp_path / "root.crt",
        provisioner="p",
        password_file=tmp_path / "pw",
    )
    results = doctor_checks(spec, tmp_path / "state")
    failed = [(what, hint) for ok, what, hint in results if not ok]
    assert any("127.0.0.1:9" in what and "port 9" in hint for what, hint in failed), results
    assert any(str(tmp_path / "pw") in what for what, _ in failed)


# --------------------------------------------------------------------------- a real step-ca


def ca_spec(step_ca, **changes) -> IssuerSpec:
    values = dict(
        type="step-ca",
        url=step_ca.url,
        root=Path(step_ca.root_path),
        provisioner=step_ca.provisioner,
        password_file=Path(step_ca.password_file),
    )
    values.update(changes)
    return IssuerSpec(**values)


def test_issue_returns_a_certificate_with_cn_ip_and_wildcard_sans_for_our_key(step_ca, tmp_path):
    key = ec_key()
    req = request_for("svc.example.internal", "*.svc.example.internal", "127.0.0.1", "::1", duration=timedelta(hours=2))
    with StepCA(ca_spec(step_ca), tmp_path) as ca:
        issued = ca.issue(req, key)
        roots = [x509.load_pem_x509_certificate(p) for p in ca.trust_pems()]
    leaf = x509.load_pem_x509_certificate(issued.leaf_pem)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "svc.example.internal"
    assert cert_sans(leaf) == {"svc.example.internal", "*.svc.example.internal", "127.0.0.1", "::1"}
    assert spki(leaf.public_key()) == spki(key.public_key())
    lifetime = leaf.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(hours=1, minutes=55) < lifetime <= timedelta(hours=2, minutes=1)
    verify_chain(issued.leaf_pem, issued.chain_pem, issued.root_pem)
    assert issued.root_pem == pem(x509.load_pem_x509_certificate(Path(step_ca.root_path).read_bytes()))
    # trust_pems knows the root and the intermediate it has now seen: a leaf alone verifies
    assert len(roots) == 2
    assert any(_directly_issued(leaf, r) for r in roots)
    assert list((tmp_path / "step-ca" / "intermediates").glob("*.crt"))


def _directly_issued(child, parent) -> bool:
    try:
        child.verify_directly_issued_by(parent)
        return True
    except Exception:
        return False


@pytest.mark.parametrize(
    "make_key", [lambda: rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate]
)
def test_issue_works_for_rsa_and_ed25519_keys(step_ca, tmp_path, make_key):
    key = make_key()
    with StepCA(ca_spec(step_ca), tmp_path) as ca:
        issued = ca.issue(request_for("keys.example.internal"), key)
    leaf = x509.load_pem_x509_certificate(issued.leaf_pem)
    assert spki(leaf.public_key()) == spki(key.public_key())


def test_client_certificates_carry_client_auth(step_ca, tmp_path):
    with StepCA(ca_spec(step_ca), tmp_path) as ca:
        issued = ca.issue(request_for("client.example.internal", cert_type="client"), ec_key())
    leaf = x509.load_pem_x509_certificate(issued.leaf_pem)
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages


def _copy_password(step_ca, tmp_path) -> Path:
    copy = tmp_path / "password-copy"
    shutil.copy(step_ca.password_file, copy)
    copy.chmod(0o600)
    return copy


def test_renew_uses_mtls_and_needs_no_password(step_ca, tmp_path, caplog, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    password = _copy_password(step_ca, tmp_path)
    key = ec_key()
    req = request_for("renew.example.internal", "127.0.0.1")
    with StepCA(ca_spec(step_ca, password_file=password), tmp_path) as ca:
        first = ca.issue(req, key)
    password.unlink()
    caplog.set_level(logging.INFO, logger="reconciler.issuers.stepca")
    with StepCA(ca_spec(step_ca, password_file=password), tmp_path) as ca:
        renewed = ca.renew(req, key, first.leaf_pem + first.chain_pem, key)
    old = x509.load_pem_x509_certificate(first.leaf_pem)
    new = x509.load_pem_x509_certificate(renewed.leaf_pem)
    assert new.serial_number != old.serial_number
    assert spki(new.public_key()) == spki(key.public_key())
    assert cert_sans(new) == {"renew.example.internal", "127.0.0.1"}
    verify_chain(renewed.leaf_pem, renewed.chain_pem, renewed.root_pem)
    assert "one-time token" not in caplog.text
    assert list(scratch.iterdir()) == []  # the client credentials file is gone


def test_renew_with_a_leaf_only_file_finds_the_cached_intermediate(step_ca, tmp_path):
    password = _copy_password(step_ca, tmp_path)
    key = ec_key()
    req = request_for("leafonly.example.internal")
    with StepCA(ca_spec(step_ca, password_file=password), tmp_path) as ca:
        first = ca.issue(req, key)
    password.unlink()
    with StepCA(ca_spec(step_ca, password_file=password), tmp_path) as ca:
        renewed = ca.renew(req, key, first.leaf_pem, key)
    assert spki(x509.load_pem_x509_certificate(renewed.leaf_pem).public_key()) == spki(key.public_key())


def test_rekey_over_mtls_puts_the_new_key_in_the_certificate(step_ca, tmp_path):
    password = _copy_password(step_ca, tmp_path)
    old_key, new_key = ec_key(), ec_key()
    req = request_for("rekey.example.internal", "::1")
    with StepCA(ca_spec(step_ca, password_file=password), tmp_path) as ca:
        first = ca.issue(req, old_key)
    password.unlink()
    with StepCA(ca_spec(step_ca, password_file=password), tmp_path) as ca:
        rekeyed = ca.renew(req, new_key, first.leaf_pem + first.chain_pem, old_key)
    new = x509.load_pem_x509_certificate(rekeyed.leaf_pem)
    assert spki(new.public_key()) == spki(new_key.public_key())
    assert cert_sans(new) == {"rekey.example.internal", "::1"}
    verify_chain(rekeyed.leaf_pem, rekeyed.chain_pem, rekeyed.root_pem)


def test_renew_falls_back_to_a_token_when_the_ca_rejects_the_client_certificate(step_ca, tmp_path, caplog):
    # a certificate the CA never issued: its TLS layer refuses it, so mTLS renewal cannot work
    foreign_ca, foreign_key = make_ca("foreign")
    key = ec_key()
    foreign_leaf = sign_leaf(
        foreign_ca, foreign_key, key.public_key(), "fallback.example.internal", ["fallback.example.internal"]
    )
    caplog.set_level(logging.INFO, logger="reconciler.issuers.stepca")
    req = request_for("fallback.example.internal")
    with StepCA(ca_spec(step_ca), tmp_path) as ca:
        issued = ca.renew(req, key, pem(foreign_leaf), key)
    verify_chain(issued.leaf_pem, issued.chain_pem, issued.root_pem)
    assert "one-time token instead" in caplog.text
    assert "fallback.example.internal" in caplog.text


def test_renew_of_an_expired_certificate_uses_the_token_flow(step_ca, tmp_path, caplog):
    foreign_ca, foreign_key = make_ca("foreign")
    key = ec_key()
    now = datetime.now(timezone.utc)
    expired = sign_leaf(
        foreign_ca,
        foreign_key,
        key.public_key(),
        "expired.example.internal",
        ["expired.example.internal"],
        not_before=now - timedelta(hours=2),
        not_after=now - timedelta(hours=1),
    )
    caplog.set_level(logging.INFO, logger="reconciler.issuers.stepca")
    with StepCA(ca_spec(step_ca), tmp_path) as ca:
        issued = ca.renew(request_for("expired.example.internal"), key, pem(expired), key)
    assert x509.load_pem_x509_certificate(issued.leaf_pem).not_valid_after_utc > now
    assert "expired" in caplog.text


def test_wrong_password_names_provisioner_and_file(step_ca, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    with StepCA(ca_spec(step_ca, password_file=wrong), tmp_path) as ca:
        with pytest.raises(IssuerError) as err:
            ca.issue(request_for("pw.example.internal"), ec_key())
    message = str(err.value)
    assert f"provisioner key for '{step_ca.provisioner}' cannot be decrypted with the password in {wrong}" in message
    assert not err.value.transient
    assert "not-the-password" not in message and step_ca.password not in message
    assert "not-the-password" not in caplog.text and step_ca.password not in caplog.text


def test_missing_password_file_is_named(step_ca, tmp_path):
    missing = tmp_path / "nope" / "password"
    with StepCA(ca_spec(step_ca, password_file=missing), tmp_path) as ca:
        with pytest.raises(IssuerError, match=f"password file {missing} cannot be read") as err:
            ca.issue(request_for("pw.example.internal"), ec_key())
    assert not err.value.transient


def test_unknown_provisioner_lists_those_that_exist(step_ca, tmp_path):
    with StepCA(ca_spec(step_ca, provisioner="no-such-provisioner"), tmp_path) as ca:
        with pytest.raises(IssuerError, match="provisioner 'no-such-provisioner' not found") as err:
            ca.issue(request_for("p.example.internal"), ec_key())
    assert f"{step_ca.provisioner} (JWK)" in str(err.value)


def test_an_untrusted_root_is_a_tls_trust_failure_naming_the_root_file(step_ca, tmp_path):
    other, _ = make_ca("some other root")
    other_path = tmp_path / "other-root.crt"
    other_path.write_bytes(pem(other))
    with StepCA(ca_spec(step_ca, root=other_path), tmp_path) as ca:
        with pytest.raises(IssuerError, match="TLS verification") as err:
            ca.issue(request_for("tls.example.internal"), ec_key())
    assert str(other_path) in str(err.value)
    assert not err.value.transient


def test_duration_above_the_provisioner_maximum_quotes_the_ca(step_ca, tmp_path):
    with StepCA(ca_spec(step_ca), tmp_path) as ca:
        with pytest.raises(IssuerError) as err:
            ca.issue(request_for("long.example.internal", duration=timedelta(days=400)), ec_key())
    assert "step-ca refused" in str(err.value)
    assert "maximum certificate duration" in str(err.value)
    assert "duration" in err.value.hint
    assert not err.value.transient


def test_fingerprint_only_bootstraps_and_caches_the_root(step_ca, tmp_path):
    fp = step_ca.fingerprint.lower()
    spec = ca_spec(step_ca, root=None, fingerprint=fp)
    with StepCA(spec, tmp_path) as ca:
        issued = ca.issue(request_for("fp.example.internal"), ec_key())
    cached = tmp_path / "step-ca" / f"root-{fp}.crt"
    assert cached.read_bytes() == issued.root_pem
    verify_chain(issued.leaf_pem, issued.chain_pem, issued.root_pem)
    with StepCA(spec, tmp_path) as ca:
        roots = [x509.load_pem_x509_certificate(p) for p in ca.trust_pems()]
    assert roots[0].fingerprint(hashes.SHA256()).hex() == fp


def test_a_wrong_fingerprint_is_refused_and_nothing_is_cached(step_ca, tmp_path):
    spec = ca_spec(step_ca, root=None, fingerprint="00" * 32)
    with StepCA(spec, tmp_path) as ca:
        with pytest.raises(IssuerError, match="fingerprint") as err:
            ca.issue(request_for("fp.example.internal"), ec_key())
    assert not err.value.transient
    assert not list(tmp_path.glob("step-ca/root-*.crt"))


def test_doctor_against_the_real_ca_passes_every_check(step_ca, tmp_path):
    results = doctor_checks(ca_spec(step_ca), tmp_path)
    assert all(ok for ok, _, _ in results), results


def test_a_stopped_ca_is_unreachable_and_transient(step_ca, tmp_path):
    from urllib.parse import urlsplit

    parts = urlsplit(step_ca.url)
    step_ca.stop()
    try:
        with StepCA(ca_spec(step_ca), tmp_path, connect_timeout=2, read_timeout=5) as ca:
            with pytest.raises(IssuerError) as err:
                ca.issue(request_for("down.example.internal"), ec_key())
    finally:
        step_ca.start()
    assert err.value.transient
    assert f"{parts.hostname}:{parts.port}" in str(err.value)
    assert "running" in err.value.hint


def test_a_ca_that_lets_connections_time_out_costs_one_timeout_per_pass_not_one_per_certificate(step_ca, tmp_path):
    import dataclasses
    import socket

    # a loopback listener whose accept queue is full: further SYNs are dropped, so a
    # connection attempt times out exactly as with a firewall that drops packets
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    spec = dataclasses.replace(ca_spec(step_ca), url=f"https://127.0.0.1:{port}")
    try:
        with StepCA(spec, tmp_path, connect_timeout=1, read_timeout=2) as ca:
            started = time.monotonic()
            errors = []
            for i in range(5):
                with pytest.raises(IssuerError) as err:
                    ca.issue(request_for(f"h{i}.example.internal"), ec_key())
                errors.append(err.value)
            elapsed = time.monotonic() - started
    finally:
        for s in fillers:
            s.close()
        blackhole.close()
    assert all(e.transient and f"127.0.0.1:{port}" in str(e) for e in errors), [str(e) for e in errors]
    assert elapsed < 2.5, f"five certificates took {elapsed:.1f}s: each waited for its own timeout"
