"""Flower's SuperLink inside the `fedlora server` process, and the federation's run on it.

How fedlora runs its ServerApp against a SuperLink, and why (read from the flwr 1.41 source):

- `flower-superlink` 1.41 serves the Fleet API (sites), the Control API (register site keys,
  start runs) and the Runtime API (the ServerApp's messages) from ONE FastAPI app on one port,
  and the open-source Control API has no authentication (`NoOpControlAuthnPlugin`): anyone who
  can reach the sites' port could register a node key of their own or start a run. So fedlora
  serves that same app (`flwr.superlink.main.create_app`) from two uvicorn listeners: the
  sites' address with TLS and a filter that passes only `/v1/fleet/*` and `/health`, and a
  private plaintext listener on 127.0.0.1 (ephemeral port) for this process's own control and
  runtime calls.
- `flwr run` needs a CLI profile under FLWR_HOME, exits 0 even when the run fails, and the
  default `--isolation subprocess` makes the SuperLink spawn `flower-superexec` and then
  `flwr-serverapp` by bare command name (PATH must hold the virtualenv, which a systemd unit
  usually does not) and install the app bundle into FLWR_HOME before importing it. Instead the
  SuperLink runs with `isolation = "process"` (it spawns nothing) and this process claims the
  run's ServerApp task itself (`AcquireTask`), exactly as `flwr-serverapp` does, and drives the
  federation with Flower's `HttpGrid`. The federation object, its results folder and its exit
  status stay in one process, as in `fedlora simulate`; a SIGKILL takes everything down at once.
- Site keys are registered through the Control API (what `flwr supernode register` does), with
  the site's name, into a SQLite database in the server's state folder, so they survive
  restarts. Every start registers the keys listed in `[sites]` (key rotation = edit the file,
  restart); a registered site left out of `[sites]` keeps its key and takes no part. Flower
  refuses an unregistered key forever, so unregistering is done only on purpose: for a rotated
  key, and by `fedlora server --revoke NAME`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from cryptography.hazmat.primitives import serialization

from fedlora.deploy.heartbeat import TaskHeartbeat, dropped
from fedlora.deploy.settings import ServerSettings
from fedlora.errors import FedloraError
from fedlora.flower_internals import (
    AcquireTaskRequest,
    ControlHttpClient,
    Fab,
    HttpGrid,
    ListNodesRequest,
    ListRunsRequest,
    NodeStatus,
    NoOpControlAuthnPlugin,
    PullTaskInputRequest,
    PushTaskOutputRequest,
    RegisterNodeRequest,
    RuntimeHttpClient,
    RuntimeVersionHttpInterceptor,
    StartRunRequest,
    StopRunRequest,
    SubStatus,
    SuperLinkLifespan,
    SuperLinkLifespanConfig,
    TaskIdentity,
    TaskType,
    UnregisterNodeRequest,
    build_fab_from_files,
    create_app,
    fab_to_proto,
    raise_when_refused,
    run_from_proto,
    runtime_client,
)
from fedlora.secure.certs import load_site_public_key

#: paths the sites' listener serves; everything else is for this process only
SITE_PATHS = ("/v1/fleet/", "/health")
START_TIMEOUT = 30.0


class FleetOnly:
    """ASGI filter for the sites' listener: the Fleet API and the health check, nothing else."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(SITE_PATHS):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a clear error when the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a restart
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FedloraError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None
    sock.listen(128)
    return sock


@dataclass
class Listener:
    server: uvicorn.Server
    thread: threading.Thread


