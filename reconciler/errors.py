"""The one base of every error an operator can act on.

`message` says what failed and where; `hint` says what to do about it. `cli.main` catches
this base once and prints `error: <explain()>`, exit 1, so a new error class needs no new
`except` clause anywhere. Errors that are not a `ReconcilerError` are bugs and keep their
traceback.
"""

from __future__ import annotations


class ReconcilerError(Exception):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:  # one line: what goes into logs and per-certificate failures
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def explain(self) -> str:
        """What the CLI prints after `error: `; subclasses with several findings (every
        manifest error, every issuer setting) list them on indented lines below."""
        return str(self)
