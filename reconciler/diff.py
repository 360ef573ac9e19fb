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
from reconciler.model import CA_MODE, DesiredCert
from reconciler.observe import FileState, Observed
from reconciler.sans import display

# the drift table (docs/design.md), in order
ISSUE, REISSUE, RENEW, CHOWN, CHMOD, RUN_HOOK = "issue", "reissue", "renew", "chown", "chmod", "run_hook"
REWRITE_CHAIN, WRITE_CA = "rewrite_chain", "write_ca"
CONTENT_ACTIONS = (ISSUE, REISSUE, RENEW)  # a new certificate
FILE_ACTIONS = (REWRITE_CHAIN, WRITE_CA)  # a file's content rewritten, the certificate kept
JITTER_SHARE = 0.05
USAGE = {"server": "serverAuth", "client": "clientAuth"}
# CAs backdate notBefore (step-ca and the embedded CA by 1 minute) and a request takes a
# moment: a lifetime this close to `duration` is the duration asked for
LIFETIME_SLACK, LIFETIME_SHARE = timedelta(minutes=2), 0.01


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


def diff(cert: DesiredCert, observed: Observed, now: datetime, hook_pending: bool = False, issuer_unknown: str | None = None) -> list[Drift]:
    """Every drift of `cert`, in table order. Raises Blocked when the path cannot be managed.
    `issuer_unknown`: why the issuer cannot be checked; the certificate is then not trusted."""
    if observed.folder_problem:
        raise Blocked(observed.folder_problem)
    files = [("cert", cert.cert_path, observed.cert_file), ("key", cert.key_path, observed.key_file)]
    if cert.ca_path is not None and observed.ca_file is not None:
        files.append(("ca", cert.ca_path, observed.ca_file))
    for label, path, state in files:
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
    usage = USAGE[cert.cert_type]
    # step-ca's default template gives every certificate both usages: having more than
    # asked is no drift, or each of its certificates would be re-issued on every pass
    if usage not in facts.usages and "any" not in facts.usages:
        have = sorted(facts.usages)
        drifts.append(
            Drift("cert_type", REISSUE, f"extended key usage is {', '.join(have) or 'empty'}, a {cert.cert_type} certificate needs {usage}", have, usage)
        )
    lifetime = facts.not_after - facts.not_before
    if _lifetime_differs(lifetime, cert.duration, facts):
        written = cert.fields.get("duration")
        have, want = format_duration(lifetime), written if isinstance(written, str) else format_duration(cert.duration)
        drifts.append(Drift("duration", REISSUE, f"lifetime is {have}, want {want}", have, want))
    if observed.chains_to_issuer is False:
        drifts.append(Drift("issuer", REISSUE, "issued by another CA than the configured issuer", facts.issued_by, "configured issuer"))
    elif observed.chains_to_issuer is None and issuer_unknown:
        drifts.append(Drift("issuer", REISSUE, f"cannot check the issuer: {issuer_unknown}", "unknown", "configured issuer"))
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
    # --- file content that is not the certificate (rewritten without a new one)
    drifts += _chain_drift(cert, facts) + _ca_drift(cert, observed)
    # --- file metadata (fixed without touching the certificate)
    managed = [("certificate", cf, cert.cert_mode), ("key", kf, cert.key_mode)]
    if observed.ca_file is not None and observed.ca_file.present:
        managed.append(("CA file", observed.ca_file, CA_MODE))
    for label, state, mode in managed:
        if cert.uid is not None and state.uid != cert.uid or cert.gid is not None and state.gid != cert.gid:
            want = f"{cert.uid if cert.uid is not None else state.uid}:{cert.gid if cert.gid is not None else state.gid}"
            drifts.append(Drift(f"{_field(label)}_owner", CHOWN, f"{label} owner {state.uid}:{state.gid}, want {want} ({cert.owner})", f"{state.uid}:{state.gid}", want))
    for label, state, mode in managed:
        if state.mode != mode:
            drifts.append(Drift(f"{_field(label)}_mode", CHMOD, f"{label} mode {state.mode:04o}, want {mode:04o}", f"{state.mode:04o}", f"{mode:04o}"))
    return drifts + _hook_drift(cert, hook_pending, drifts)


def _field(label: str) -> str:
    return "ca" if label == "CA file" else label


def _lifetime_differs(lifetime: timedelta, duration: timedelta, facts) -> bool:
    slack = max(LIFETIME_SLACK, duration * LIFETIME_SHARE)
    if abs(lifetime - duration) <= slack:
        return False
    # shorter because the CA could not sign beyond its own certificate: asking again gives
    # the same, so it is no drift (the embedded CA caps at its intermediate's expiry)
    capped = facts.signer_not_after is not None and facts.not_after >= facts.signer_not_after - slack
    return not (lifetime < duration and capped)


def _chain_drift(cert: DesiredCert, facts) -> list[Drift]:
    """The certificates after the leaf are exactly the issuer's chain with include_ca, none
    without. Unknown when the issuer's chain is not known here (then only "none" is judged)."""
    want = facts.issuer_chain if cert.include_ca else ()
    if want is None or facts.chain == want:
        return []
    if not want:
        n = len(facts.chain)
        reason = f"the certificate file holds a CA chain ({n} certificate{'s' if n != 1 else ''}) that include_ca: false leaves out"
    elif not facts.chain:
        reason = "the certificate file lacks the CA chain include_ca asks for"
    else:
        reason = "the CA chain in the certificate file is not the issuer's (a stale or foreign certificate in it)"
    return [Drift("chain", REWRITE_CHAIN, reason, list(facts.chain), list(want))]


def _ca_drift(cert: DesiredCert, observed: Observed) -> list[Drift]:
    """`ca_path` holds exactly the issuer's root. Which root that is may be unknown here (a
    step-ca before its root was fetched): then only a missing or unreadable file is judged."""
    state = observed.ca_file
    if cert.ca_path is None or state is None:
        return []
    want = observed.issuer_root
    if not state.present:
        why = "missing" if state.kind == "missing" else f"unreadable: {state.detail}"
        return [Drift("ca_file", WRITE_CA, f"CA file {cert.ca_path} {why}", state.kind, want)]
    if observed.ca_certs is None:
        return [Drift("ca_file", WRITE_CA, f"CA file {cert.ca_path} does not hold a PEM certificate", "not a certificate", want)]
    if want is not None and observed.ca_certs != (want,):
        return [Drift("ca_file", WRITE_CA, f"CA file {cert.ca_path} holds another certificate than the issuer's root", list(observed.ca_certs), want)]
    return []


def _hook_drift(cert: DesiredCert, hook_pending: bool, drifts: list[Drift]) -> list[Drift]:
    # a pending hook whose command was since removed from the manifest has nothing to run;
    # planning it would report a change on every pass, forever
    # (a content or file write runs the command anyway)
    if hook_pending and cert.post_renewal_command and not any(d.action in CONTENT_ACTIONS + FILE_ACTIONS for d in drifts):
        return [Drift("hook", RUN_HOOK, "the post-renewal command did not succeed after the last deployment", "failed", "succeeded")]
    return []
