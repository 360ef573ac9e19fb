"""The status store: what the reconciler remembers between passes (hooks owed, last
issuance, last error). A versioned JSON file in the state folder, written atomically.

Each certificate has a typed `CertRecord`. The one rule it exists for: a post-renewal
command is owed from the moment its certificate's files change until that command
succeeds, across any number of kills and stops. Hence, in pass order:

    begin_deploy(serial)   saved before any file is touched: "replacing serial X"
    settle(serial_now)     at the start of the next pass: X is gone, so the files changed
                           under a pass that never recorded it → owe_hook()
    end_deploy(changed)    after the renames: a content change → owe_hook()
    hook_succeeded(run)    the only way an owed hook is ever cleared

A damaged store (wrong shape, wrong types) is set aside as `status.json.bad-<time>` with a
warning, never a crash (`reconciler.statefiles`); a damaged certificate record, or a store
lost whole, counts its hooks as owed, because running a reload once more is harmless and
forgetting one is not.
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reconciler.atomic import write_atomic
from reconciler.endpoints import remembered
from reconciler.faults import fault_point
from reconciler.guestfacts import DeliveryRecord
from reconciler.statefiles import StateFileDamaged, StatusError, read_state_file  # noqa: F401  (StatusError: re-exported)

VERSION = 1
log = logging.getLogger("reconciler.status")


_UNSET = object()


@dataclass
class HookRun:
    """The last run of a certificate's post-renewal command."""

    command: str
    # ok | failed | timeout | refused | skipped | not taken (exited 0; a `serve` endpoint kept the old leaf)
    result: str
    returncode: int | None
    at: str
    output_tail: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: Any) -> "HookRun":
        tail = raw.get("output_tail", []) if isinstance(raw, dict) else None
        returncode = raw.get("returncode") if isinstance(raw, dict) else None
        ok = (
            isinstance(raw, dict)
            and all(isinstance(raw.get(name), str) for name in ("command", "result", "at"))
            and (returncode is None or (isinstance(returncode, int) and not isinstance(returncode, bool)))
            and isinstance(tail, list)
            and all(isinstance(line, str) for line in tail)
        )
        if not ok:
            raise StateFileDamaged(f"hook is {raw!r}, not a hook run")
        return cls(raw["command"], raw["result"], returncode, raw["at"], list(tail))


