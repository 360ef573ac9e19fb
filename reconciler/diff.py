"""diff: (Desired, Observed, now, context) → the drifts of one certificate. Pure: no I/O, no clock.

The drift table (docs/design.md) is `DRIFT_TABLE`: the row functions of drift_rows.py in
table order. `diff()` walks it for `plan`; `readiness()` walks the same rows to say whether
the certificate on disk can serve now, so "what the next pass would change" and "is it
ready" never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from reconciler import drift_rows as rows
from reconciler.drift_rows import (
    CHMOD,
    CHOWN,
    CONTENT_ACTIONS,
    FILE_ACTIONS,
    ISSUE,
    REISSUE,
    RENEW,
    REWRITE_CHAIN,
    RUN_HOOK,
    WRITE_CA,
    Context,
    Drift,
    Row,
    renewal_due_at,
)
from reconciler.model import DesiredCert, FileState, Observed

# the names other modules take from the stage that decides drifts
__all__ = [
    "CHMOD",
    "CHOWN",
    "CONTENT_ACTIONS",
    "DRIFT_TABLE",
    "FILE_ACTIONS",
    "ISSUE",
    "REISSUE",
    "RENEW",
    "REWRITE_CHAIN",
    "RUN_HOOK",
    "WRITE_CA",
    "Blocked",
    "Context",
    "Drift",
    "Readiness",
    "blocked",
    "diff",
    "readiness",
    "readiness_of",
    "renewal_due_at",
    "walk",
]


class Blocked(Exception):
    """The path cannot be managed as it is (a symlink, a folder, a device): needs an operator."""


# --------------------------------------------------------------------------- blocked paths


def blocked(cert: DesiredCert, observed: Observed) -> str | None:
    """Why the paths cannot be managed as they are (not a drift: nothing is done to them)."""
    if observed.folder_problem:
        return observed.folder_problem
    files = [("cert", cert.cert_path, observed.cert_file), ("key", cert.key_path, observed.key_file)]
    if cert.ca_path is not None and observed.ca_file is not None:
        files.append(("ca", cert.ca_path, observed.ca_file))
    for label, path, state in files:
        problem = _file_problem(label, path, state, cert.allow_symlink)
        if problem:
            return problem
    return None


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


# --------------------------------------------------------------------------- the table


DRIFT_TABLE: tuple[Row, ...] = (
    rows.cert_file,
    rows.key_file,  # present and readable
    rows.cert_parses,
    rows.key_parses,
    rows.key_matches,  # a usable pair
    rows.common_name,
    rows.sans,
    rows.key_type,
    rows.cert_type,
    rows.duration,
    rows.issuer,  # the certificate asked for
    rows.not_yet_valid,
    rows.expired,
    rows.renewal_due,  # lifetime
    rows.chain,
    rows.ca_file,  # content beside the certificate
    rows.cert_owner,
    rows.key_owner,
    rows.ca_owner,
    rows.cert_mode,
    rows.key_mode,
    rows.ca_mode,  # metadata
    rows.guest_copy,
    rows.guest_reload,  # the Proxmox guest's copy (reconciler.guestfacts)
    rows.hook,  # owed from an earlier pass
    rows.served,  # a service still presenting another leaf
)

# an earlier drift with one of these actions makes a later one moot: a new pair is written
# with everything right (so after `issue` only other `issue` rows count), a reissue is no
# renewal, and any file write runs the hook anyway
_MOOT_AFTER = {
    REISSUE: frozenset({ISSUE}),
    RENEW: frozenset({ISSUE, REISSUE}),
    REWRITE_CHAIN: frozenset({ISSUE}),
    WRITE_CA: frozenset({ISSUE}),
    CHOWN: frozenset({ISSUE}),
    CHMOD: frozenset({ISSUE}),
    RUN_HOOK: frozenset(CONTENT_ACTIONS + FILE_ACTIONS),
}


def diff(
    cert: DesiredCert, observed: Observed, now: datetime, hook_pending: bool = False, issuer_unknown: str | None = None
) -> list[Drift]:
    """Every drift of `cert`, in table order. Raises Blocked when the path cannot be managed.
    `issuer_unknown`: why the issuer cannot be checked; the certificate is then not trusted."""
    problem = blocked(cert, observed)
    if problem:
        raise Blocked(problem)
    return walk(cert, observed, now, Context.of(cert, observed, hook_pending, issuer_unknown))


def walk(cert: DesiredCert, observed: Observed, now: datetime, ctx: Context) -> list[Drift]:
    """The drift table's rows in order, leaving out what an earlier drift makes moot."""
    drifts: list[Drift] = []
    actions: set[str] = set()
    for row in DRIFT_TABLE:
        d = row(cert, observed, now, ctx)
        if d is not None and not actions & _MOOT_AFTER.get(d.action, frozenset()):
            drifts.append(d)
            actions.add(d.action)
    return drifts


# --------------------------------------------------------------------------- readiness


@dataclass(frozen=True, slots=True)
class Readiness:
    """The certificate on disk, judged by the same rows as the plan (docs/design.md, "Ready").

    `ready`: it can serve as the manifest asks now: no unusable drift (Drift.unusable) and
    the path is not blocked. `pending`: every drift the next pass would act on, in table
    order; a ready certificate may still have some (a renewal due, chain, CA file, owner,
    mode, an owed hook)."""

    ready: bool
    problem: str | None  # why not ready: the blocked path or the first unusable drift's reason
    pending: tuple[Drift, ...]
    not_after: datetime | None = None  # of the usable certificate on disk
    # the certificate and its notBefore, for renewal_at, worked out when asked: the outcome
    # asks, a --plan (whose output has no renewal times) never does
    cert: DesiredCert | None = field(default=None, compare=False, repr=False)
    not_before: datetime | None = field(default=None, compare=False, repr=False)

    @property
    def renewal_at(self) -> datetime | None:
        """When the usable certificate enters its (jittered) renewal window (renewal_due_at)."""
        if self.cert is None or self.not_before is None or self.not_after is None:
            return None
        return renewal_due_at(self.cert, self.not_before, self.not_after)

    @property
    def actions(self) -> tuple[str, ...]:
        """The pending drifts' actions, each once, in table order."""
        return tuple(dict.fromkeys(d.action for d in self.pending))


def readiness(
    cert: DesiredCert, observed: Observed, now: datetime, hook_owed: bool = False, issuer_unknown: str | None = None
) -> Readiness:
    problem = blocked(cert, observed)
    if problem:
        return Readiness(False, problem, ())
    ctx = Context.of(cert, observed, hook_owed, issuer_unknown)
    return readiness_of(cert, walk(cert, observed, now, ctx), ctx)


def readiness_of(cert: DesiredCert, drifts: list[Drift], ctx: Context) -> Readiness:
    """Readiness from drifts already walked with `ctx` (plan_cert walks once for both)."""
    unusable = next((d for d in drifts if d.unusable), None)
    ready, problem, facts = unusable is None, unusable.reason if unusable else None, ctx.facts
    if facts is None:
        return Readiness(ready, problem, tuple(drifts))
    return Readiness(ready, problem, tuple(drifts), facts.not_after, cert, facts.not_before)
