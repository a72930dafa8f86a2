"""Real deployment on 127.0.0.1: `fedlora server` and three `fedlora client` site daemons as
separate processes, over TLS with node authentication, on the tiny-random model.

One set of site daemons serves every federation of this module (they are long-running: a server
that finishes or dies is waited for), in this order: a full federation (while it runs, a site
with an unregistered key, a site that does not trust the server's CA and a site configured
without TLS all fail with their reason); a TLS site against an --insecure server; a site whose
policy requires secure aggregation refusing a plaintext federation; a server killed with
SIGKILL in round 2 and resumed (round 2 is not repeated); a site killed in the middle of a round
(the round completes with the other two).

Run alone with `pytest -m deploy`. Every process is killed at the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedlora.deploy.ports import free_port
from fedlora.errors import FedloraError

#: real server and site processes (or a real SuperLink); the other tests here are pure and
#: belong to the fast tier
deploy = pytest.mark.deploy

SITES = ("alpha", "beta", "gamma")
FEDERATION_TIMEOUT = 150.0
ALPHA_KEY = '"certs/sites/alpha/auth.key"'
WORDS = {
    "positive": ["great", "helped", "better", "relief", "calm"],
    "negative": ["awful", "worse", "dizzy", "rash", "stopped"],
    "neutral": ["okay", "mixed", "average", "fine", "unsure"],
}


def write_rows(path: Path, seed: int, n: int = 40) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        rows.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(6)), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


class Processes:
    """Every process the module starts; all are killed at the end, whatever happened."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def fedlora(self, name: str, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        with (self.root / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedlora.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_all(self, since: int = 0) -> None:
        """End every process started (from the `since`-th on), gently first."""
        for proc in self.procs[since:]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs[since:]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_certs_in_the_formats_flower_loads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    from fedlora.errors import FedloraError
    from fedlora.secure.certs import Layout, make_certs

    layout = Layout(tmp_path / "certs")
    make_certs(layout.root, server_names=["fl.example.org"], server_ips=["10.1.2.3"], sites=["a"])
    for private in (layout.ca_key, layout.server_key, layout.site_key("a")):
        assert private.stat().st_mode & 0o777 == 0o600, private
    assert layout.site_public_key("a").stat().st_mode & 0o777 == 0o644
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    # what `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read
    load_ssh_private_key(layout.site_key("a").read_bytes(), None)
    assert b"BEGIN PUBLIC KEY" in try_load_public_key(layout.site_public_key("a"))

    before = layout.site_key("a").read_bytes()
    with pytest.raises(FedloraError, match="--force"):
        make_certs(layout.root, server_names=[], server_ips=[], sites=["b", "a"])
    assert layout.site_key("a").read_bytes() == before
    assert not layout.site_key("b").exists()  # nothing is written when anything is refused
    ca_before = layout.ca_cert.read_bytes()
    make_certs(layout.root, server_names=[], server_ips=[], sites=["a"], force=True)
    assert layout.site_key("a").read_bytes() != before  # rotated
    assert layout.ca_cert.read_bytes() == ca_before  # the CA is never replaced


def link_settings(root: Path, layout):
    """A SuperLink on a free loopback port with the certificates of `layout`, state under root."""
    from fedlora.deploy.settings import ServerSettings

    return ServerSettings(
        host="127.0.0.1",
        port=free_port(),
        state_dir=root / "state",
        ca_cert=layout.ca_cert,
        cert=layout.server_cert,
        key=layout.server_key,
        sites={},
    )


@deploy
def test_registered_site_keys_follow_the_server_config(tmp_path):
    """Every start registers the keys in [sites]: an unchanged key keeps its node, a rotated key
    replaces the old one (revoked). A site left out keeps its key and comes back with it; only
    an explicit revocation revokes a key otherwise, and a revoked key listed again is refused,
    naming the fix."""
    from fedlora.deploy.link import Link, node_names, revoke_sites, sync_sites
    from fedlora.errors import FedloraError
    from fedlora.secure.certs import Layout, make_certs

    layout = Layout(tmp_path / "certs")
    make_certs(layout.root, server_names=["localhost"], server_ips=[], sites=["a", "b"])
    settings = link_settings(tmp_path, layout)
    keys = {"a": layout.site_public_key("a"), "b": layout.site_public_key("b")}
    link = Link(settings, insecure=False)
    link.start()
    try:
        assert sync_sites(link, keys) == ["registered the key of a", "registered the key of b"]
        first = {name: node for node, name in node_names(link).items()}
        assert sync_sites(link, keys) == []
        make_certs(layout.root, server_names=[], server_ips=[], sites=["a"], force=True)
        assert sync_sites(link, keys) == ["revoked the old key of a", "registered the key of a"]
        second = {name: node for node, name in node_names(link).items()}
        assert second["b"] == first["b"] and second["a"] != first["a"]

        # b left out of [sites]: not revoked, and back with the same key and node
        assert sync_sites(link, {"a": keys["a"]}) == [
            "b is registered but not in [sites]: it takes no part (`--revoke b` revokes its key)"
        ]
        assert node_names(link) == {second["a"]: "a", second["b"]: "b"}
        assert sync_sites(link, keys) == []
        assert node_names(link) == {second["a"]: "a", second["b"]: "b"}
        with pytest.raises(FedloraError, match="registered on this server for site b"):
            sync_sites(link, {"a": keys["a"], "c": keys["b"]})  # one key, two names
        with pytest.raises(FedloraError, match="Sites a and c list the same public key"):
            sync_sites(link, {"a": keys["a"], "c": keys["a"]})

        # explicit revocation: every name is checked before any key goes
        unknown = r"Cannot revoke site 'z': no key is registered for it \(registered sites: a, b\)"
        with pytest.raises(FedloraError, match=unknown):
            revoke_sites(link, ["b", "z"], keys)
        assert sorted(node_names(link).values()) == ["a", "b"]
        (line,) = revoke_sites(link, ["b", "b"], keys)
        assert line.startswith("revoked the key of b (still listed in [sites] with that key")
        assert sorted(node_names(link).values()) == ["a"]
        with pytest.raises(FedloraError, match=r"already revoked \(registered sites: a\)"):
            revoke_sites(link, ["b"], keys)
        with pytest.raises(FedloraError, match="stays revoked.*--site b --force"):
            sync_sites(link, keys)
        make_certs(layout.root, server_names=[], server_ips=[], sites=["b"], force=True)
        assert sync_sites(link, keys) == ["registered the key of b"]  # b is back, new key
    finally:
        link.stop()


