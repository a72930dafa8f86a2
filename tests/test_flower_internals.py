"""fedlora's uses of Flower beyond its public API are in one module, and still match flwr."""

import ast
import inspect
import re
import sqlite3
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import fedlora
from fedlora import flower_internals as fi
from fedlora.deploy.link import Link, public_key_bytes, serverapp_task, start_run
from fedlora.deploy.settings import ServerSettings

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
    assert '"[code: {flower_error.code}]' in connection, "port fi.NOT_ACTIVATED"
    assert fi.NOT_ACTIVATED == f"[code: {ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED}]"
    retry = inspect.getsource(http_retry)
    assert f'"{fi.RECONNECTING} in %.2f seconds"' in retry, "port fi.RECONNECTING"
    assert f'"{fi.RECONNECTED} %.2f seconds' in retry, "port fi.RECONNECTED"
    logged = re.findall(r'"(Run ID %s is not in `RUNNING` status\. Ignoring[^"]*)"', supernode)
    assert len(logged) == 2, "port fi.RUN_NOT_RUNNING (the message and the reply case)"
    for line in logged:
        assert fi.RUN_NOT_RUNNING.search(line.replace("%s", "123", 1)).group(1) == "123"


def test_the_supernode_command_starts_flowers_supernode():
    namespace: dict = {}
    statement = fi.SUPERNODE_COMMAND.replace("flower_supernode()", "")
    exec(statement, namespace)  # noqa: S102 - our own constant, without the call
    from flwr.supernode.cli import flower_supernode

    assert namespace["flower_supernode"] is flower_supernode


def test_the_superlink_database_waits_out_a_long_write_lock(tmp_path):
    """The SuperLink keeps its state in SQLite, and Flower gives up on a locked database after
    5 s (busy_timeout). On a loaded server (10 site daemons training on two cores, 1.8 MB
    updates) a write took longer, the server's pull of the sites' replies got HTTP 500
    "database is locked" and the round was lost. fedlora's embedded SuperLink waits longer:
    a write blocked by another writer for 7 s goes through."""
    settings = ServerSettings("127.0.0.1", 0, tmp_path, None, None, None, {})
    link = Link(settings, insecure=True)
    link.start()
    try:
        database = tmp_path / "superlink.db"
        locked = threading.Event()

        def hold_the_write_lock() -> None:
            other = sqlite3.connect(database, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(7)
            other.execute("COMMIT")
            other.close()

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        assert locked.wait(10)
        key = _site_public_key(tmp_path / "site.pub")
        with link.control() as ctl:  # a write: the Control API registers a site key
            ctl.RegisterNode(fi.RegisterNodeRequest(public_key=public_key_bytes(key), name="a"))
        holder.join()
    finally:
        link.stop()


def _site_public_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    path.write_bytes(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return path


def test_the_servers_requests_to_its_superlink_wait_longer_than_sqlite_may(tmp_path):
    """A Runtime API request given up on (Flower: after 30 s) is sent again while the first
    is still waiting for SQLite's lock, and the two collide (a round lost nine of ten sites'
    replies right after such a resend). The federation's grid waits longer than the
    SuperLink's SQLite may."""
    link = Link(ServerSettings("127.0.0.1", 0, tmp_path, None, None, None, {}), insecure=True)
    link.start()
    try:
        run_id = start_run(link, {"fedlora-config": "{}"})
        with serverapp_task(link, run_id) as grid:
            timeout = fi.runtime_client(grid)._client.timeout  # noqa: SLF001
            assert timeout.read > fi.SQLITE_BUSY_SECONDS
            assert timeout.write > fi.SQLITE_BUSY_SECONDS
    finally:
        link.stop()
