"""`reconcile status`: one row per certificate, from a read-only snapshot and the status store."""

from __future__ import annotations

from datetime import datetime, timezone

from reconciler.desired import load_or_last_valid
from reconciler.durations import format_duration
from reconciler.outcome import READY, PassOutcome
from reconciler.passes import assess, snapshot
from reconciler.status import read_only


def _desired(settings):
    """The manifest as it is, or, when it is invalid, the last valid one `--watch` kept;
    with why it is invalid, and the status store."""
    store = read_only(settings.state_dir)
    desired, invalid = load_or_last_valid(settings)
    if invalid is None:
        return desired, None, store
    since = store.manifest.get("invalid_since") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    return desired, f"manifest invalid since {since}: {invalid.issues[0]}", store


def status_outcome(settings, now: datetime | None = None) -> tuple[PassOutcome | None, str | None, dict | None]:
    """(each certificate as it is, why the manifest is invalid or None, the issuer's summary
    or None). Reads only: the read-only snapshot and the status store."""
    now = now or datetime.now(timezone.utc)
    desired, note, store = _desired(settings)
    if desired is None:
        return None, note, None
    outcome = assess(snapshot(settings, desired, store, now), store, now)
    return outcome, note, desired.issuer.summary(settings.state_dir)


def status_rows(outcome: PassOutcome | None) -> list[dict]:
    """`reconcile status --output json`'s certificates: the outcome, as the contract spells it."""
    if outcome is None:
        return []
    now = datetime.fromtimestamp(outcome.finished_at, timezone.utc)
    return [
        {
            "name": c.name,
            "state": c.state,
            "cert_path": c.cert_path,
            "not_after": c.not_after.isoformat() if c.not_after else None,
            "expires_in": format_duration(c.not_after - now) if c.not_after else None,
            "renewal_due_at": c.renewal_at.isoformat() if c.renewal_at else None,
            "sans": list(c.sans),
            "owner_ok": c.owner_ok,
            "mode_ok": c.mode_ok,
            "last_issued": c.last_issued,
            "last_hook": c.last_hook,
            "last_hook_at": c.last_hook_at,
            "hook_owed": c.hook_owed,
            "problem": c.problem,
            "served": [_endpoint_row(e) for e in c.served],
            "guest": c.guest,
        }
        for c in outcome.certificates
    ]


def _endpoint_row(e) -> dict:
    s = e.served
    return {
        "connect": s.connect,
        "state": e.state,
        "serial": s.serial,
        "not_after": s.not_after.isoformat() if s.not_after else None,
        "sans": list(s.sans),
        "error": s.error,
        "since": e.since,
    }


def status_json(outcome: PassOutcome | None, note: str | None, issuer: dict | None = None) -> dict:
    return {
        "format_version": 1,
        **({"issuer": issuer} if issuer else {}),
        "manifest_valid": note is None,
        "manifest_problem": note,
        "certificates": status_rows(outcome),
    }


def status_text(outcome: PassOutcome | None, note: str | None, issuer: dict | None = None) -> str:
    rows = status_rows(outcome)
    lines = [f"issuer: {issuer['description']}"] if issuer else []
    if note:
        lines.append(note)
    header = ("NAME", "STATE", "EXPIRES", "IN", "OWNER/MODE", "LAST ISSUED", "LAST HOOK", "SANS")
    table = [header]
    for r in rows:
        table.append(
            (
                r["name"],
                r["state"],
                (r["not_after"] or "-")[:19].replace("T", " "),
                r["expires_in"] or "-",
                "ok" if r["owner_ok"] and r["mode_ok"] else ("owner differs" if not r["owner_ok"] else "mode differs"),
                (r["last_issued"] or "-")[:19].replace("T", " "),
                r["last_hook"] or "-",
                ",".join(r["sans"]),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1])
    for r in rows:
        if r["state"] != READY and r["problem"]:
            lines.append(f"{r['name']}: {r['problem']}")
    lines += [_endpoint_line(r["name"], e) for r in rows for e in r["served"]]
    return "\n".join(lines) + "\n"


def _endpoint_line(name: str, e: dict) -> str:
    """web at 127.0.0.1:443: current, serial 4f…, expires 2026-12-01 10:00 (since ...)."""

    def when(iso: str) -> str:
        return iso[:16].replace("T", " ")

    if e["error"]:
        what = f"unreachable: {e['error']}"
    else:
        what = f"{e['state']}, serial {e['serial']}, expires {when(e['not_after'])}"
    return f"{name} at {e['connect']}: {what} (since {when(e['since'])})"
