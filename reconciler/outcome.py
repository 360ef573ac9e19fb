"""What one pass (or the read-only snapshot behind `--plan` and `status`) found and did,
per certificate, computed once. `reconcile status`, the CLI's summary, the metrics and
`--watch` only read it; none of them re-derives a state, a deadline or a failure.

A certificate's state is judged from the drift rows' readiness (diff.readiness, carried by
each CertPlan) for the disk as it is now (after a pass: as re-read after the pass's
writes) and the status store's record:

    error         the path cannot be managed, the last attempt failed, or the file holds
                  another certificate than the manifest asks for (the next pass reissues it)
    missing       the certificate or key file is not there (or cannot be read)
    expired       past notAfter
    (the three above: not ready in the drift rows' sense, the certificate cannot serve)
    hook pending  its post-renewal command still has to succeed
    delivery owed its Proxmox guest does not hold it yet, or the reload there has to succeed
                  (a stopped guest, a failed delivery: reconciler.guests)
    renewal due   still valid, inside its renewal window: the next pass renews it
    repair due    the right certificate, but not the owner, mode, chain or CA file asked for
    endpoint unreachable   the files need nothing, but a `serve` endpoint does not answer
    service stale          ...but a `serve` endpoint presents another certificate, and the
                  entry has no post-renewal command to run for it (with one: hook pending)
    ready         nothing left to do

`ready` (nothing left to do) is what the metrics and the watch's log count; `serving`
(ready or only due for renewal) is what `reconcile status` exits 0 for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from reconciler.diff import CHMOD, CHOWN, RENEW, REWRITE_CHAIN, RUN_HOOK, WRITE_CA, Readiness
from reconciler.endpoints import EndpointState, endpoint_states, service_state
from reconciler.guestfacts import DELIVER, RELOAD
from reconciler.plan import CertPlan, Plan
from reconciler.sans import ordered
from reconciler.status import CertRecord

if TYPE_CHECKING:  # pragma: no cover
    from reconciler.apply import CertResult, Result

READY, RENEWAL_DUE, MISSING, EXPIRED, ERROR, HOOK_PENDING, REPAIR_DUE = (
    "ready",
    "renewal due",
    "missing",
    "expired",
    "error",
    "hook pending",
    "repair due",
)
DELIVERY_OWED = "delivery owed"
# a certificate in these states serves and needs nothing from an operator: `status` exits 0.
# "renewal due" is still valid, and a renewal that fails turns it into "error".
SERVING_STATES = (READY, RENEWAL_DUE)
REPAIRS = frozenset({CHOWN, CHMOD, REWRITE_CHAIN, WRITE_CA})
FILE_ROWS = ("certificate_file", "key_file")  # the drift fields of a missing or unreadable file


def cert_state(
    readiness: Readiness, last_error: str | None, hook_owed: bool, served: tuple[EndpointState, ...] = ()
) -> str:
    """The one place a certificate's state is decided (see the module's docstring), from the
    drift rows' own judgement (diff.readiness) and the status store's."""
    if last_error:
        return ERROR
    if not readiness.ready:
        first = next((d for d in readiness.pending if d.unusable), None)
        if first is None:
            return ERROR  # a blocked path: nothing is done to it until an operator acts
        if first.field in FILE_ROWS:
            return MISSING
        return EXPIRED if first.expired else ERROR  # otherwise present but not what is asked
    pending = set(readiness.actions)
    if RUN_HOOK in pending or hook_owed:
        return HOOK_PENDING
    if pending & {DELIVER, RELOAD}:
        return DELIVERY_OWED
    if RENEW in pending:
        return RENEWAL_DUE
    if pending & REPAIRS:
        # the right certificate, but a service reading the file (or the CA file) does not
        # see the owner, mode, chain or CA file the manifest asks for
        return REPAIR_DUE
    return service_state(served) or READY  # the files are right; are the services?


@dataclass(frozen=True, slots=True)  # one per certificate, like model's values
class CertOutcome:
    name: str
    cert_path: str
    key_path: str
    follow_symlinks: bool
    sans: tuple[str, ...]
    state: str
    problem: str | None  # why it is not ready (None: it is)
    not_after: datetime | None
    renewal_at: datetime | None  # when it enters its jittered renewal window
    owner_ok: bool
    mode_ok: bool
    hook_owed: bool
    # what this pass did (all empty for the read-only snapshot)
    changed: tuple[str, ...] = ()  # actions carried out
    content_changed: bool = False  # a new certificate was written
    attempted: bool = False  # the pass tried something for it (a blocked path tries nothing)
    failed: str | None = None  # why this pass's attempt failed
    transient: bool = False  # ...because the CA did not answer (worth a retry soon)
    hook_ok: bool | None = None  # its post-renewal command ran this pass: did it succeed
    delivery_ok: bool | None = None  # its delivery into a Proxmox guest (and reload) ran this pass: did it succeed
    delivery_waits: bool = False  # ...or it is owed because the guest is not running (here)
    guest: dict | None = None  # the status store's last delivery into its guest (DeliveryRecord.summary)
    still_drifts: bool = False  # written this pass, yet the re-read disk still differs
    # (dev, inode, size, mtime, ctime) of the files as the pass left them: --watch compares
    # the events it gets against these, so its own writes do not wake it
    stamps: tuple[tuple, tuple] = ((), ())
    ca_path: str | None = None  # and its `ca_path` file's, when it has one: a managed file too
    ca_stamp: tuple = ()
    # from the status store
    last_issued: str | None = None
    last_hook: str | None = None
    last_hook_at: str | None = None
    # what each `serve` endpoint presents, judged against the file (reconciler.endpoints)
    served: tuple[EndpointState, ...] = ()

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def serving(self) -> bool:
        return self.state in SERVING_STATES


@dataclass(frozen=True)
class PassOutcome:
    """One pass (`result` set) or the read-only snapshot (`result` None). `plan` is the plan
    the pass was given, as printed; the states are judged after it."""

    certificates: tuple[CertOutcome, ...]
    plan: Plan
    result: "Result | None" = None
    duration: float = 0.0
    finished_at: float = 0.0  # Unix time

    @property
    def ok(self) -> bool:
        return self.result is None or self.result.ok

    @property
    def changed(self) -> int:
        """Certificates this pass changed anything of."""
        return sum(1 for c in self.certificates if c.changed)

    def failures(self) -> list[str]:
        return self.result.failures() if self.result is not None else []

    @property
    def ready(self) -> int:
        return sum(1 for c in self.certificates if c.ready)

    @property
    def all_serving(self) -> bool:
        return all(c.serving for c in self.certificates)

    @property
    def recheck(self) -> bool:
        """A file this pass wrote changed again before the pass ended."""
        return any(c.still_drifts for c in self.certificates)

    @property
    def ca_unreachable(self) -> bool:
        """The CA did not answer, and no certificate got through to it this pass."""
        return any(c.transient for c in self.certificates) and not any(c.content_changed for c in self.certificates)

    def next_renewal(self, after: datetime) -> datetime | None:
        future = [c.renewal_at for c in self.certificates if c.renewal_at is not None and c.renewal_at > after]
        return min(future) if future else None


def outcome_of(
    plan: Plan,
    observed: dict,
    records: dict[str, CertRecord],
    owed: frozenset[str],
    now: datetime,
    result: "Result | None" = None,
    after: dict[str, CertPlan] | None = None,
    duration: float = 0.0,
) -> PassOutcome:
    """Each certificate's outcome from what the pass saw and did. `observed`: the disk as it
    is now; `after`: the plans of what this pass wrote, made again from the re-read disk (a
    certificate missing here is judged by `plan`, which nothing changed). `records`: the
    status store's records; `owed`: names whose post-renewal command is owed."""
    done = {c.name: c for c in result.certificates} if result is not None else {}
    hooks: dict[str, bool] = {}
    for h in result.hooks if result is not None else ():
        for name in h.certificates:
            hooks[name] = hooks.get(name, True) and h.ok
    guests = {d.name: d for d in result.deliveries} if result is not None else {}
    after = after or {}
    certs = []
    for p in plan.certificates:
        name = p.cert.name
        o = observed[name]
        record = records.get(name)
        now_plan = after.get(name, p)
        ran = done.get(name)
        served = endpoint_states(o.served, o.cert, record.served if record is not None else {}, now.isoformat())
        outcome = _cert_outcome(p.cert, now_plan, o, record, name in owed, ran, hooks.get(name), name in after, served)
        delivery = guests.get(name)
        if delivery is not None:
            outcome = replace(
                outcome, delivery_ok=None if delivery.owed else delivery.ok, delivery_waits=delivery.owed is not None
            )
        certs.append(outcome)
    return PassOutcome(tuple(certs), plan, result, duration, now.timestamp())