def test_config_errors_name_the_key(tmp_path):
    from fedlora.deploy.settings import DEFAULT_POLL_INTERVAL, load_server, load_site
    from fedlora.errors import FedloraError
    from fedlora.secure.certs import make_certs

    make_certs(tmp_path / "certs", server_names=["localhost"], server_ips=[], sites=["a", "b"])
    server = tmp_path / "server.toml"
    head = (
        '[server]\nca_cert = "certs/ca.pem"\ncert = "certs/server.pem"\nkey = "certs/server.key"\n'
        '[sites]\na = "certs/sites/a/auth.pub"\nb = "certs/sites/b/auth.pub"\n'
    )
    server.write_text(head + "[federation]\nclients = 3\n")
    with pytest.raises(FedloraError, match="lists 2 sites"):
        load_server(server, [], insecure=False)
    server.write_text(head + "[federation]\nmin_clients = 2\n")
    settings, cfg = load_server(server, ["federation.rounds=7"], insecure=False)
    assert cfg.federation.clients == 2 and cfg.federation.rounds == 7
    assert list(settings.sites) == ["a", "b"] and settings.port == 9092
    server.write_text(head.replace("auth.pub", "auth.key") + "[federation]\nmin_clients = 2\n")
    with pytest.raises(FedloraError, match="OpenSSH public key"):
        load_server(server, [], insecure=False)
    site = tmp_path / "site.toml"
    site.write_text('[site]\nname = "a"\nserver = "localhost:9092"\n[train]\nlr = 1.0\n')
    with pytest.raises(FedloraError, match=r"\[train\]"):
        load_site(site)
    head = '[site]\nname = "a"\nserver = "localhost:9092"\ninsecure = true\n'
    data = '[data]\npath = "a.jsonl"\n'
    site.write_text(head + data)
    assert load_site(site).poll_interval == DEFAULT_POLL_INTERVAL
    site.write_text(head + "poll_interval = 2\n" + data)
    assert load_site(site).poll_interval == 2.0
    for bad in ("0", "-1", "61", "true", '"fast"'):
        site.write_text(head + f"poll_interval = {bad}\n" + data)
        with pytest.raises(FedloraError, match="site.poll_interval .* from 0.05 to 60"):
            load_site(site)
    site.write_text(head + data)
    assert load_site(site).train_during_key_exchange is True
    site.write_text(head + "train_during_key_exchange = false\n" + data)
    assert load_site(site).train_during_key_exchange is False
    site.write_text(head + 'train_during_key_exchange = "no"\n' + data)
    with pytest.raises(FedloraError, match="site.train_during_key_exchange .* true or false"):
        load_site(site)


def test_what_a_site_trains_with(tmp_path):
    """The federation's config reaches a site without the server's paths; the site adds its own
    data file, threads and privacy unit, and a site with a budget refuses to train without DP."""
    import tomllib

    from fedlora.config import load_config
    from fedlora.deploy.apps import site_config
    from fedlora.deploy.server import shared_config
    from fedlora.deploy.settings import SiteSettings
    from fedlora.privacy.site_policy import PolicyRefused, SitePolicy

    server = load_config(
        None,
        [
            {
                "data": {"path": "/srv/eval.jsonl", "max_text_tokens": 40},
                "lora": {"targets": ["q_proj", "o_proj"]},
                "privacy": {"level": "sample", "max_epsilon": 8.0},
                "run": {"out": "/srv/runs/x", "seed": 3, "trackers": ["tensorboard"]},
            }
        ],
    )
    shared = tomllib.loads(shared_config(server))
    assert "path" not in shared["data"] and "out" not in shared["run"]
    assert "trackers" not in shared["run"]  # the server's own logging, not a site's
    shared["data"]["test_path"] = "/etc/passwd"  # a server cannot choose a site's files
    write_rows(tmp_path / "own.jsonl", seed=0)
    site = SiteSettings(
        name="a",
        server="localhost:9092",
        ca_cert=None,
        auth_key=None,
        state_dir=tmp_path / "state",
        audit_log=tmp_path / "audit.jsonl",
        insecure=True,
        threads=3,
        data={"path": str(tmp_path / "own.jsonl")},
        path=tmp_path / "site.toml",
        policy=SitePolicy(max_epsilon=4.0),
        privacy_unit="patient_id",
    )
    cfg = site_config(shared, site)
    assert cfg.data.path == str(tmp_path / "own.jsonl") and cfg.data.max_text_tokens == 40
    assert cfg.data.test_path == ""
    assert cfg.lora.targets == ["q_proj", "o_proj"] and cfg.run.seed == 3
    assert cfg.train.threads == 3
    # the federation's budget stays the federation's: the site's own is checked over its ledger
    assert cfg.privacy.max_epsilon == 8.0
    assert cfg.privacy.unit == "patient_id"  # who a person is in the site's own data
    site.policy.check_request(cfg, secure=False)
    shared["privacy"]["unit"] = "row"  # a server cannot make the site's patients rows
    assert site_config(shared, site).privacy.unit == "patient_id"

    without_dp = dict(shared, privacy={"level": "none"})
    cfg = site_config(without_dp, site)
    with pytest.raises(PolicyRefused, match="differential privacy required"):
        site.policy.check_request(cfg, secure=True)


def test_the_kits_example_configs_load(tmp_path):
    """server/ and clients/ example configs, with the files their READMEs make, are valid."""
    import shutil

    from fedlora.deploy.settings import load_server, load_site
    from fedlora.secure.certs import Layout, make_certs
    from fedlora.secure.identity import fingerprint

    repo = Path(__file__).resolve().parents[1]
    server, site = tmp_path / "server", tmp_path / "site"
    server.mkdir()
    site.mkdir()
    shutil.copy(repo / "server" / "server.example.toml", server / "server.toml")
    shutil.copy(repo / "clients" / "site.example.toml", site / "site.toml")
    make_certs(server / "certs", server_names=["fl.example.org"], server_ips=[], sites=[])
    names = ["general-hospital", "st-marys", "university-clinic"]
    make_certs(site / "keys", server_names=[], server_ips=[], sites=names)
    (server / "site-keys").mkdir()
    for name in names:
        shutil.copy(
            Layout(site / "keys").site_public_key(name), server / "site-keys" / f"{name}.pub"
        )
    settings, cfg = load_server(server / "server.toml", [], insecure=False)
    assert list(settings.sites) == names and cfg.federation.clients == 3
    shutil.copy(server / "certs" / "ca.pem", site / "ca.pem")
    with pytest.raises(FedloraError, match="peers.general-hospital .* must be a key fingerprint"):
        load_site(site / "site.toml")  # as shipped: the other sites' fingerprints to fill in
    text = (site / "site.toml").read_text()
    for name in ["general-hospital", "university-clinic"]:
        key = Layout(site / "keys").site_public_key(name).read_bytes()
        placeholder = f"SHA256:<{name}'s key fingerprint, from its operator>"
        assert placeholder in text
        text = text.replace(placeholder, fingerprint(key))
    (site / "site.toml").write_text(text)
    loaded = load_site(site / "site.toml")
    assert loaded.name == "st-marys" and loaded.policy.max_epsilon == 10.0
    assert [name for name, _ in loaded.policy.peers] == ["general-hospital", "university-clinic"]
    assert loaded.auth_key == Layout(site / "keys").site_key("st-marys")
    # the kits work together as copied: the site's policy accepts the server's federation
    import tomllib

    from fedlora.deploy.apps import site_config
    from fedlora.deploy.server import shared_config

    assert loaded.policy.require_secure_aggregation and cfg.secure.enabled
    site_cfg = site_config(tomllib.loads(shared_config(cfg)), loaded)
    loaded.policy.check_request(site_cfg, secure=cfg.secure.enabled)


