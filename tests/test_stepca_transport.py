"""The step-ca client through its HTTP seam: an httpx.MockTransport answers in place of the
CA, so every way an answer can be wrong is one fast, in-process test. The certificates are
real (signed by an in-memory CA with `cryptography`), the provisioner key is really
encrypted and decrypted; only the network is replaced. The real step-ca is in
test_stepca_issuer.py and test_stepca_cli.py."""

from __future__ import annotations

import email.utils
import json
import time
from datetime import timedelta
from typing import Callable

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from jwcrypto import jwt

from reconciler.issuers import IssueRequest, IssuerError
from reconciler.issuers.stepca import StepCA
from reconciler.issuers.stepca_config import fingerprint_of
from reconciler.issuers.stepca_transport import MAX_RESPONSE_BYTES, Refused
from reconciler.model import IssuerSpec, KeySpec
from reconciler.sans import ordered, san_set

from hostile_ca import ec_key, jwk_provisioner, make_ca, pem, sign_leaf

URL = "https://ca.test:9000"
PASSWORD = "mock-secret"


class MockCA:
    """A step-ca's answers as a function of the request; `answer` overrides /1.0/sign."""

    def __init__(self, tmp_path):
        self.root, self.root_key = make_ca("mock test root")
        self.root_path = tmp_path / "root.crt"
        self.root_path.write_bytes(pem(self.root))
        self.password_file = tmp_path / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.entry, self.provisioner_key = jwk_provisioner("admin", PASSWORD)
        self.requests: list[httpx.Request] = []
        self.answer = self.sign
        self.date_offset = timedelta(0)

    def spec(self, **changes) -> IssuerSpec:
        values = dict(
            type="step-ca", url=URL, root=self.root_path, provisioner="admin", password_file=self.password_file
        )
        return IssuerSpec(**(values | changes))

    def issuer(self, tmp_path, **kwargs) -> StepCA:
        return StepCA(self.spec(), tmp_path / "state", transport=httpx.MockTransport(self.handle), **kwargs)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        date = email.utils.formatdate(time.time() + self.date_offset.total_seconds(), usegmt=True)
        if request.url.path == "/provisioners":
            return httpx.Response(200, json={"provisioners": [self.entry], "nextCursor": ""}, headers={"date": date})
        response = self.answer(request)
        response.headers.setdefault("date", date)
        return response

    def sign(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        claims = json.loads(jwt.JWT(jwt=body["ott"], key=self.provisioner_key).claims)
        leaf = sign_leaf(self.root, self.root_key, csr.public_key(), claims["sub"], claims["sans"])
        return httpx.Response(201, json={"crt": pem(leaf).decode(), "ca": pem(self.root).decode()})

    def signs(self) -> int:
        return sum(1 for r in self.requests if r.url.path == "/1.0/sign")


@pytest.fixture
def mock(tmp_path):
    return MockCA(tmp_path)


def request_for(common_name: str, *names: str) -> IssueRequest:
    return IssueRequest(
        name=common_name,
        common_name=common_name,
        sans=ordered(san_set(common_name, list(names))),
        duration=timedelta(hours=1),
        cert_type="server",
        key=KeySpec(),
    )


def answering(status: int, content: bytes = b"", **headers) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, content=content, headers=headers)


def test_a_good_answer_is_issued_with_a_token_naming_exactly_the_requested_names(mock, tmp_path):
    key = ec_key()
    with mock.issuer(tmp_path) as ca:
        issued = ca.issue(request_for("web.example", "www.example"), key)
    leaf = x509.load_pem_x509_certificate(issued.leaf_pem)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert issued.root_pem == pem(mock.root)
    (sign,) = [r for r in mock.requests if r.url.path == "/1.0/sign"]
    claims = json.loads(jwt.JWT(jwt=json.loads(sign.content)["ott"], key=mock.provisioner_key).claims)
    assert sorted(claims["sans"]) == ["web.example", "www.example"]
    assert claims["aud"] == f"{URL}/1.0/sign" and claims["sha"] == fingerprint_of(mock.root)


