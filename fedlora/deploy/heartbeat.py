"""Keeping a claimed task alive: a heartbeat every few seconds, on a client of its own.

The SuperLink (the server's own task) and the SuperNode (a site's task) drop a claimed task
whose last heartbeat is older than `TASK_TTL` (60 s), and refuse its token from then on;
Flower's reaction to the refusal is to SIGINT its own process. Flower's HeartbeatSender beats
every 17-23 s with requests that may wait 30 s, and on the server it shares the round loop's
client, whose retries wait behind one another: on a machine busy with training three misses in
a row happened, and the server ended as "interrupted". Here a beat goes every `TASK_TTL / 12`
(5 s) with a 10 s timeout and no retries, so only a minute of misses drops a task, and a
refused beat is said in words. Written by hand: Flower's sender takes neither an interval nor a
client of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx

from fedlora.flower_internals import (
    TASK_TTL,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SendTaskHeartbeatRequest,
)

#: beats per TASK_TTL: this many misses in a row drop the task
BEATS_PER_TTL = 12
REQUEST_TIMEOUT = 10.0


def dropped(what: str) -> str:
    """What to say when the task was dropped (`what` names it and who dropped it)."""
    return (
        f"{what}: none of its heartbeats got through for {TASK_TTL:.0f} s (this machine was too "
        "busy to answer in time)"
    )


class TaskHeartbeat:
    """Beats for the task whose token it holds until `stop`; `refused` says whether the
    SuperLink or SuperNode has dropped the task (then `on_refused` was called once)."""

    def __init__(
        self,
        address: str,
        token: str,
        component: str,
        on_refused: Callable[[], None] = lambda: None,
        every: float | None = None,
    ) -> None:
        self.every = TASK_TTL / BEATS_PER_TTL if every is None else every
        self.on_refused = on_refused
        self.refused = False
        self._client = RuntimeHttpClient(
            f"http://{address}",  # the Runtime API listens on loopback only, without TLS
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name=component),
                RuntimeTokenHttpInterceptor(token),
            ],
            timeout=REQUEST_TIMEOUT,
        )
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-heartbeat", daemon=True)

    def start(self) -> TaskHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._client.close()

    def __enter__(self) -> TaskHeartbeat:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def beat(self) -> bool | None:
        """One heartbeat: True if accepted, False if the task was dropped, None if unanswered."""
        try:
            return self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.HTTPStatusError as exc:
            return False if exc.response.status_code == httpx.codes.UNAUTHORIZED else None
        except httpx.HTTPError:
            return None

    def _run(self) -> None:
        while not self._stopped.wait(self.every):
            if self.beat() is False:
                self.refused = True
                self.on_refused()
                return
