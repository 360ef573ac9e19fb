"""step-ca's JOSE side: decrypting a JWK provisioner's key (JWE, PBES2)."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from typing import Iterator

from jwcrypto import jwa, jwe, jwk

from reconciler.issuers import IssuerError


# step-ca (go.step.sm/crypto) encrypts provisioner keys with 100,000 PBKDF2 rounds;
# jwcrypto refuses more than 16,384 by default. We lift its cap to exactly what the
# key needs, never above this, and only while decrypting.
STEP_PBKDF2_ITERATIONS = 100_000

# serialises changes to jwcrypto's process-wide PBKDF2 cap
_PBKDF2_CAP_LOCK = threading.Lock()


def default_alg(key) -> str:
    """The JWS algorithm a JWK signs with when its provisioner names none."""
    kty = key.get("kty")
    if kty == "EC":
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(key.get("crv"), "ES256")
    if kty == "OKP":
        return "EdDSA"
    return "RS256"


def _jwe_header(token: str) -> dict:
    head = token.split(".", 1)[0] if token.lstrip()[:1] != "{" else None
    if head is None:
        data = json.loads(token)
        protected = data.get("protected", "")
    else:
        protected = head
    padded = protected + "=" * (-len(protected) % 4)
    return json.loads(base64.urlsafe_b64decode(padded))


@contextlib.contextmanager
def _pbkdf2_cap(iterations: int) -> Iterator[None]:
    """Lift jwcrypto's PBKDF2 cap to `iterations` (bounded) while decrypting."""
    with _PBKDF2_CAP_LOCK:
        before = jwa.default_max_pbkdf2_iterations
        jwa.default_max_pbkdf2_iterations = max(before, min(iterations, STEP_PBKDF2_ITERATIONS))
        try:
            yield
        finally:
            jwa.default_max_pbkdf2_iterations = before


def decrypt_provisioner_key(encrypted_key: str, password: bytes, name: str, password_file: str):
    """Decrypt a step-ca provisioner's `encryptedKey` (JWE, PBES2-HS256+A128KW / A256GCM)."""
    undecryptable = IssuerError(
        f"provisioner key for '{name}' cannot be decrypted with the password in {password_file}",
        hint="put the provisioner's password in that file (the one given to `step ca init` or "
        "`step ca provisioner add`)",
    )
    try:
        header = _jwe_header(encrypted_key)
        iterations = int(header.get("p2c", 0))
    except (ValueError, TypeError, AttributeError):
        raise IssuerError(
            f"provisioner '{name}' has an encrypted key that is not a JWE",
            hint="the CA's configuration is damaged; re-create the provisioner",
        ) from None
    if iterations > STEP_PBKDF2_ITERATIONS:
        raise IssuerError(
            f"provisioner '{name}' key asks for {iterations} PBKDF2 iterations, "
            f"more than step-ca's {STEP_PBKDF2_ITERATIONS}",
            hint="refusing an unusual key derivation cost; re-create the provisioner with step",
        )
    token = jwe.JWE()
    token.allowed_algs = ["PBES2-HS256+A128KW", "PBES2-HS384+A192KW", "PBES2-HS512+A256KW", "A256GCM", "A128GCM"]
    try:
        with _pbkdf2_cap(iterations):
            token.deserialize(encrypted_key, key=jwk.JWK.from_password(password.decode("utf-8", "surrogateescape")))
        payload = token.payload
    except Exception:  # jwcrypto raises several types for a wrong key; never echo them
        raise undecryptable from None
    try:
        key = jwk.JWK.from_json(payload)
    except Exception:
        raise IssuerError(
            f"provisioner '{name}' encrypted key does not hold a JWK",
            hint="the CA's configuration is damaged; re-create the provisioner",
        ) from None
    if not key.has_private:
        raise IssuerError(
            f"provisioner '{name}' encrypted key holds no private key",
            hint="the CA's configuration is damaged; re-create the provisioner",
        )
    return key
