"""Run the SuperNode's queued messages in this (long-lived) process.

What `flwr-clientapp` does once per process, done here once per message: claim a ClientApp
task from the SuperNode's Runtime API (`AcquireTask`), pull the message and the context, call
the app, push the reply and the updated context (Flower keeps `context.state` across a run's
messages that way), with task heartbeats meanwhile. Flower's own functions do the exchange
(`flwr.supernode.runtime.run_clientapp`); what differs is that nothing here exits the process.

The SuperNode of flwr 1.41 works in lock step: it receives one message, waits until some reply
is queued, sends every queued reply, and only then receives the next message. A server that
stops a run while one of its messages is on its way breaks the step: the message's task stays
queued though its content never arrives (Flower's pull would wait for it for two hours), or the
site answers it and that stale reply stands in for the next message's, so that the next reply
waits for a message that never comes. Here a pull gives up once the SuperNode has said that its
run stopped, and the runner says when the queue is out of step (`out_of_step`, or a served run
that stopped: see `runs_served`); the site daemon then starts a fresh SuperNode.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import httpx
from flwr.app import Error, Message

from fedlora.deploy import runconfig
from fedlora.deploy.heartbeat import TaskHeartbeat, dropped
from fedlora.errors import FedloraError
from fedlora.flower_internals import (
    AcquireTaskRequest,
    ErrorCode,
    PullObjectRequest,
    PullObjectResponse,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    TaskType,
    pull_task_input,
    push_message,
    push_task_output,
)

App = Callable[[Message, object], Message]
#: whether the server stopped a run (by its id), as far as this site knows
RunStopped = Callable[[int], bool]

#: an absolute path (POSIX, or Windows with a drive letter)
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^/\\\s,;:'\"()]+)+[/\\]?")


def relayed_reason(exc: BaseException, site: str) -> str:
    """Why a message failed, as the server reads it: naming the site, and only in words fedlora
    wrote (an exception of its own), with every local path cut to its file name (a site's file
    layout is its own business). Another library's message may quote whatever it was working
    on, a row of the site's data or a value of its update, so of such an error the server
    learns the type; the site's log keeps the message."""
    if not type(exc).__module__.startswith("fedlora."):
        return f"site {site}: {type(exc).__name__} (the message is in the site's log)"
    text = _PATH.sub(
        lambda m: m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], str(exc)
    )
    kind = "" if isinstance(exc, FedloraError) else f"{type(exc).__name__}: "
    return f"site {site}: {kind}{text}"


def _client(address: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(address, True, None, interceptors=interceptors)


class RunGone(RuntimeError):
    """The message being pulled belongs to a run the server has stopped: it will never arrive."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} was stopped by the server before its message arrived")


def give_up_on_stopped_runs(client: RuntimeHttpClient, run_stopped: RunStopped) -> None:
    """Make `client`'s object pulls fail with RunGone, instead of being retried, once the
    object's run is known to be stopped."""
    pull_object = client.PullObject

    def pull(request: PullObjectRequest) -> PullObjectResponse:
        response = pull_object(request)
        if not response.object_available and run_stopped(request.run_id):
            raise RunGone(request.run_id)
        return response

    client.PullObject = pull  # type: ignore[method-assign]


def _import_app() -> App:
    from fedlora.deploy.apps import client_app

    return client_app


class TaskRunner:
    """Claims and runs one task at a time; `poll` returns whether it ran one.

    The training code (torch, transformers) is imported before the first claim, not after it:
    Flower drops a claimed task whose input is not pulled within 30 s, and the import alone can
    take longer on a busy machine, so the first round's reply was refused (401)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.app: App | None = None
        self._loader: threading.Thread | None = None
        self.handled = 0
        #: runs with a task claimed from the current SuperNode
        self.runs_served: set[int] = set()
        #: a claimed task ended without a reply: the SuperNode's lock step is broken
        self.out_of_step = False

    def load_in_background(self) -> None:
        """Start importing the training code while the daemon connects."""

        def load() -> None:
            started = time.perf_counter()
            self.app = _import_app()
            self.log(f"training code loaded in {time.perf_counter() - started:.1f} s")

        self._loader = threading.Thread(target=load, name="load-training-code", daemon=True)
        self._loader.start()

    def _ready(self) -> App:
        if self._loader is not None:
            self._loader.join()
        if self.app is None:  # not started, or it failed: import here, where errors surface
            self.app = _import_app()
        return self.app

    def new_queue(self) -> None:
        """A fresh SuperNode: nothing claimed from it yet, in step."""
        self.runs_served.clear()
        self.out_of_step = False

    def poll(self, address: str, run_stopped: RunStopped = lambda run_id: False) -> bool:
        self._ready()
        client = _client(address)
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except httpx.HTTPError:
            return False  # the SuperNode is starting or stopping
        finally:
            client.close()
        if not res.HasField("task"):
            return False
        self.runs_served.add(res.task.run_id)
        self.run(address, res.token, run_stopped)
        return True

    def run(self, address: str, token: str, run_stopped: RunStopped) -> None:
        app = self._ready()
        started = time.perf_counter()
        client = _client(address, token)
        give_up_on_stopped_runs(client, run_stopped)

        def refused() -> None:
            self.log(dropped("the SuperNode dropped this message's task"))

        heartbeat = TaskHeartbeat(address, token, "flwr-clientapp", refused).start()
        try:
            message, context, _, _ = pull_task_input(client)
            try:
                reply = app(message, context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as exc:  # the server learns why; the daemon carries on
                site = str(context.node_config.get(runconfig.SITE_NAME, "?"))
                details = relayed_reason(exc, site)
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
                status = SubStatus.FAILED
                local = getattr(exc, "local_detail", "")  # what the server is not told
                self.log(
                    f"{message.metadata.message_type} failed: {type(exc).__name__}: {exc}"
                    + (f" ({local})" if local else "")
                )
            push_message(client, reply, context)
            push_task_output(client, context, status, details)
            self.handled += 1
            self.log(
                f"{message.metadata.message_type} handled in "
                f"{time.perf_counter() - started:.1f} s (message {self.handled} of this process)"
            )
        except RunGone as exc:
            self.log(f"a message was skipped: {exc}")
            push_task_output(client, None, SubStatus.FAILED, str(exc))
            self.out_of_step = True
        except (httpx.HTTPError, RuntimeError) as exc:
            self.log(f"a message could not be exchanged with the SuperNode: {exc}")
            self.out_of_step = True
        finally:
            heartbeat.stop()
            client.close()
