"""A step-ca JWK provisioner: found by name in the CA's list, its key decrypted with the
password file once per pass, and the one-time tokens signed with it."""

from __future__ import annotations

import copy
import secrets
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from jwcrypto import jwt

from reconciler.issuers import IssuerError
from reconciler.issuers.stepca_config import fingerprint_of
from reconciler.issuers.stepca_jose import default_alg, decrypt_provisioner_key
from reconciler.issuers.stepca_transport import StepCATransport
from reconciler.model import IssuerSpec

TOKEN_LIFETIME = timedelta(minutes=5)
_MAX_PROVISIONER_PAGES = 1000


class Provisioner:
    def __init__(self, spec: IssuerSpec, transport: StepCATransport):
        self.spec = spec
        self.name = spec.provisioner
        self.transport = transport
        self._lock = threading.Lock()
        self._jwk: Any = None  # the decrypted key (jwcrypto JWK), memory only
        self._error: IssuerError | None = None  # why the key could not be had, this pass
        self._kid: str | None = None
        self._alg: str | None = None

    def forget(self) -> None:
        self._jwk = None
        self._error = None

    def listing(self) -> list[dict]:
        """Every provisioner the CA publishes, all pages."""
        found: list[dict] = []
        cursor = ""
        seen: set[str] = set()
        for _ in range(_MAX_PROVISIONER_PAGES):
            params = {"cursor": cursor} if cursor else None
            _, data = self.transport.call("GET", "/provisioners", params=params, what="listing provisioners")
            page = data.get("provisioners") if isinstance(data, dict) else None
            if not isinstance(page, list):
                raise IssuerError(
                    f"step-ca at {self.transport.url} sent a provisioner list without a 'provisioners' array",
                    hint=f"check that {self.spec.where('url')} points at step-ca",
                )
            found.extend(p for p in page if isinstance(p, dict))
            cursor = data.get("nextCursor") or ""
            if not cursor or cursor in seen:
                break
            seen.add(cursor)
        return found

    def find(self) -> dict:
        """This provisioner's entry in the CA's list; an IssuerError naming the others when
        it is missing or not a JWK one."""
        everything = self.listing()
        named = [p for p in everything if p.get("name") == self.name]
        jwk = [p for p in named if p.get("type") == "JWK"]
        if jwk:
            return jwk[0]
        if named:
            raise IssuerError(
                f"provisioner '{self.name}' at {self.transport.url} is of type {named[0].get('type')}, not JWK",
                hint="the reconciler signs with JWK provisioners; add one with `step ca provisioner add NAME --create`",
            )
        listing = ", ".join(f"{p.get('name')} ({p.get('type')})" for p in everything) or "none"
        raise IssuerError(
            f"provisioner '{self.name}' not found at {self.transport.url}; it has: {listing}",
            hint=f"set {self.spec.where('provisioner')} to one of those (a JWK one)",
        )

    def read_password(self) -> bytes:
        path = self.spec.password_file
        if path is None:
            raise IssuerError(
                f"no password file set for provisioner '{self.name}'",
                hint=f"set {self.spec.where('password_file')} to a 0600 file holding the provisioner password",
            )
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IssuerError(
                f"password file {path} cannot be read: {exc.strerror or exc}",
                hint="create it with the provisioner's password (mode 0600, readable by the reconciler's user) "
                f"or fix {self.spec.where('password_file')}",
            ) from None
        password = data.rstrip(b"\r\n")
        if not password:
            raise IssuerError(f"password file {path} is empty", hint="write the provisioner's password into it")
        return password

    def decrypt(self, entry: dict, password: bytes) -> Any:
        """The provisioner's private key from its list entry, decrypted with `password`."""
        encrypted = entry.get("encryptedKey")
        if not isinstance(encrypted, str) or not encrypted:
            raise IssuerError(
                f"provisioner '{self.name}' at {self.transport.url} publishes no encrypted key",
                hint="the JWK provisioner was added without --create; re-add it with an encrypted key",
            )
        return decrypt_provisioner_key(encrypted, password, str(self.name), str(self.spec.password_file))

    def key(self) -> Any:
        """The decrypted JWK, decrypted once per instance on first use.

        A failure that needs an operator (wrong password, no password file, no such
        provisioner) is remembered as well: otherwise every certificate of the pass would
        list the provisioners and run PBKDF2 again only to fail the same way. Transient
        failures (CA unreachable) are not remembered; a later certificate may succeed."""
        if self._jwk is not None:
            return self._jwk
        with self._lock:
            if self._jwk is None:
                if self._error is not None:
                    raise copy.copy(self._error)
                try:
                    self._jwk = self._fetch_key()
                except IssuerError as exc:
                    if not exc.transient:
                        self._error = copy.copy(exc)
                    raise
            return self._jwk

    def _fetch_key(self) -> Any:
        password = self.read_password()  # a local mistake is reported before any network
        entry = self.find()
        jwk = self.decrypt(entry, password)
        del password
        public = entry.get("key") if isinstance(entry.get("key"), dict) else {}
        kid = public.get("kid")
        if kid and jwk.get("kid") and jwk.get("kid") != kid:
            raise IssuerError(
                f"provisioner '{self.name}' key id {jwk.get('kid')} does not match its public key {kid}",
                hint="the CA's configuration is inconsistent; re-create the provisioner",
            )
        self._kid = kid or jwk.get("kid")
        self._alg = public.get("alg") or jwk.get("alg")
        return jwk

    def token(self, subject: str, names: list[str], root: x509.Certificate) -> str:
        """A one-time token for POST /1.0/sign: these names exactly (step-ca matches them
        one to one with the CSR's), bound to the root by its fingerprint."""
        jwk = self.key()
        now = int(time.time())
        header = {"alg": self._alg or default_alg(jwk), "kid": self._kid, "typ": "JWT"}
        claims = {
            "iss": self.name,
            "sub": subject,
            "aud": f"{self.transport.url}/1.0/sign",
            "sans": names,
            "sha": fingerprint_of(root),
            "nbf": now,
            "iat": now,
            "exp": now + int(TOKEN_LIFETIME.total_seconds()),
            "jti": secrets.token_hex(32),
        }
        token = jwt.JWT(header=header, claims=claims)
        token.make_signed_token(jwk)
        return token.serialize()
