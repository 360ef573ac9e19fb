"""`reconcile status`: one row per certificate, from a read-only snapshot and the status store."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from reconciler.diff import CHMOD, CHOWN, RENEW, REWRITE_CHAIN, RUN_HOOK, WRITE_CA, renewal_due_at
from reconciler.durations import format_duration
from reconciler.sans import ordered

LAST_VALID = "last-valid-manifest.json"


def _desired(settings):
    """The manifest as it is, or, when it is invalid, the last valid one `--watch` kept."""
    from reconciler.manifest import ManifestError, build, parse_document
    from reconciler.passes import load_desired, resolve_issuer
    from reconciler.status import read_only

    store = read_only(settings.state_dir)
    try:
        return load_desired(settings), None, store
    except ManifestError as exc:
        since = store.manifest.get("invalid_since") or datetime.now(timezone.utc).isoformat(timespec="seconds")
        note = f"manifest invalid since {since}: {exc.issues[0]}"
        kept = settings.state_dir / LAST_VALID
        try:
            desired = build(parse_document(kept.read_bytes(), kept), Path(settings.manifest).resolve())
            from dataclasses import replace

            return replace(desired, issuer=resolve_issuer(desired, settings.issuer_options)), note, store
        except (OSError, ManifestError):
            return None, note, store


def status_rows(settings, now: datetime | None = None) -> tuple[list[dict], str | None, dict | None]:
    """(rows, why the manifest is invalid or None, the issuer's summary or None)."""
    from reconciler.passes import snapshot

    now = now or datetime.now(timezone.utc)
    desired, note, store = _desired(settings)
    if desired is None:
        return [], note, None
    snap = snapshot(settings, desired, store, now)
    owed = store.hooks_pending({n: (o.cert.serial if o.cert else None) for n, o in snap.observed.items()})
    rows = []
    for p in snap.plan.certificates:
        c, o = p.cert, snap.observed[p.cert.name]
        record = store.get(c.name)
        actions = {a.action for a in p.actions}
        facts = o.cert
        if p.error or record.last_error:
            state = "error"
        elif not o.cert_file.present or not o.key_file.present:
            state = "missing"
        elif RUN_HOOK in actions or record.hook_pending:
            state = "hook pending"
        elif facts is not None and now >= facts.not_after:
            state = "expired"
        elif RENEW in actions:
            state = "renewal due"
        elif p.content_action is not None:
            state = "error"  # present but wrong: unparsable, mismatched, other identity
        elif actions & {CHOWN, CHMOD, REWRITE_CHAIN, WRITE_CA}:
            # the right certificate, but not the owner, mode, chain or CA file asked for:
            # a service reading the file (or the CA file) does not see what the manifest says
            state = "repair due"
        else:
            state = "ready"
        rows.append(
            {
                "name": c.name,
                "state": state,
                "cert_path": str(c.cert_path),
                "not_after": facts.not_after.isoformat() if facts else None,
                "expires_in": format_duration(facts.not_after - now) if facts else None,
                "renewal_due_at": renewal_due_at(c, facts.not_before, facts.not_after).isoformat() if facts else None,
                "sans": list(ordered(c.sans)),
                "owner_ok": CHOWN not in actions,
                "mode_ok": CHMOD not in actions,
                "last_issued": record.last_issued,
                "last_hook": record.hook.result if record.hook else None,
                "last_hook_at": record.hook.at if record.hook else None,
                "hook_owed": c.name in owed,
                "problem": p.error or record.last_error or (p.actions[0].reason if p.actions else None),
            }
        )
    return rows, note, desired.issuer.summary(settings.state_dir)


# a certificate in these states serves and needs nothing from an operator: `status` exits 0.
# "renewal due" is still valid, and a renewal that fails turns it into "error".
READY_STATES = ("ready", "renewal due")


def all_ready(rows: list[dict], note: str | None) -> bool:
    return note is None and all(r["state"] in READY_STATES for r in rows)


def status_json(rows: list[dict], note: str | None, issuer: dict | None = None) -> dict:
    return {
        "format_version": 1, **({"issuer": issuer} if issuer else {}),
        "manifest_valid": note is None, "manifest_problem": note, "certificates": rows,
    }


def status_text(rows: list[dict], note: str | None, issuer: dict | None = None) -> str:
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
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
    for r in rows:
        if r["state"] not in ("ready",) and r["problem"]:
            lines.append(f"{r['name']}: {r['problem']}")
    return "\n".join(lines) + "\n"
