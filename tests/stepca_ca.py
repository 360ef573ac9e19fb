"""pytest plugin: a REAL Smallstep step-ca (0.19, Debian sources) on loopback.

Load it with ``pytest_plugins = ["stepca_ca"]`` (tests/ must be on sys.path).

Fixtures
--------
``step_ca`` (session)
    A running CA (:class:`StepCA`) on a free 127.0.0.1 port, JWK provisioner
    ``admin@example``, claims min 1m / max 24h / default 24h, renewal enabled.
``other_step_ca`` (session)
    A second, independent CA (different root) -- for "untrusted root" tests.
``step_ca_factory`` (session)
    ``factory(name=..., min_dur="1m", max_dur="24h", default_dur="24h",
    allow_renewal_after_expiry=False, provisioner=..., password=...)`` starts
    one more CA and returns it; all are stopped at session end.
``step_ca_binary`` (session)
    Path of the built harness (scripts/build-step-ca.sh).

Never skips: if the binary cannot be built or the CA does not come up, the
fixture fails with the reason and the tail of the CA log.

Outside pytest use :func:`build_harness` and :func:`start_ca` directly (they
raise :class:`StepCAError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-step-ca.sh"

DEFAULT_PROVISIONER = "admin@example"
DEFAULT_PASSWORD = "reconciler-test-password"
START_TIMEOUT = 30.0


class StepCAError(RuntimeError):
    """The harness could not be built or the CA could not be started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_BINARY: Path | None = None


def build_harness() -> Path:
    """Build (or reuse from cache) the step-ca harness; return its path."""
    global _BINARY
    if _BINARY is not None and _BINARY.exists():
        return _BINARY
    if not BUILD_SCRIPT.exists():
        raise StepCAError(f"build script missing: {BUILD_SCRIPT}")
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired as exc:
        raise StepCAError(f"building step-ca harness timed out: {exc}") from exc
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or "").splitlines()[-40:])
        raise StepCAError(f"scripts/build-step-ca.sh failed (exit {proc.returncode}):\n{tail}")
    path = Path(lines[-1].strip())
    if not os.access(path, os.X_OK):
        raise StepCAError(f"build script printed {path!s}, which is not executable")
    _BINARY = path
    return path


@dataclass
class StepCA:
    """One step-ca instance (created by :func:`start_ca`)."""

    url: str  # https://127.0.0.1:PORT (no trailing slash)
    port: int
    root_path: Path  # certs/root_ca.crt (PEM)
    intermediate_path: Path  # certs/intermediate_ca.crt (PEM)
    fingerprint: str  # sha256 hex (lower case) of the root DER
    provisioner: str  # JWK provisioner name
    password_file: Path  # password of the CA keys AND of the provisioner key
    password: str
    steppath: Path  # STEPPATH of this CA
    config_path: Path  # config/ca.json
    log_path: Path  # stdout+stderr of the server (appended across restarts)
    binary: Path
    claims: dict = field(default_factory=dict)
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    # -- lifecycle -------------------------------------------------------
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """(Re)start the server on the same port; wait until /health is OK."""
        if self.is_running():
            return
        env = dict(os.environ)
        env["STEPPATH"] = str(self.steppath)
        env.pop("STEP_CA_CONTEXT", None)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== harness start {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    "serve",
                    "--password-file",
                    str(self.password_file),
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.steppath),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last_err: object = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise StepCAError(
                    f"step-ca exited with status {rc} during start-up\n"
                    f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
                )
            try:
                if self.health():
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling
                last_err = exc
            time.sleep(0.1)
        self.stop()
        raise StepCAError(
            f"step-ca did not answer {self.url}/health within {timeout:.0f}s "
            f"(last error: {last_err!r})\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- helpers ---------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """Client context that trusts only this CA's root."""
        return ssl.create_default_context(cafile=str(self.root_path))

    def health(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", context=self.ssl_context(), timeout=2) as resp:
            return resp.status == 200 and json.load(resp).get("status") == "ok"

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", context=self.ssl_context(), timeout=5) as resp:
            return json.load(resp)

    def root_pem(self) -> bytes:
        return self.root_path.read_bytes()

    def intermediate_pem(self) -> bytes:
        return self.intermediate_path.read_bytes()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])


