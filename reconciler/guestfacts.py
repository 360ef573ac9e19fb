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

import json
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
        out = [
            GuestTarget("key", self.key_path, self.key_mode, user_, group_),
            GuestTarget("cert", self.cert_path, self.cert_mode, user_, group_),
        ]
        if self.ca_path:
            out.append(GuestTarget("ca", self.ca_path, GUEST_CA_MODE, user_, group_))
        return tuple(out)


def legacy_spec(guest_id: str, guest_type: str, include_ca: bool) -> GuestSpec:
    """Exactly the files `certificate-renewal-manager.sh` pushed; its hook moves them into place."""
    return GuestSpec(
        guest_id,
        guest_type,
        LEGACY_CERT,
        LEGACY_KEY,
        LEGACY_CA if include_ca else None,
        cert_mode=LEGACY_CERT_MODE,
        key_mode=LEGACY_KEY_MODE,
        legacy=True,
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

    def summary(self) -> dict[str, Any]:
        """What `status` shows of it."""
        return {
            "guest": self.guest,
            "node": self.node,
            "delivered_at": self.at,
            "reload_owed": self.reload_owed,
            "owed": self.owed,
            "error": self.error,
        }

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


@dataclass(frozen=True)
class GuestSeen:
    """A certificate's guest as observed: the last delivery (status store) and, when the
    guest was looked at, what it holds; `source` is host_source() of the host files now."""

    record: DeliveryRecord | None = None
    view: GuestView | None = None
    source: dict | None = field(default=None, hash=False)


def host_source(cert_stamp: tuple, key_stamp: tuple, ca: Any) -> dict[str, Any]:
    """What identifies the host files a delivery copies: (dev, inode, size, mtime) of the
    certificate and key files (a replacement is a new inode; chown/chmod change neither),
    and the CA file's stamp or the root's fingerprint."""
    out: dict[str, Any] = {"cert": list(cert_stamp[:4]), "key": list(key_stamp[:4])}
    if ca is not None:
        out["ca"] = list(ca[:4]) if isinstance(ca, tuple) else ca
    return out


def guest_drifts(
    spec: GuestSpec, source: dict | None, record: DeliveryRecord | None, view: GuestView | None, content_changes: bool
) -> list[tuple[str, str, str, Any, Any]]:
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
    return {"stopped": "stopped", "missing": "not on this node", "unreachable": "unreachable"}.get(
        view.state, view.state
    )


def _deliver_reason(
    spec: GuestSpec, source: dict | None, record: DeliveryRecord | None, view: GuestView | None, content_changes: bool
) -> str | None:
    if content_changes or source is None:
        return f"new files for {spec.describe()}"
    if record is None or record.guest != spec.key:
        return f"never delivered to {spec.describe()}"
    if record.source != source:
        return f"host files changed since the last delivery to {spec.describe()}"
    wanted = {t.path: t for t in spec.targets()}
    if set(record.files) != set(wanted) or any(
        record.files[p].get("owner") != t.owner or record.files[p].get("mode") != t.mode for p, t in wanted.items()
    ):
        return f"the manifest's files for {spec.describe()} changed"
    # a legacy entry's command moves the /tmp files away: their absence is the normal state
    if view is None or view.files is None or spec.legacy:
        return None
    return next(
        (why for t in wanted.values() if (why := _copy_differs(spec, t, view.files.get(t.path), record.files[t.path]))),
        None,
    )


def _copy_differs(spec: GuestSpec, target: GuestTarget, have: InGuestFile | None, delivered: dict) -> str | None:
    """How the guest's copy of one file differs from what was delivered (None: it does not)."""
    where = f"{target.path} in {spec.describe()}"
    if have is None or have.sha256 is None:
        return f"{target.path} missing in {spec.describe()}"
    if have.sha256 != delivered["sha256"]:
        return f"{where} differs from what was delivered"
    if not have.owned_as(target):
        return f"{where} is owned by {have.user}:{have.group}, want {target.owner}"
    if have.mode != target.mode:
        return (
            f"{where} has mode {have.mode:04o}, want {target.mode:04o}"
            if have.mode is not None
            else f"{where} has no mode"
        )
    return None


# --------------------------------------------------------------------------- from the manifest


def guest_spec_of(entry: dict) -> tuple[GuestSpec | None, list[tuple[str, str]]]:
    """The entry's GuestSpec (the `guest` object, or a legacy guest_id + guest_type) and the
    problems the schema cannot express, as (field, message). The schema has run."""
    raw = entry.get("guest")
    if raw is None:
        gid, gtype = entry.get("guest_id"), entry.get("guest_type")
        if gid is not None and gtype in ("lxc", "vm"):
            return legacy_spec(str(gid), gtype, bool(entry.get("include_ca"))), []
        return None, []
    if entry.get("guest_id") is not None or entry.get("guest_type") is not None:
        return None, [
            (
                "guest",
                "give either the guest object or the legacy guest_id + guest_type, not both; "
                "the guest object says all the legacy fields said",
            )
        ]
    spec = GuestSpec(
        str(raw["id"]),
        raw["type"],
        raw["cert_path"],
        raw["key_path"],
        raw.get("ca_path"),
        raw.get("owner"),
        int(raw.get("cert_permissions", "644"), 8),
        int(raw.get("key_permissions", "600"), 8),
        raw.get("reload"),
    )
    problems = []
    if spec.key_mode & 0o007:
        problems.append(
            (
                "guest.key_permissions",
                f'"{raw["key_permissions"]}" would make the private key readable '
                'by every user of the guest; set "600" (or "640" with an owner group)',
            )
        )
    if spec.cert_mode & 0o002:
        problems.append(
            (
                "guest.cert_permissions",
                f'"{raw["cert_permissions"]}" would let every user of the guest replace the certificate; set "644"',
            )
        )
    paths = [t.path for t in spec.targets()]
    if len(set(paths)) != len(paths):
        problems.append(("guest", "cert_path, key_path and ca_path inside the guest must be three different files"))
    return spec, problems


def validate_notes(certs) -> list[str]:
    """What `validate` adds for guest entries (DesiredCerts): for each legacy entry the guest
    object it means, and a warning where legacy entries of one guest share the /tmp files."""
    notes: list[str] = []
    by_guest: dict[str, list[str]] = {}
    for cert in certs:
        spec = cert.guest
        if spec is None or not spec.legacy:
            continue
        by_guest.setdefault(spec.key, []).append(cert.name)
        obj = {"id": int(spec.id), "type": spec.type, "cert_path": LEGACY_CERT, "key_path": LEGACY_KEY}
        if spec.ca_path:
            obj["ca_path"] = LEGACY_CA
        notes.append(
            f"hint: {cert.name} ({cert.where or 'entry'}): "
            "guest_id + guest_type deliver as certificate-renewal-manager.sh did, "
            f'the same as "guest": {json.dumps(obj)}; name the final paths there (with "owner", "reload") '
            "and the post-renewal command that moves the /tmp files is no longer needed"
        )
    for key, names in by_guest.items():
        if len(names) > 1:
            notes.append(
                f"warning: {', '.join(names)} all deliver to /tmp/cert.pem and /tmp/key.pem in {key}; "
                "each pass delivers them one after another, "
                "so a post-renewal command that runs later moves another entry's files: give each a guest object"
            )
    return notes


# --------------------------------------------------------------------------- one manifest for a cluster


def for_this_node(certs, node: str, placement: dict[str, str]) -> tuple[list, list[str]]:
    """A Proxmox cluster's shared manifest, as one node acts on it: entries whose guest runs
    on `node` (placement: guest key → node, from /cluster/resources), entries marked
    `"node": node`, and host entries marked for no node. Returns (kept, why each other one
    is left to another node)."""
    kept, left = [], []
    for cert in certs:
        if cert.guest is not None:
            where = placement.get(cert.guest.key)
            if where == node:
                kept.append(cert)
            else:
                left.append(
                    f"{cert.name}: {cert.guest.describe()} "
                    + (f"runs on {where}" if where else "is not in the cluster")
                )
        elif cert.node is None or cert.node == node:
            kept.append(cert)
        else:
            left.append(f"{cert.name}: marked for node {cert.node}")
    return kept, left


def placement_of(resources: list) -> dict[str, str]:
    """guest key → node, from `pvesh get /cluster/resources --type vm` output."""
    return {
        str(r["id"]): str(r["node"])
        for r in resources
        if isinstance(r, dict) and r.get("type") in ("lxc", "qemu") and "id" in r and "node" in r
    }
