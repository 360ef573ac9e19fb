"""Turning plans and results into text for people and JSON for tools. Pure: returns strings."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Iterator

from reconciler.defaults import colour_allowed
from reconciler.plan import Plan

if TYPE_CHECKING:  # pragma: no cover
    from reconciler.apply import Result

FORMAT_VERSION = 1
SYMBOLS = {
    "issue": "+",
    "reissue": "-/+",
    "renew": "~",
    "rewrite_chain": "~",
    "write_ca": "+",
    "chown": "~",
    "chmod": "~",
    "run_hook": "!",
    "deliver": ">",
    "reload": "!",
}
# how an action reads in the text plan: (the column, the summary's "N to ...")
WORDS = {"rewrite_chain": ("rewrite chain", "rewrite the chain"), "write_ca": ("write CA file", "write the CA file")}
COLOURS = {">": "36", "+": "32", "-/+": "33", "~": "33", "!": "35", "x": "31"}
# what was done, for "N of M <done>" after a pass (run_hook counts certificates)
DONE = {
    "issue": "issued",
    "reissue": "reissued",
    "renew": "renewed",
    "chown": "chowned",
    "chmod": "chmodded",
    "rewrite_chain": ("chain rewritten", "chains rewritten"),
    "write_ca": ("CA file written", "CA files written"),
    "deliver": "delivered to guests",
    "reload": ("reloaded in its guest", "reloaded in their guests"),
}


def plural(n: int, noun: str, many: str | None = None) -> str:
    """ "1 certificate", "2 certificates"; `many` for nouns that do not just take an s."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def use_colour(stream=sys.stdout) -> bool:
    return stream.isatty() and colour_allowed()


def plan_json(plan: Plan, issuer: dict | None = None) -> dict:
    """`issuer`: IssuerSpec.summary(); `notes`: what the plan could not check."""
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
        **({"issuer": issuer} if issuer is not None else {}),
        "notes": list(plan.notes),
    }


def paint(colour: bool, symbol: str, text: str) -> str:
    return f"\033[{COLOURS.get(symbol, '0')}m{text}\033[0m" if colour else text


def _head(plan: Plan, issuer: str | None) -> str:
    """The issuer's one-line description first, then what the plan could not check."""
    return (f"issuer: {issuer}\n" if issuer else "") + "".join(f"note: {n}\n" for n in plan.notes)


def plan_text(plan: Plan, colour: bool = False, issuer: str | None = None) -> str:
    return _head(plan, issuer) + _plan_body(plan, colour)


def _plan_body(plan: Plan, colour: bool) -> str:
    total = len(plan.certificates)
    changed = [p for p in plan.certificates if p.actions]
    errors = plan.errors
    if not changed and not errors:
        return f"No changes: {plural(total, 'certificate')} {'matches' if total == 1 else 'match'} the manifest.\n"
    counts: dict[str, int] = {}
    for p in changed:
        for a in p.actions:
            counts[a.action] = counts.get(a.action, 0) + 1
    summary = ", ".join(f"{n} to {WORDS[a][1] if a in WORDS else a.replace('_', ' ')}" for a, n in counts.items())
    if errors:
        summary = ", ".join(x for x in (summary, f"{len(errors)} cannot be managed") if x)
    lines = [f"Plan: {summary} ({total - len(changed) - len(errors)} of {total} unchanged)."]
    width = max((len(p.cert.name) for p in changed + list(errors)), default=0)
    for p in changed:
        for a in p.actions:
            sym = SYMBOLS[a.action]
            lines.append(paint(colour, sym, f"  {sym:>3} {p.cert.name:<{width}}  {_column(a.action):<8} {a.reason}"))
    lines += _error_lines(plan, colour, width)
    if plan.hooks:
        lines.append("Hooks that would run:")
        lines += [f"  {h.command}   (for {', '.join(h.certificates)})" for h in plan.hooks]
    return "\n".join(lines) + "\n"


def _column(action: str) -> str:
    """How an action reads in a plan's or a result's action column."""
    return WORDS[action][0] if action in WORDS else action


def _error_lines(plan: Plan, colour: bool, width: int) -> list[str]:
    """The certificates that cannot be managed, with why."""
    return [paint(colour, "x", f"  {'x':>3} {p.cert.name:<{width}}  {'error':<8} {p.error}") for p in plan.errors]


def result_text(plan: Plan, result: "Result", colour: bool = False, issuer: str | None = None) -> str:
    """After a pass: what was done, counted against what was planned, and only the hooks
    that ran (those held back are listed apart, with why). `issuer`: as for plan_text."""
    return _head(plan, issuer) + _result_body(plan, result, colour)


def _result_body(plan: Plan, result: "Result", colour: bool) -> str:
    if not plan.changes and not plan.errors:
        return _plan_body(plan, colour)
    total = len(plan.certificates)
    changed = [p for p in plan.certificates if p.actions and not p.error]
    counts, rows = _result_rows(changed, result)
    parts = [_done_count(action, *n) for action, n in counts.items()]
    if plan.errors:
        parts.append(f"{len(plan.errors)} cannot be managed")
    lines = [f"Applied: {'; '.join(parts)} ({total - len(changed) - len(plan.errors)} of {total} unchanged)."]
    width = max((len(p.cert.name) for p in changed + list(plan.errors)), default=0)
    lines += [paint(colour, sym, f"  {sym:>3} {name:<{width}}  {rest}") for sym, name, rest in rows]
    lines += _error_lines(plan, colour, width)
    ran = [h for h in result.hooks if not h.refused]
    if ran:
        lines.append("Hooks run:")
        lines += [f"  {h.command}   (for {', '.join(h.certificates)}): {h.describe()}" for h in ran]
    held = held_back(plan, result)
    if held:
        lines.append("Hooks held back:")
        lines += [f"  {command}   (for {', '.join(names)}): {reason}" for command, names, reason in held]
    return "\n".join(lines) + "\n"


