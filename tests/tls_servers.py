"""Real TLS servers from Debian on loopback, for the serve-probe tests: nginx (TLS from the
first byte), PostgreSQL (SSLRequest), Postfix (SMTP STARTTLS) and Dovecot (IMAP STARTTLS).
Each runs in the foreground of the test (so the test holds its master process) with its own
configuration, pid file and log in a temporary folder, on an ephemeral port; the packages'
own services and configuration are never touched. scripts/install --test installs them.

Only ever bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reconciler.endpoints import Endpoint
from reconciler.probe import probe

LOOPBACK = "127.0.0.1"
START_DEADLINE = 60.0  # seconds; a busy 2-core machine starts a server slowly
NGINX, POSTFIX, DOVECOT = "/usr/sbin/nginx", "/usr/sbin/postfix", "/usr/sbin/dovecot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def self_signed(cert_path: Path, key_path: Path, name: str, days: int = 30) -> x509.Certificate:
    """A stand-in certificate for a server to start with, before the reconciler writes its own."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def wait_until(condition, what: str, deadline: float = START_DEADLINE, every: float = 0.1):
    """Poll `condition()` until it returns something true; fail naming `what` at the deadline."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {deadline:.0f} s waiting for {what}")
        time.sleep(every)


class LoopbackServer:
    """One server process on 127.0.0.1:<port> presenting `cert`/`key`. A subclass says how
    to configure it (`configure`), start it (`argv`), make it re-read its certificate
    (`reload_command`) and what its log says when the port was taken (`PORT_TAKEN`)."""

    NAME = "server"
    STARTTLS: str | None = None
    PORT_TAKEN = "Address already in use"

    def __init__(self, base: Path, cert: Path, key: Path, server_name: str):
        self.base, self.cert, self.key, self.server_name = base, cert, key, server_name
        self.log_path = base / f"{self.NAME}.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def connect(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.connect, LOOPBACK, self.port, self.server_name, self.STARTTLS)

    @property
    def reload_command(self) -> str:
        raise NotImplementedError

    def configure(self) -> None:
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"

    def start(self):
        for attempt in range(3):  # another test may take the free port before the server binds it
            if attempt or not self.port:  # a restart keeps its port: the manifest names it
                self.port = free_port()
            self.configure()
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT)
            proc = self.proc
            wait_until(lambda p=proc: p.poll() is not None or probe(self.endpoint, 2.0).reachable, f"{self.NAME} TLS")
            if proc.poll() is None:
                return self
            if self.PORT_TAKEN not in self.log():
                break
        raise AssertionError(f"{self.NAME} did not start (exit {self.proc and self.proc.poll()}):\n{self.log()}")

    def shut_down(self) -> None:
        """Ask the running server to stop; `stop` waits for it."""
        assert self.proc is not None
        self.proc.terminate()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.shut_down()
            try:
                self.proc.wait(START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def outside_tmp_path(prefix: str):
    """A folder the daemons' own users can enter: pytest's tmp_path is root's alone."""
    base = Path(tempfile.mkdtemp(prefix=f"reconciler-{prefix}-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- nginx


class Nginx(LoopbackServer):
    """nginx serving `cert`/`key` over TLS; `nginx -s reload` re-reads them."""

    NAME = "nginx"

    def __init__(self, base: Path, cert: Path, key: Path, server_name: str = "nginx.probe.test"):
        super().__init__(base, cert, key, server_name)
        self.conf, self.pid_file = base / "nginx.conf", base / "nginx.pid"

    def configure(self) -> None:
        temp = self.base / "temp"
        temp.mkdir(exist_ok=True)
        self.conf.write_text(
            f"""daemon off;
master_process on;
worker_processes 1;
pid {self.pid_file};
error_log {self.log_path} info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {LOOPBACK}:{self.port} ssl;
        server_name {self.server_name};
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        return 204;
    }}
}}
"""
        )

    def argv(self, *args: str) -> list[str]:
        return [NGINX, "-p", str(self.base), "-c", str(self.conf), "-e", str(self.log_path), *args]

    @property
    def reload_command(self) -> str:
        """A post-renewal command that really reloads this nginx."""
        return " ".join(self.argv("-s", "reload"))

    def shut_down(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, pid file removed


@pytest.fixture
def nginx(tmp_path):
    """nginx serving a stand-in self-signed certificate from tmp_path/www/site.crt/.key."""
    (tmp_path / "nginx").mkdir()
    (tmp_path / "www").mkdir()
    server = Nginx(tmp_path / "nginx", tmp_path / "www" / "site.crt", tmp_path / "www" / "site.key")
    self_signed(server.cert, server.key, server.server_name)
    server.start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- PostgreSQL


class Postgres(LoopbackServer):
    """A throw-away PostgreSQL cluster (initdb) with ssl = on, run as the `postgres` user (it
    refuses root). Its certificate files live in `tls/`, owned by postgres."""

    NAME = "postgres"
    STARTTLS = "postgres"
    PORT_TAKEN = "could not bind"

    def __init__(self, base: Path):
        super().__init__(base, base / "tls" / "server.crt", base / "tls" / "server.key", "db.probe.test")
        self.data = base / "data"
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        if not found:
            raise AssertionError("PostgreSQL is not installed; run scripts/install --test")
        self.bin = Path(found[-1]).parent
        self.user = pwd.getpwnam("postgres")

    def init(self) -> None:
        self.cert.parent.mkdir()
        for path in (self.base, self.cert.parent):
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        subprocess.run(["runuser", "-u", "postgres", "--", *initdb], check=True, capture_output=True, timeout=300)

    def configure(self) -> None:
        pass  # all on the command line

    def argv(self) -> list[str]:
        settings = {"listen_addresses": LOOPBACK, "ssl": "on", "ssl_cert_file": self.cert, "ssl_key_file": self.key}
        options = [arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")]
        server = [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.base), "-p", str(self.port)]
        return ["runuser", "-u", "postgres", "--", *server, *options]

    @property
    def reload_command(self) -> str:
        """A post-renewal command that makes PostgreSQL re-read its certificate files."""
        return f"kill -HUP $(head -1 {self.data}/postmaster.pid)"

    def shut_down(self) -> None:
        # to the postmaster itself (runuser is in between): "fast" shutdown
        os.kill(int((self.data / "postmaster.pid").read_text().split()[0]), signal.SIGINT)


@pytest.fixture
def postgres():
    """PostgreSQL serving a stand-in self-signed certificate (outside tmp_path: it runs as postgres)."""
    with outside_tmp_path("pg") as base:
        server = Postgres(base)
        server.init()
        self_signed(server.cert, server.key, server.server_name)
        for path in (server.cert, server.key):
            os.chown(path, server.user.pw_uid, server.user.pw_gid)
        try:
            yield server.start()
        finally:
            server.stop()


# --------------------------------------------------------------------------- Postfix


class Postfix(LoopbackServer):
    """A private Postfix instance (its own config_directory, queue and log) whose smtpd offers
    STARTTLS; `postfix start-fg` keeps its master in the foreground."""

    NAME = "postfix"
    STARTTLS = "smtp"

    def __init__(self, base: Path, cert: Path, key: Path, server_name: str = "mx.probe.test"):
        super().__init__(base, cert, key, server_name)
        self.conf = base / "conf"

    @property
    def reload_command(self) -> str:
        """A post-renewal command that makes new smtpd processes read the certificate again."""
        return f"{POSTFIX} -c {self.conf} reload"

    def configure(self) -> None:
        data = self.base / "data"
        for folder in (self.conf, self.base / "queue", data):
            folder.mkdir(exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(data, owner.pw_uid, owner.pw_gid)
        settings = {
            "compatibility_level": "3.6", "queue_directory": self.base / "queue", "data_directory": data,
            "inet_interfaces": LOOPBACK, "inet_protocols": "ipv4", "mydestination": "", "alias_maps": "",
            "alias_database": "", "myhostname": self.server_name, "maillog_file_prefixes": self.base,
            # no syslog needed: the log (and a fatal error at start) goes to a file here
            "maillog_file": self.log_path, "smtpd_tls_cert_file": self.cert, "smtpd_tls_key_file": self.key,
            "smtpd_tls_security_level": "may",
        }  # fmt: skip
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        # the package's own services, with smtpd moved to our port and nothing chrooted
        master = [
            f"{LOOPBACK}:{self.port} inet n - n - - smtpd" if line.startswith("smtp ") and " inet " in line else line
            for line in Path("/etc/postfix/master.cf").read_text().splitlines()
        ]
        (self.conf / "master.cf").write_text("\n".join(master) + "\n")
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True, timeout=60)

    def argv(self) -> list[str]:
        return [POSTFIX, "-c", str(self.conf), "start-fg"]

    def shut_down(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], capture_output=True, timeout=START_DEADLINE)


# --------------------------------------------------------------------------- Dovecot


class Dovecot(LoopbackServer):
    """A private Dovecot (its own configuration, base_dir and log) offering IMAP STARTTLS;
    `dovecot -F` keeps its master in the foreground."""

    NAME = "dovecot"
    STARTTLS = "imap"

    def __init__(self, base: Path, cert: Path, key: Path, server_name: str = "imap.probe.test"):
        super().__init__(base, cert, key, server_name)
        self.conf = base / "dovecot.conf"

    @property
    def reload_command(self) -> str:
        return f"{DOVECOT} -c {self.conf} reload"

    def configure(self) -> None:
        b = self.base
        self.conf.write_text(
            f"""base_dir = {b}/run
state_dir = {b}/state
log_path = {self.log_path}
protocols = imap
listen = {LOOPBACK}
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={b}/home
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""
        )

    def argv(self) -> list[str]:
        return [DOVECOT, "-F", "-c", str(self.conf)]


def _mail_fixture(kind: type[LoopbackServer], prefix: str):
    """A fixture running `kind` with a stand-in self-signed certificate, outside tmp_path (its
    processes drop to the package's own users)."""

    def fixture():
        with outside_tmp_path(prefix) as base:
            server = kind(base, base / f"{prefix}.crt", base / f"{prefix}.key")
            self_signed(server.cert, server.key, server.server_name)
            try:
                yield server.start()
            finally:
                server.stop()

    fixture.__name__ = kind.NAME
    fixture.__doc__ = f"{kind.__doc__.splitlines()[0]} With a stand-in self-signed certificate."
    return pytest.fixture(fixture)


postfix = _mail_fixture(Postfix, "mx")
dovecot = _mail_fixture(Dovecot, "imap")