class Link:
    """The SuperLink app on the sites' listener and on a private loopback listener."""

    def __init__(self, settings: ServerSettings, insecure: bool) -> None:
        self.settings = settings
        self.insecure = insecure
        self.listeners: list[Listener] = []
        self.private_port = 0

    @property
    def private_address(self) -> str:
        return f"127.0.0.1:{self.private_port}"

    def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        config = SuperLinkLifespanConfig(
            control_address="",  # Flower's legacy gRPC Control API stays off
            health_server_address=None,
            host=s.host,
            port=s.port,
            insecure=self.insecure,
            certificates=None,
            superexec_auth_secret=None,
            authn_plugin=NoOpControlAuthnPlugin(),
            event_log_plugin=None,
            fleet_event_log_plugin=None,
            enable_event_log=False,
            artifact_provider=None,
            enable_supernode_auth=not self.insecure,  # Flower allows node auth only over TLS
            fleet_api_type="grpc-rere",  # the only type with node authentication
            fleet_api_address=None,
            simulation=False,
            ssl_ca_certfile=None,
            ssl_certfile=None,
            ssl_keyfile=None,
            database=str(s.state_dir / "superlink.db"),
            isolation="process",
            runtime_dependency_install=False,
        )
        app = create_app(config, SuperLinkLifespan)
        public = bind(s.host, s.port)
        private = bind("127.0.0.1", 0)
        self.private_port = private.getsockname()[1]
        tls = {} if self.insecure else {"ssl_certfile": str(s.cert), "ssl_keyfile": str(s.key)}
        quiet = {"log_level": "warning", "access_log": False, "log_config": None}
        self._serve(uvicorn.Config(FleetOnly(app), lifespan="on", **tls, **quiet), public)
        self._serve(uvicorn.Config(app, lifespan="off", **quiet), private)

    def _serve(self, config: uvicorn.Config, sock: socket.socket) -> None:
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise FedloraError(
                    f"The server could not start listening on {sock.getsockname()}; see above."
                )
            time.sleep(0.05)
        self.listeners.append(Listener(server, thread))

    def stop(self) -> None:
        for listener in self.listeners:
            listener.server.should_exit = True
        for listener in self.listeners:
            listener.thread.join(timeout=10)
        self.listeners.clear()

    @contextlib.contextmanager
    def control(self) -> Iterator[ControlHttpClient]:
        client = ControlHttpClient.from_server_address(
            self.private_address, True, None, interceptors=[_version("flwr CLI")]
        )
        try:
            yield client
        finally:
            client.close()


def _version(component: str) -> RuntimeVersionHttpInterceptor:
    return RuntimeVersionHttpInterceptor(component_name=component)


def public_key_bytes(path: Path) -> bytes:
    """A site key as the SuperLink stores it (PEM SubjectPublicKeyInfo, as `flwr supernode
    register` sends it)."""
    return load_site_public_key(path).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sync_sites(link: Link, sites: dict[str, Path]) -> list[str]:
    """Register the listed sites' keys; return what changed, and the registered sites that are
    not listed. `[sites]` chooses who takes part, not who is revoked: a registered site left
    out keeps its key (the round loop ignores it) so that listing it again later just works.
    Only a listed site's replaced key is unregistered (Flower then refuses it forever); a site
    whose key is unchanged keeps its node id (and its connection). Everything is checked
    before anything changes."""
    wanted: dict[bytes, str] = {}
    for name, path in sites.items():
        key = public_key_bytes(path)
        if key in wanted:
            raise FedloraError(
                f"Sites {wanted[key]} and {name} list the same public key ({path}): every site "
                f"needs its own key pair (`fedlora certs DIR --site {name} --force`)."
            )
        wanted[key] = name
    changes: list[str] = []
    with link.control() as ctl:
        nodes = ctl.ListNodes(ListNodesRequest()).nodes_info
        for node in nodes:
            if node.status == NodeStatus.UNREGISTERED and _key(node) in wanted:
                name = wanted[_key(node)]
                raise FedloraError(
                    f"The key of site {name} ({sites[name]}) was revoked on this server "
                    "before, and a revoked key stays revoked: make the site a new key pair "
                    f"(`fedlora certs DIR --site {name} --force`) and list its auth.pub."
                )
        registered = [n for n in nodes if n.status != NodeStatus.UNREGISTERED]
        for node in registered:
            name = wanted.get(_key(node))
            if name is not None and name != node.name:
                raise FedloraError(
                    f"The key listed for site {name} ({sites[name]}) is registered on this "
                    f"server for site {node.name}: a key belongs to one site. Give {name} its "
                    f"own key pair (`fedlora certs DIR --site {name} --force`)."
                )
        for node in sorted(registered, key=lambda n: n.name):
            if _key(node) in wanted:
                del wanted[_key(node)]  # unchanged: keeps its node id
            elif node.name in sites:  # a rotated key: the old one goes for good
                ctl.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
                changes.append(f"revoked the old key of {node.name}")
            else:
                changes.append(
                    f"{node.name} is registered but not in [sites]: it takes no part "
                    f"(`--revoke {node.name}` revokes its key)"
                )
        for key, name in sorted(wanted.items(), key=lambda kv: kv[1]):
            ctl.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
            changes.append(f"registered the key of {name}")
    return changes


