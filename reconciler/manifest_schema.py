"""The JSON Schema check of a manifest: the schema shipped in the package (reconciler/schema/),
a fast gate that passes what is valid, and for what it does not pass, every error in words.

Two implementations of one schema, on purpose: jsonschema-rs answers "valid?" in about a
microsecond an entry, so a 10,000-entry manifest costs ~10 ms instead of seconds; only what
it does not pass goes to the Python jsonschema, whose errors carry the paths and schema
parts every message here is made from. The Python one stays the authority: the gate only
ever skips work for what it passes, and it never passes a float (see `_has_float`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from functools import lru_cache
from importlib.resources import files
from typing import Any, Callable

try:
    import jsonschema_rs
except ImportError:  # an install that predates the dependency: every entry goes to jsonschema (slow, same answers)
    jsonschema_rs = None  # type: ignore[assignment]

from reconciler.manifest_issues import Issue, json_type

SCHEMA_RESOURCE = "schema/certificate-manifest.schema.json"  # package data: found wherever the package is installed


@lru_cache(maxsize=1)
def schema_bytes() -> bytes:
    """The installed schema, byte for byte (`reconcile schema` prints it)."""
    return files("reconciler").joinpath(SCHEMA_RESOURCE).read_bytes()


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(schema_bytes())


@lru_cache(maxsize=1)
def schema_digest() -> str:
    return hashlib.sha256(schema_bytes()).hexdigest()[:16]


def schema_issues(definition: str, instance: Any, prefix: str) -> list[Issue]:
    """Every schema error of `instance` against the schema's $defs/`definition`, as Issues
    whose paths start at `prefix`; [] when it is valid."""
    if _gate(definition, instance):
        return []
    validator = _explainer(definition)
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return [issue for error in errors for issue in _explain(error, prefix)]


def _sub_schema(definition: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{definition}", "$defs": _schema()["$defs"]}


@lru_cache(maxsize=None)
def _gate_for(definition: str) -> Any:
    return jsonschema_rs.Draft202012Validator(_sub_schema(definition))


def _gate(definition: str, instance: Any) -> bool:
    """True only when `instance` is certainly valid. A float never passes: the schema counts
    101.0 as an integer, this manifest does not (see _explainer)."""
    if jsonschema_rs is None or _has_float(instance):
        return False
    try:
        return _gate_for(definition).is_valid(instance)
    except Exception:  # whatever the Rust side cannot take (a type it does not map): ask the authority
        return False


def _has_float(value: Any) -> bool:
    # a loop, not recursion: a hostile manifest nests as deep as the JSON reader allows
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


@lru_cache(maxsize=None)
def _explainer(definition: str):
    """A Draft 2020-12 validator for one of the schema's $defs, built once.

    The schema uses no `format` keyword on purpose: SANs, durations and modes are checked by
    patterns and by our own SAN normaliser, so no FormatChecker (and none of the slow
    grammar-compiling format packages) is needed."""
    # imported here: ~60 ms of imports (referencing, rpds, attrs) that a valid manifest never needs
    from jsonschema import Draft202012Validator
    from jsonschema.validators import extend

    # JSON Schema counts 101.0 and 1e3 as integers; a guest id or key size written that
    # way is a slip (or a spreadsheet's export), so only numbers written as digits count
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return extend(Draft202012Validator, type_checker=checker)(_sub_schema(definition))


# --------------------------------------------------------------------------- errors in words


def json_path(prefix: str, parts) -> str:
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _explain(error, prefix: str) -> list[Issue]:
    path = json_path(prefix, error.absolute_path)
    explain = _EXPLAIN.get(error.validator, _as_jsonschema_says)
    return explain(error, path)


def _unknown_fields(error, path: str) -> list[Issue]:
    allowed = sorted(error.schema.get("properties", {}))
    out = []
    for key in sorted(set(error.instance) - set(allowed)):
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f'did you mean "{close[0]}"?' if close else f"known fields: {', '.join(allowed)}"
        out.append(Issue(json_path(path, [key]), f"unknown field; {hint}"))
    return out


def _required(error, path: str) -> list[Issue]:
    missing = error.message.split("'")[1] if "'" in error.message else error.message
    return [Issue(path, f'"{missing}" is required')]


def _pattern(error, path: str) -> list[Issue]:
    desc = error.schema.get("description", f"must match {error.schema['pattern']}")
    return [Issue(path, f"{json.dumps(error.instance)[:80]} is not valid: {desc}")]


def _enum(error, path: str) -> list[Issue]:
    choices = ", ".join(json.dumps(c) for c in error.validator_value)
    return [Issue(path, f"{json.dumps(error.instance)[:80]} is not allowed; choose one of {choices}")]


def _type(error, path: str) -> list[Issue]:
    want, value = error.validator_value, error.instance
    if isinstance(value, float) and "integer" in want:
        return [Issue(path, _not_whole(value, want))]
    want = " or ".join(want) if isinstance(want, list) else want
    return [Issue(path, f"expected {_article(want)}, got {json_type(value)}")]


def _not(error, path: str) -> list[Issue]:
    if isinstance(error.schema, dict) and "description" in error.schema:
        # $defs/forbidden: a field that does not belong to this issuer type
        return [Issue(path, error.schema["description"])]
    return _key_fields(error, path)


def _key_fields(error, path: str) -> list[Issue]:
    return [Issue(path, "combines key fields that do not belong together (curve is for EC, size for RSA)")]


def _length(error, path: str) -> list[Issue]:
    return [Issue(path, "is empty" if error.validator == "minLength" else "is too long")]


def _as_jsonschema_says(error, path: str) -> list[Issue]:
    return [Issue(path, error.message[:200])]


_EXPLAIN: dict[str, Callable[[Any, str], list[Issue]]] = {
    "additionalProperties": _unknown_fields,
    "required": _required,
    "pattern": _pattern,
    "enum": _enum,
    "type": _type,
    "not": _not,
    "if": _key_fields,
    "minLength": _length,
    "maxLength": _length,
}


def _not_whole(value: float, want) -> str:
    written = getattr(value, "text", repr(value))
    message = f"{written} is written with a fraction or exponent; write a whole number as plain digits"
    if value == value and abs(value) != float("inf") and value == int(value) and value >= 0:
        example = int(value)
        message += f", e.g. {example}" + (f' (or the string "{example}")' if "string" in want else "")
    return message


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word