def test_site_policy_in_site_toml(tmp_path):
    """[policy] keys are checked when site.toml loads; [privacy] max_epsilon is its older name."""
    from fedlora.deploy.settings import load_site
    from fedlora.errors import FedloraError

    head = '[site]\nname = "a"\nserver = "localhost:9092"\ninsecure = true\n'
    head += '[data]\npath = "x.jsonl"\n'
    site = tmp_path / "site.toml"
    site.write_text(head + "[policy]\nrequire_secure_aggregation = true\nmin_cohort = 4\n")
    policy = load_site(site).policy
    assert policy.require_secure_aggregation and policy.min_cohort == 4
    site.write_text(head + "[privacy]\nmax_epsilon = 3.0\n")
    assert load_site(site).policy.max_epsilon == 3.0
    site.write_text(head + '[privacy]\nunit = "patient_id"\n')
    assert load_site(site).privacy_unit == "patient_id"
    site.write_text(head + '[privacy]\nunit = ""\n')
    with pytest.raises(FedloraError, match="privacy.unit .* column"):
        load_site(site)
    site.write_text(head + "[privacy]\nmax_epsilon = 3.0\n[policy]\nmax_epsilon = 2.0\n")
    with pytest.raises(FedloraError, match="both"):
        load_site(site)
    site.write_text(head + "[policy]\nmin_cohort = true\n")
    with pytest.raises(FedloraError, match="policy.min_cohort"):
        load_site(site)


#: a line of a site's supernode.log after its server was stopped while a message was on its way
STOPPED_RUN_LINE = (
    "\x1b[92mINFO \x1b[0m:      Run ID 16815035837695012091 is not in `RUNNING` status. "
    "Ignoring message 2b8b369ea3722203dd6ff581d59a359fc641b8e62efc0ea10e0ea39a5c8d1f7b."
)


def test_a_site_reads_which_runs_the_server_stopped_from_its_supernode_log():
    from fedlora.deploy.site import stopped_runs

    text = f"INFO:      Received successfully\n{STOPPED_RUN_LINE}\nINFO:      [RUN 7]\n"
    assert stopped_runs(text) == {16815035837695012091}
    assert stopped_runs("INFO:      Receiving: query message (ID: 3a4a)\n") == set()


def test_a_site_says_when_the_server_goes_away_and_comes_back():
    from types import SimpleNamespace

    from fedlora.deploy.site import ServerWatch

    said: list[str] = []
    watch = ServerWatch(SimpleNamespace(name="alpha", server="localhost:9092"), said.append)
    lines = [
        "INFO :      SuperNode ID: 42",
        "WARNING :   Connection attempt failed, retrying in 0.61 seconds",
        "WARNING :   Connection attempt failed, retrying in 1.07 seconds",
        "INFO :      Connection successful after 10.54 seconds and 5 tries.",
        "INFO :      Received successfully",
    ]
    for line in lines:
        watch.see(line)
    assert said == [
        "site alpha: lost the server localhost:9092; reconnecting (the site keeps its place "
        "in the federation)",
        "site alpha: the server is back after 0 s",
    ]


def test_a_supernode_that_says_it_ends_but_hangs_is_ended(tmp_path):
    """Flower's SuperNode, giving up on a server that answered without TLS, logged that it
    terminated and then hung in its interpreter's shutdown: the daemon waited on it for ever
    and its site never rejoined. One that says it ends is ended after a grace."""
    from types import SimpleNamespace

    from fedlora.deploy.site import SuperNode
    from fedlora.flower_internals import SUPERNODE_ENDED

    node = SuperNode(SimpleNamespace(state_dir=tmp_path))
    with node.log_path.open("wb") as log:
        node.proc = subprocess.Popen(
            [sys.executable, "-c", f"print({SUPERNODE_ENDED!r}, flush=True)\nwhile True: pass"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: SUPERNODE_ENDED in node.log_path.read_text(), 30, "the line")
        assert node.exited() is None  # within the grace it may still be ending by itself
        assert any(SUPERNODE_ENDED in line for line in node.new_output())
        assert node.exited(grace=0.0) is not None
    finally:
        node.proc.kill()
        node.proc.wait()


def test_a_port_chosen_to_listen_on_later_is_one_nothing_else_is_handed():
    """A server's port chosen now and listened on later (the next server on the same address)
    was once taken in between by another process's port-0 listener, a plaintext one: the sites
    dialling it gave up on the TLS error. Outgoing connections and port-0 listeners take their
    ports from the ephemeral range; a chosen port lies below it and is free."""
    from fedlora.deploy.ports import ephemeral_start

    for _ in range(20):
        port = free_port()
        assert 20000 <= port < ephemeral_start()  # Ray's workers take 10002-19999
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@deploy
def test_the_servers_task_outlives_the_superlinks_heartbeat_window(tmp_path, monkeypatch):
    """The SuperLink drops a task none of whose heartbeats got through for TASK_TTL (60 s), and
    Flower then SIGINTs the server: three missed beats of Flower's 20 s sender on a busy machine
    ended federations. Here the window is shrunk to 3 s: the server's task is still held after
    several windows, and a task the SuperLink has dropped is refused and said so."""
    from flwr.supercore.corestate import sql_corestate

    from fedlora.deploy import heartbeat
    from fedlora.deploy.link import Link, serverapp_task, start_run
    from fedlora.flower_internals import AcquireTaskRequest, RuntimeHttpClient, TaskType
    from fedlora.secure.certs import Layout, make_certs

    monkeypatch.setattr(sql_corestate, "HEARTBEAT_DEFAULT_INTERVAL", 1.5)  # a 3 s window
    monkeypatch.setattr(heartbeat, "TASK_TTL", 3.0)
    layout = Layout(tmp_path / "certs")
    make_certs(layout.root, server_names=["localhost"], server_ips=[], sites=[])
    settings = link_settings(tmp_path, layout)
    link = Link(settings, insecure=False)
    link.start()
    lines: list[str] = []
    try:
        with serverapp_task(link, start_run(link, {}), lines.append) as grid:
            time.sleep(8.0)
            token = grid._token  # noqa: SLF001 - the test checks the task the grid holds
            assert heartbeat.TaskHeartbeat(link.private_address, token, "test").beat() is True
        assert lines == []

        # a claimed task whose input is never pulled lapses after half the window
        acquirer = RuntimeHttpClient(f"http://{link.private_address}")
        run_id = start_run(link, {})
        deadline = time.monotonic() + 30
        while not (
            res := acquirer.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
            )
        ).HasField("task"):
            assert time.monotonic() < deadline, "the SuperLink handed out no task"
            time.sleep(0.2)
        acquirer.close()
        assert res.task.run_id == run_id
        dropped = heartbeat.TaskHeartbeat(
            link.private_address, res.token, "test", lambda: lines.append("refused"), every=2.5
        )
        with dropped:
            time.sleep(4.0)
        assert dropped.refused and lines == ["refused"]
    finally:
        link.stop()


