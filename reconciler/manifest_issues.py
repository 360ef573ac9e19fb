"""What a manifest that does not load says: one Issue per problem, with its JSON path, all at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ReconcilerError


@dataclass(frozen=True)
class Issue:
    """One validation error: where (a JSON path) and what is wrong, with the fix."""

    path: str
    message: str

    def __str__(self) -> str:
        # a hostile manifest's 10 MB key or value must not come back as a 10 MB message
        path, message = _clip(self.path, 200), _clip(self.message, 2000)
        return f"{path}: {message}" if path else message


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class ManifestError(ReconcilerError):
    def __init__(self, manifest: Path, issues: list[Issue]):
        self.manifest = manifest
        self.issues = issues
        super().__init__(f"{manifest}: {len(issues)} error(s); first: {issues[0]}")

    def explain(self) -> str:
        """Every error, each with its JSON path, under one line saying nothing was changed."""
        n = len(self.issues)
        head = f"{self.manifest} is invalid ({n} error{'s' if n != 1 else ''}); nothing was changed:"
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


def json_type(value: object) -> str:
    """How an error names the JSON type of a value it did not expect."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
