"""The manifest's `serve` and `serve_settle`: what they become, and every bad value's error."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.endpoints import Endpoint
from reconciler.manifest import ManifestError, load


def _load(tmp_path: Path, **fields):
    entry = {"common_name": "web.probe.test", "cert_path": "web.crt", "key_path": "web.key", **fields}
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"issuer": {"type": "local"}, "certificates": [entry]}))
    return load(path)


def _errors(tmp_path: Path, **fields) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as info:
        _load(tmp_path, **fields)
    return [(i.path, i.message) for i in info.value.issues]


def test_serve_endpoints_default_their_server_name_to_the_common_name(tmp_path):
    cert = _load(
        tmp_path,
        serve=[
            {"connect": "127.0.0.1:443"},
            {"connect": "[::1]:25", "server_name": "mx.probe.test", "starttls": "smtp"},
        ],
    ).certificates[0]
    assert cert.serve == (
        Endpoint("127.0.0.1:443", "127.0.0.1", 443, "web.probe.test"),
        Endpoint("[::1]:25", "::1", 25, "mx.probe.test", "smtp"),
    )
    assert cert.serve_settle == timedelta(seconds=5)


def test_an_entry_without_serve_probes_nothing(tmp_path):
    assert _load(tmp_path).certificates[0].serve == ()


def test_serve_settle_takes_a_duration(tmp_path):
    assert _load(tmp_path, serve=[{"connect": "localhost:443"}], serve_settle="30s").certificates[
        0
    ].serve_settle == timedelta(seconds=30)


@pytest.mark.parametrize(
    "serve, path, words",
    [
        ([{"connect": "127.0.0.1"}], "certificates[0].serve[0].connect", "has no port"),
        ([{"connect": "::1:443"}], "certificates[0].serve[0].connect", "in brackets"),
        ([{"connect": "a:1"}, {"connect": "a:99999"}], "certificates[0].serve[1].connect", "from 1 to 65535"),
        ([{"connect": "a:1"}, {"connect": "A:1"}], "certificates[0].serve[1].connect", "already serve[0]"),
    ],
)
def test_a_bad_connect_is_reported_at_its_json_path_with_the_fix(tmp_path, serve, path, words):
    errors = _errors(tmp_path, serve=serve)
    assert [p for p, _ in errors] == [path], errors
    assert words in errors[0][1]


@pytest.mark.parametrize(
    "fields, path",
    [
        ({"serve": [{"connect": "a:1", "starttls": "ftp"}]}, "certificates[0].serve[0].starttls"),
        ({"serve": [{"connect": "a:1", "port": 1}]}, "certificates[0].serve[0].port"),
        ({"serve": [{"server_name": "x"}]}, "certificates[0].serve[0]"),
        ({"serve": {"connect": "a:1"}}, "certificates[0].serve"),
        ({"serve": [{"connect": "a:1"}], "serve_settle": "soon"}, "certificates[0].serve_settle"),
    ],
)
def test_a_malformed_serve_field_is_a_validation_error_at_its_path(tmp_path, fields, path):
    errors = _errors(tmp_path, **fields)
    assert path in [p for p, _ in errors], errors
