"""The one exception type for mistakes a user can fix.

A :class:`UserError` carries a one-line message that names the option, row or
field at fault and says what to do. The magics print it without a traceback;
plain Python callers get an ordinary exception with the same text.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input, with a one-line message that says how to fix it."""

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None):
        super().__init__(message)
        self.field = field
        self.line = line

    def __str__(self) -> str:
        return self.args[0]
