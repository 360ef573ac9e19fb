"""The serve probe against real servers on loopback: nginx (TLS) and PostgreSQL (STARTTLS)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest
from tls_servers import LOOPBACK, self_signed

from reconciler.endpoints import ConnectError, Endpoint, parse_connect
from reconciler.crypto import public_key_id
from reconciler.probe import await_leaf, file_leaf, probe


def _serial(cert) -> str:
    return format(cert.serial_number, "x")


def test_probe_reports_the_leaf_nginx_presents(nginx):
    from helpers import load_cert

    on_disk = load_cert(nginx.cert)
    served = probe(nginx.endpoint)
    assert served.error is None
    assert served.presents(_serial(on_disk), public_key_id(on_disk.public_key()))
    assert served.not_after == on_disk.not_valid_after_utc
    assert served.sans == (nginx.server_name,)
    assert served.describe().startswith(f"{nginx.connect} serves serial ")


def test_probe_sees_the_new_leaf_only_after_nginx_reloads(nginx):
    from helpers import load_cert

    old = load_cert(nginx.cert)
    new = self_signed(nginx.cert, nginx.key, nginx.server_name)
    # the files changed, the running service did not: the probe sees the old leaf
    assert probe(nginx.endpoint).serial == _serial(old)
    subprocess.run(nginx.reload_command, shell=True, check=True, timeout=60)
    served = await_leaf(nginx.endpoint, _serial(new), public_key_id(new.public_key()), settle=60)
    assert served.presents(_serial(new), public_key_id(new.public_key())), served


def test_await_leaf_gives_up_after_the_settle_time_when_nothing_reloads(nginx):
    from helpers import load_cert

    old = load_cert(nginx.cert)
    new = self_signed(nginx.cert, nginx.key, nginx.server_name)
    started = time.monotonic()
    served = await_leaf(nginx.endpoint, _serial(new), public_key_id(new.public_key()), settle=1.0)
    assert served.serial == _serial(old)
    assert time.monotonic() - started >= 1.0


def test_a_stopped_server_is_unreachable_with_the_error(nginx):
    nginx.stop()
    served = probe(nginx.endpoint)
    assert not served.reachable
    assert "refused" in served.error.lower()
    assert served.describe() == f"{nginx.connect} unreachable: {served.error}"


def test_a_server_that_never_answers_times_out_after_the_short_timeout():
    # a listener whose backlog accepts the connection but never speaks TLS
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        served = probe(Endpoint(f"{LOOPBACK}:{port}", LOOPBACK, port, "silent.test"), timeout=1.0)
    assert served.error == "timed out"
    assert time.monotonic() - started < 30  # generous: only "not hanging" is pinned


def test_a_server_that_does_not_speak_tls_is_a_handshake_failure():
    def answer_plain_text(listener):
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        thread = threading.Thread(target=answer_plain_text, args=(listener,), daemon=True)
        thread.start()
        served = probe(Endpoint(f"{LOOPBACK}:{port}", LOOPBACK, port, "plain.test"), timeout=10.0)
        thread.join(30)
    assert served.error.startswith("TLS handshake failed"), served.error


def test_postgres_starttls_presents_its_leaf_and_a_reload_changes_it(postgres):
    import os

    from helpers import load_cert

    old = load_cert(postgres.cert)
    served = probe(postgres.endpoint)
    assert served.presents(_serial(old), public_key_id(old.public_key())), served
    new = self_signed(postgres.cert, postgres.key, "db.probe.test")
    for path in (postgres.cert, postgres.key):
        os.chown(path, postgres.user.pw_uid, postgres.user.pw_gid)
    subprocess.run(postgres.reload_command, shell=True, check=True, timeout=60)
    served = await_leaf(postgres.endpoint, _serial(new), public_key_id(new.public_key()), settle=60)
    assert served.presents(_serial(new), public_key_id(new.public_key())), served


def test_starttls_against_a_server_without_tls_says_so(nginx):
    # nginx speaks TLS at once: a postgres SSLRequest gets no 'S' back
    served = probe(Endpoint(nginx.connect, LOOPBACK, nginx.port, "x.test", starttls="postgres"), timeout=5.0)
    assert not served.reachable and served.error


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:443", ("127.0.0.1", 443)),
        ("[::1]:5432", ("::1", 5432)),
        ("mail.internal.example:25", ("mail.internal.example", 25)),
    ],
)
def test_connect_takes_a_host_name_ipv4_or_bracketed_ipv6_with_a_port(text, expected):
    assert parse_connect(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("127.0.0.1", "has no port"),
        ("::1:443", "in brackets"),
        ("[::1:443", "in brackets"),
        ("[nope]:443", "not an IPv6 address"),
        ("host:0", "from 1 to 65535"),
        ("host:https", "from 1 to 65535"),
        (":443", "has no port"),
    ],
)
def test_a_bad_connect_value_says_what_is_wrong(text, words):
    with pytest.raises(ConnectError, match=words):
        parse_connect(text)


def test_smtp_starttls_against_postfix_presents_its_leaf_and_a_reload_changes_it(postfix):
    from helpers import load_cert

    old = load_cert(postfix.cert)
    served = probe(postfix.endpoint)
    assert served.presents(_serial(old), public_key_id(old.public_key())), served
    # without STARTTLS the same port speaks plain SMTP: no handshake
    assert not probe(Endpoint(postfix.connect, LOOPBACK, postfix.port, "mx.probe.test"), timeout=5.0).reachable
    new = self_signed(postfix.cert, postfix.key, postfix.server_name)
    subprocess.run(postfix.reload_command, shell=True, check=True, timeout=60)
    served = await_leaf(postfix.endpoint, _serial(new), public_key_id(new.public_key()), settle=60)
    assert served.presents(_serial(new), public_key_id(new.public_key())), served


def test_imap_starttls_against_dovecot_presents_its_leaf_and_a_reload_changes_it(dovecot):
    from helpers import load_cert

    old = load_cert(dovecot.cert)
    served = probe(dovecot.endpoint)
    assert served.presents(_serial(old), public_key_id(old.public_key())), served
    new = self_signed(dovecot.cert, dovecot.key, dovecot.server_name)
    subprocess.run(dovecot.reload_command, shell=True, check=True, timeout=60)
    served = await_leaf(dovecot.endpoint, _serial(new), public_key_id(new.public_key()), settle=60)
    assert served.presents(_serial(new), public_key_id(new.public_key())), served


@pytest.fixture
def dual_nginx(tmp_path):
    """nginx on 127.0.0.1 and [::1] (one port), with a second name on its own certificate:
    the probe must reach IPv6 loopback and send the entry's server_name as SNI."""
    from tls_servers import Nginx

    class Dual(Nginx):
        def configure(self) -> None:
            super().configure()
            text = self.conf.read_text()
            listen = f"        listen {LOOPBACK}:{self.port} ssl;\n"
            other = (
                f"    server {{\n{listen}        listen [::1]:{self.port} ssl;\n"
                f"        server_name other.probe.test;\n"
                f"        ssl_certificate {self.base.parent / 'www' / 'other.crt'};\n"
                f"        ssl_certificate_key {self.base.parent / 'www' / 'other.key'};\n"
                f"        return 204;\n    }}\n"
            )
            text = text.replace(listen, listen + f"        listen [::1]:{self.port} ssl default_server;\n", 1)
            text = text.replace(listen, listen.replace(" ssl;", " ssl default_server;"), 1)
            self.conf.write_text(text.rstrip().removesuffix("}") + other + "}\n")

    (tmp_path / "nginx").mkdir()
    (tmp_path / "www").mkdir()
    server = Dual(tmp_path / "nginx", tmp_path / "www" / "site.crt", tmp_path / "www" / "site.key")
    self_signed(server.cert, server.key, server.server_name)
    self_signed(tmp_path / "www" / "other.crt", tmp_path / "www" / "other.key", "other.probe.test")
    server.start()
    yield server
    server.stop()


