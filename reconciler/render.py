"""Turning plans and results into text for people and JSON for tools. Pure: returns strings."""

from __future__ import annotations

import json
import os
import sys

from reconciler.plan import Plan

FORMAT_VERSION = 1
SYMBOLS = {"issue": "+", "reissue": "-/+", "renew": "~", "chown": "~", "chmod": "~", "run_hook": "!"}
COLOURS = {"+": "32", "-/+": "33", "~": "33", "!": "35", "x": "31"}


def use_colour(stream=sys.stdout) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def plan_json(plan: Plan) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "changes": plan.changes,
        "certificates": [
            {
                "name": p.cert.name,
                "cert_path": str(p.cert.cert_path),
                "key_path": str(p.cert.key_path),
                "actions": [
                    {
                        "action": a.action,
                        "reason": a.reason,
                        "drift": [{"field": d.field, "observed": d.observed, "desired": d.desired} for d in a.drifts],
                    }
                    for a in p.actions
                ],
                **({"error": p.error} if p.error else {}),
            }
            for p in plan.certificates
        ],
        "hooks": [{"command": h.command, "certificates": list(h.certificates)} for h in plan.hooks],
    }


def plan_text(plan: Plan, colour: bool = False) -> str:
    def paint(symbol: str, text: str) -> str:
        return f"\033[{COLOURS.get(symbol, '0')}m{text}\033[0m" if colour else text

    total = len(plan.certificates)
    changed = [p for p in plan.certificates if p.actions]
    errors = plan.errors
    lines: list[str] = []
    counts: dict[str, int] = {}
    for p in changed:
        for a in p.actions:
            counts[a.action] = counts.get(a.action, 0) + 1
    if not changed and not errors:
        return f"No changes: {total} certificate{'s' if total != 1 else ''} match the manifest.\n"
    summary = ", ".join(f"{n} to {a.replace('_', ' ')}" for a, n in counts.items())
    if errors:
        summary = ", ".join(x for x in (summary, f"{len(errors)} cannot be managed") if x)
    lines.append(f"Plan: {summary} ({total - len(changed) - len(errors)} of {total} unchanged).")
    width = max((len(p.cert.name) for p in changed + list(errors)), default=0)
    for p in changed:
        for a in p.actions:
            sym = SYMBOLS[a.action]
            lines.append(paint(sym, f"  {sym:>3} {p.cert.name:<{width}}  {a.action:<8} {a.reason}"))
    for p in errors:
        lines.append(paint("x", f"  {'x':>3} {p.cert.name:<{width}}  {'error':<8} {p.error}"))
    if plan.hooks:
        lines.append("Hooks that would run:")
        for h in plan.hooks:
            lines.append(f"  {h.command}   (for {', '.join(h.certificates)})")
    return "\n".join(lines) + "\n"


def dumps(data) -> str:
    # one line: Python's C encoder only runs without indent, and 10k certificates matter
    return json.dumps(data, separators=(",", ":")) + "\n"
