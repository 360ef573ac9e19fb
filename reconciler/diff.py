"""diff: (Desired, Observed, now, status) → the drifts of one certificate. Pure: no I/O, no clock.

Drifts are small (field, observed, desired) records in the drift table's order (docs/design.md); `plan`
turns them into the minimal actions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from reconciler.durations import format_duration
from reconciler.model import DesiredCert
from reconciler.observe import FileState, Observed
from reconciler.sans import display

# the drift table (docs/design.md), in order
ISSUE, REISSUE, RENEW, CHOWN, CHMOD, RUN_HOOK = "issue", "reissue", "renew", "chown", "chmod", "run_hook"
CONTENT_ACTIONS = (ISSUE, REISSUE, RENEW)
JITTER_SHARE = 0.05


@dataclass(frozen=True)
class Drift:
    field: str
    action: str
    reason: str
    observed: Any = None
    desired: Any = None


class Blocked(Exception):
    """The path cannot be managed as it is (a symlink, a folder, a device): needs an operator."""


def _file_problem(label: str, path, state: FileState, allow_symlink: bool) -> str | None:
    if state.kind == "symlink" and not allow_symlink:
        return (
            f"{label} {path} is a symlink to {state.detail or '?'}; refusing to write through it. "
            f'Point {label}_path at the real file, or set "allow_symlink": true'
        )
    if state.kind == "directory":
        return f"{label} {path} is a directory; point {label}_path at a file inside it"
    if state.kind == "special":
        return f"{label} {path} is a device, FIFO or socket, not a regular file; point {label}_path elsewhere"
    return None


def renewal_due_at(cert: DesiredCert, not_before: datetime, not_after: datetime) -> datetime:
    """When this certificate enters its renewal window, with a stable per-certificate jitter
    of up to 5 % of its lifetime (earlier, never later), so a fleet issued together does not
    renew together."""
    lifetime = not_after - not_before
    window = cert.renew_before.window(lifetime)
    digest = hashlib.sha256(f"{cert.name}\0{not_after.timestamp()}".encode()).digest()
    fraction = int.from_bytes(digest[:4], "big") / 2**32
    jitter = timedelta(seconds=lifetime.total_seconds() * JITTER_SHARE * fraction)
    return not_after - window - jitter


def diff(cert: DesiredCert, observed: Observed, now: datetime, hook_pending: bool = False) -> list[Drift]:
    """Every drift of `cert`, in table order. Raises Blocked when the path cannot be managed."""
    if observed.folder_problem:
        raise Blocked(observed.folder_problem)
    for label, path, state in (("cert", cert.cert_path, observed.cert_file), ("key", cert.key_path, observed.key_file)):
        problem = _file_problem(label, path, state, cert.allow_symlink)
        if problem:
            raise Blocked(problem)

    drifts: list[Drift] = []
    cf, kf = observed.cert_file, observed.key_file
    # --- files present and readable
    for label, state in (("certificate", cf), ("key", kf)):
        if state.kind == "missing":
            drifts.append(Drift(f"{label}_file", ISSUE, f"{label} file missing", "missing", "present"))
        elif state.kind == "unreadable":
            drifts.append(Drift(f"{label}_file", ISSUE, f"{label} file unreadable: {state.detail}", "unreadable", "present"))
    if drifts:
        return drifts + _hook_drift(cert, hook_pending, drifts)
    # --- parses, key matches
    if observed.cert is None:
        drifts.append(Drift("certificate", ISSUE, f"certificate does not parse: {observed.cert_error}", observed.cert_error, "valid"))
    if observed.key_public_id is None:
        drifts.append(Drift("key", ISSUE, f"key does not parse: {observed.key_error}", observed.key_error, "valid"))
    elif observed.cert is not None and not observed.key_matches:
        drifts.append(Drift("key_match", ISSUE, "key does not match the certificate", "mismatch", "match"))
    if drifts:
        return drifts
    facts = observed.cert
    assert facts is not None
    # --- identity
    if facts.common_name != cert.common_name:
        drifts.append(
            Drift("common_name", REISSUE, f"common name is {facts.common_name!r}, want {cert.common_name!r}", facts.common_name, cert.common_name)
        )
    have = facts.sans
    if have != cert.sans:
        adds = sorted(display(s) for s in cert.sans - have)
        drops = sorted(display(s) for s in have - cert.sans)
        words = ", ".join(p for p in (f"adds {', '.join(adds)}" if adds else "", f"drops {', '.join(drops)}" if drops else "") if p)
        drifts.append(Drift("sans", REISSUE, f"SANs differ: {words}", sorted(display(s) for s in have), sorted(display(s) for s in cert.sans)))
    want_key = cert.key.describe()
    if facts.key_type != want_key:
        drifts.append(Drift("key_type", REISSUE, f"key type is {facts.key_type}, want {want_key}", facts.key_type, want_key))
    if observed.chains_to_issuer is False:
        drifts.append(Drift("issuer", REISSUE, "issued by another CA than the configured issuer", facts.issued_by, "configured issuer"))
    # --- lifetime
    if now < facts.not_before:
        # TLS clients refuse it ("certificate is not yet valid") until then; a renewal could
        # keep that notBefore, so it is a new certificate, from a CA whose clock is right
        drifts.append(
            Drift(
                "not_before",
                REISSUE,
                f"not valid until {facts.not_before:%Y-%m-%dT%H:%MZ} (in {format_duration(facts.not_before - now)}); "
                "the clock may have jumped backwards",
                facts.not_before.isoformat(),
                f"at or before {now.isoformat()}",
            )
        )
    if not any(d.action == REISSUE for d in drifts):
        due = renewal_due_at(cert, facts.not_before, facts.not_after)
        if now >= facts.not_after:
            drifts.append(Drift("expiry", RENEW, f"expired {format_duration(now - facts.not_after)} ago", facts.not_after.isoformat(), "valid"))
        elif now >= due:
            # the jitter moves the moment earlier than the window alone says: name the moment,
            # or "expires in 4m17s, inside the 4m window" reads as a contradiction
            window = cert.renew_before.describe()
            drifts.append(
                Drift(
                    "expiry",
                    RENEW,
                    f"renewal due since {format_duration(now - due)} ago (window {window} + jitter); "
                    f"expires in {format_duration(facts.not_after - now)}",
                    facts.not_after.isoformat(),
                    due.isoformat(),
                )
            )
    # --- file metadata (fixed without touching the certificate)
    for label, state, mode in (("certificate", cf, cert.cert_mode), ("key", kf, cert.key_mode)):
        if cert.uid is not None and state.uid != cert.uid or cert.gid is not None and state.gid != cert.gid:
            want = f"{cert.uid if cert.uid is not None else state.uid}:{cert.gid if cert.gid is not None else state.gid}"
            drifts.append(Drift(f"{label}_owner", CHOWN, f"{label} owner {state.uid}:{state.gid}, want {want} ({cert.owner})", f"{state.uid}:{state.gid}", want))
    for label, state, mode in (("certificate", cf, cert.cert_mode), ("key", kf, cert.key_mode)):
        if state.mode != mode:
            drifts.append(Drift(f"{label}_mode", CHMOD, f"{label} mode {state.mode:04o}, want {mode:04o}", f"{state.mode:04o}", f"{mode:04o}"))
    return drifts + _hook_drift(cert, hook_pending, drifts)


def _hook_drift(cert: DesiredCert, hook_pending: bool, drifts: list[Drift]) -> list[Drift]:
    # a pending hook whose command was since removed from the manifest has nothing to run;
    # planning it would report a change on every pass, forever
    if hook_pending and cert.post_renewal_command and not any(d.action in CONTENT_ACTIONS for d in drifts):
        return [Drift("hook", RUN_HOOK, "the post-renewal command did not succeed after the last deployment", "failed", "succeeded")]
    return []
