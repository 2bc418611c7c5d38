"""The one exception type users see.

Errors a user can cause (a bad file, a wrong shape, an impossible budget) raise
:class:`EdgekilnError` with a one-line message that names the problem. The CLI prints the
message and exits non-zero; only ``--debug`` shows a traceback.
"""

from __future__ import annotations


class EdgekilnError(Exception):
    """A user-facing failure: the message is one line and names the file or value at fault.

    ``exit_code`` lets callers distinguish "bad input" (2) from "a budget cannot be met" (3) and
    "a server cannot be reached" (4, worth retrying later).
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class BudgetNotMet(EdgekilnError):
    """A constraint (accuracy drop, RAM, flash, latency) cannot be satisfied."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


class ServerUnreachable(EdgekilnError):
    """The update server could not be reached (refused, timed out, cut): retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=4)