@deploy
def test_a_dropped_server_task_is_an_error_not_a_sigint(tmp_path, monkeypatch):
    """Once the SuperLink has dropped the server's task, its next Grid call is refused (401);
    Flower's retry answers that by SIGINTing its own process, so the federation ended as
    "interrupted" after the server had said why. The call raises a FedloraError instead."""
    from flwr.supercore.corestate import sql_corestate

    from fedlora.deploy import heartbeat
    from fedlora.deploy.link import Link, serverapp_task, start_run
    from fedlora.errors import FedloraError
    from fedlora.secure.certs import Layout, make_certs

    monkeypatch.setattr(sql_corestate, "HEARTBEAT_DEFAULT_INTERVAL", 1.5)  # a 3 s window
    monkeypatch.setattr(heartbeat, "TASK_TTL", 3.0)
    monkeypatch.setattr(heartbeat, "BEATS_PER_TTL", 0.05)  # one beat a minute: starved
    layout = Layout(tmp_path / "certs")
    make_certs(layout.root, server_names=["localhost"], server_ips=[], sites=[])
    link = Link(link_settings(tmp_path, layout), insecure=False)
    link.start()
    try:
        with pytest.raises(FedloraError, match="dropped this server's federation task"):
            with serverapp_task(link, start_run(link, {}), print) as grid:
                time.sleep(6.0)
                grid.get_node_ids()
    finally:
        link.stop()


def test_a_site_claims_no_task_before_its_training_code_is_loaded(monkeypatch):
    """Flower drops a claimed task whose input is not pulled within 30 s; a daemon that imported
    torch only after its first claim had its first reply refused (401) on a busy machine."""
    from types import SimpleNamespace

    from fedlora.deploy import executor

    def slow_import():
        time.sleep(1.0)
        return lambda message, context: message

    claims: list[bool] = []
    fake = SimpleNamespace(
        AcquireTask=lambda request: (
            claims.append(runner.app is not None) or SimpleNamespace(HasField=lambda field: False)
        ),
        close=lambda: None,
    )
    monkeypatch.setattr(executor, "_import_app", slow_import)
    monkeypatch.setattr(executor, "_client", lambda address, token=None: fake)
    lines: list[str] = []
    runner = executor.TaskRunner(lines.append)
    runner.load_in_background()
    assert runner.poll("127.0.0.1:1") is False
    assert claims == [True], "a task was claimed before the training code was loaded"
    assert any("training code loaded" in line for line in lines)


def test_a_site_stops_pulling_a_message_of_a_run_the_server_stopped():
    """After a server restart, the SuperNode keeps a task for a message of the stopped run whose
    objects never arrive; Flower's pull retries it for up to two hours, and meanwhile the site
    answers no other federation. The site's pull ends once the run is known stopped."""
    import threading
    from types import SimpleNamespace

    from flwr.proto.message_pb2 import PullObjectResponse
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    from fedlora.deploy.executor import RunGone, give_up_on_stopped_runs

    asked: list[int] = []
    client = SimpleNamespace(
        PullObject=lambda request: PullObjectResponse(object_found=True, object_available=False)
    )

    def run_stopped(run_id: int) -> bool:
        asked.append(run_id)
        return len(asked) >= 2  # the SuperNode logs the stop a little after the pull began

    give_up_on_stopped_runs(client, run_stopped)
    pull = make_pull_object_fn_protobuf(client.PullObject, Node(node_id=1), 42)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            pull_objects(["a" * 64], pull)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the pull of a stopped run's message is still retrying"
    assert len(outcome) == 1 and isinstance(outcome[0], RunGone), outcome
    assert asked == [42, 42]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Key material, data, configs, and the three site daemons (started before any server:
    they wait for it, with their training code loaded)."""
    from fedlora.model import resolve_model
    from fedlora.secure.certs import make_certs

    resolve_model("tiny-random", log=lambda _: None)  # built once, before processes race
    root = tmp_path_factory.mktemp("deploy")
    make_certs(
        root / "certs",
        server_names=["localhost"],
        server_ips=["127.0.0.1"],
        sites=[*SITES, "rogue"],
    )
    make_certs(root / "other-ca", server_names=["localhost"], server_ips=[], sites=[])
    for i, site in enumerate(SITES):
        write_rows(root / f"{site}.jsonl", seed=i)
    write_rows(root / "eval.jsonl", seed=99)
    port = free_port()
    procs = Processes(root)
    for site in SITES:
        site_toml(root, site, port)
        procs.fedlora(f"site-{site}", "client", "--config", f"site-{site}.toml")
    for site in SITES:  # three torch imports at once would slow the first server's start
        wait_for(
            lambda site=site: "training code loaded" in procs.log(f"site-{site}"),
            180,
            f"site {site} to load its training code",
        )
    yield root, port, procs
    procs.kill_all()


@pytest.fixture(autouse=True)
def end_what_the_test_started(request):
    """The servers and sites a test of the shared kit started end with it, passed or failed: a
    server left running by a failed test held the kit's port and failed the next tests too."""
    if "kit" not in request.fixturenames:
        yield
        return
    procs = request.getfixturevalue("kit")[2]
    since = len(procs.procs)
    yield
    procs.kill_all(since)


def site_toml(root: Path, stem: str, port: int, **overrides: str | None) -> Path:
    """site-<stem>.toml for site <stem> (or `name=`); an override of None leaves the key out."""
    values = {
        "name": f'"{stem}"',
        "server": f'"localhost:{port}"',
        "ca_cert": '"certs/ca.pem"',
        "auth_key": f'"certs/sites/{stem}/auth.key"',
        "state_dir": f'"state-{stem}"',
        "threads": "1",
    } | overrides
    path = root / f"site-{stem}.toml"
    site = "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)
    data = stem if stem in SITES else "alpha"
    path.write_text(f'[site]\n{site}\n[data]\npath = "{data}.jsonl"\n')
    return path


#: the federation of the main tests: SCAFFOLD (site state across rounds) under secure
#: aggregation (four message stages per round), the hardest combination to resume exactly.
#: Every batch holds all of a site's rows (40, 32 of them trained on) and there is no LoRA
#: dropout: a site draws both from a secret of each federation's, so that two federations
#: train alike only where those draws do not matter (the secure one is compared with a
#: plaintext one below).
SECURE_SCAFFOLD = {
    "strategy": {"name": '"scaffold"'},
    "train": {"optimizer": '"sgd"', "lr": "0.5", "local_steps": "2", "batch_size": "64"},
    "lora": {"dropout": "0.0"},
    "secure": {"enabled": "true"},
}
PLAIN_FEDAVG = {"train": {"local_steps": "2"}}


