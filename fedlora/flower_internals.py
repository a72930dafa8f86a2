"""Every part of Flower that fedlora uses beyond Flower's public app API, behind one door.

fedlora's apps use only Flower's public API (`flwr.app`, `flwr.clientapp`, `flwr.serverapp`,
`flwr.simulation`). Three places go further, each for a reason its module gives:

- the deployment server (`fedlora/deploy/link.py`) serves the SuperLink's FastAPI app inside
  its own process, claims the run's ServerApp task itself and drives the federation with
  `HttpGrid` (so that the results folder, the exit status and Ctrl-C stay in one process),
  whose retry policy it changes for one answer: a refused token is an error, not a SIGINT;
- the site daemon (`fedlora/deploy/executor.py`, `fedlora/deploy/site.py`) claims the
  SuperNode's ClientApp tasks itself, as `flwr-clientapp` does, so that the base model stays
  loaded across messages; it reads the SuperNode's log for the few facts the SuperNode tells
  nobody else (its node id, a refused key, a run stopped under a message), and it shortens the
  SuperNode's fixed wait after a pull that found no message and has it say when it ends itself
  (`run_supernode`);
- secure aggregation (`fedlora/secure/secagg.py`) reuses Flower's SecAgg+ key-share encoding
  and its symmetric encryption.

These names are private to flwr and may change in any release. They were read from, and tested
against, the version in `WRITTEN_FOR`; `pyproject.toml` pins it. To move to another flwr: bump
the pin, run `pytest tests/test_flower_internals.py` (it names every private use), then the
deployment tests (`pytest -m deploy`), and port what fails.
"""

from __future__ import annotations

import os
import re
import sys
import time
import types
from collections.abc import Callable
from importlib.metadata import version

import httpx

WRITTEN_FOR = "1.41.0"

try:
    # the deployment server: SuperLink app, Control and Runtime APIs, task identity
    from flwr.cli.build import build_fab_from_files
    from flwr.common.constant import (
        HEARTBEAT_DEFAULT_INTERVAL,
        HEARTBEAT_PATIENCE,
        ErrorCode,
        SubStatus,
    )
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
    from flwr.common.secure_aggregation.secaggplus_utils import (
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.common.serde import fab_to_proto, run_from_proto
    from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
        ListNodesRequest,
        ListRunsRequest,
        RegisterNodeRequest,
        StartRunRequest,
        StopRunRequest,
        UnregisterNodeRequest,
    )
    from flwr.proto.message_pb2 import (  # pylint: disable=no-name-in-module
        PullObjectRequest,
        PullObjectResponse,
    )
    from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
        AcquireTaskRequest,
        PullTaskInputRequest,
        PushTaskOutputRequest,
        SendTaskHeartbeatRequest,
    )
    from flwr.supercore.constant import NodeStatus, TaskType
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.fab import Fab
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.auth_plugin import NoOpControlAuthnPlugin
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.config_loader import SuperLinkLifespanConfig
    from flwr.superlink.grid import HttpGrid
    from flwr.superlink.main import create_app
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )
except ImportError as exc:  # pragma: no cover - only with another flwr than the pinned one
    raise ImportError(
        f"fedlora's deployment and secure aggregation use parts of flwr {WRITTEN_FOR} that the "
        f"installed flwr {version('flwr')} does not have ({exc}). Install flwr=={WRITTEN_FOR} "
        "(pip install -e .), or port fedlora/flower_internals.py: see its docstring."
    ) from exc

__all__ = [
    "TASK_TTL",
    "AcquireTaskRequest",
    "ControlHttpClient",
    "ErrorCode",
    "Fab",
    "HttpGrid",
    "ListNodesRequest",
    "ListRunsRequest",
    "NoOpControlAuthnPlugin",
    "NodeStatus",
    "PullObjectRequest",
    "PullObjectResponse",
    "PullTaskInputRequest",
    "PushTaskOutputRequest",
    "RegisterNodeRequest",
    "RuntimeHttpClient",
    "RuntimeTokenHttpInterceptor",
    "RuntimeVersionHttpInterceptor",
    "SendTaskHeartbeatRequest",
    "StartRunRequest",
    "StopRunRequest",
    "SubStatus",
    "SuperLinkLifespan",
    "SuperLinkLifespanConfig",
    "TaskIdentity",
    "TaskType",
    "UnregisterNodeRequest",
    "build_fab_from_files",
    "create_app",
    "decrypt",
    "encrypt",
    "fab_to_proto",
    "pull_task_input",
    "push_message",
    "push_task_output",
    "run_from_proto",
    "share_keys_plaintext_concat",
    "share_keys_plaintext_separate",
]

#: seconds Flower's SuperNode sleeps after a pull that found no message (`time.sleep(3)` in
#: the loop of `start_client_internal`, a constant there)
FLOWER_IDLE_WAIT = 3


