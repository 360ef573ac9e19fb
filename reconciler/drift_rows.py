"""drift_rows: one function per row of the drift table (docs/design.md), each
`(desired, observed, now, context) -> Drift | None`. Pure: no I/O, no clock.

`diff.DRIFT_TABLE` lists them in table order and `diff.walk` runs them; a row only says
whether its own field differs, and looks at the certificate's facts only when the pair is
usable (both parse, the key matches). A new row is a function here, its place in
DRIFT_TABLE, and its test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from reconciler.durations import format_duration
from reconciler.endpoints import stale_reason
from reconciler.guestfacts import DELIVER, RELOAD, GuestSeen, guest_drifts
from reconciler.model import CA_MODE, CertFacts, DesiredCert, FileState, Observed
from reconciler.sans import display

ISSUE, REISSUE, RENEW, CHOWN, CHMOD, RUN_HOOK = "issue", "reissue", "renew", "chown", "chmod", "run_hook"
REWRITE_CHAIN, WRITE_CA = "rewrite_chain", "write_ca"
CONTENT_ACTIONS = (ISSUE, REISSUE, RENEW)  # a new certificate
FILE_ACTIONS = (REWRITE_CHAIN, WRITE_CA)  # a file's content rewritten, the certificate kept
JITTER_SHARE = 0.05
USAGE = {"server": "serverAuth", "client": "clientAuth"}
# CAs backdate notBefore (step-ca and the embedded CA by 1 minute) and a request takes a
# moment: a lifetime this close to `duration` is the duration asked for
LIFETIME_SLACK, LIFETIME_SHARE = timedelta(minutes=2), 0.01


@dataclass(frozen=True, slots=True)
class Drift:
    field: str
    action: str
    reason: str
    observed: Any = None
    desired: Any = None
    # the certificate is past its notAfter: a renewal that no client can wait for
    expired: bool = False

    @property
    def unusable(self) -> bool:
        """The certificate on disk cannot serve as the manifest asks: missing, garbage, not
        the one asked for (names, key, usage, lifetime, CA, not yet valid) or expired.
        A renewal of a still valid certificate, a chain, CA file, owner, mode or owed hook
        leave it usable."""
        return self.action in (ISSUE, REISSUE) or self.expired


@dataclass(frozen=True)
class Context:
    """What some rows need beyond desired, observed and now (`Context.of`)."""

    hook_owed: bool = False  # the status store says the post-renewal command is owed
    # why the issuer cannot be checked here; certificates are then not trusted
    issuer_unknown: str | None = None
    # the certificate's facts when the pair is usable (usable_facts): worked out once for all
    # the rows and the readiness
    facts: CertFacts | None = None

    @classmethod
    def of(cls, cert: DesiredCert, o: Observed, hook_owed: bool = False, issuer_unknown: str | None = None) -> Context:
        return cls(hook_owed, issuer_unknown, usable_facts(o))


Row = Callable[[DesiredCert, Observed, datetime, Context], "Drift | None"]


def renewal_due_at(cert: DesiredCert, not_before: datetime, not_after: datetime) -> datetime:
    """When this certificate enters its renewal window, with a stable per-certificate jitter
    of up to 5 % of its lifetime (earlier, never later), so a fleet issued together does not
    renew together."""
    lifetime = not_after - not_before
    digest = hashlib.sha256(f"{cert.name}\0{not_after.timestamp()}".encode()).digest()
    fraction = int.from_bytes(digest[:4], "big") / 2**32  # below 1: see earliest_renewal
    jitter = timedelta(seconds=lifetime.total_seconds() * JITTER_SHARE * fraction)
    return _window_opens(cert, lifetime, not_after) - jitter


def earliest_renewal(cert: DesiredCert, not_before: datetime, not_after: datetime) -> datetime:
    """The earliest moment renewal_due_at can give this certificate (the whole 5 % of jitter):
    before it a renewal is not due, which the renewal row knows without a digest."""
    lifetime = not_after - not_before
    return _window_opens(cert, lifetime, not_after) - timedelta(seconds=lifetime.total_seconds() * JITTER_SHARE)


def _window_opens(cert: DesiredCert, lifetime: timedelta, not_after: datetime) -> datetime:
    return not_after - cert.renew_before.window(lifetime)


# --------------------------------------------------------------------------- rows: files present, readable, parsing


def _file_missing(label: str, state: FileState) -> Drift | None:
    if state.kind == "missing":
        return Drift(f"{label}_file", ISSUE, f"{label} file missing", "missing", "present")
    if state.kind == "unreadable":
        return Drift(f"{label}_file", ISSUE, f"{label} file unreadable: {state.detail}", "unreadable", "present")
    return None


def cert_file(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _file_missing("certificate", o.cert_file)


def key_file(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _file_missing("key", o.key_file)


def _both_present(o: Observed) -> bool:
    # a missing file already asks for a new pair: what the other one holds does not matter
    return o.cert_file.present and o.key_file.present


def cert_parses(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    if _both_present(o) and o.cert is None:
        return Drift("certificate", ISSUE, f"certificate does not parse: {o.cert_error}", o.cert_error, "valid")
    return None


def key_parses(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    if _both_present(o) and o.key_public_id is None:
        return Drift("key", ISSUE, f"key does not parse: {o.key_error}", o.key_error, "valid")
    return None


def key_matches(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    if _both_present(o) and o.cert is not None and o.key_public_id is not None and not o.key_matches:
        return Drift("key_match", ISSUE, "key does not match the certificate", "mismatch", "match")
    return None


def usable_facts(o: Observed) -> CertFacts | None:
    """The certificate's facts when the pair is usable at all (both parse, key matches):
    the rows below compare them (`Context.facts`) with the manifest."""
    return o.cert if o.key_matches else None


# --------------------------------------------------------------------------- rows: identity


def common_name(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts = ctx.facts
    if facts is None or facts.common_name == cert.common_name:
        return None
    return Drift(
        "common_name",
        REISSUE,
        f"common name is {facts.common_name!r}, want {cert.common_name!r}",
        facts.common_name,
        cert.common_name,
    )


def sans(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts = ctx.facts
    if facts is None or facts.sans == cert.sans:
        return None
    adds = sorted(display(s) for s in cert.sans - facts.sans)
    drops = sorted(display(s) for s in facts.sans - cert.sans)
    words = ", ".join(
        p for p in (f"adds {', '.join(adds)}" if adds else "", f"drops {', '.join(drops)}" if drops else "") if p
    )
    return Drift(
        "sans",
        REISSUE,
        f"SANs differ: {words}",
        sorted(display(s) for s in facts.sans),
        sorted(display(s) for s in cert.sans),
    )


def key_type(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts, want = ctx.facts, cert.key.describe()
    if facts is None or facts.key_type == want:
        return None
    return Drift("key_type", REISSUE, f"key type is {facts.key_type}, want {want}", facts.key_type, want)


def cert_type(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts, usage = ctx.facts, USAGE[cert.cert_type]
    # step-ca's default template gives every certificate both usages: having more than
    # asked is no drift, or each of its certificates would be re-issued on every pass
    if facts is None or usage in facts.usages or "any" in facts.usages:
        return None
    have = sorted(facts.usages)
    return Drift(
        "cert_type",
        REISSUE,
        f"extended key usage is {', '.join(have) or 'empty'}, a {cert.cert_type} certificate needs {usage}",
        have,
        usage,
    )


def duration(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts = ctx.facts
    if facts is None:
        return None
    lifetime = facts.not_after - facts.not_before
    if not _lifetime_differs(lifetime, cert.duration, facts):
        return None
    written = cert.fields.get("duration")
    have, want = format_duration(lifetime), written if isinstance(written, str) else format_duration(cert.duration)
    return Drift("duration", REISSUE, f"lifetime is {have}, want {want}", have, want)


def _lifetime_differs(lifetime: timedelta, duration: timedelta, facts: CertFacts) -> bool:
    slack = max(LIFETIME_SLACK, duration * LIFETIME_SHARE)
    if abs(lifetime - duration) <= slack:
        return False
    # shorter because the CA could not sign beyond its own certificate: asking again gives
    # the same, so it is no drift (the embedded CA caps at its intermediate's expiry)
    capped = facts.signer_not_after is not None and facts.not_after >= facts.signer_not_after - slack
    return not (lifetime < duration and capped)


def issuer(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts = ctx.facts
    if facts is None:
        return None
    if o.chains_to_issuer is False:
        return Drift(
            "issuer", REISSUE, "issued by another CA than the configured issuer", facts.issued_by, "configured issuer"
        )
    if o.chains_to_issuer is None and ctx.issuer_unknown:
        return Drift(
            "issuer", REISSUE, f"cannot check the issuer: {ctx.issuer_unknown}", "unknown", "configured issuer"
        )
    return None


# --------------------------------------------------------------------------- rows: lifetime


def not_yet_valid(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts = ctx.facts
    if facts is None or now >= facts.not_before:
        return None
    # TLS clients refuse it ("certificate is not yet valid") until then; a renewal could
    # keep that notBefore, so it is a new certificate, from a CA whose clock is right
    return Drift(
        "not_before",
        REISSUE,
        f"not valid until {facts.not_before:%Y-%m-%dT%H:%MZ} (in {format_duration(facts.not_before - now)}); "
        "the clock may have jumped backwards",
        facts.not_before.isoformat(),
        f"at or before {now.isoformat()}",
    )


def expired(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts = ctx.facts
    if facts is None or now < facts.not_after:
        return None
    return Drift(
        "expiry",
        RENEW,
        f"expired {format_duration(now - facts.not_after)} ago",
        facts.not_after.isoformat(),
        "valid",
        expired=True,
    )


def renewal_due(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    facts = ctx.facts
    if facts is None or now >= facts.not_after:
        return None  # expired: the row above
    if now < earliest_renewal(cert, facts.not_before, facts.not_after):
        return None  # (most certificates: not even the largest jitter makes it due)
    due = renewal_due_at(cert, facts.not_before, facts.not_after)
    if now < due:
        return None
    # the jitter moves the moment earlier than the window alone says: name the moment,
    # or "expires in 4m17s, inside the 4m window" reads as a contradiction
    return Drift(
        "expiry",
        RENEW,
        f"renewal due since {format_duration(now - due)} ago (window {cert.renew_before.describe()} + jitter); "
        f"expires in {format_duration(facts.not_after - now)}",
        facts.not_after.isoformat(),
        due.isoformat(),
    )


# --------------------------------------------------------------------------- rows: file content besides the certificate


def chain(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    """The certificates after the leaf are exactly the issuer's chain with include_ca, none
    without. Unknown when the issuer's chain is not known here (then only "none" is judged)."""
    facts = ctx.facts
    if facts is None:
        return None
    want = facts.issuer_chain if cert.include_ca else ()
    if want is None or facts.chain == want:
        return None
    if not want:
        n = len(facts.chain)
        reason = (
            f"the certificate file holds a CA chain ({n} certificate{'s' if n != 1 else ''}) "
            "that include_ca: false leaves out"
        )
    elif not facts.chain:
        reason = "the certificate file lacks the CA chain include_ca asks for"
    else:
        reason = "the CA chain in the certificate file is not the issuer's (a stale or foreign certificate in it)"
    return Drift("chain", REWRITE_CHAIN, reason, list(facts.chain), list(want))