def server_toml(
    root: Path,
    name: str,
    port: int,
    out: str,
    sections: dict,
    *,
    sites: tuple[str, ...] = SITES,
    state_dir: str = "server-state",
    **federation: int,
) -> Path:
    path = root / f"{name}.toml"
    listed = "".join(f'{s} = "certs/sites/{s}/auth.pub"\n' for s in sites)
    sections = sections | {
        "federation": {"rounds": "2"} | {k: str(v) for k, v in federation.items()}
    }
    body = "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n"
        for section, entries in sections.items()
    )
    path.write_text(
        "[server]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'state_dir = "{state_dir}"\n'
        'ca_cert = "certs/ca.pem"\ncert = "certs/server.pem"\nkey = "certs/server.key"\n\n'
        f"[sites]\n{listed}\n"
        '[model]\nname = "tiny-random"\nprecision = "fp32"\n\n'
        '[data]\npath = "eval.jsonl"\neval_rows = 20\n\n'
        f"{body}"
        f'[run]\nout = "{out}"\n'
    )
    return path


def metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def adapter(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def audit(root: Path, site: str) -> list[dict]:
    path = root / f"state-{site}" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(proc: subprocess.Popen, procs: Processes, name: str, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} did not finish:\n{procs.log(name)[-3000:]}") from None


@deploy
def test_federation_over_tls_with_node_authentication(kit):
    root, port, procs = kit
    server = procs.fedlora(
        "server-a",
        "server",
        "--config",
        str(server_toml(root, "server-a", port, "runs/a", SECURE_SCAFFOLD)),
    )
    wait_for(lambda: "Listening on" in procs.log("server-a"), 60, "the server to listen")

    # what the sites' port serves: the Fleet API only (Flower's unauthenticated Control API,
    # which registers keys and starts runs, is not reachable from the network)
    trust = ssl.create_default_context(cafile=root / "certs" / "ca.pem")
    with httpx.Client(verify=trust) as client:
        assert client.get(f"https://localhost:{port}/health").status_code == 200
        assert client.post(f"https://localhost:{port}/v1/control/list-nodes").status_code == 404

    # a site whose key the server does not know
    site_toml(root, "rogue", port)
    rogue = procs.fedlora("site-rogue", "client", "--config", "site-rogue.toml")
    # a site that trusts another CA
    site_toml(root, "untrusting", port, ca_cert='"other-ca/ca.pem"', auth_key=ALPHA_KEY)
    untrusting = procs.fedlora("site-untrusting", "client", "--config", "site-untrusting.toml")
    # a site without TLS against a TLS server
    site_toml(root, "plain", port, insecure="true", ca_cert=None, auth_key=None)
    plain = procs.fedlora("site-plain", "client", "--config", "site-plain.toml")

    assert finished(untrusting, procs, "site-untrusting", 60) == 2
    assert "does not trust" in procs.log("site-untrusting")
    assert "other-ca/ca.pem" in procs.log("site-untrusting")
    assert finished(plain, procs, "site-plain", 60) == 2
    assert "requires TLS" in procs.log("site-plain")
    wait_for(lambda: "refused this site's key" in procs.log("site-rogue"), 60, "the refusal")
    assert rogue.poll() is None or rogue.returncode == 2  # retried for a while, then exits
    rogue.terminate()

    assert finished(server, procs, "server-a", FEDERATION_TIMEOUT) == 0, procs.log("server-a")
    out = root / "runs" / "a"
    assert not (root / "runs" / "a.partial").exists()
    for name in ("config.toml", "metrics.jsonl", "summary.json", "metrics.png"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients"] for r in rows[1:]] == [3, 3]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    assert json.loads((out / "summary.json").read_text())["secure_aggregation"] is True
    assert json.loads((out / "summary.json").read_text())["secrets"] == "site CSPRNG"
    for site in SITES:
        lines = audit(root, site)
        assert [e["round"] for e in lines] == [1, 2], lines
        for entry in lines:  # what left the site: its masked input, never the update itself
            assert entry["message"] == "train.secagg"
            assert entry["records"] == ["secagg_masked"]
            assert entry["bytes"] > 0 and len(entry["sha256"]) == 64
            assert entry["secrets"] == "site CSPRNG"
        (secret,) = (root / f"state-{site}").glob("federations/*/site.secret")
        assert len(secret.read_bytes()) == 32  # 256 bits from the site's OS CSPRNG
        assert lines[0]["sha256"] != lines[1]["sha256"]
    assert not audit(root, "rogue")


@deploy
def test_secure_aggregation_matches_the_plaintext_federation(kit):
    root, port, procs = kit
    plain = SECURE_SCAFFOLD | {"secure": {"enabled": "false"}}
    config = server_toml(root, "server-p", port, "runs/p", plain)
    server = procs.fedlora("server-p", "server", "--config", str(config))
    assert finished(server, procs, "server-p", FEDERATION_TIMEOUT) == 0, procs.log("server-p")
    for site in SITES:
        assert audit(root, site)[-1]["records"] == ["contribution"]
    # plaintext sites send float32, secure ones fixed point with 2^-30 steps
    secure, clear = adapter(root / "runs" / "a"), adapter(root / "runs" / "p")
    for key in clear:
        np.testing.assert_allclose(secure[key], clear[key], rtol=1e-4, atol=1e-6, err_msg=key)


@deploy
def test_tls_site_refuses_an_insecure_server(kit):
    root, _, procs = kit
    port = free_port()
    config = server_toml(root, "server-plain", port, "runs/plain", PLAIN_FEDAVG)
    server = procs.fedlora("server-plain", "server", "--config", str(config), "--insecure")
    site_toml(root, "alpha-tls", port, auth_key=ALPHA_KEY, name='"alpha"')
    site = procs.fedlora("site-alpha-tls", "client", "--config", "site-alpha-tls.toml")
    wait_for(lambda: "WARNING: --insecure" in procs.log("server-plain"), 60, "the warning")
    assert finished(site, procs, "site-alpha-tls", 90) == 2
    assert "not speaking TLS" in procs.log("site-alpha-tls")
    server.terminate()
    server.wait(timeout=20)


@deploy
def test_a_site_whose_policy_requires_secure_aggregation_refuses_plain_rounds(kit):
    """alpha's site.toml (re-read for every message) requires secure aggregation: it refuses
    every round of a plaintext federation before training, says so in its audit log, and the
    server reports it per site and round while the other two carry the rounds."""
    root, port, procs = kit
    path = site_toml(root, "alpha", port)
    path.write_text(path.read_text() + "\n[policy]\nrequire_secure_aggregation = true\n")
    try:
        config = server_toml(root, "server-r", port, "runs/r", PLAIN_FEDAVG, min_clients=2)
        server = procs.fedlora("server-r", "server", "--config", str(config))
        assert finished(server, procs, "server-r", FEDERATION_TIMEOUT) == 0, procs.log("server-r")
    finally:
        site_toml(root, "alpha", port)
    for round_ in (1, 2):
        assert f"alpha refused round {round_}: secure aggregation required" in procs.log("server-r")
    assert [r["clients"] for r in metrics(root / "runs" / "r")[1:]] == [2, 2]
    assert metrics(root / "runs" / "r")[1]["refused"] == {"0": "secure aggregation required"}
    refusals = [e for e in audit(root, "alpha") if "refused" in e][-2:]
    assert [(e["round"], e["refused"]) for e in refusals] == [
        (1, "secure aggregation required"),
        (2, "secure aggregation required"),
    ]
    assert all("sha256" not in e for e in refusals)  # nothing was sent


@deploy
def test_server_killed_in_round_2_resumes_without_repeating_it(kit):
    """Killed once round 2 has begun, resumed: a site takes part in a round once, so the
    server does not repeat round 2 (it says so) and continues with round 3 from round 1's
    state."""
    root, port, procs = kit
    before = {site: len(audit(root, site)) for site in SITES}
    config = server_toml(root, "server-c", port, "runs/c", SECURE_SCAFFOLD, rounds=3)
    work = root / "runs" / "c.partial"
    started = work / "state" / "round-started.txt"
    server = procs.fedlora("server-c1", "server", "--config", str(config))
    wait_for(lambda: started.exists() and started.read_text() == "2", FEDERATION_TIMEOUT, "round 2")
    server.kill()
    server.wait(timeout=10)
    from fedlora import checkpoint
    from fedlora.config import load_config

    fingerprint = checkpoint.config_fingerprint(load_config(work / "config.toml").to_dict())
    saved = checkpoint.load(work / "state", fingerprint)
    assert saved is not None and saved.round == 1

    again = procs.fedlora("server-c2", "server", "--config", str(config))
    assert finished(again, procs, "server-c2", 60) == 2
    assert "--resume" in procs.log("server-c2")  # an interrupted federation is not overwritten

    resumed = procs.fedlora("server-c3", "server", "--config", str(config), "--resume")
    assert finished(resumed, procs, "server-c3", FEDERATION_TIMEOUT) == 0, procs.log("server-c3")
    assert "Resumed from the saved state after round 1" in procs.log("server-c3")
    assert "Round 2 was interrupted and is not repeated" in procs.log("server-c3")
    rows = metrics(root / "runs" / "c")
    assert [r["round"] for r in rows] == [0, 1, 3]
    assert rows[-1]["clients"] == 3 and "refused" not in rows[-1]
    for site in SITES:  # this federation's updates: each round at most once
        rounds = [e["round"] for e in audit(root, site)[before[site] :]]
        assert len(rounds) == len(set(rounds)) and 3 in rounds, (site, rounds)
        site_log = procs.log(f"site-{site}")  # its operator heard of the server's absence
        assert f"site {site}: lost the server" in site_log, site_log[-2000:]
        assert f"site {site}: the server is back after" in site_log, site_log[-2000:]


@deploy
def test_a_site_left_out_takes_no_part_and_is_revoked_only_on_request(kit):
    """gamma left out of [sites]: its key stays registered (the next tests list it again) and
    the federation runs with alpha and beta while gamma's daemon, running, is never asked.
    `--revoke gamma` revokes a key for good and serves nothing; a start that lists the revoked
    key is refused with the fix, before any results folder is begun."""
    from dataclasses import replace

    from fedlora.deploy.link import Link, sync_sites
    from fedlora.deploy.settings import load_server

    def register_every_site(config: Path) -> None:
        """What a start listing all three does to the keys (here on a port no site dials)."""
        settings, _ = load_server(config, [], insecure=False)
        link = Link(replace(settings, port=free_port()), insecure=False)
        link.start()
        try:
            sync_sites(link, settings.sites)
        finally:
            link.stop()

    root, port, procs = kit
    register_every_site(server_toml(root, "server-all", port, "runs/all", PLAIN_FEDAVG))
    gamma = (procs.log("site-gamma").count("query handled"), len(audit(root, "gamma")))
    two = server_toml(root, "server-u", port, "runs/u", PLAIN_FEDAVG, sites=SITES[:2], rounds=1)
    server = procs.fedlora("server-u", "server", "--config", str(two))
    assert finished(server, procs, "server-u", FEDERATION_TIMEOUT) == 0, procs.log("server-u")
    text = procs.log("server-u")
    assert "Site keys: gamma is registered but not in [sites]: it takes no part" in text, text
    assert "waiting for 2 sites: alpha, beta." in text
    assert [r["clients"] for r in metrics(root / "runs" / "u")[1:]] == [2]
    assert (procs.log("site-gamma").count("query handled"), len(audit(root, "gamma"))) == gamma

    # revocation on a server of its own (no site dials it: a site daemon refused for over a
    # minute gives up, and the next tests need gamma's)
    every = server_toml(root, "server-v", free_port(), "runs/v", PLAIN_FEDAVG, state_dir="v")
    register_every_site(every)
    wrong = procs.fedlora("revoke-z", "server", "--config", str(every), "--revoke", "z")
    assert finished(wrong, procs, "revoke-z", 60) == 2
    text = procs.log("revoke-z")
    assert "Cannot revoke site 'z'" in text and "Traceback" not in text, text
    assert "(registered sites: alpha, beta, gamma)." in text
    revoke = procs.fedlora("revoke-gamma", "server", "--config", str(every), "--revoke", "gamma")
    assert finished(revoke, procs, "revoke-gamma", 60) == 0, procs.log("revoke-gamma")
    assert "Site keys: revoked the key of gamma (still listed" in procs.log("revoke-gamma")
    again = procs.fedlora("server-v", "server", "--config", str(every))
    assert finished(again, procs, "server-v", 60) == 2
    text = procs.log("server-v")
    assert "stays revoked" in text and "--site gamma --force" in text and "Traceback" not in text
    assert not (root / "runs" / "v.partial").exists()


# (before the next test, which kills a site daemon of the shared kit for good)
@deploy
def test_server_sigint_ends_within_seconds_with_the_resume_command(kit):
    """Ctrl-C on `fedlora server`: one line naming the saved rounds and the command that
    continues the federation, within 10 s, no traceback, and nothing saved after it."""
    root, port, procs = kit
    config = server_toml(root, "server-z", port, "runs/z", PLAIN_FEDAVG, rounds=500)
    work = root / "runs" / "z.partial"
    server = procs.fedlora("server-z", "server", "--config", str(config))
    wait_for(lambda: len(metrics(work)) >= 2, FEDERATION_TIMEOUT, "round 1")
    server.send_signal(signal.SIGINT)
    assert finished(server, procs, "server-z", 10) == 130
    text = procs.log("server-z")
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    from fedlora import checkpoint

    saved = checkpoint.saved_round(work / "state")
    assert last.startswith(f"fedlora: interrupted (SIGINT); rounds 0-{saved} are saved"), last
    assert last.endswith(f"resume with: fedlora server --config {config} --resume"), last
    time.sleep(3)
    assert len(metrics(work)) == saved + 1


@deploy
def test_a_site_that_stops_answering_holds_a_round_only_for_the_reply_timeout(kit):
    """A site daemon frozen mid-federation (SIGSTOP: its SuperNode still heartbeats, so Flower
    counts it gone only minutes later) holds each round for federation.reply_timeout, and the
    rounds complete with the others; thawed, it answers the next federation (the next test)."""
    root, port, procs = kit
    victim = next(p for p in procs.procs if p.args[-1] == "site-gamma.toml")
    queries = procs.log("site-gamma").count("query handled")
    config = server_toml(
        root, "server-t", port, "runs/t", PLAIN_FEDAVG, min_clients=2, reply_timeout=10
    )
    server = procs.fedlora("server-t", "server", "--config", str(config))
    wait_for(lambda: procs.log("site-gamma").count("query handled") > queries, 90, "gamma's query")
    victim.send_signal(signal.SIGSTOP)
    try:
        assert finished(server, procs, "server-t", FEDERATION_TIMEOUT) == 0, procs.log("server-t")
    finally:
        victim.send_signal(signal.SIGCONT)
    rows = metrics(root / "runs" / "t")
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    said = procs.log("server-t")
    assert said.count("gamma: no reply within 10 s (federation.reply_timeout)") == 2, said


@deploy
def test_site_killed_mid_round_the_round_completes_with_the_others(kit):
    root, port, procs = kit
    victim = next(p for p in procs.procs if p.args[-1] == "site-gamma.toml")
    queries = procs.log("site-gamma").count("query handled")
    before = {s: len(audit(root, s)) for s in ("alpha", "beta")}
    config = server_toml(root, "server-b", port, "runs/b", PLAIN_FEDAVG, min_clients=2)
    server = procs.fedlora("server-b", "server", "--config", str(config))
    # gamma told the server who it is; freeze it before it can train
    wait_for(lambda: procs.log("site-gamma").count("query handled") > queries, 90, "gamma's query")
    victim.send_signal(signal.SIGSTOP)
    # round 1 is under way: the others have sent their update, gamma holds its message
    wait_for(
        lambda: all(len(audit(root, s)) > before[s] for s in before), 90, "the others' updates"
    )
    victim.kill()  # its SuperNode is told to leave and disconnects from the server
    victim.wait(timeout=10)
    assert finished(server, procs, "server-b", FEDERATION_TIMEOUT) == 0, procs.log("server-b")
    rows = metrics(root / "runs" / "b")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    assert "a site failed" in procs.log("server-b")


@deploy
def test_the_kits_as_shipped_run_a_federation(tmp_path):
    """server/ and clients/ copied as their READMEs say (certificates, each site's own key pair,
    its public half in the server's site-keys/, its fingerprint in the other sites' [peers]),
    with only what every operator edits: the addresses, each site's name, data and peers, and
    (to keep this test short) the base model and the number of rounds. Secure aggregation with
    DP-SGD, as the kits ship, passes every site's policy and roster and runs two rounds: in the
    second each site checks the adapter against round 1's sum (fedlora.apps.evidence)."""
    import shutil

    from fedlora.model import resolve_model
    from fedlora.privacy.ledger import PrivacyLedger
    from fedlora.secure.certs import Layout, make_certs
    from fedlora.secure.identity import fingerprint

    resolve_model("tiny-random", log=lambda _: None)
    repo = Path(__file__).resolve().parents[1]
    port = free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server_toml = (repo / "server" / "server.example.toml").read_text()
    assert 'address = "0.0.0.0:9092"' in server_toml
    (server_dir / "server.toml").write_text(
        server_toml.replace('address = "0.0.0.0:9092"', f'address = "127.0.0.1:{port}"')
    )
    make_certs(server_dir / "certs", server_names=["localhost"], server_ips=["127.0.0.1"], sites=[])
    write_rows(server_dir / "eval.jsonl", seed=99)
    (server_dir / "site-keys").mkdir()
    site_toml = (repo / "clients" / "site.example.toml").read_text()
    procs = Processes(tmp_path)
    names = ["general-hospital", "st-marys", "university-clinic"]
    for name in names:  # each site makes its own key; the others list its fingerprint
        make_certs(tmp_path / name / "keys", server_names=[], server_ips=[], sites=[name])
    prints = {
        n: fingerprint(Layout(tmp_path / n / "keys").site_public_key(n).read_bytes()) for n in names
    }
    try:
        for i, name in enumerate(names):
            site = tmp_path / name
            shutil.copy(
                Layout(site / "keys").site_public_key(name),
                server_dir / "site-keys" / f"{name}.pub",
            )
            shutil.copy(server_dir / "certs" / "ca.pem", site / "ca.pem")
            (site / "data").mkdir()
            write_rows(site / "data" / "train.jsonl", seed=i)
            text = site_toml.replace('"st-marys"', f'"{name}"').replace("/st-marys/", f"/{name}/")
            text = text.replace('"fl.example.org:9092"', f'"localhost:{port}"')
            text = text.split("\n[peers]\n")[0] + "\n[peers]\n"
            text += "".join(f'{n} = "{prints[n]}"\n' for n in names if n != name)
            (site / "site.toml").write_text(text)
            procs.fedlora(f"site-{name}", "client", "--config", str(site / "site.toml"))
        server = procs.fedlora(
            "server",
            "server",
            "--config",
            str(server_dir / "server.toml"),
            "--set",
            "model.name=tiny-random",
            "--set",
            "federation.rounds=2",
        )
        assert server.wait(timeout=FEDERATION_TIMEOUT) == 0, procs.log("server")[-3000:]
    except subprocess.TimeoutExpired:
        raise AssertionError(procs.log("server")[-3000:]) from None
    finally:
        procs.kill_all()
    out = server_dir / "runs" / "federation-1"
    rows = metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2], rows
    assert [r["clients"] for r in rows[1:]] == [3, 3] and "refused" not in rows[2], rows
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]  # under secure aggregation only the sites' mean is known
    assert privacy["level"] == "sample" and privacy["max_epsilon"] is None
    assert 0 < privacy["epsilon_mean"] <= 8
    for name in names:  # each site sent one masked update, under its own policy
        sent = [
            json.loads(line) for line in (tmp_path / name / "audit.jsonl").read_text().splitlines()
        ]
        assert [e["message"] for e in sent if "records" in e] == ["train.secagg"] * 2, sent
        # its operator saw the noise and the spend; its ledger holds the round it released
        assert "round 1 trained: DP-SGD, noise multiplier" in procs.log(f"site-{name}")
        assert "secure aggregation with the 2 sites of [peers] only" in procs.log(f"site-{name}")
        ledger = PrivacyLedger(tmp_path / name / "state" / "privacy-ledger.jsonl")
        assert [r.round for r in ledger.releases()] == [1, 2]