def test_an_answer_that_is_not_json_is_an_unreadable_answer(mock, tmp_path):
    mock.answer = answering(201, b'{"crt": "-----BEGIN CERT')
    with mock.issuer(tmp_path) as ca, pytest.raises(IssuerError) as err:
        ca.issue(request_for("web.example"), ec_key())
    unreadable = f"step-ca at {URL} sent an unreadable answer to POST /1.0/sign (not complete JSON, 24 bytes)"
    assert unreadable in err.value.message
    assert "points at step-ca" in err.value.hint and not err.value.transient


def test_a_server_error_is_transient_and_quotes_the_cas_message(mock, tmp_path):
    mock.answer = answering(503, b'{"status":503,"message":"database   is locked"}')
    with mock.issuer(tmp_path) as ca, pytest.raises(IssuerError) as err:
        ca.issue(request_for("web.example"), ec_key())
    assert err.value.message == (
        f"step-ca at {URL} failed while signing web.example (POST /1.0/sign: HTTP 503): database is locked"
    )
    assert err.value.transient


def test_a_refused_duration_says_where_the_limit_is_and_is_not_retried(mock, tmp_path):
    too_long = b'{"message":"requested duration of 2400h is more than the authorized maximum of 24h"}'
    mock.answer = answering(400, too_long)
    with mock.issuer(tmp_path) as ca, pytest.raises(Refused) as err:
        ca.issue(request_for("web.example"), ec_key())
    assert err.value.status == 400 and not err.value.transient
    assert "step-ca refused signing web.example (POST /1.0/sign: HTTP 400): requested duration" in err.value.message
    assert "maxTLSCertDuration" in err.value.hint


def test_an_answer_without_a_message_is_quoted_as_what_it_is(mock, tmp_path):
    mock.answer = answering(403, b"")
    with mock.issuer(tmp_path) as ca, pytest.raises(Refused, match=r"HTTP 403\): \(empty answer\)"):
        ca.issue(request_for("web.example"), ec_key())


def test_a_redirect_is_not_followed(mock, tmp_path):
    mock.answer = answering(302, b"", location="https://elsewhere.test/1.0/sign")
    with mock.issuer(tmp_path) as ca, pytest.raises(IssuerError) as err:
        ca.issue(request_for("web.example"), ec_key())
    assert err.value.message == f"step-ca at {URL} redirected POST /1.0/sign (HTTP 302)"
    assert "the CA's own address" in err.value.hint


def test_a_connect_timeout_is_transient_and_no_other_certificate_waits_for_it_again(mock, tmp_path):
    def silent(request):
        raise httpx.ConnectTimeout("timed out", request=request)

    mock.answer = silent
    with mock.issuer(tmp_path, connect_timeout=2, read_timeout=7) as ca:
        ca.provisioner.key()  # the listing is answered; only signing goes silent
        with pytest.raises(IssuerError) as first:
            ca.issue(request_for("a.example"), ec_key())
        with pytest.raises(IssuerError) as second:
            ca.issue(request_for("b.example"), ec_key())
    assert first.value.message == "step-ca at ca.test:9000 is unreachable: no connection within 2s"
    assert first.value.transient and second.value.transient
    assert second.value.message == first.value.message
    assert mock.signs() == 1  # the second certificate did not ask


def test_a_read_timeout_is_transient_and_names_the_deadline(mock, tmp_path):
    def stalled(request):
        raise httpx.ReadTimeout("timed out", request=request)

    mock.answer = stalled
    with mock.issuer(tmp_path, read_timeout=7) as ca, pytest.raises(IssuerError) as err:
        ca.issue(request_for("web.example"), ec_key())
    assert err.value.message == "step-ca at ca.test:9000 did not answer POST /1.0/sign within 7s"
    assert err.value.transient and "retries" in err.value.hint