def ca_file(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    """`ca_path` holds exactly the issuer's root. Which root that is may be unknown here (a
    step-ca before its root was fetched): then only a missing or unreadable file is judged."""
    state, want = o.ca_file, o.issuer_root
    if cert.ca_path is None or state is None:
        return None
    if not state.present:
        why = "missing" if state.kind == "missing" else f"unreadable: {state.detail}"
        return Drift("ca_file", WRITE_CA, f"CA file {cert.ca_path} {why}", state.kind, want)
    if o.ca_certs is None:
        return Drift(
            "ca_file", WRITE_CA, f"CA file {cert.ca_path} does not hold a PEM certificate", "not a certificate", want
        )
    if want is not None and o.ca_certs != (want,):
        return Drift(
            "ca_file",
            WRITE_CA,
            f"CA file {cert.ca_path} holds another certificate than the issuer's root",
            list(o.ca_certs),
            want,
        )
    return None


# --------------------------------------------------------------------------- rows: file metadata


def _owner(cert: DesiredCert, label: str, field_name: str, state: FileState | None) -> Drift | None:
    if state is None or not state.present:
        return None
    if (cert.uid is None or state.uid == cert.uid) and (cert.gid is None or state.gid == cert.gid):
        return None
    want = f"{cert.uid if cert.uid is not None else state.uid}:{cert.gid if cert.gid is not None else state.gid}"
    return Drift(
        f"{field_name}_owner",
        CHOWN,
        f"{label} owner {state.uid}:{state.gid}, want {want} ({cert.owner})",
        f"{state.uid}:{state.gid}",
        want,
    )


def _mode(label: str, field_name: str, state: FileState | None, mode: int) -> Drift | None:
    if state is None or not state.present or state.mode == mode:
        return None
    return Drift(
        f"{field_name}_mode",
        CHMOD,
        f"{label} mode {state.mode:04o}, want {mode:04o}",
        f"{state.mode:04o}",
        f"{mode:04o}",
    )


def cert_owner(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _owner(cert, "certificate", "certificate", o.cert_file)


def key_owner(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _owner(cert, "key", "key", o.key_file)


def ca_owner(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _owner(cert, "CA file", "ca", o.ca_file)


def cert_mode(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _mode("certificate", "certificate", o.cert_file, cert.cert_mode)


def key_mode(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _mode("key", "key", o.key_file, cert.key_mode)


def ca_mode(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    return _mode("CA file", "ca", o.ca_file, CA_MODE)


# --------------------------------------------------------------------------- rows: the guest's copy


def _guest_row(cert: DesiredCert, o: Observed, action: str) -> Drift | None:
    if cert.guest is None:
        return None
    seen = o.guest or GuestSeen()
    found = guest_drifts(cert.guest, seen.source, seen.record, seen.view, content_changes=False)
    return next((Drift(*row) for row in found if row[1] == action), None)


def guest_copy(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    """The guest's copy missing or different, or the host files changed since the last delivery."""
    return _guest_row(cert, o, DELIVER)


def guest_reload(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    """A delivery whose reload inside the guest did not succeed."""
    return _guest_row(cert, o, RELOAD)


def hook(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    # a pending hook whose command was since removed from the manifest has nothing to run;
    # planning it would report a change on every pass, forever
    if ctx.hook_owed and cert.post_renewal_command:
        return Drift(
            "hook",
            RUN_HOOK,
            "the post-renewal command did not succeed after the last deployment",
            "failed",
            "succeeded",
        )
    return None


def served(cert: DesiredCert, o: Observed, now: datetime, ctx: Context) -> Drift | None:
    """A command can exit 0 and change nothing: a `serve` endpoint still presenting another
    leaf than the file owes it again. An unreachable endpoint is its own state (status,
    metrics), never a reason to rerun the command; without a command there is nothing to run."""
    facts = ctx.facts
    why = stale_reason(o.served, facts) if facts is not None and cert.post_renewal_command else None
    return Drift("serve", RUN_HOOK, why, "another certificate", facts.serial) if why and facts else None
