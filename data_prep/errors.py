"""What a prep raises when it cannot go on: the message says what was expected where, and what to do.

Library code raises these and never calls ``sys.exit`` (a test or a caller that imports a prep must get an
exception, not a dead process); each module's ``main()`` turns them into a message and a non-zero exit code
(:func:`data_prep.pipeline.cli`).
"""

from __future__ import annotations


class PrepError(Exception):
    """A prep that cannot run, or that found or cached nothing usable (exit code 1)."""

    exit_code = 1


class UsageError(PrepError):
    """A command line that cannot be understood: an unknown or mistyped option, a missing required one (exit
    code 2; ``--help`` exits 0)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
