"""The one exception type of the runtime package boundary.

Anything a user can cause (a bad bundle, a bad flag, a bad request) raises EdgepackError with a
message that names what was wrong; the CLI prints it as one line and exits non-zero.
"""


class EdgepackError(Exception):
    """A user-facing failure with a one-line message."""


class ContextOverflow(EdgepackError):
    """A prompt and its max_tokens do not fit a model's context."""
