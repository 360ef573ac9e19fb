"""Values that flow between the pipeline stages: frozen, hashable, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from reconciler.durations import format_duration
from reconciler.endpoints import Endpoint, Served
from reconciler.guestfacts import GuestSeen, GuestSpec

# `ca_path` holds a public root that clients of the service read: always this mode
CA_MODE = 0o644


@dataclass(frozen=True, slots=True)
class KeySpec:
    type: str = "EC"  # "EC" | "RSA" | "Ed25519"
    curve: str | None = "P-256"  # EC only
    size: int | None = None  # RSA only
    rotation: str = "always"  # "always" | "never"

    def describe(self) -> str:
        if self.type == "EC":
            return f"EC {self.curve}"
        if self.type == "RSA":
            return f"RSA {self.size}"
        return self.type


@dataclass(frozen=True, slots=True)
class IssuerSpec:
    type: str = "local"  # "local" | "step-ca"
    dir: Path | None = None  # local: where the embedded CA lives (default <state-dir>/ca)
    url: str | None = None  # step-ca
    root: Path | None = None
    fingerprint: str | None = None
    provisioner: str | None = None
    password_file: Path | None = None
    # where each setting came from ("--root", "RECONCILER_ROOT", "root in .../defaults.json"),
    # so a hint names what the operator has to fix; unlisted ones are the manifest's issuer.<field>
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def where(self, setting: str) -> str:
        return dict(self.sources).get(setting, f"issuer.{setting}")

    def ca_dir(self, state_dir: Path) -> Path:
        """The embedded CA's folder."""
        return self.dir if self.dir else state_dir / "ca"

    def describe(self, state_dir: Path) -> str:
        """One line naming the CA, for the top of every output."""
        if self.type == "local":
            return f"embedded CA in {self.ca_dir(state_dir)}"
        return f"{self.type} {self.url or '(no URL)'}, provisioner {self.provisioner or '(none)'}"

    def summary(self, state_dir: Path) -> dict:
        """The issuer as JSON output carries it."""
        if self.type == "local":
            return {"type": "local", "dir": str(self.ca_dir(state_dir)), "description": self.describe(state_dir)}
        values = {
            "url": self.url,
            "provisioner": self.provisioner,
            "root": self.root and str(self.root),
            "fingerprint": self.fingerprint,
        }
        return {"type": self.type, **{k: v for k, v in values.items() if v}, "description": self.describe(state_dir)}


@dataclass(frozen=True, slots=True)
class RenewBefore:
    """Either a fixed time before expiry or a share of the lifetime."""

    fixed: timedelta | None = None
    share: float | None = None  # 0 < share < 1

    def window(self, lifetime: timedelta) -> timedelta:
        if self.fixed is not None:
            return self.fixed
        return lifetime * (self.share or 0.0)

    def describe(self) -> str:
        if self.fixed is not None:
            return format_duration(self.fixed)
        return f"{round((self.share or 0) * 100)}%"


@dataclass(frozen=True, slots=True)
class DesiredCert:
    name: str
    common_name: str
    sans: frozenset[str]  # normalised, common name included
    # paths as text (absolute, normalised): a Path costs ~2.5 µs to make and a method call for
    # every str() or os call after; 20,000 of them were a tenth of a warm 10,000-entry plan.
    # The few writers that need Path operations make one from the text.
    cert_path: str
    key_path: str
    owner: str | None  # as written, "user:group" / "user" / numeric
    uid: int | None
    gid: int | None
    cert_mode: int
    key_mode: int
    renew_before: RenewBefore
    duration: timedelta
    key: KeySpec
    post_renewal_command: str | None
    hook_timeout: timedelta
    include_ca: bool
    ca_path: str | None
    cert_type: str
    guest_id: str | None = None
    guest_type: str | None = None
    allow_symlink: bool = False
    # where the files go inside a Proxmox guest (the `guest` object, or legacy guest_id + guest_type)
    guest: GuestSpec | None = None
    node: str | None = None  # a Proxmox cluster's node this host entry is for (None: every node)
    serve: tuple[Endpoint, ...] = ()  # where the service should present this certificate
    serve_settle: timedelta = timedelta(seconds=5)  # how long a reloaded service may take to present it
    # the entry as written and the defaults it inherits (one dict shared by every entry),
    # kept apart: a merged copy per entry was 13 MB of a 50,000-entry --plan (see `fields`)
    entry: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    defaults: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    # position in the manifest's list, for error messages ("certificates[3].owner")
    where: str = field(default="", compare=False, repr=False)

    @property
    def fields(self) -> dict:
        """The entry as written, after defaults: what `--watch` compares between saves."""
        return {**self.defaults, **self.entry}

    @property
    def source(self) -> str:
        """Canonical JSON of `fields`; computed on demand (it costs more than a stat)."""
        return json.dumps(self.fields, sort_keys=True)

    @property
    def holds_root(self) -> bool:
        """A file of this entry holds the issuer's root (`ca_path`, or the guest's CA copy):
        only for these is the root worked out (Observed.issuer_root), which parses the
        issuer's certificates (parse.Trust)."""
        return self.ca_path is not None or (self.guest is not None and bool(self.guest.ca_path))


