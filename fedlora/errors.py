"""The one exception type that reaches the user as a message instead of a traceback."""

from typing import TypeVar

E = TypeVar("E", bound=Exception)


class FedloraError(Exception):
    """A problem the user can fix: the message says what is wrong and what to change."""

    exit_code = 2


def told_the_server(exc: E, local_detail: str) -> E:
    """`exc`, whose text a site daemon relays to the server, with the detail only the site's
    log gets (fedlora.deploy.executor): what the site's data or update looks like."""
    exc.local_detail = local_detail  # type: ignore[attr-defined]
    return exc
