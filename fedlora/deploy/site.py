"""`fedlora client`: one hospital site, as a long-running daemon.

Two processes: Flower's SuperNode (`flower-supernode`, started by this one, dies with it) keeps
the authenticated TLS connection to the server and queues the server's messages; this process
runs the ClientApp for every queued message. The SuperNode runs with `--isolation process`:
by default (`subprocess`) it would start a fresh `flwr-clientapp` process per message, which
imports torch and loads the base model again every time; here the model stays loaded across
messages (and across federations with the same model settings). This process claims each
message's task from the SuperNode's local Runtime API (127.0.0.1) the way `flwr-clientapp`
does, using Flower's own functions for the exchange. Being long-lived, it also trains a secure
round in a background thread from the keys message on, while it answers the key and share
messages (`site.train_during_key_exchange`, fedlora.apps.secure.BackgroundTraining).

Before (re)starting the SuperNode the daemon probes the server, so that a configuration that
can never work (an untrusted certificate, TLS on one side only, an unknown site key) stops it
with one clear message, while a server that is merely away is waited for with backoff. SIGTERM
(or SIGINT) finishes the update in progress, if any, disconnects and exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from fedlora.deploy import runconfig
from fedlora.deploy.ports import free_port
from fedlora.deploy.settings import SiteSettings
from fedlora.errors import FedloraError
from fedlora.flower_internals import (
    CONNECTION_FAILED,
    NODE_ID_LINE,
    NOT_ACTIVATED,
    RECONNECTED,
    RECONNECTING,
    RUN_NOT_RUNNING,
    SUPERNODE_COMMAND,
    SUPERNODE_ENDED,
    SUPERNODE_SELF_ENDED,
    SUPERNODE_SIGNAL_EXITS,
)

BACKOFF_MAX = 60.0
PROBE_TIMEOUT = 10.0
#: how long a SuperNode that said it is ending may take to exit before it is ended
ENDING_GRACE = 10.0


class ServerAway(Exception):
    """The server cannot be reached now (not running, network down): wait and try again."""


def probe(settings: SiteSettings, timeout: float = PROBE_TIMEOUT) -> None:
    """One health request to the server with this site's TLS settings. Returns when the server
    answers; raises ServerAway when it is unreachable and FedloraError when the two sides can
    never talk (what to change is in the message)."""
    scheme = "http" if settings.insecure else "https"
    verify: ssl.SSLContext | bool = False
    if not settings.insecure:
        verify = ssl.create_default_context(cafile=str(settings.ca_cert))
    url = f"{scheme}://{settings.server}/health"
    try:
        with httpx.Client(verify=verify, timeout=timeout) as client:
            client.get(url)
        return
    except httpx.ConnectError as exc:
        reason = _root_cause(exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise FedloraError(
                f"The server at {settings.server} presented a certificate this site does not "
                f"trust ({reason.verify_message}): it is not signed by the CA in site.ca_cert = "
                f"{settings.ca_cert}, or it is not issued for the name '{_host(settings)}'. Get "
                "the federation's ca.pem from the server operator."
            ) from None
        if isinstance(reason, ssl.SSLError):
            raise FedloraError(
                f"The TLS handshake with {settings.server} failed ({reason.reason}): the server "
                "is not speaking TLS (was it started with --insecure?). Both sides must use TLS; "
                "`--insecure` is for rehearsals only and must then be set on both."
            ) from None
        raise ServerAway(str(reason)) from None
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        if settings.insecure and _speaks_tls(settings):
            raise FedloraError(
                f"The server at {settings.server} requires TLS, but this site has insecure = "
                "true in site.toml; remove it and set site.ca_cert and site.auth_key."
            ) from None
        raise ServerAway(str(exc)) from None
    except httpx.TimeoutException as exc:
        raise ServerAway(f"no answer within {timeout:.0f} s") from exc


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _host(settings: SiteSettings) -> str:
    return settings.server.rpartition(":")[0].strip("[]")


def _speaks_tls(settings: SiteSettings) -> bool:
    """Whether the server completes a TLS handshake (certificate not checked: diagnosis only)."""
    host, _, port = settings.server.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT) as raw:
            with context.wrap_socket(raw):
                return True
    except (OSError, ssl.SSLError):
        return False


def _die_with_parent() -> None:
    """Linux: the SuperNode gets SIGTERM when this process dies, even by SIGKILL, so it
    disconnects (the server then knows the site is gone) instead of lingering."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SuperNode:
    """The site's `flower-supernode` process; its output goes to <state>/supernode.log."""

    def __init__(self, settings: SiteSettings) -> None:
        self.settings = settings
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = settings.state_dir / "supernode.log"
        self._log_offset = 0
        self._stopped_runs: set[int] = set()
        self._stopped_offset = 0
        self._ending_since: float | None = None
        #: it logged SUPERNODE_SELF_ENDED since it started
        self.self_ended = False

    def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        node_config = s.state_dir / "node-config.toml"  # Flower reads a .toml node config file
        node_config.write_text(
            f"{runconfig.SITE_NAME} = {_toml_str(s.name)}\n"
            f"{runconfig.SITE_CONFIG} = {_toml_str(str(s.path))}\n"
        )
        self.port = free_port()
        args = ["--superlink", s.server, "--isolation", "process"]
        args += ["--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--node-config", str(node_config)]
        if s.insecure:
            args += ["--insecure"]
        else:
            args += ["--root-certificates", str(s.ca_cert)]
            args += ["--auth-supernode-private-key", str(s.auth_key)]
        env = dict(
            os.environ,
            FLWR_HOME=str(s.state_dir / "flwr"),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
        )
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stopped_offset = self._log_offset
        self._stopped_runs = set()
        self._ending_since = None
        self.self_ended = False
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SUPERNODE_COMMAND, str(s.poll_interval), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    @property
    def runtime_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def exited(self, grace: float = ENDING_GRACE) -> int | None:
        """Its exit code, or None while it runs. One that said it is ending but still runs
        after `grace` is ended here: Flower's SuperNode can hang in its shutdown after giving
        up on the server, and the daemon would wait on it for ever."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        ending = self._ending_since is not None and time.monotonic() - self._ending_since > grace
        if code is None and ending:
            self.stop()
            code = self.proc.poll()
        return code

    @property
    def ending(self) -> bool:
        """It has exited, or logged that it is ending."""
        return self._ending_since is not None or (
            self.proc is not None and self.proc.poll() is not None
        )

    def new_output(self) -> list[str]:
        """Lines the SuperNode logged since the last call."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as fh:
            fh.seek(self._log_offset)
            data = fh.read()
        self._log_offset += len(data)
        lines = data.decode(errors="replace").splitlines()
        if self._ending_since is None and any(SUPERNODE_ENDED in line for line in lines):
            self._ending_since = time.monotonic()
        self.self_ended |= any(SUPERNODE_SELF_ENDED in line for line in lines)
        return lines

    def stopped_runs_seen(self) -> set[int]:
        """The runs that this SuperNode said the server stopped while one of their messages was
        on its way (read from its log, apart from `new_output`'s reading)."""
        if self.log_path.exists():
            with self.log_path.open("rb") as fh:
                fh.seek(self._stopped_offset)
                data = fh.read()
            self._stopped_offset += len(data)
            self._stopped_runs |= stopped_runs(data.decode(errors="replace"))
        return self._stopped_runs

    def run_stopped(self, run_id: int) -> bool:
        return run_id in self.stopped_runs_seen()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the SuperNode deactivates itself at the server), then SIGKILL if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)