@dataclass
class CertRecord:
    last_issued: str | None = None
    last_action: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    failures: int = 0
    # the serial the files held when a deployment began (None: there was no certificate);
    # `_UNSET`: no deployment in flight
    deploying_from: Any = _UNSET
    hook_pending: bool = False
    hook_failures: int = 0
    hook: HookRun | None = None
    # the last delivery into the entry's Proxmox guest (reconciler.guestfacts)
    delivery: DeliveryRecord | None = None
    # per `serve` endpoint ("127.0.0.1:443"): what it presents ("serial", "not_after") or
    # "error" (unreachable), and "since" when a pass first saw that state
    served: dict[str, dict[str, str]] = field(default_factory=dict)
    # what was owed before a rewrite began (this pass only, never saved): None, none began
    owed_before_rewrite: bool | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------- the owed-hook rule
    @property
    def deploying(self) -> bool:
        return self.deploying_from is not _UNSET

    def begin_deploy(self, serial: str | None) -> None:
        """Saved before the first file of this certificate is replaced."""
        self.deploying_from = serial

    def settle(self, serial_now: str | None) -> None:
        """A deployment a killed pass began: owe the hook if the certificate changed since."""
        if not self.deploying:
            return
        if serial_now is not None and serial_now != self.deploying_from:
            self.owe_hook()
            self.deploying_from = _UNSET
        # unchanged: the pass died before the certificate moved; the plan redoes it, and
        # keeping the marker costs nothing (the next begin_deploy overwrites it)

    def end_deploy(self, changed: bool, has_hook: bool) -> None:
        """After the renames. A failed deployment keeps its marker: some of its files may
        have changed, and settle() finds out next pass from what is on disk."""
        if changed:
            if has_hook:
                self.owe_hook()
            self.deploying_from = _UNSET

    def begin_rewrite(self) -> None:
        """A chain or CA file rewritten under the same certificate keeps the serial, so
        settle() could not tell it changed: the hook is owed before the write."""
        self.owed_before_rewrite = self.hook_pending
        self.owe_hook()

    def cancel_rewrite(self) -> None:
        """The rewrite failed or never started: only what was owed before stays owed."""
        if self.owed_before_rewrite is not None:
            self.hook_pending = self.owed_before_rewrite
            self.owed_before_rewrite = None

    def cancel_deploy(self) -> None:
        """A deployment that never started (a stopping --watch): nothing changed."""
        self.deploying_from = _UNSET

    def owe_hook(self) -> None:
        self.hook_pending = True

    def hook_owed(self, serial_now: str | None = None, check_serial: bool = False) -> bool:
        if self.hook_pending:
            return True
        return check_serial and self.deploying and serial_now is not None and serial_now != self.deploying_from

    def hook_succeeded(self, run: HookRun) -> None:
        self.hook = run
        self.hook_pending = False

    def hook_failed(self, run: HookRun) -> None:
        self.hook = run
        self.hook_pending = True
        self.hook_failures += 1

    def hook_ran(self, run: HookRun) -> None:
        """Record a run by its result: only "ok" clears what is owed."""
        if run.result == "ok":
            self.hook_succeeded(run)
        elif run.result in ("refused", "skipped"):
            self.hook_not_run(run)
        else:
            self.hook_failed(run)

    def hook_not_run(self, run: HookRun) -> None:
        """Refused or skipped (--no-hooks): still owed, not a failure of the command."""
        self.hook = run
        self.hook_pending = True

    def nothing_to_run(self) -> None:
        """The entry has no post-renewal command (any more): nothing can be owed."""
        self.hook_pending = False

    # ------------------------------------------------------------- other facts
    def saw_served(self, served, stamp: str) -> None:
        """The latest probe of each `serve` endpoint (reconciler.endpoints.Served); "since"
        moves only when it starts presenting another leaf or becomes (un)reachable."""
        self.served = {s.connect: remembered(s, self.served.get(s.connect), stamp) for s in served}

    def succeeded(self, stamp: str, content_action: str | None) -> None:
        self.last_error = self.last_error_at = None
        self.failures = 0
        if content_action is not None:
            self.last_issued = stamp
            self.last_action = content_action

    def failed(self, error: str, stamp: str, count: bool = True) -> None:
        self.last_error, self.last_error_at = error, stamp
        if count:
            self.failures += 1

    # ------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"failures": self.failures}
        for name in ("last_issued", "last_action", "last_error", "last_error_at"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.deploying:
            out["deploying_from"] = self.deploying_from
        if self.hook_pending:
            out["hook_pending"] = True
        if self.hook_failures:
            out["hook_failures"] = self.hook_failures
        if self.hook is not None:
            out["hook"] = dict(vars(self.hook))
        if self.delivery is not None:
            out["delivery"] = self.delivery.to_json()
        if self.served:
            out["served"] = self.served
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "CertRecord":
        """Raises StateFileDamaged naming the first field of the wrong shape."""
        if not isinstance(raw, dict):
            raise StateFileDamaged(f"a record is {type(raw).__name__}, not an object")
        # a record holds a few of these: looking up each field it has, not each one it may
        # have, is most of reading a 10,000-certificate store
        for name, value in raw.items():
            check = _FIELDS.get(name)
            if check is not None and value is not None and not check[0](value):
                raise StateFileDamaged(f"{name} is {value!r}, {check[1]}")
        rec = cls(
            last_issued=raw.get("last_issued"),
            last_action=raw.get("last_action"),
            last_error=raw.get("last_error"),
            last_error_at=raw.get("last_error_at"),
            failures=raw.get("failures", 0),
            deploying_from=raw.get("deploying_from", _UNSET),
            hook_pending=raw.get("hook_pending", False),
            hook_failures=raw.get("hook_failures", 0),
        )
        if raw.get("hook") is not None:
            rec.hook = HookRun.from_json(raw["hook"])
        if raw.get("delivery") is not None:
            try:
                rec.delivery = DeliveryRecord.from_json(raw["delivery"])
            except ValueError as exc:
                raise StateFileDamaged(str(exc)) from None
        if "served" in raw:
            rec.served = raw["served"]
        return rec


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_served(value: Any) -> bool:
    """{"127.0.0.1:443": {"serial": ..., "not_after": ..., "since": ...}, ...} (or "error")."""
    return isinstance(value, dict) and all(
        isinstance(state, dict)
        and isinstance(state.get("since"), str)
        and all(isinstance(v, str) for v in state.values())
        for state in value.values()
    )


# the plain fields of a record: (valid(value), what a wrong one is not); None is always valid
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "last_issued": (_is_text, "not text"),
    "last_action": (_is_text, "not text"),
    "last_error": (_is_text, "not text"),
    "last_error_at": (_is_text, "not text"),
    "failures": (_is_count, "not a count"),
    "hook_failures": (_is_count, "not a count"),
    "deploying_from": (_is_text, "not a serial"),
    "hook_pending": (lambda v: isinstance(v, bool), "not true or false"),
    "served": (_is_served, "not endpoint states"),
}