def _pem_fingerprint(pem_path: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(pem_path.read_text())
    return hashlib.sha256(der).hexdigest()


def start_ca(
    base_dir: Path,
    *,
    name: str = "Reconciler Test CA",
    provisioner: str = DEFAULT_PROVISIONER,
    password: str = DEFAULT_PASSWORD,
    min_dur: str = "1m",
    max_dur: str = "24h",
    default_dur: str = "24h",
    allow_renewal_after_expiry: bool = False,
    binary: Path | None = None,
    start: bool = True,
) -> StepCA:
    """Create a brand-new CA under ``base_dir`` and (by default) start it.

    Raises :class:`StepCAError`. The caller must ``stop()`` the result.
    """
    binary = binary or build_harness()
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    steppath = base_dir / "step"
    password_file = base_dir / "password.txt"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    log_path = base_dir / "step-ca.log"

    last_error: StepCAError | None = None
    for _attempt in range(3):
        port = free_port()
        if steppath.exists():
            import shutil

            shutil.rmtree(steppath)
        cmd = [
            str(binary),
            "init",
            "--steppath",
            str(steppath),
            "--name",
            name,
            "--dns",
            "127.0.0.1,localhost",
            "--address",
            f"127.0.0.1:{port}",
            "--provisioner",
            provisioner,
            "--password-file",
            str(password_file),
            "--min-dur",
            min_dur,
            "--max-dur",
            max_dur,
            "--default-dur",
            default_dur,
        ]
        if allow_renewal_after_expiry:
            cmd.append("--allow-renewal-after-expiry")
        env = dict(os.environ)
        env["STEPPATH"] = str(steppath)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            raise StepCAError(f"harness init failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        root_path = steppath / "certs" / "root_ca.crt"
        fingerprint = proc.stdout.strip().splitlines()[-1].strip()
        if fingerprint != _pem_fingerprint(root_path):
            raise StepCAError(
                f"fingerprint mismatch: harness said {fingerprint}, root is {_pem_fingerprint(root_path)}"
            )
        ca = StepCA(
            url=f"https://127.0.0.1:{port}",
            port=port,
            root_path=root_path,
            intermediate_path=steppath / "certs" / "intermediate_ca.crt",
            fingerprint=fingerprint,
            provisioner=provisioner,
            password_file=password_file,
            password=password,
            steppath=steppath,
            config_path=steppath / "config" / "ca.json",
            log_path=log_path,
            binary=binary,
            claims={
                "minTLSCertDuration": min_dur,
                "maxTLSCertDuration": max_dur,
                "defaultTLSCertDuration": default_dur,
                "allowRenewalAfterExpiry": allow_renewal_after_expiry,
            },
        )
        if not start:
            return ca
        try:
            ca.start()
            return ca
        except StepCAError as exc:
            last_error = exc
            # Lost the race for the port? Try again with another one.
            if "address already in use" not in ca.log_tail(200):
                raise
    assert last_error is not None
    raise last_error


# -- pytest fixtures -----------------------------------------------------------


def _fail(exc: Exception):
    pytest.fail(f"step-ca test CA unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def step_ca_binary() -> Path:
    error: StepCAError | None = None
    try:
        return build_harness()
    except StepCAError as exc:
        error = exc
    _fail(error)  # outside the except block: no chained traceback noise


@pytest.fixture(scope="session")
def step_ca_factory(tmp_path_factory: pytest.TempPathFactory, step_ca_binary: Path) -> Iterator[Callable[..., StepCA]]:
    started: list[StepCA] = []

    def factory(**kwargs) -> StepCA:
        base = tmp_path_factory.mktemp("stepca")
        error: StepCAError | None = None
        try:
            ca = start_ca(base, binary=step_ca_binary, **kwargs)
        except StepCAError as exc:
            error = exc
        if error is not None:
            _fail(error)
        started.append(ca)
        return ca

    yield factory
    for ca in started:
        ca.stop()


@pytest.fixture(scope="session")
def step_ca(step_ca_factory: Callable[..., StepCA]) -> Iterator[StepCA]:
    ca = step_ca_factory(name="Reconciler Test CA")
    yield ca
    ca.stop()


@pytest.fixture(scope="session")
def other_step_ca(step_ca_factory: Callable[..., StepCA]) -> Iterator[StepCA]:
    ca = step_ca_factory(name="Other Untrusted CA", provisioner="other@example")
    yield ca
    ca.stop()