def test_a_connection_refused_is_transient_and_names_the_port(mock, tmp_path):
    def refused(request):
        cause = ConnectionRefusedError(111, "refused")
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request) from cause

    mock.answer = refused
    with mock.issuer(tmp_path) as ca, pytest.raises(IssuerError) as err:
        ca.issue(request_for("web.example"), ec_key())
    assert err.value.message == "step-ca at ca.test:9000 is unreachable: connection refused"
    assert err.value.transient and "port 9000" in err.value.hint


def test_an_answer_larger_than_the_cap_is_refused_before_it_is_parsed(mock, tmp_path):
    mock.answer = answering(201, b"[" + b" " * MAX_RESPONSE_BYTES + b"]")
    with mock.issuer(tmp_path) as ca, pytest.raises(IssuerError) as err:
        ca.issue(request_for("web.example"), ec_key())
    assert err.value.message == f"step-ca at {URL} sent more than {MAX_RESPONSE_BYTES} bytes for POST /1.0/sign"


def test_a_ca_clock_off_by_more_than_the_leeway_stops_asking_for_the_rest_of_the_pass(mock, tmp_path):
    mock.date_offset = timedelta(minutes=-10)
    with mock.issuer(tmp_path) as ca:
        with pytest.raises(IssuerError) as first:
            ca.issue(request_for("a.example"), ec_key())
        asked = len(mock.requests)
        with pytest.raises(IssuerError) as second:
            ca.issue(request_for("b.example"), ec_key())
    assert "disagree on the time by 9m" in first.value.message
    assert "the CA's clock is behind this host's" in first.value.message
    assert "NTP" in first.value.hint and not first.value.transient
    assert second.value.message == first.value.message
    assert len(mock.requests) == asked


def test_a_provisioner_list_that_is_not_a_list_is_reported_as_such(mock, tmp_path):
    def handle(request):
        return httpx.Response(200, json={"provisioners": "admin"})

    with StepCA(mock.spec(), tmp_path / "state", transport=httpx.MockTransport(handle)) as ca:
        with pytest.raises(IssuerError) as err:
            ca.issue(request_for("web.example"), ec_key())
    assert err.value.message == f"step-ca at {URL} sent a provisioner list without a 'provisioners' array"


def test_a_root_known_by_its_fingerprint_is_downloaded_once_and_believed_only_if_it_matches(mock, tmp_path):
    impostor, _ = make_ca("impostor root")
    served = {"root": impostor}

    def answer(request):
        assert request.url.path.startswith("/root/")
        return httpx.Response(200, json={"ca": pem(served["root"]).decode()})

    mock.answer = answer
    spec = mock.spec(root=None, fingerprint=fingerprint_of(mock.root))
    with StepCA(spec, tmp_path / "state", transport=httpx.MockTransport(mock.handle)) as ca:
        with pytest.raises(IssuerError) as err:
            ca.fetch_root()
    mismatch = f"has fingerprint {fingerprint_of(impostor)}, not the configured {fingerprint_of(mock.root)}"
    assert mismatch in err.value.message
    assert not list((tmp_path / "state").glob("step-ca/root-*.crt"))

    served["root"] = mock.root
    with StepCA(spec, tmp_path / "state", transport=httpx.MockTransport(mock.handle)) as ca:
        ca.fetch_root()
        assert ca.trust_pems() == [mock.root.public_bytes(serialization.Encoding.PEM)]
    downloads = [r for r in mock.requests if r.url.path.startswith("/root/")]
    assert len(downloads) == 2
    with StepCA(spec, tmp_path / "state", transport=httpx.MockTransport(mock.handle)) as ca:
        ca.fetch_root()  # from the cache now
    assert len([r for r in mock.requests if r.url.path.startswith("/root/")]) == 2
