"""Real TLS servers from Debian on loopback, for the serve-probe tests: nginx (TLS from the
first byte) and PostgreSQL (STARTTLS-like SSLRequest). Each runs with its own configuration,
pid file and logs in a temporary folder on an ephemeral port; the packages' own services and
configuration are never touched. scripts/install --test installs both packages.

Only ever bound to 127.0.0.1.
"""

from __future__ import annotations

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
NGINX = "/usr/sbin/nginx"


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


class Nginx:
    """nginx serving `cert`/`key` over TLS on 127.0.0.1:<port>; reload re-reads them."""

    def __init__(self, base: Path, cert: Path, key: Path, server_name: str = "nginx.probe.test"):
        self.base, self.cert, self.key, self.server_name = base, cert, key, server_name
        self.conf, self.pid_file, self.error_log = base / "nginx.conf", base / "nginx.pid", base / "error.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def connect(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.connect, LOOPBACK, self.port, self.server_name)

    def _write_conf(self) -> None:
        temp = self.base / "temp"
        temp.mkdir(exist_ok=True)
        self.conf.write_text(
            f"""daemon off;
master_process on;
worker_processes 1;
pid {self.pid_file};
error_log {self.error_log} info;
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

    def command(self, *args: str) -> list[str]:
        return [NGINX, "-p", str(self.base), "-c", str(self.conf), "-e", str(self.error_log), *args]

    @property
    def reload_command(self) -> str:
        """A post-renewal command that really reloads this nginx."""
        return " ".join(self.command("-s", "reload"))

    def start(self) -> "Nginx":
        for attempt in range(3):  # another test may take the free port before nginx binds it
            if attempt or not self.port:  # a restart keeps its port: the manifest names it
                self.port = free_port()
            self._write_conf()
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(
                lambda: self.proc.poll() is not None or probe(self.endpoint, 2.0).reachable, "nginx to accept TLS"
            )
            if self.proc.poll() is None:
                return self
            if "Address already in use" not in self.log():
                break
        raise AssertionError(f"nginx did not start (exit {self.proc and self.proc.poll()}):\n{self.log()}")

    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else "(no error log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, pid file removed
            try:
                self.proc.wait(START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def nginx(tmp_path):
    """nginx serving a stand-in self-signed certificate from tmp_path/www/site.crt/.key."""
    base = tmp_path / "nginx"
    base.mkdir()
    www = tmp_path / "www"
    www.mkdir()
    server = Nginx(base, www / "site.crt", www / "site.key")
    self_signed(server.cert, server.key, server.server_name)
    server.start()
    yield server
    server.stop()


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise AssertionError("PostgreSQL is not installed; run scripts/install --test")
    return Path(found[-1]).parent


class Postgres:
    """A throw-away PostgreSQL cluster (initdb) with ssl = on, on 127.0.0.1:<port>, run as the
    `postgres` user (it refuses root). Its certificate files live in `tls/`, owned by postgres."""

    def __init__(self, base: Path):
        self.base = base
        self.data, self.tls = base / "data", base / "tls"
        self.cert, self.key = self.tls / "server.crt", self.tls / "server.key"
        self.bin = _postgres_bin()
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.user = pwd.getpwnam("postgres")

    @property
    def connect(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.connect, LOOPBACK, self.port, "db.probe.test", starttls="postgres")

    def _as_postgres(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv]

    def init(self) -> None:
        self.tls.mkdir()
        for path in (self.base, self.tls):
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        subprocess.run(
            self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"),
            check=True,
            capture_output=True,
            timeout=300,
        )

    @property
    def reload_command(self) -> str:
        """A post-renewal command that makes PostgreSQL re-read its certificate files."""
        return f"kill -HUP $(head -1 {self.data}/postmaster.pid)"

    def start(self) -> "Postgres":
        for _attempt in range(3):
            self.port = free_port()
            log = self.base / "postgres.log"
            self.proc = subprocess.Popen(
                self._as_postgres(
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-k",
                    str(self.base),
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={LOOPBACK}",
                    "-c",
                    "ssl=on",
                    "-c",
                    f"ssl_cert_file={self.cert}",
                    "-c",
                    f"ssl_key_file={self.key}",
                ),
                stdout=open(log, "ab"),
                stderr=subprocess.STDOUT,
            )
            wait_until(
                lambda: self.proc.poll() is not None or probe(self.endpoint, 2.0).reachable, "PostgreSQL to accept TLS"
            )
            if self.proc.poll() is None:
                return self
            if "could not bind" not in log.read_text(errors="replace"):
                break
        raise AssertionError(f"PostgreSQL did not start:\n{(self.base / 'postgres.log').read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # runuser forwards the signal; "fast" shutdown closes connections and exits
            os.kill(int((self.data / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
            try:
                self.proc.wait(START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def postgres():
    """PostgreSQL serving a stand-in self-signed certificate. Its folder is outside pytest's
    tmp_path, which only root may enter, because the server runs as `postgres`."""
    base = Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
    server = Postgres(base)
    try:
        server.init()
        self_signed(server.cert, server.key, "db.probe.test")
        for path in (server.cert, server.key):
            os.chown(path, server.user.pw_uid, server.user.pw_gid)
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


POSTFIX = "/usr/sbin/postfix"


class Postfix:
    """A private Postfix instance (its own config_directory, queue and log) whose smtpd offers
    STARTTLS on 127.0.0.1:<port>. Run as `postfix start-fg`, so the test holds its master."""

    def __init__(self, base: Path, cert: Path, key: Path, server_name: str = "mx.probe.test"):
        self.base, self.cert, self.key, self.server_name = base, cert, key, server_name
        self.conf, self.queue, self.log_path = base / "conf", base / "queue", base / "maillog"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def connect(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.connect, LOOPBACK, self.port, self.server_name, starttls="smtp")

    @property
    def reload_command(self) -> str:
        """A post-renewal command that makes new smtpd processes read the certificate again."""
        return f"{POSTFIX} -c {self.conf} reload"

    def _configure(self) -> None:
        self.conf.mkdir(exist_ok=True)
        data = self.base / "data"
        for folder in (self.queue, data):
            folder.mkdir(exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(data, postfix_user.pw_uid, postfix_user.pw_gid)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": data,
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "myhostname": self.server_name,
            "maillog_file_prefixes": self.base,
            # no syslog needed: the log (and any fatal error at start) goes to a file here
            "maillog_file": self.log_path,
            "smtpd_tls_cert_file": self.cert,
            "smtpd_tls_key_file": self.key,
            "smtpd_tls_security_level": "may",
        }
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        # the package's own services, with smtpd moved to our port and nothing chrooted
        master = Path("/etc/postfix/master.cf").read_text()
        master = "\n".join(
            f"{LOOPBACK}:{self.port} inet n - n - - smtpd" if line.startswith("smtp ") and " inet " in line else line
            for line in master.splitlines()
        )
        (self.conf / "master.cf").write_text(master + "\n")
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no mail log)"

    def start(self) -> "Postfix":
        for attempt in range(3):
            if attempt or not self.port:
                self.port = free_port()
            self._configure()
            self.proc = subprocess.Popen(
                [POSTFIX, "-c", str(self.conf), "start-fg"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            wait_until(lambda: self.proc.poll() is not None or probe(self.endpoint, 2.0).reachable, "Postfix STARTTLS")
            if self.proc.poll() is None:
                return self
            if "Address already in use" not in self.log():
                break
        raise AssertionError(f"Postfix did not start (exit {self.proc and self.proc.poll()}):\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], capture_output=True, timeout=START_DEADLINE)
            try:
                self.proc.wait(START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def postfix():
    """Postfix offering STARTTLS with a stand-in self-signed certificate from <base>/mail. Its
    folder is outside pytest's tmp_path, which only root may enter: smtpd runs as `postfix`."""
    base = Path(tempfile.mkdtemp(prefix="reconciler-postfix-"))
    base.chmod(0o755)
    (base / "mail").mkdir()
    server = Postfix(base, base / "mail" / "mx.crt", base / "mail" / "mx.key")
    try:
        self_signed(server.cert, server.key, server.server_name)
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


DOVECOT = "/usr/sbin/dovecot"


class Dovecot:
    """A private Dovecot (its own configuration, base_dir and log) offering IMAP STARTTLS on
    127.0.0.1:<port>, run in the foreground (`dovecot -F`) so the test holds its master."""

    def __init__(self, base: Path, cert: Path, key: Path, server_name: str = "imap.probe.test"):
        self.base, self.cert, self.key, self.server_name = base, cert, key, server_name
        self.conf, self.log_path = base / "dovecot.conf", base / "dovecot.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def connect(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.connect, LOOPBACK, self.port, self.server_name, starttls="imap")

    @property
    def reload_command(self) -> str:
        return f"{DOVECOT} -c {self.conf} reload"

    def _configure(self) -> None:
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"

    def start(self) -> "Dovecot":
        for attempt in range(3):
            if attempt or not self.port:
                self.port = free_port()
            self._configure()
            self.proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            wait_until(lambda: self.proc.poll() is not None or probe(self.endpoint, 2.0).reachable, "Dovecot STARTTLS")
            if self.proc.poll() is None:
                return self
            if "Address already in use" not in self.log():
                break
        raise AssertionError(f"Dovecot did not start (exit {self.proc and self.proc.poll()}):\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the master shuts its children down on SIGTERM
            try:
                self.proc.wait(START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def dovecot():
    """Dovecot offering IMAP STARTTLS with a stand-in self-signed certificate; outside pytest's
    tmp_path, which only root may enter (its login processes run as dovenull)."""
    base = Path(tempfile.mkdtemp(prefix="reconciler-dovecot-"))
    base.chmod(0o755)
    server = Dovecot(base, base / "imap.crt", base / "imap.key")
    try:
        self_signed(server.cert, server.key, server.server_name)
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
