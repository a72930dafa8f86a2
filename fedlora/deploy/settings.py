"""The two deployment config files: `server.toml` (the aggregation server) and `site.toml`
(one hospital site). Relative paths in them are relative to the file's own folder, so a kit
folder can be moved as a whole.

server.toml = a normal fedlora config (the federation: strategy, rounds, secure aggregation,
privacy, ...; see configs/default.toml) plus `[server]` (address, TLS files, state folder) and
`[sites]` (site name = its node-authentication public key). federation.clients is the number
of sites listed. site.toml = `[site]` (name, server address, CA, key, state, audit log) plus the
site's own `[data]`, `[model] device` (its own hardware), `[privacy] unit` (the column of its
own data that names a person, when DP-SGD protects people rather than rows) and `[policy]` (what
it accepts, fedlora.privacy.site_policy; the older `[privacy] max_epsilon` is read as `[policy]
max_epsilon`); everything else comes from the server.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import Config, _apply, parse_override, settle
from fedlora.errors import FedloraError
from fedlora.privacy.site_policy import SitePolicy, load_policy
from fedlora.readers import read_text
from fedlora.secure.certs import check_site_name, load_site_public_key
from fedlora.secure.identity import Signer, check_fingerprint, fingerprint

SERVER_KEYS = {"address", "state_dir", "ca_cert", "cert", "key"}
SITE_KEYS = {
    "name",
    "server",
    "ca_cert",
    "auth_key",
    "state_dir",
    "audit_log",
    "insecure",
    "threads",
    "poll_interval",
    "train_during_key_exchange",
}
SITE_DATA_KEYS = {"path", "test_path", "test_fraction"}
SITE_PRIVACY_KEYS = {"max_epsilon", "unit"}
SITE_MODEL_KEYS = {"device"}
DEFAULT_POLL_INTERVAL = 1.0
"""Seconds a site waits before asking the server again when it had no message (Flower's
SuperNode: 3 s). Every message stage of a round waits up to this long at the last site to ask.
Measured (BENCHMARKS.md, "The sites' poll interval"): 1 s takes about 2 s off a secure round
against 3 s; 0.5 s was no faster than 1 s within the noise, at twice the requests."""


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    state_dir: Path  # the SuperLink's database (registered site keys) lives here
    ca_cert: Path | None  # None: --insecure (no TLS)
    cert: Path | None
    key: Path | None
    sites: dict[str, Path]  # name -> OpenSSH public key, sorted by name


@dataclass(frozen=True)
class SiteSettings:
    name: str
    server: str  # host:port
    ca_cert: Path | None  # None: insecure (no TLS, no node authentication)
    auth_key: Path | None
    state_dir: Path
    audit_log: Path
    insecure: bool
    threads: int
    data: dict[str, Any]  # the site's own [data] keys
    path: Path  # the site.toml itself
    device: str = "auto"  # the site's model.device (its own hardware, never the server's)
    policy: SitePolicy = SitePolicy()  # what this site accepts, whatever the server asks
    #: the column of the site's data that names a person under sample-level DP ("": the
    #: federation's privacy.unit); the site's own, so the server cannot make it "row"
    privacy_unit: str = ""
    poll_interval: float = DEFAULT_POLL_INTERVAL  # s between asks for a message when idle
    #: a secure round trains from its keys stage on, in a background thread (fedlora.apps.secure)
    train_during_key_exchange: bool = True

    @property
    def ledger(self) -> Path:
        """The site's privacy ledger: one for all its federations (fedlora.privacy.ledger)."""
        return self.state_dir / "privacy-ledger.jsonl"


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FedloraError(f"Config file {path} does not exist.")
    try:
        return tomllib.loads(read_text(path, "Config file"))
    except tomllib.TOMLDecodeError as exc:
        raise FedloraError(f"Config file {path} is not valid TOML: {exc}.") from None


def _table(values: dict[str, Any], name: str, path: Path, known: set[str]) -> dict[str, Any]:
    table = values.get(name)
    if not isinstance(table, dict):
        raise FedloraError(f"{path} needs a [{name}] table.")
    unknown = set(table) - known
    if unknown:
        raise FedloraError(
            f"Unknown key {name}.{sorted(unknown)[0]} in {path}; known: {', '.join(sorted(known))}."
        )
    return table