def _toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def server_presence(line: str) -> bool | None:
    """What a SuperNode log line says about the server: lost (False), reached (True), or
    nothing (None)."""
    if RECONNECTING in line:
        return False
    if RECONNECTED in line or NODE_ID_LINE in line:
        return True
    return None


class ServerWatch:
    """Tells the site's operator when the server goes away and when it is back."""

    def __init__(self, settings: SiteSettings, log: Callable[[str], None]) -> None:
        self.settings, self.log = settings, log
        self.away_since: float | None = None

    def see(self, line: str) -> None:
        presence = server_presence(line)
        if presence is False and self.away_since is None:
            self.away_since = time.monotonic()
            self.log(
                f"site {self.settings.name}: lost the server {self.settings.server}; "
                "reconnecting (the site keeps its place in the federation)"
            )
        elif presence and self.away_since is not None:
            away = time.monotonic() - self.away_since
            self.log(f"site {self.settings.name}: the server is back after {away:.0f} s")
            self.away_since = None


def supernode_exit(code: int | None, self_ended: bool = False) -> str:
    """What a SuperNode's exit says: Flower's SuperNode ending itself after a 401 from the server
    (`self_ended`, from its log), a signal from another process (this daemon stops its
    SuperNode only on its way out), or another exit."""
    lost = "a message it held is lost, and the server counts this site out of that round"
    if self_ended:
        return (
            f"exit {code}: it ended itself because the server answered a request with 401 "
            "Unauthorized (the server no longer accepts this site's key, or this machine's "
            f"clock and the server's are more than 5 s apart); {lost}"
        )
    if code in SUPERNODE_SIGNAL_EXITS:
        return f"exit {code}: another process sent it {SUPERNODE_SIGNAL_EXITS[code]}; {lost}"
    return f"exit {code}"


def stopped_runs(log_text: str) -> set[int]:
    """The runs that a SuperNode's log says the server has stopped."""
    return {int(run_id) for run_id in RUN_NOT_RUNNING.findall(log_text)}


#: how long a refused key is retried: a site whose previous connection died without saying
#: goodbye stays "online" at the server for up to 2 heartbeats of 30 s
REFUSAL_WINDOW = 75.0


def connection_failure(lines: list[str], settings: SiteSettings) -> tuple[bool, str] | None:
    """(refused, what to tell the operator) when the SuperNode gave up on connecting, else
    None. `refused`: the server would not activate this site's key."""
    text = "\n".join(lines)
    if CONNECTION_FAILED not in text:
        return None
    if NOT_ACTIVATED in text:
        return True, (
            f"The server refused this site's key (site.auth_key = {settings.auth_key}): it is not "
            "registered there (the server operator must list this site's auth.pub under [sites] "
            "in server.toml and restart the server), or another daemon with this key is connected."
        )
    detail = next((ln.strip() for ln in lines if "[code:" in ln), lines[-1] if lines else "")
    return False, f"The site could not join the federation at {settings.server}: {detail}"