def revoke_sites(link: Link, names: list[str], sites: dict[str, Path]) -> list[str]:
    """Unregister the keys registered for `names`, for good: Flower keeps an unregistered key
    as history and refuses it forever, so the site can only come back with a new key pair.
    Every name is checked before any key is revoked; `sites` ([sites]) only adds a warning to
    a site still listed with the key just revoked."""
    changes: list[str] = []
    with link.control() as ctl:
        nodes = ctl.ListNodes(ListNodesRequest()).nodes_info
        registered: dict[str, list] = {}
        for node in nodes:
            if node.status != NodeStatus.UNREGISTERED:
                registered.setdefault(node.name, []).append(node)
        for name in names:
            if name not in registered:
                revoked = any(n.name == name for n in nodes)
                raise FedloraError(
                    f"Cannot revoke site {name!r}: "
                    + ("its key is already revoked" if revoked else "no key is registered for it")
                    + f" (registered sites: {', '.join(sorted(registered)) or 'none'})."
                )
        for name in dict.fromkeys(names):
            keys = set()
            for node in registered[name]:
                ctl.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
                keys.add(_key(node))
            line = f"revoked the key of {name}"
            if name in sites and public_key_bytes(sites[name]) in keys:
                line += (
                    f" (still listed in [sites] with that key: the server will not start until "
                    f"{name}'s line is removed or names a new key pair)"
                )
            changes.append(line)
    return changes


def _key(node) -> bytes:
    return node.public_key.encode() if isinstance(node.public_key, str) else node.public_key


def registered_nodes(ctl: ControlHttpClient) -> list:
    """The SuperLink's nodes whose key is registered (it keeps unregistered ones as history)."""
    nodes = ctl.ListNodes(ListNodesRequest()).nodes_info
    return [n for n in nodes if n.status != NodeStatus.UNREGISTERED]


def node_names(link: Link) -> dict[int, str]:
    """node id -> registered site name (empty without node authentication)."""
    with link.control() as ctl:
        return {n.node_id: n.name for n in registered_nodes(ctl)}


def app_bundle(run_config: dict[str, str]) -> bytes:
    """The Flower app bundle of a federation: only a pyproject.toml (every process runs the
    installed fedlora; the bundle carries the run config to the sites)."""
    lines = [
        "[project]",
        'name = "fedlora-federation"',
        'version = "1.0.0"',
        'description = "A fedlora federation"',
        'license = "Apache-2.0"',
        "[tool.flwr.app]",
        'publisher = "fedlora"',
        "[tool.flwr.app.components]",
        'serverapp = "fedlora.deploy.apps:server_app"',
        'clientapp = "fedlora.deploy.apps:client_app"',
        "[tool.flwr.app.config]",
        *(f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in run_config.items()),
    ]
    return build_fab_from_files({"pyproject.toml": "\n".join(lines).encode()})[0]


def stop_unfinished_runs(link: Link) -> int:
    """Stop runs a killed server left behind: their messages must not reach the sites."""
    stopped = 0
    with link.control() as ctl:
        for run in ctl.ListRuns(ListRunsRequest()).run_dict.values():
            if run.status.status != "finished":
                ctl.StopRun(StopRunRequest(run_id=run.run_id))
                stopped += 1
    return stopped


def start_run(link: Link, run_config: dict[str, str]) -> int:
    fab_bytes = app_bundle(run_config)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    with link.control() as ctl:
        response = ctl.StartRun(StartRunRequest(fab=fab_to_proto(fab)))
    if not response.HasField("run_id"):
        raise FedloraError("The SuperLink did not start the federation's run.")
    return response.run_id


@contextlib.contextmanager
def serverapp_task(
    link: Link, run_id: int, log: Callable[[str], None] = print, timeout: float = 60.0
) -> Iterator[HttpGrid]:
    """Claim the run's ServerApp task (what `flwr-serverapp` does), keep it alive with
    heartbeats, yield a Grid on it, and report the outcome when the block ends."""
    acquirer = RuntimeHttpClient.from_server_address(
        link.private_address, True, None, interceptors=[_version("flwr-serverapp")]
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            res = acquirer.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
            )
            if res.HasField("task") and res.task.run_id == run_id:
                break
            if time.monotonic() > deadline:
                raise FedloraError("The SuperLink never handed out the federation's task.")
            time.sleep(0.2)
    finally:
        acquirer.close()
    grid = HttpGrid(link.private_address, True, None, token=res.token)
    why = dropped("The SuperLink dropped this server's federation task") + "."
    raise_when_refused(grid, lambda: FedloraError(why))
    client = runtime_client(grid)
    task_input = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task_input.task_id
    TaskIdentity.run_id = task_input.run.run_id
    TaskIdentity.node_id = task_input.context.node_id
    grid.set_run(run_from_proto(task_input.run))

    status, details = SubStatus.FAILED, "The fedlora server stopped."
    try:
        with TaskHeartbeat(link.private_address, res.token, "flwr-serverapp", lambda: log(why)):
            yield grid
        status, details = SubStatus.COMPLETED, ""
    except BaseException as exc:
        details = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with contextlib.suppress(httpx.HTTPError):
            client.PushTaskOutput(PushTaskOutputRequest(sub_status=status, details=details))
        grid.close()
