"""fedlora's uses of Flower beyond its public API are in one module, and still match flwr."""

import ast
import inspect
import os
import re
import sys
from pathlib import Path

import fedlora
from fedlora import flower_internals as fi

#: Flower's public app API, which any module may use
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation")
PACKAGE = Path(fedlora.__file__).parent


def test_the_installed_flwr_is_the_one_the_internals_were_written_for():
    assert fi.version_problem() is None, fi.version_problem()


def test_only_the_one_door_imports_flower_internals():
    strays = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "flower_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "flwr" and not module.startswith(PUBLIC):
                    strays.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {module}")
    assert not strays, "import these through fedlora/flower_internals.py:\n" + "\n".join(strays)


def test_the_supernode_still_logs_the_lines_the_site_daemon_reads():
    """The site daemon reads its SuperNode's log for its node id, a refused key and a run
    stopped under a message: each line must still be written by the installed flwr."""
    from flwr.supercore.error.base import ApiErrorCode
    from flwr.supercore.retry import http_retry
    from flwr.supernode import fleet_http_connection, start_client_internal

    supernode = inspect.getsource(start_client_internal)
    connection = inspect.getsource(fleet_http_connection)
    assert f'"{fi.NODE_ID_LINE} %s"' in supernode, "port fi.NODE_ID_LINE"
    assert fi.CONNECTION_FAILED in connection, "port fi.CONNECTION_FAILED"
    assert f'exit_message="{fi.SUPERNODE_ENDED}"' in supernode, "port fi.SUPERNODE_ENDED"
    assert '"[code: {flower_error.code}]' in connection, "port fi.NOT_ACTIVATED"
    assert fi.NOT_ACTIVATED == f"[code: {ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED}]"
    retry = inspect.getsource(http_retry)
    assert f'"{fi.RECONNECTING} in %.2f seconds"' in retry, "port fi.RECONNECTING"
    assert f'"{fi.RECONNECTED} %.2f seconds' in retry, "port fi.RECONNECTED"
    logged = re.findall(r'"(Run ID %s is not in `RUNNING` status\. Ignoring[^"]*)"', supernode)
    assert len(logged) == 2, "port fi.RUN_NOT_RUNNING (the message and the reply case)"
    for line in logged:
        assert fi.RUN_NOT_RUNNING.search(line.replace("%s", "123", 1)).group(1) == "123"


def test_the_supernode_command_runs_the_supernode_with_the_sites_idle_wait(monkeypatch):
    """`python -c SUPERNODE_COMMAND WAIT ARGS...` hands WAIT and ARGS to run_supernode."""
    calls = []
    monkeypatch.setattr(fi, "run_supernode", lambda wait, args: calls.append((wait, args)))
    monkeypatch.setattr(sys, "argv", ["-c", "0.25", "--superlink", "localhost:9092"])
    exec(fi.SUPERNODE_COMMAND, {})  # noqa: S102 - our own constant
    assert calls == [(0.25, ["--superlink", "localhost:9092"])]


def test_the_supernode_sleeps_the_sites_idle_wait_after_an_empty_pull_and_nothing_else(
    monkeypatch,
):
    """Flower's SuperNode loop sleeps FLOWER_IDLE_WAIT after a pull that found no message;
    run_supernode turns that one sleep into the site's wait and starts flower-supernode."""
    import time

    from flwr.supernode import cli, start_client_internal

    source = inspect.getsource(start_client_internal)
    idle = re.findall(r"if run_id is None:\s+#[^\n]*\n\s+time\.sleep\((\d+)\)", source)
    assert idle == [str(fi.FLOWER_IDLE_WAIT)], "port fi.FLOWER_IDLE_WAIT / fi.run_supernode"
    waits = re.findall(r"time\.sleep\(([^)]*)\)", source)
    assert waits.count(str(fi.FLOWER_IDLE_WAIT)) == 1, "another 3 s wait would shrink too"

    slept, started = [], []
    monkeypatch.setattr(start_client_internal, "time", time)  # undone after the test
    monkeypatch.setattr(os, "kill", os.kill)  # run_supernode wraps it
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(cli, "flower_supernode", lambda: started.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["-c"])
    fi.run_supernode(0.25, ["--insecure"])
    assert started == [["flower-supernode", "--insecure"]]
    loop_time = start_client_internal.time
    loop_time.sleep(fi.FLOWER_IDLE_WAIT)
    loop_time.sleep(0.5)
    assert slept == [0.25, 0.5]
    assert loop_time is not time and loop_time.monotonic is time.monotonic  # time untouched