class StatusStore:
    """`repair`: a damaged file is renamed aside (passes that may write); read-only users
    (`--plan`, `status`) only warn and read around it."""

    def __init__(self, state_dir: Path, repair: bool = True):
        self.path = state_dir / "status.json"
        self.records: dict[str, CertRecord] = {}
        self.manifest: dict[str, Any] = {}
        self.warning: str | None = None
        self._saved: bytes | None = None
        found = read_state_file(
            self.path,
            self._parse,
            "status store",
            repair=repair,
            consequence="starting afresh from what is on disk; every post-renewal command runs once more to be safe",
        )
        self.warning = found.warning
        # the whole store is gone (not merely absent): it cannot vouch that no hook was owed
        self.past_lost = found.value is None and found.warning is not None
        if found.value is not None:
            self.records, self.manifest, damaged = found.value
            if damaged:
                self._saved = None  # rewrite it whole
            else:
                self._saved = found.raw  # save() compares against it: an unchanged store is not rewritten

    def _parse(self, data: bytes):
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise StateFileDamaged(f"not a version {VERSION} status file")
        certs = raw.get("certificates")
        if not isinstance(certs, dict):
            raise StateFileDamaged("'certificates' is not an object")
        manifest = raw.get("manifest", {})
        if not isinstance(manifest, dict):
            raise StateFileDamaged(f"'manifest' is {manifest!r}, not an object")
        records: dict[str, CertRecord] = {}
        damaged: list[str] = []
        for name, entry in certs.items():
            try:
                records[name] = CertRecord.from_json(entry)
            except StateFileDamaged as exc:
                # what this certificate owed is unknown: owe its hook (once more is harmless)
                damaged.append(f"{name}: {exc}")
                records[name] = CertRecord(hook_pending=True)
        if damaged:
            raise StateFileDamaged(
                "damaged records (" + "; ".join(damaged) + "); their post-renewal commands run once more to be safe",
                salvaged=(records, manifest, True),
            )
        return records, manifest, False

    def cert(self, name: str) -> CertRecord:
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = CertRecord()
        return rec

    def get(self, name: str) -> CertRecord:
        return self.records.get(name) or CertRecord()

    def settle(self, serials: dict[str, str | None]) -> None:
        """Turn the deployments a killed pass began into owed hooks, from what is on disk now."""
        for name, rec in self.records.items():
            if name in serials:
                rec.settle(serials[name])

    def nothing_to_run(self, names: set[str]) -> None:
        """These entries have no post-renewal command (any more): none of them owes one."""
        for name in names & self.records.keys():
            self.records[name].nothing_to_run()

    def hooks_pending(self, serials: dict[str, str | None] | None = None) -> frozenset[str]:
        """Certificates whose post-renewal command is owed.

        `serials` (name → serial on disk now) catches a pass killed after writing a
        certificate but before recording it: the record still says "deploying from
        serial X", and the disk no longer holds X, so the content changed.

        After the whole store was lost, every certificate on disk owes its hook once: a
        reload run once more is harmless, one forgotten is not."""
        if self.past_lost and serials:
            for name, serial in serials.items():
                if serial is not None and name not in self.records:
                    self.records[name] = CertRecord(hook_pending=True)
        return frozenset(
            name
            for name, rec in self.records.items()
            if rec.hook_owed(
                serials.get(name) if serials else None, check_serial=serials is not None and name in serials
            )
        )

    def forget_except(self, names: set[str]) -> None:
        for name in list(self.records):
            if name not in names:
                del self.records[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "certificates": {n: r.to_json() for n, r in self.records.items()},
            "manifest": self.manifest,
        }

    def save(self) -> None:
        """Write the store if anything in it changed: a pass with nothing to do writes nothing."""
        payload = _encode(self.to_json())
        if payload == self._saved:
            return
        fault_point("before_status")
        try:
            write_atomic(self.path, payload, mode=0o600, make_parents=True)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StatusError(
                f"cannot write the status store {self.path}: {exc.strerror or exc}"
                + ("; the filesystem is full" if full else "")
                + ". The pass stopped there: certificates and keys already in place stay as they are "
                "(old or complete new), nothing is half-written, and the next pass re-reads them from disk. "
                + ("Free space in the state folder and run again" if full else "Check --state-dir and run again")
            ) from None
        self._saved = payload
        fault_point("after_status")


def _encode(data: dict) -> bytes:
    # sorted keys so equal content is equal bytes; no indent, so Python's C encoder runs
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def read_only(state_dir: Path) -> StatusStore:
    """For --plan and status: the same store, never saved, a damaged file left where it is."""
    return StatusStore(state_dir, repair=False)