def test_a_site_cannot_answer_discovery_in_another_sites_name():
    """The server maps a node to the site whose key the SuperLink authenticated; a query reply
    claiming another site is dropped, however the replies are collected (discovery pulls them
    as they come, a round sends and receives)."""
    from types import SimpleNamespace

    from flwr.app import MessageType

    from fedlora.apps import records as R
    from fedlora.deploy.server import VerifiedGrid

    def reply(node: int, claimed_site: int) -> SimpleNamespace:
        return SimpleNamespace(
            has_error=lambda: False,
            metadata=SimpleNamespace(message_type=MessageType.QUERY, src_node_id=node),
            content={R.SITE_METRICS: {R.SITE_ID: claimed_site}},
        )

    honest, impostor = reply(7, 0), reply(8, 0)  # node 8 holds beta's key, claims alpha
    inner = SimpleNamespace(
        pull_messages=lambda ids: [honest, impostor],
        send_and_receive=lambda msgs, timeout=None: [honest, impostor],
    )
    notes: list[str] = []
    grid = VerifiedGrid(inner, {7: "alpha", 8: "beta"}, ["alpha", "beta"], notes.append)
    assert grid.pull_messages(["a", "b"]) == [honest]
    assert grid.send_and_receive([], timeout=1) == [honest]
    assert len(notes) == 1 and "node 8 (key of beta) claims to be site alpha" in notes[0]