def _cert_outcome(cert, plan: CertPlan, o, record, owed: bool, ran, hook_ok, rewritten: bool, served=()) -> CertOutcome:
    actions = {a.action for a in plan.actions}
    judged = plan.readiness
    assert judged is not None, "plan_cert judges every certificate it plans"
    record = record or CertRecord()
    return CertOutcome(
        name=cert.name,
        cert_path=str(cert.cert_path),
        key_path=str(cert.key_path),
        follow_symlinks=cert.allow_symlink,
        sans=tuple(ordered(cert.sans)),
        state=cert_state(judged, record.last_error, owed, served),
        problem=plan.error or record.last_error or (plan.actions[0].reason if plan.actions else None),
        not_after=judged.not_after,
        renewal_at=judged.renewal_at,
        owner_ok=CHOWN not in actions,
        mode_ok=CHMOD not in actions,
        hook_owed=owed,
        hook_ok=hook_ok,
        stamps=(o.cert_file.stamp, o.key_file.stamp),
        ca_path=cert.ca_path,
        ca_stamp=o.ca_file.stamp if o.ca_file is not None else (),
        last_issued=record.last_issued,
        last_hook=record.hook.result if record.hook else None,
        last_hook_at=record.hook.at if record.hook else None,
        guest=record.delivery.summary() if record.delivery is not None else None,
        **(_attempt(ran, plan, rewritten) if ran is not None else {}),
        served=served,
    )


def _attempt(ran: "CertResult", plan: CertPlan, rewritten: bool) -> dict:
    """What this pass did for one certificate, and whether the re-read disk still differs."""
    if not ran.ok:
        return {"attempted": bool(ran.actions), "failed": ran.error or "failed", "transient": ran.transient}
    written = bool(ran.actions)
    return {
        "attempted": written,
        "changed": tuple(ran.actions),
        "content_changed": ran.content_changed,
        # a hook, a delivery into a guest or its reload still owed is no change to the disk
        "still_drifts": written
        and rewritten
        and any(a.action not in (RUN_HOOK, DELIVER, RELOAD) for a in plan.actions),
    }