class Stop:
    """SIGTERM/SIGINT: finish the update in progress, then leave. (The handler only sets a
    flag: taking a lock in a signal handler can deadlock the thread it interrupts.)"""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def wait(self, seconds: float) -> None:
        """Sleep, waking early when a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def wait_for_server(
    settings: SiteSettings, stop: Stop, log: Callable[[str], None], start_delay: float = 1.0
) -> bool:
    """Probe until the server answers (True) or the daemon is told to stop (False)."""
    delay = start_delay
    while not stop.requested:
        try:
            probe(settings)
            return True
        except ServerAway as exc:
            log(f"server {settings.server} unreachable ({exc}); retrying in {delay:.0f} s")
        stop.wait(delay)
        delay = min(2 * delay, BACKOFF_MAX)
    return False


def forward_site_log(log: Callable[[str], None]) -> Callable[[], None]:
    """Send the site's own lines (fedlora.apps.contribution.SITE_LOG: each private round's noise
    and what its rows have spent) to the daemon's output; returns what undoes it."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log(record.getMessage())

    site_log, handler = logging.getLogger("fedlora.site"), Forward()
    previous = site_log.level
    site_log.setLevel(logging.INFO)
    site_log.addHandler(handler)

    def undo() -> None:
        site_log.removeHandler(handler)
        site_log.setLevel(previous)

    return undo


def roster_line(settings: SiteSettings) -> str:
    """Whom the site shares its secure-aggregation secrets with, said when the daemon starts."""
    peers = [name for name, _ in settings.policy.peers]
    if peers:
        return (
            f"site {settings.name}: secure aggregation with the {len(peers)} sites of [peers] "
            f"only ({', '.join(peers)}); every key of a session must carry their signature, "
            "and each of them must have [peers] too"
        )
    return (
        "WARNING: no [peers] in site.toml: in secure aggregation this site cannot tell the other "
        "sites' keys from keys the server made itself, and a server that invents sites can read "
        "this site's update; and sites that have [peers] take no part in a session with it. "
        "List the other sites' key fingerprints under [peers]."
    )


def run_site(settings: SiteSettings, log: Callable[[str], None] = print) -> int:
    """The daemon's life: probe, start the SuperNode, run messages until told to stop."""
    from fedlora.deploy.executor import TaskRunner
    from fedlora.quiet import quiet_libraries

    quiet_libraries()
    stop = Stop()
    stop.install()
    if settings.insecure:
        log(
            "WARNING: insecure = true: no TLS and no node authentication; anyone on the network "
            "can read this site's updates. Use it for rehearsals only."
        )
    else:
        log(roster_line(settings))
    runner = TaskRunner(log)
    runner.load_in_background()
    node = SuperNode(settings)
    delay = 1.0
    refused_since: float | None = None
    watch = ServerWatch(settings, log)
    stop_forwarding = forward_site_log(log)
    try:
        while not stop.requested:
            if not wait_for_server(settings, stop, log):
                break
            node.start()
            runner.new_queue()
            log(f"site {settings.name}: connecting to {settings.server}")
            lines: list[str] = []
            out_of_step = False
            while not stop.requested and node.exited() is None:
                for line in node.new_output():
                    lines.append(line)
                    watch.see(line)
                    if NODE_ID_LINE in line:
                        node_id = line.split(NODE_ID_LINE)[1].strip()
                        log(f"site {settings.name}: connected (node {node_id})")
                        delay, refused_since = 1.0, None
                out_of_step = runner.out_of_step or bool(
                    runner.runs_served & node.stopped_runs_seen()
                )
                if out_of_step:
                    break
                if not runner.poll(node.runtime_address, node.run_stopped):
                    stop.wait(0.5)
            if stop.requested:
                break
            lines += node.new_output()  # its last lines: did it end by itself?
            if out_of_step:
                by_itself = node.ending
                node.stop()  # one ending by itself is seen gone too
                if not by_itself:
                    log(
                        f"site {settings.name}: a federation stopped while one of its messages "
                        "was on its way; reconnecting with a fresh queue"
                    )
                    continue
            failure = connection_failure(lines, settings)
            if failure is None:
                ended = supernode_exit(node.exited(), node.self_ended)
                log(f"the SuperNode stopped ({ended}); restarting in {delay:.0f} s")
            elif not failure[0]:
                raise FedloraError(failure[1])
            else:
                refused_since = refused_since or time.monotonic()
                left = REFUSAL_WINDOW - (time.monotonic() - refused_since)
                if left <= 0:
                    raise FedloraError(failure[1])
                log(f"{failure[1]} Retrying for {left:.0f} s.")
            stop.wait(delay)
            delay = min(2 * delay, BACKOFF_MAX)
    finally:
        with contextlib.suppress(Exception):
            node.stop()
        stop_forwarding()
    log(f"site {settings.name}: stopped")
    return 0