def test_discovery_never_asks_a_registered_site_left_out_of_the_sites(monkeypatch):
    """gamma's key stays registered when gamma is left out of [sites], and its daemon may be
    connected: the server sees only the listed sites' nodes, so gamma is never asked which site
    it is (it cannot answer, not being in the run's list, and an error reply is asked again at
    once); the log says once that it is ignored."""
    from types import SimpleNamespace

    from flwr.app import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.apps import records as R
    from fedlora.apps.discovery import discover_sites
    from fedlora.deploy.server import VerifiedGrid

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    names, listed = {7: "alpha", 8: "beta", 9: "gamma"}, ["alpha", "beta"]
    asked: list[int] = []

    def push(messages) -> list[str]:
        asked.extend(m.metadata.dst_node_id for m in messages)
        return [f"q{m.metadata.dst_node_id}" for m in messages]

    def reply(message_id: str) -> SimpleNamespace:
        node = int(message_id[1:])
        error = names[node] not in listed  # what an unlisted site daemon answers
        return SimpleNamespace(
            has_error=lambda: error,
            metadata=SimpleNamespace(
                message_type=MessageType.QUERY, src_node_id=node, reply_to_message_id=message_id
            ),
            content={} if error else {R.SITE_METRICS: {R.SITE_ID: listed.index(names[node])}},
        )

    inner = SimpleNamespace(
        get_node_ids=lambda: [7, 9, 8],
        push_messages=push,
        pull_messages=lambda ids: [reply(i) for i in ids],
    )
    notes: list[str] = []
    grid = VerifiedGrid(inner, names, listed, notes.append)
    assert discover_sites(grid, 2, timeout=5.0, names=listed) == {0: 7, 1: 8}
    assert sorted(asked) == [7, 8]
    assert grid.get_node_ids() == [7, 8]
    assert notes == ["node 9 (key of gamma) is connected but not in [sites]; ignored."]


