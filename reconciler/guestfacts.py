"""Values of delivery into Proxmox guests, and its drift rows. Pure: no I/O, no clock.

  GuestSpec       where an entry's files go inside its guest (the manifest's `guest` object,
                  or the legacy `guest_id` + `guest_type`: /tmp/cert.pem, /tmp/key.pem, /tmp/ca.pem)
  DeliveryRecord  what was last delivered (kept in the status store): the host files' stamps
                  then, and per file in the guest its sha256, owner and mode; a reload owed
  GuestView       what the guest holds now, when it was looked at: running or not, per file
                  its sha256, owner and mode (None: not looked at this pass)
  guest_drifts    the drift table's guest rows: `deliver`, then `reload`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DELIVER, RELOAD = "deliver", "reload"
LEGACY_CERT, LEGACY_KEY, LEGACY_CA = "/tmp/cert.pem", "/tmp/key.pem", "/tmp/ca.pem"
# the old script wrote these with pct push's defaults; the key is kept to root here
LEGACY_CERT_MODE, LEGACY_KEY_MODE = 0o644, 0o600
GUEST_CA_MODE = 0o644


@dataclass(frozen=True)
class GuestTarget:
    """One file inside the guest: `label` is the host file it copies (cert, key, ca)."""

    label: str
    path: str
    mode: int
    user: str | None = None
    group: str | None = None

    @property
    def owner(self) -> str:
        return f"{self.user or ''}:{self.group or ''}"


@dataclass(frozen=True)
class GuestSpec:
    id: str
    type: str  # "lxc" | "vm"
    cert_path: str
    key_path: str
    ca_path: str | None = None
    owner: str | None = None  # "user:group" / "user", names looked up inside the guest
    cert_mode: int = 0o644
    key_mode: int = 0o600
    reload: str | None = None  # run inside the guest after a delivery
    legacy: bool = False  # guest_id + guest_type: the post-renewal command is the reload

    @property
    def key(self) -> str:
        """The guest as the cluster names it: lxc/101, qemu/201."""
        return f"{'lxc' if self.type == 'lxc' else 'qemu'}/{self.id}"

    def describe(self) -> str:
        return f"{'container' if self.type == 'lxc' else 'VM'} {self.id}"

    def targets(self) -> tuple[GuestTarget, ...]:
        user, _, group = (self.owner or "").partition(":")
        user_, group_ = user or None, group or None
        out = [GuestTarget("key", self.key_path, self.key_mode, user_, group_), GuestTarget("cert", self.cert_path, self.cert_mode, user_, group_)]
        if self.ca_path:
            out.append(GuestTarget("ca", self.ca_path, GUEST_CA_MODE, user_, group_))
        return tuple(out)


def legacy_spec(guest_id: str, guest_type: str, include_ca: bool) -> GuestSpec:
    """Exactly the files `certificate-renewal-manager.sh` pushed; its hook moves them into place."""
    return GuestSpec(
        guest_id, guest_type, LEGACY_CERT, LEGACY_KEY, LEGACY_CA if include_ca else None,
        cert_mode=LEGACY_CERT_MODE, key_mode=LEGACY_KEY_MODE, legacy=True,
    )


@dataclass(frozen=True)
class InGuestFile:
    sha256: str | None  # None: missing, or not a regular file
    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    group: str | None = None
    mode: int | None = None

    def owned_as(self, target: GuestTarget) -> bool:
        """Owner as the manifest writes it: names compare as names, numbers as numbers."""
        for want, name, number in ((target.user, self.user, self.uid), (target.group, self.group, self.gid)):
            if want is not None and want != (str(number) if want.isdigit() else name):
                return False
        return True


@dataclass(frozen=True)
class GuestView:
    state: str  # "running" | "stopped" | "missing" (not on this node) | "unreachable"
    detail: str = ""
    files: dict[str, InGuestFile] | None = field(default=None, hash=False)  # None: not looked at


@dataclass
class DeliveryRecord:
    """The status store's memory of one certificate's delivery into its guest."""

    guest: str  # GuestSpec.key
    source: dict[str, Any] = field(default_factory=dict)  # label → host stamp (or root fingerprint) delivered
    files: dict[str, dict] = field(default_factory=dict)  # guest path → {"sha256", "owner", "mode"}
    node: str | None = None  # where it was delivered from (cluster mode)
    at: str | None = None
    reload_owed: bool = False
    owed: str | None = None  # why a delivery is waiting (a stopped guest), not a failure
    error: str | None = None  # the last failed delivery or reload

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"guest": self.guest, "source": self.source, "files": self.files}
        for name in ("node", "at", "owed", "error"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.reload_owed:
            out["reload_owed"] = True
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "DeliveryRecord":
        """Raises ValueError naming the first field of the wrong shape."""
        if not isinstance(raw, dict) or not isinstance(raw.get("guest"), str):
            raise ValueError(f"delivery is {raw!r}, not a delivery record")
        rec = cls(raw["guest"])
        for name, kind in (("source", dict), ("files", dict)):
            value = raw.get(name, {})
            if not isinstance(value, kind):
                raise ValueError(f"delivery.{name} is {value!r}, not an object")
            setattr(rec, name, value)
        for name in ("node", "at", "owed", "error"):
            value = raw.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"delivery.{name} is {value!r}, not text")
            setattr(rec, name, value)
        if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in rec.files.values()):
            raise ValueError("delivery.files holds an entry without a sha256")
        rec.reload_owed = raw.get("reload_owed") is True
        return rec


def host_source(cert_stamp: tuple, key_stamp: tuple, ca: Any) -> dict[str, Any]:
    """What identifies the host files a delivery copies: (dev, inode, size, mtime) of the
    certificate and key files (a replacement is a new inode; chown/chmod change neither),
    and the CA file's stamp or the root's fingerprint."""
    out: dict[str, Any] = {"cert": list(cert_stamp[:4]), "key": list(key_stamp[:4])}
    if ca is not None:
        out["ca"] = list(ca[:4]) if isinstance(ca, tuple) else ca
    return out


def guest_drifts(spec: GuestSpec, source: dict | None, record: DeliveryRecord | None, view: GuestView | None, content_changes: bool) -> list[tuple[str, str, str, Any, Any]]:
    """The guest rows of the drift table, as (field, action, reason, observed, desired).
    `source`: host_source() of the files now (None: not readable, a new certificate comes
    first); `content_changes`: this pass writes new host files, so a delivery follows."""
    why = _deliver_reason(spec, source, record, view, content_changes)
    if why is not None:
        if view is not None and view.state != "running":
            why += f" ({spec.describe()} {_state_words(view)}: owed)"
        return [("guest", DELIVER, why, view.state if view else None, spec.key)]
    if record is not None and record.reload_owed and spec.reload and not spec.legacy:
        reason = f"the reload inside {spec.describe()} did not succeed after the last delivery"
        if view is not None and view.state != "running":
            reason += f" ({spec.describe()} {_state_words(view)}: owed)"
        return [("guest_reload", RELOAD, reason, "owed", "succeeded")]
    return []


def _state_words(view: GuestView) -> str:
    return {"stopped": "stopped", "missing": "not on this node", "unreachable": "unreachable"}.get(view.state, view.state)


def _deliver_reason(spec: GuestSpec, source: dict | None, record: DeliveryRecord | None, view: GuestView | None, content_changes: bool) -> str | None:
    if content_changes or source is None:
        return f"new files for {spec.describe()}"
    if record is None or record.guest != spec.key:
        return f"never delivered to {spec.describe()}"
    if record.source != source:
        return f"host files changed since the last delivery to {spec.describe()}"
    wanted = {t.path: t for t in spec.targets()}
    if set(record.files) != set(wanted) or any(record.files[p].get("owner") != t.owner or record.files[p].get("mode") != t.mode for p, t in wanted.items()):
        return f"the manifest's files for {spec.describe()} changed"
    if view is None or view.files is None:
        return None
    for path, target in wanted.items():
        have = view.files.get(path)
        if have is None or have.sha256 is None:
            return f"{path} missing in {spec.describe()}"
        if have.sha256 != record.files[path]["sha256"]:
            return f"{path} in {spec.describe()} differs from what was delivered"
        if not have.owned_as(target):
            return f"{path} in {spec.describe()} is owned by {have.user}:{have.group}, want {target.owner}"
        if have.mode != target.mode:
            return f"{path} in {spec.describe()} has mode {have.mode:04o}, want {target.mode:04o}" if have.mode is not None else f"{path} in {spec.describe()} has no mode"
    return None
