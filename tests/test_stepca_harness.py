"""The step-ca test harness works: a real step-ca 0.19 on loopback.

Also a worked example (for the real client in reconciler/issuers) of the whole
JWK-provisioner flow from Python: decrypt the provisioner key, mint a one-time
token, POST /1.0/sign, renew and rekey over mTLS, renew with an x5c token.
See tests/stepca/NOTES.md for the observed request/response shapes.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import uuid
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwcrypto import jwa, jwe, jwk, jws

from stepca_ca import StepCA

# step-ca encrypts provisioner keys with PBES2 and 100000 iterations; jwcrypto
# refuses more than 16384 by default.
jwa.default_max_pbkdf2_iterations = max(jwa.default_max_pbkdf2_iterations, 600_000)


# -- tiny client, just enough to prove the flow ----------------------------------


def client(ca: StepCA, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
    ctx = ca.ssl_context()
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return httpx.Client(base_url=ca.url, verify=ctx, timeout=10)


def provisioner_key(ca: StepCA) -> tuple[dict, jwk.JWK]:
    with client(ca) as c:
        resp = c.get("/provisioners")
    assert resp.status_code == 200
    provs = [p for p in resp.json()["provisioners"] if p["name"] == ca.provisioner]
    assert len(provs) == 1
    prov = provs[0]
    token = jwe.JWE()
    token.deserialize(prov["encryptedKey"], key=jwk.JWK.from_password(ca.password))
    return prov, jwk.JWK.from_json(token.payload)


def sign_jwt(key: jwk.JWK, header: dict, claims: dict) -> str:
    token = jws.JWS(json.dumps(claims).encode())
    token.add_signature(key, alg=header["alg"], protected=json.dumps(header))
    return token.serialize(compact=True)


def one_time_token(ca: StepCA, key: jwk.JWK, subject: str, sans: list[str], **override) -> str:
    now = int(time.time())
    claims = {
        "iss": ca.provisioner,
        "sub": subject,
        "aud": f"{ca.url}/1.0/sign",
        "sans": sans,
        "sha": ca.fingerprint,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(override)
    return sign_jwt(key, {"alg": "ES256", "typ": "JWT", "kid": key.get("kid")}, claims)


def make_csr(cn: str, dns: list[str] = (), ips: list[str] = ()):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def write_pair(tmp_path: Path, chain_pem: str, key) -> tuple[Path, Path]:
    cert_path, key_path = tmp_path / "leaf.crt", tmp_path / "leaf.key"
    cert_path.write_text(chain_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def sans_of(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in ext}


def issue(ca: StepCA, cn: str, dns: list[str], ips: list[str], not_after: str | None = "5m"):
    _, pkey = provisioner_key(ca)
    key, csr = make_csr(cn, dns, ips)
    body = {"csr": csr, "ott": one_time_token(ca, pkey, cn, [*dns, *ips])}
    if not_after is not None:
        body["notAfter"] = not_after
    with client(ca) as c:
        resp = c.post("/1.0/sign", json=body)
    assert resp.status_code == 201, resp.text
    return key, resp.json()


# -- the harness itself -------------------------------------------------------------


def test_health_answers_over_verified_tls(step_ca: StepCA):
    assert step_ca.is_running()
    assert step_ca.url.startswith("https://127.0.0.1:")
    with client(step_ca) as c:
        resp = c.get("/health")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}
    # The served chain verifies against our root only, and the fingerprint is
    # the sha256 of the root DER.
    der = ssl.PEM_cert_to_DER_cert(step_ca.root_path.read_text())
    import hashlib

    assert hashlib.sha256(der).hexdigest() == step_ca.fingerprint
    with client(step_ca) as c:
        roots = c.get(f"/root/{step_ca.fingerprint}")
    assert roots.status_code == 200
    assert roots.json()["ca"].strip() == step_ca.root_path.read_text().strip()


def test_provisioners_lists_the_jwk_provisioner_with_an_encrypted_key(step_ca: StepCA):
    with client(step_ca) as c:
        resp = c.get("/provisioners")
    assert resp.status_code == 200
    provs = resp.json()["provisioners"]
    (prov,) = [p for p in provs if p["name"] == step_ca.provisioner]
    assert prov["type"] == "JWK"
    assert prov["key"]["kty"] == "EC" and prov["key"]["kid"]
    header = json.loads(base64.urlsafe_b64decode(prov["encryptedKey"].split(".")[0] + "=="))
    assert header == {
        "alg": "PBES2-HS256+A128KW",
        "cty": "jwk+json",
        "enc": "A256GCM",
        "p2c": 100000,
        "p2s": header["p2s"],
    }
    # The password decrypts it to the private half of the published key.
    _, private = provisioner_key(step_ca)
    assert private.get("kid") == prov["key"]["kid"]
    public = json.loads(private.export_public())
    assert (public["x"], public["y"]) == (prov["key"]["x"], prov["key"]["y"])
    assert step_ca.claims["minTLSCertDuration"] == "1m"


def test_stop_and_start_keep_the_same_ca_on_the_same_port(step_ca: StepCA):
    url, fingerprint = step_ca.url, step_ca.fingerprint
    step_ca.stop()
    try:
        assert not step_ca.is_running()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", step_ca.port), timeout=1).close()
        step_ca.stop()  # idempotent
    finally:
        step_ca.start()
    assert step_ca.is_running()
    assert (step_ca.url, step_ca.fingerprint) == (url, fingerprint)
    with client(step_ca) as c:
        assert c.get("/health").status_code == 200


def test_the_other_ca_has_a_different_root(step_ca: StepCA, other_step_ca: StepCA):
    assert other_step_ca.fingerprint != step_ca.fingerprint
    assert other_step_ca.port != step_ca.port
    # Trusting step_ca's root does not let us talk to the other CA.
    with httpx.Client(verify=step_ca.ssl_context()) as c:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get(f"{other_step_ca.url}/health")
    with client(other_step_ca) as c:
        assert c.get("/health").status_code == 200


# -- the whole flow from Python -------------------------------------------------------


def test_sign_with_a_one_time_token(step_ca: StepCA):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    key, body = issue(step_ca, "svc.example", ["svc.example", "www.example"], ["127.0.0.1"])
    assert set(body) == {"crt", "ca", "certChain", "tlsOptions"}
    cert = load(body["crt"])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "svc.example"
    assert sans_of(cert) == {"svc.example", "www.example", "127.0.0.1"}
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # notAfter is relative to now; notBefore is backdated by one minute.
    assert before + timedelta(minutes=5) - timedelta(seconds=2) <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= before + timedelta(minutes=5, seconds=5)
    assert cert.not_valid_before_utc <= before - timedelta(seconds=55)
    # ca == certChain[1] == the intermediate, which the root signed.
    intermediate = load(body["ca"])
    assert body["certChain"][0] == body["crt"] and body["certChain"][1] == body["ca"]
    assert intermediate == x509.load_pem_x509_certificate(step_ca.intermediate_path.read_bytes())
    cert.verify_directly_issued_by(intermediate)
    root = x509.load_pem_x509_certificate(step_ca.root_path.read_bytes())
    intermediate.verify_directly_issued_by(root)


def test_default_duration_and_token_sans_decide_the_certificate(step_ca: StepCA):
    # CSR without SANs: the certificate gets the token's "sans" (here with an
    # IP the CSR never mentioned) and the default duration (24h).
    _, pkey = provisioner_key(step_ca)
    _, csr = make_csr("cn-only.example")
    token = one_time_token(step_ca, pkey, "cn-only.example", ["cn-only.example", "10.0.0.1"])
    with client(step_ca) as c:
        resp = c.post("/1.0/sign", json={"csr": csr, "ott": token})
    assert resp.status_code == 201, resp.text
    cert = load(resp.json()["crt"])
    assert sans_of(cert) == {"cn-only.example", "10.0.0.1"}
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(hours=24) < life <= timedelta(hours=24, minutes=1, seconds=2)


def test_error_bodies(step_ca: StepCA):
    _, pkey = provisioner_key(step_ca)
    with client(step_ca) as c:
        # CSR SANs differ from the token's: 403 with the reason.
        _, csr = make_csr("svc.example", ["other.example"])
        resp = c.post(
            "/1.0/sign", json={"csr": csr, "ott": one_time_token(step_ca, pkey, "svc.example", ["svc.example"])}
        )
        assert resp.status_code == 403
        assert resp.json() == {
            "status": 403,
            "message": "The request was forbidden by the certificate authority: certificate request "
            "does not contain the valid DNS names - got [other.example], want [svc.example].",
        }
        # Longer than maxTLSCertDuration (24h + 1m backdate allowance).
        _, csr = make_csr("svc.example")
        resp = c.post(
            "/1.0/sign",
            json={"csr": csr, "ott": one_time_token(step_ca, pkey, "svc.example", ["svc.example"]), "notAfter": "48h"},
        )
        assert resp.status_code == 403
        assert "more than the authorized maximum certificate duration of 24h1m0s" in resp.json()["message"]
        # A token is single-use (jti stored in the CA's DB): replay -> 401,
        # with a generic message (the reason is only in the CA log).
        token = one_time_token(step_ca, pkey, "svc.example", ["svc.example"])
        assert c.post("/1.0/sign", json={"csr": make_csr("svc.example")[1], "ott": token}).status_code == 201
        resp = c.post("/1.0/sign", json={"csr": make_csr("svc.example")[1], "ott": token})
        assert resp.status_code == 401
        assert resp.json()["status"] == 401
        assert resp.json()["message"].startswith("The request lacked necessary authorization")
        # Bad JSON / missing CSR -> 400.
        resp = c.post("/1.0/sign", content=b"{not json")
        assert resp.status_code == 400 and resp.json()["message"].endswith("error decoding json.")
        resp = c.post("/1.0/sign", json={"ott": "x"})
        assert resp.json() == {"status": 400, "message": "The request could not be completed: missing csr."}
        # Renew without a client certificate.
        resp = c.post("/1.0/renew")
        assert resp.json() == {
            "status": 400,
            "message": "The request could not be completed: missing client certificate.",
        }


def test_renew_and_rekey_over_mtls(step_ca: StepCA, tmp_path: Path):
    key, body = issue(step_ca, "svc.example", ["svc.example"], ["127.0.0.1"], not_after="10m")
    old = load(body["crt"])
    cert_path, key_path = write_pair(tmp_path, body["crt"] + body["ca"], key)
    with client(step_ca, cert_path, key_path) as c:
        resp = c.post("/1.0/renew")
        assert resp.status_code == 201, resp.text
        renewed = load(resp.json()["crt"])
        assert renewed.serial_number != old.serial_number
        assert renewed.public_key().public_numbers() == old.public_key().public_numbers()
        assert renewed.subject == old.subject and sans_of(renewed) == sans_of(old)
        # Same lifetime as the old certificate, counted from now.
        assert (
            renewed.not_valid_after_utc - renewed.not_valid_before_utc
            == old.not_valid_after_utc - old.not_valid_before_utc
        )

        new_key, csr = make_csr("ignored.example")
        resp = c.post("/1.0/rekey", json={"csr": csr})
        assert resp.status_code == 201, resp.text
        rekeyed = load(resp.json()["crt"])
        assert rekeyed.public_key().public_numbers() == new_key.public_key().public_numbers()
        assert rekeyed.subject == old.subject and sans_of(rekeyed) == sans_of(old)


def renew_token(ca: StepCA, body: dict, key, subject: str) -> str:
    now = int(time.time())
    x5c = [base64.b64encode(load(p).public_bytes(serialization.Encoding.DER)).decode() for p in body["certChain"]]
    signer = jwk.JWK.from_pem(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return sign_jwt(
        signer,
        {"alg": "ES256", "typ": "JWT", "x5cInsecure": x5c},
        {
            "iss": "step-ca-client/1.0",
            "sub": subject,
            "aud": f"{ca.url}/1.0/renew",
            "iat": now,
            "nbf": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
        },
    )


def test_renew_with_an_x5c_bearer_token(step_ca: StepCA):
    key, body = issue(step_ca, "bearer.example", ["bearer.example"], [])
    with client(step_ca) as c:
        resp = c.post(
            "/1.0/renew", headers={"Authorization": "Bearer " + renew_token(step_ca, body, key, "bearer.example")}
        )
    assert resp.status_code == 201, resp.text
    assert load(resp.json()["crt"]).serial_number != load(body["crt"]).serial_number


def test_expired_certificates_renew_only_with_allow_renewal_after_expiry(
    step_ca_factory, step_ca: StepCA, tmp_path: Path
):
    lenient = step_ca_factory(name="Lenient CA", allow_renewal_after_expiry=True)
    for ca, allowed in ((step_ca, False), (lenient, True)):
        key, body = issue(ca, "old.example", ["old.example"], [], not_after="1s")
        time.sleep(2.2)
        # mTLS with an expired client certificate fails in the TLS handshake.
        cert_path, key_path = write_pair(tmp_path, body["crt"] + body["ca"], key)
        with client(ca, cert_path, key_path) as c:
            with pytest.raises(httpx.HTTPError):
                c.post("/1.0/renew")
        with client(ca) as c:
            resp = c.post(
                "/1.0/renew", headers={"Authorization": "Bearer " + renew_token(ca, body, key, "old.example")}
            )
        if allowed:
            assert resp.status_code == 201, resp.text
            assert load(resp.json()["crt"]).not_valid_after_utc > datetime.now(timezone.utc)
        else:
            assert resp.status_code == 401, resp.text