def test_a_federation_id_from_the_server_is_never_a_path(tmp_path):
    """The server names the federation, and a site daemon keeps that federation's state (its
    secret, rounds taken, strategy state, personalised adapter) in state_dir/federations/<id>:
    an id such as "../../x" or "/srv/data" put those files wherever the server chose."""
    from flwr.app import Context, Message, MessageType, RecordDict
    from in_process import task_identity

    from fedlora.deploy import runconfig
    from fedlora.deploy.apps import SiteApp

    uuid_hex = "42f9422dbef54adf86a4acf5107b219e"
    assert runconfig.federation({runconfig.FEDERATION: uuid_hex}) == uuid_hex
    for bad in ["../../elsewhere", str(tmp_path / "elsewhere"), "", "a/b", ".."]:
        with pytest.raises(FedloraError, match="not a federation id"):
            runconfig.federation({runconfig.FEDERATION: bad})

    site = tmp_path / "site"
    site.mkdir()
    (site / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    (site / "site.toml").write_text(
        "[site]\nname = 'alpha'\nserver = 'localhost:9092'\ninsecure = true\n"
        "state_dir = 'state'\n[data]\npath = 'train.jsonl'\n"
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={
            runconfig.SITE_NAME: "alpha",
            runconfig.SITE_CONFIG: str(site / "site.toml"),
        },
        state=RecordDict(),
        run_config={runconfig.FEDERATION: str(tmp_path / "elsewhere")},
    )
    with task_identity():
        msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
        with pytest.raises(FedloraError, match="not a federation id"):
            SiteApp()(msg, context)
    assert not (tmp_path / "elsewhere").exists()


@deploy
def test_sites_with_peers_confirm_the_survivors_when_one_leaves_after_sharing_its_keys(tmp_path):
    """Four site daemons listing each other under [peers], secure aggregation with DP-SGD. The
    fourth has already spent its own budget (policy.max_epsilon), which it finds when it trains:
    it refuses at the mask stage, after its keys and shares went out. The other three confirm
    the survivors before revealing its mask key (fedlora.secure.secagg), over TLS between real
    processes, and the round sums the three."""
    from fedlora.model import resolve_model
    from fedlora.secure.certs import Layout, make_certs
    from fedlora.secure.identity import fingerprint

    resolve_model("tiny-random", log=lambda _: None)
    names = ("north", "south", "east", "west")
    certs = tmp_path / "certs"
    make_certs(certs, server_names=["localhost"], server_ips=["127.0.0.1"], sites=list(names))
    prints = {n: fingerprint(Layout(certs).site_public_key(n).read_bytes()) for n in names}
    write_rows(tmp_path / "eval.jsonl", seed=99)
    port = free_port()
    sections = {
        "secure": {"enabled": "true"},
        "privacy": {"level": '"sample"', "target_epsilon": "8.0"},
    }
    config = server_toml(
        tmp_path, "server", port, "runs/dropout", sections, sites=names, rounds=1, min_clients=3
    )
    procs = Processes(tmp_path)
    try:
        server = procs.fedlora("server", "server", "--config", str(config))
        for i, name in enumerate(names):
            write_rows(tmp_path / f"{name}.jsonl", seed=i)
            policy = "[policy]\nmax_epsilon = 0.01\n\n" if name == "west" else ""
            peers = "".join(f'{n} = "{prints[n]}"\n' for n in names if n != name)
            (tmp_path / f"site-{name}.toml").write_text(
                f'[site]\nname = "{name}"\nserver = "localhost:{port}"\n'
                f'ca_cert = "certs/ca.pem"\nauth_key = "certs/sites/{name}/auth.key"\n'
                f'state_dir = "state-{name}"\nthreads = 1\n\n[data]\npath = "{name}.jsonl"\n\n'
                f"{policy}[peers]\n{peers}"
            )
            procs.fedlora(f"site-{name}", "client", "--config", f"site-{name}.toml")
        assert finished(server, procs, "server", 300) == 0, procs.log("server")
    finally:
        procs.kill_all()
    (_, row) = metrics(tmp_path / "runs" / "dropout")
    assert row["sites"] == [0, 1, 2], procs.log("server")
    assert list(row["secagg_seconds"]) == ["keys", "share", "mask", "confirm", "unmask"]
    assert "site 3 has spent its privacy budget" in procs.log("server")