def _str(table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise FedloraError(f"{where}.{key} must be a non-empty string (got {value!r}).")
    return value


def _file(base: Path, value: str, what: str) -> Path:
    path = (base / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise FedloraError(f"{what} {path} does not exist.")
    return path


def _folder(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def split_address(address: str, where: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedloraError(f"{where} = {address!r}: expected host:port, e.g. 0.0.0.0:9092.")
    return host.strip("[]"), int(port)


def load_server(path: Path, overrides: list[str], insecure: bool) -> tuple[ServerSettings, Config]:
    """The server's deployment settings and the federation's effective config."""
    values = read_toml(path)
    base = path.resolve().parent
    server = _table(values, "server", path, SERVER_KEYS)
    sites_table = values.get("sites")
    if not isinstance(sites_table, dict) or not sites_table:
        raise FedloraError(
            f'{path} lists no sites: add a [sites] table of name = "public key file" '
            "(make the keys with `fedlora certs DIR --site NAME`)."
        )
    sites: dict[str, Path] = {}
    for name in sorted(sites_table):
        check_site_name(name)
        key_path = _file(base, _str(sites_table, name, "sites"), f"Public key of site {name!r}:")
        if not insecure:
            load_site_public_key(key_path)  # a bad key fails here, not at the first round
        sites[name] = key_path
    host, port = split_address(_str(server, "address", "server", "0.0.0.0:9092"), "server.address")
    tls: dict[str, Path | None] = {
        k: None if insecure else _file(base, _str(server, k, "server"), f"server.{k}:")
        for k in ("ca_cert", "cert", "key")
    }
    settings = ServerSettings(
        host=host,
        port=port,
        state_dir=_folder(base, _str(server, "state_dir", "server", "server-state")),
        sites=sites,
        **tls,
    )
    federation = {k: v for k, v in values.items() if k not in ("server", "sites")}
    clients = federation.get("federation", {}).get("clients")
    if clients is not None and clients != len(sites):
        raise FedloraError(
            f"federation.clients = {clients} in {path}, but [sites] lists {len(sites)} sites; "
            "leave federation.clients out (it is the number of sites)."
        )
    _resolve_paths(federation, base)
    cfg = Config()
    chosen: set[str] = set()
    _apply(cfg, federation, str(path), chosen)
    _apply(cfg, {"federation": {"clients": len(sites)}}, str(path), chosen)
    for text in overrides:
        _apply(cfg, parse_override(text), "the command line", chosen)
    settle(cfg, chosen)
    return settings, cfg


def _resolve_paths(values: dict[str, Any], base: Path) -> None:
    """Relative data files and results folder in a deployment config are relative to it."""
    for section, key in (("data", "path"), ("data", "test_path"), ("run", "out")):
        value = values.get(section, {}).get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            values[section][key] = str(base / value)


def load_site(path: Path) -> SiteSettings:
    values = read_toml(path)
    base = path.resolve().parent
    unknown = set(values) - {"site", "data", "privacy", "policy", "peers", "model"}
    if unknown:
        raise FedloraError(
            f"Unknown section [{sorted(unknown)[0]}] in {path}: a site sets only [site], its own "
            "[data], [model] device, [policy] and [peers]; the federation's settings come from "
            "the server."
        )
    model = _table(values, "model", path, SITE_MODEL_KEYS) if "model" in values else {}
    device = _site_device(model.get("device", "auto"), path)
    site = _table(values, "site", path, SITE_KEYS)
    data = _table(values, "data", path, SITE_DATA_KEYS) if "data" in values else {}
    privacy = _table(values, "privacy", path, SITE_PRIVACY_KEYS) if "privacy" in values else {}
    if "path" not in data:
        raise FedloraError(f"{path}: [data] path must name this site's training file.")
    _resolve_paths({"data": data}, base)
    insecure = site.get("insecure", False)
    if not isinstance(insecure, bool):
        raise FedloraError(f"site.insecure in {path} must be true or false.")
    threads = site.get("threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise FedloraError(f"site.threads in {path} must be 0 (every core) or more.")
    poll = site.get("poll_interval", DEFAULT_POLL_INTERVAL)
    if isinstance(poll, bool) or not isinstance(poll, int | float) or not 0.05 <= poll <= 60:
        raise FedloraError(
            f"site.poll_interval in {path} must be a number of seconds from 0.05 to 60 "
            f"(got {poll!r}; default {DEFAULT_POLL_INTERVAL})."
        )
    overlap = site.get("train_during_key_exchange", True)
    if not isinstance(overlap, bool):
        raise FedloraError(f"site.train_during_key_exchange in {path} must be true or false.")
    policy_table = dict(values.get("policy", {}))
    if not isinstance(values.get("policy", {}), dict):
        raise FedloraError(f"{path}: [policy] must be a table.")
    if "max_epsilon" in privacy and "max_epsilon" in policy_table:
        raise FedloraError(
            f"{path} sets both [privacy] max_epsilon and [policy] max_epsilon; keep the one in "
            "[policy] ([privacy] max_epsilon is its older name)."
        )
    max_eps = privacy.get("max_epsilon", policy_table.pop("max_epsilon", None))
    if max_eps is not None and (
        isinstance(max_eps, bool) or not isinstance(max_eps, int | float) or max_eps <= 0
    ):
        raise FedloraError(f"policy.max_epsilon in {path} must be a positive number.")
    unit = privacy.get("unit", "")
    if not isinstance(unit, str) or "unit" in privacy and not unit.strip():
        raise FedloraError(
            f'privacy.unit in {path} must name a column of this site\'s data, such as "patient_id" '
            '(or "row": every row is a different person).'
        )
    name = check_site_name(_str(site, "name", "site"))
    split_address(_str(site, "server", "site"), "site.server")
    state_dir = _folder(base, _str(site, "state_dir", "site", "site-state"))
    auth_key = None if insecure else _file(base, _str(site, "auth_key", "site"), "site.auth_key:")
    signer = None if auth_key is None else Signer.load(name, auth_key)  # signs its SecAgg keys
    peers = _peers(values.get("peers", {}), signer, path)
    if peers and insecure:
        raise FedloraError(
            f"{path}: [peers] needs this site's key to sign its own secure-aggregation keys, "
            "and insecure = true has none; set site.auth_key and site.ca_cert, or remove [peers]."
        )
    if policy_table.get("check_content_before_masking") and not peers:
        raise FedloraError(
            f"{path}: policy.check_content_before_masking checks the signatures of the sites "
            "[peers] lists, and there is no [peers]; list the other sites' key fingerprints "
            'under [peers] (clients/README.md, "Peers").'
        )
    return SiteSettings(
        name=name,
        server=site["server"],
        ca_cert=None if insecure else _file(base, _str(site, "ca_cert", "site"), "site.ca_cert:"),
        auth_key=auth_key,
        state_dir=state_dir,
        audit_log=_folder(base, _str(site, "audit_log", "site", str(state_dir / "audit.jsonl"))),
        insecure=insecure,
        threads=threads or os.cpu_count() or 1,
        data=data,
        path=path.resolve(),
        device=device,
        policy=dataclasses.replace(
            load_policy(policy_table | {"max_epsilon": float(max_eps or 0.0)}, str(path)),
            peers=peers,
        ),
        privacy_unit=unit,
        poll_interval=float(poll),
        train_during_key_exchange=overlap,
    )


def _peers(table: Any, signer: Signer | None, path: Path) -> tuple[tuple[str, str], ...]:
    """[peers]: the other sites' names and key fingerprints, sorted by name. A roster that
    lists this site too (one list for the whole consortium) must give its own key."""
    if not isinstance(table, dict):
        raise FedloraError(f"{path}: [peers] must be a table of site name = key fingerprint.")
    for name, value in table.items():
        check_site_name(name)
        check_fingerprint(value, f"peers.{name} in {path}")
    if len(set(table.values())) != len(table):
        raise FedloraError(f"{path}: two sites in [peers] have the same key fingerprint.")
    if signer is not None and signer.name in table:
        own = fingerprint(signer.public_key())
        if table[signer.name] != own:
            raise FedloraError(
                f"{path}: [peers] gives this site ({signer.name}) the fingerprint "
                f"{table[signer.name]}, but its site.auth_key has {own}: the roster is not this "
                "site's, or the key changed."
            )
    others = {n: f for n, f in table.items() if signer is None or n != signer.name}
    return tuple(sorted(others.items()))


def _site_device(value: Any, path: Path) -> str:
    """The site's [model] device, checked against this machine now (not at round 1)."""
    from fedlora.device import check_device_name, cuda_count, pick_device

    if not isinstance(value, str):
        raise FedloraError(f'model.device in {path} must be a string such as "auto" or "cuda".')
    try:
        check_device_name(value)
        if value.startswith("cuda"):
            pick_device(value, cuda_count())
    except FedloraError as exc:
        raise FedloraError(f"{path}: {exc}") from None
    return value