def run_supernode(idle_wait: float, args: list[str]) -> None:
    """Run Flower's SuperNode (`flower-supernode ARGS`) in this process, sleeping `idle_wait`
    seconds after a pull that found no message where Flower sleeps 3 s.

    Every message of a round reaches a site that is idle up to that long after the server sent
    it, and the round goes on when the last site answers: a plaintext round has one message
    stage per site, a secure round four (keys, shares, masked input, unmasking). Flower has no
    setting for it; this swaps the `time` that the SuperNode's loop module sees for a copy whose
    `sleep` turns 3 s into `idle_wait` and leaves every other wait as it is."""
    sleep = time.sleep
    patched = types.ModuleType("time", time.__doc__)
    patched.__dict__.update(vars(time))
    patched.sleep = lambda seconds: sleep(idle_wait if seconds == FLOWER_IDLE_WAIT else seconds)
    start_client_internal.time = patched  # type: ignore[attr-defined]
    os.kill = _announcing_self_signals(os.kill)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


def _announcing_self_signals(kill: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """`os.kill` that first logs SUPERNODE_SELF_ENDED when this process signals itself: Flower's
    SuperNode sends itself SIGINT when the server answers a request with 401 (its fleet
    heartbeat and its request retries), and that exit looks like any other otherwise."""

    def announcing(pid: int, sig: int) -> None:
        if pid == os.getpid():
            print(SUPERNODE_SELF_ENDED, flush=True)
        kill(pid, sig)

    return announcing


#: the command line that starts Flower's SuperNode with this interpreter: `python -c
#: SUPERNODE_COMMAND IDLE_WAIT ARGS...` (`run_supernode`)
SUPERNODE_COMMAND = (
    "import sys; from fedlora.flower_internals import run_supernode; "
    "run_supernode(float(sys.argv[1]), sys.argv[2:])"
)

# What the SuperNode's log says, read by the site daemon.
#: the node id the SuperLink gave this site
NODE_ID_LINE = "SuperNode ID:"
#: the SuperNode gave up connecting ...
CONNECTION_FAILED = "Failed to initialize the connection"
#: ... because the key cannot be activated: not registered, or still connected
NOT_ACTIVATED = "[code: 2004]"
#: the SuperNode lost the server and retries ...
RECONNECTING = "Connection attempt failed, retrying"
#: ... and reached it again
RECONNECTED = "Connection successful after"
#: the SuperNode is ending (it may then hang in its interpreter's shutdown: seen after giving up
#: on a TLS error)
SUPERNODE_ENDED = "SuperNode terminated gracefully."
#: what the SuperNode logs (through run_supernode) when it signals itself to end: the server
#: refused one of its requests as unauthorised (a key it no longer accepts, or a signed timestamp
#: outside its window: the two machines' clocks apart)
SUPERNODE_SELF_ENDED = "fedlora: the SuperNode ends itself: the server answered 401 Unauthorized"
#: the SuperNode's exit code after a signal (Flower's ExitCode.GRACEFUL_EXIT_*): it ended
#: because another process told it to, not by itself
SUPERNODE_SIGNAL_EXITS = {1: "SIGINT", 2: "SIGQUIT", 3: "SIGTERM"}
#: a message dropped because the server stopped its run
RUN_NOT_RUNNING = re.compile(r"Run ID (\d+) is not in `RUNNING` status")


#: how long a SuperLink or SuperNode keeps a claimed task whose heartbeats stopped (60 s)
TASK_TTL = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL


def runtime_client(grid: HttpGrid) -> RuntimeHttpClient:
    """The Runtime API client inside Flower's `HttpGrid` (Flower's own ServerApp runtime claims
    the task input through it the same way)."""
    return grid._runtime_client  # noqa: SLF001 - private by design, see the module docstring


def installed_version() -> str:
    return version("flwr")


def version_problem() -> str | None:
    """Why the installed flwr may not match what this module was written for, or None."""
    installed = installed_version()
    if installed == WRITTEN_FOR:
        return None
    return (
        f"flwr {installed} is installed; fedlora's use of Flower internals was written for "
        f"flwr {WRITTEN_FOR}. Re-check every private use in fedlora/flower_internals.py (the "
        "SuperLink app and lifespan, the Runtime and Control API requests, HttpGrid's runtime "
        "client, TaskIdentity, a task heartbeat's lifetime, run_clientapp's pull/push "
        "functions, the SuperNode's log lines and idle sleep, SecAgg+ key shares), run "
        "`pytest -m deploy`, then set WRITTEN_FOR."
    )


def raise_when_refused(grid: HttpGrid, error: Callable[[], Exception]) -> None:
    """Make `grid` raise `error()` when the SuperLink refuses its token (401: the task was
    dropped), where Flower's retry SIGINTs its own process and waits to be killed. Call it before
    the grid's first request: the retry policy is read when the grid connects."""
    invoker = grid._retry_invoker  # noqa: SLF001 - private by design, see the module docstring
    flowers = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
            raise error() from exc
        return flowers(exc) if flowers else False

    invoker.should_giveup = should_giveup