def test_the_task_lifetime_is_the_one_the_superlink_and_supernode_keep():
    """fedlora's task heartbeat beats TASK_TTL / 12 apart: the lifetime must still be what the
    SuperLink (SQLite state) and the SuperNode (in-memory state) give a heartbeat."""
    from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    for state in (SqlCoreState, InMemoryCoreState):
        source = inspect.getsource(state.acknowledge_task_heartbeat)
        assert "timedelta(seconds=HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL)" in source
    assert fi.TASK_TTL == 60


def test_a_refused_grid_token_raises_the_given_error_and_other_statuses_keep_flowers_policy():
    """Flower's retry SIGINTs its own process on a 401; `raise_when_refused` makes the Grid
    raise instead, and leaves the rest of Flower's policy (retry a 503, give up on a 404)."""
    import httpx
    import pytest

    grid = fi.HttpGrid("127.0.0.1:9", True, None, token="t")
    fi.raise_when_refused(grid, lambda: RuntimeError("task dropped"))
    invoker = grid._retry_invoker  # noqa: SLF001 - the policy raise_when_refused changed

    def status(code: int) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", "http://127.0.0.1:9")
        return httpx.HTTPStatusError("", request=request, response=httpx.Response(code))

    def fails_with(*codes: int):
        left = list(codes)

        def call() -> str:
            if left:
                raise status(left.pop(0))
            return "answered"

        return call

    with pytest.raises(RuntimeError, match="task dropped"):
        invoker.invoke(fails_with(401))
    assert invoker.invoke(fails_with(503)) == "answered"
    with pytest.raises(httpx.HTTPStatusError):
        invoker.invoke(fails_with(404))


def test_a_supernode_that_ends_itself_after_a_401_says_so(monkeypatch, capsys):
    """Flower's SuperNode sends itself SIGINT when the server answers 401 (its heartbeat, its
    request retries); run_supernode's os.kill logs SUPERNODE_SELF_ENDED first, which the site
    daemon reads: an exit that looked like another process's SIGTERM in a flaky test."""
    import signal

    from flwr.supercore.retry import http_retry
    from flwr.supernode import fleet_http_connection

    from fedlora.deploy.site import supernode_exit

    for module in (fleet_http_connection, http_retry):
        source = inspect.getsource(module)
        assert "UNAUTHORIZED" in source and "os.kill(os.getpid(), signal.SIGINT)" in source
    sent = []
    monkeypatch.setattr(os, "kill", fi._announcing_self_signals(lambda p, s: sent.append((p, s))))
    os.kill(os.getpid() + 1, signal.SIGTERM)  # another process: nothing said
    assert fi.SUPERNODE_SELF_ENDED not in capsys.readouterr().out
    os.kill(os.getpid(), signal.SIGINT)
    assert fi.SUPERNODE_SELF_ENDED in capsys.readouterr().out
    assert sent == [(os.getpid() + 1, signal.SIGTERM), (os.getpid(), signal.SIGINT)]
    assert "401 Unauthorized" in supernode_exit(1, self_ended=True)


def test_the_supernode_exits_with_the_codes_the_site_daemon_reads_as_signals():
    """A SuperNode that another process stops exits with Flower's graceful-exit code of that
    signal; the daemon names the signal (a flake once looked like a lost heartbeat)."""
    import signal

    from flwr.supercore.exit.exit_code import ExitCode

    from fedlora.deploy.site import supernode_exit

    for code, name in fi.SUPERNODE_SIGNAL_EXITS.items():
        assert getattr(ExitCode, f"GRACEFUL_EXIT_{name}") == code
        assert name in supernode_exit(code) and signal.Signals[name]
    assert supernode_exit(0) == "exit 0" and supernode_exit(None) == "exit None"
