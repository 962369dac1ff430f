"""User-facing errors.

A :class:`UserError` is bad input that the user can fix: the CLI prints its message on one
line (no traceback) and exits with status 2. Its message names the problem and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit status 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if not fix else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))