def test_an_ipv6_endpoint_is_probed_and_the_server_name_picks_the_certificate(dual_nginx):
    from helpers import load_cert

    site = load_cert(dual_nginx.cert)
    other = load_cert(dual_nginx.cert.parent / "other.crt")
    for connect in (f"[::1]:{dual_nginx.port}", f"127.0.0.1:{dual_nginx.port}"):
        host, port = parse_connect(connect)
        by_default = probe(Endpoint(connect, host, port, dual_nginx.server_name))
        assert by_default.error is None, by_default.error
        assert by_default.serial == _serial(site), connect
        by_name = probe(Endpoint(connect, host, port, "other.probe.test"))
        assert by_name.serial == _serial(other), connect
        assert by_name.sans == ("other.probe.test",)


def test_the_file_leaf_is_read_from_a_file_that_parses_whole_or_not_at_all(tmp_path):
    """As observe reads it (parse_leaf): a certificate file whose second block is damaged does
    not parse, so a probe has no leaf of the file to compare a service against."""
    cert = self_signed(tmp_path / "a.crt", tmp_path / "a.key", "a.example")
    leaf = file_leaf(tmp_path / "a.crt")
    assert leaf is not None and leaf.serial == format(cert.serial_number, "x")
    good = (tmp_path / "a.crt").read_bytes()
    (tmp_path / "a.crt").write_bytes(good + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert file_leaf(tmp_path / "a.crt") is None
