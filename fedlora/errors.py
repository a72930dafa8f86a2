"""The one exception type that reaches the user as a message instead of a traceback."""


class FedloraError(Exception):
    """A problem the user can fix: the message says what is wrong and what to change."""

    exit_code = 2