def _result_rows(changed: list, result: "Result") -> tuple[dict[str, list[int]], list[tuple[str, str, str]]]:
    """Per action [planned, done, failed], and one (symbol, name, text) row per action."""
    outcomes = {c.name: c for c in result.certificates}
    hook_ok = {n: h.ok for h in result.hooks if not h.refused for n in h.certificates}
    guests = {d.name: d for d in result.deliveries}
    counts: dict[str, list[int]] = {}
    rows: list[tuple[str, str, str]] = []
    for p in changed:
        for a in p.actions:
            if a.action in ("deliver", "reload"):
                done, failed, note = _delivery_done(a.action, guests.get(p.cert.name))
            else:
                done, failed, note = _action_done(a.action, outcomes.get(p.cert.name), hook_ok.get(p.cert.name))
            n = counts.setdefault(a.action, [0, 0, 0])
            n[0], n[1], n[2] = n[0] + 1, n[1] + done, n[2] + failed
            rows.append((SYMBOLS[a.action] if done else "x", p.cert.name, f"{_column(a.action):<8} {a.reason}{note}"))
    return counts, rows


def _action_done(action: str, res, hook_ok: bool | None) -> tuple[bool, bool, str]:
    """(done, failed, a note for the row) for one planned action of a certificate whose
    result is `res` (None: not started) and whose hook ran with `hook_ok`."""
    if res is None:
        return False, False, " (not started)"
    if action == "run_hook":
        return hook_ok is True, hook_ok is not True, "" if hook_ok is True else " (the hook did not succeed)"
    return res.ok, not res.ok, "" if res.ok else " (failed)"


def _delivery_done(action: str, outcome) -> tuple[bool, bool, str]:
    """(done, failed, note) of a delivery into a Proxmox guest or the reload there: a guest
    that is not running owes it (not a failure)."""
    if outcome is None:
        return False, False, " (not started)"
    if outcome.owed:
        return False, False, f" (owed: {outcome.owed})"
    if not outcome.ok:
        return False, True, f" (failed: {outcome.error})"
    done = outcome.delivered if action == "deliver" else outcome.reloaded
    return done, False, ""


def _done_count(action: str, planned: int, done: int, failed: int) -> str:
    """ "2 of 3 renewed, 1 failed": the noun agrees with the number planned."""
    words = DONE.get(action) or ("hook retried", "hooks retried")
    if isinstance(words, tuple):
        words = words[planned != 1]
    return f"{done} of {planned} {words}" + (f", {failed} failed" if failed else "")


def held_back(plan: Plan, result: "Result") -> list[tuple[str, tuple[str, ...], str]]:
    """The planned hooks that did not run, per command: (command, certificates, why)."""
    outcomes = {c.name: c for c in result.certificates}
    accounted = {(h.command, n) for h in result.hooks for n in h.certificates}
    held = [(h.command, h.certificates, h.refused) for h in result.hooks if h.refused]
    for hook in plan.hooks:
        waiting = tuple(n for n in hook.certificates if (hook.command, n) not in accounted)
        failed = tuple(n for n in waiting if outcomes.get(n) is not None and not outcomes[n].ok)
        if failed:
            held.append(
                (hook.command, failed, "its certificate failed" if len(failed) == 1 else "their certificates failed")
            )
        rest = tuple(n for n in waiting if n not in failed)
        if rest:
            held.append((hook.command, rest, "not run in this pass; it runs on the next one"))
    return held


def failure_headline(plan: Plan, result: "Result") -> str:
    """ "3 of 3 certificates failed", "1 hook failed", or both, for the error line on stderr."""
    attempted = [p for p in plan.certificates if p.actions or p.error]
    certs = sum(1 for c in result.certificates if not c.ok)
    hooks = sum(1 for h in result.hooks if not h.ok)
    parts = []
    if certs:
        parts.append(f"{certs} of {plural(len(attempted), 'certificate')}")
    if hooks:
        parts.append(plural(hooks, "hook"))
    return " and ".join(parts) + " failed"


# items of a top-level list encoded at a time: a few hundred kB per piece
_CHUNK = 1000


def json_pieces(data: dict) -> Iterator[str]:
    """`data` as one line of JSON (and a newline), in pieces to write one after the other: a
    50,000-certificate plan as one string would be 13 MB more at the peak of a --plan. One
    line: Python's C encoder only runs without indent, and 10k certificates matter."""
    encode = json.JSONEncoder(separators=(",", ":")).encode
    yield "{"
    for i, (key, value) in enumerate(data.items()):
        yield ("," if i else "") + encode(key) + ":"
        if isinstance(value, list):
            yield "["
            for start in range(0, len(value), _CHUNK):
                yield ("," if start else "") + encode(value[start : start + _CHUNK])[1:-1]
            yield "]"
        else:
            yield encode(value)
    yield "}\n"