@dataclass(frozen=True, slots=True)
class Desired:
    issuer: IssuerSpec | None  # None: the manifest names no issuer (flags, env or defaults.json decide)
    certificates: tuple[DesiredCert, ...]
    manifest_path: Path


# --------------------------------------------------------------------------- observed
# What `observe` found on disk: values like the desired ones, so that diff and plan (pure)
# never import the stage that reads files.


@dataclass(frozen=True, slots=True)
class FileState:
    kind: str  # "file" | "missing" | "symlink" | "directory" | "special" | "unreadable"
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    detail: str = ""  # the OS error for "unreadable", the link target for "symlink"
    stamp: tuple = ()  # (dev, ino, size, mtime_ns, ctime_ns) for the cache

    @property
    def present(self) -> bool:
        return self.kind == "file"


@dataclass(frozen=True, slots=True)
class CertFacts:
    common_name: str | None
    sans: frozenset[str]  # normalised like a desired SAN set (reconciler.sans)
    not_before: datetime
    not_after: datetime
    key_type: str  # "EC P-256", "RSA 2048", "Ed25519"
    public_key_id: str  # sha256 of the SubjectPublicKeyInfo
    issued_by: str | None  # sha256 of the trust certificate that signed it, if any
    serial: str
    # "serverAuth", "clientAuth", or "any" (no EKU extension, or anyExtendedKeyUsage)
    usages: frozenset[str] = frozenset({"any"})
    chain: tuple[str, ...] = ()  # sha256 of each certificate after the leaf in the file
    # sha256 of the intermediates from the leaf up to the issuer's root, as the issuer knows
    # them (its trust certificates); None: the leaf does not chain through them
    issuer_chain: tuple[str, ...] | None = None
    # when the certificate that signed the leaf expires: a CA cannot issue beyond it
    signer_not_after: datetime | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    cert_file: FileState
    key_file: FileState
    cert: CertFacts | None = None
    cert_error: str | None = None  # why a present cert file did not parse
    key_public_id: str | None = None
    key_error: str | None = None
    # None: we cannot tell (no trust anchors known for a remote CA)
    chains_to_issuer: bool | None = None
    # why these paths cannot be managed: a folder above them that someone other than root
    # and the owner can write, or files another state folder manages (reconciler.managed)
    folder_problem: str | None = None
    ca_file: FileState | None = None  # None: the entry has no ca_path
    ca_certs: tuple[str, ...] | None = None  # sha256 of each certificate in it; None: no PEM
    # sha256 of the issuer's root; None: not known here, or no file of the entry holds it
    # (DesiredCert.holds_root)
    issuer_root: str | None = None
    guest: GuestSeen | None = None  # the entry's guest: what was delivered, what it holds now
    # what each of the entry's `serve` endpoints presents (reconciler.probe), in manifest
    # order; never cached: it is the running service, not the files
    served: tuple[Served, ...] = ()

    @property
    def key_matches(self) -> bool:
        return (
            self.cert is not None and self.key_public_id is not None and self.cert.public_key_id == self.key_public_id
        )


@dataclass(frozen=True, slots=True)
class Written:
    """What apply wrote for one certificate: SHA-256 digests of the bytes, and what apply
    already knows of them. Re-observing a file whose bytes still have that digest reuses it:
    `parsed`, the certificate file as deploy parsed it to check the CA's answer (it is not
    parsed again); `signer`, the fingerprint of the certificate that signed the leaf, whose
    signature the issuer verified before it answered (the Issuer protocol); and `key_id`,
    the new key's public key id (the key is not loaded). Any other file is read and checked
    as usual. A pass drops `parsed` once it has read its files back: it may write thousands."""

    cert_digest: str
    signer: str | None = None
    key_digest: str | None = None  # None: the key on disk was kept, not written
    key_id: str | None = None
    parsed: object | None = None  # parse.ParsedCert (this module is below parse)
