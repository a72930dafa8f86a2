"""The Flower apps a deployed federation's bundle names, and the site's audit log.

`client_app` is what a site runs for every message: it rebuilds the site's config from the
federation's run config (sent by the server) and the site's own `site.toml` (named in its node
config), hands the message to the same ClientApp `fedlora simulate` uses with the site's own
`[policy]`, and appends one audit line for every reply that carries tensors and for every
request its policy refused. `server_app` exists because Flower's bundle format
requires one; fedlora's server half runs inside `fedlora server` (fedlora.deploy.link says why).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.apps import records
from fedlora.apps.client import make_client_app
from fedlora.apps.contribution import AUTH_KEY, LEDGER_FILE, STATE_DIR
from fedlora.apps.secure import BACKGROUND
from fedlora.config import Config, DataConfig, load_config
from fedlora.deploy import runconfig
from fedlora.deploy.settings import SiteSettings, load_site
from fedlora.errors import FedloraError
from fedlora.privacy.secrets import SITE_CSPRNG

#: the data keys a site sets for itself (defaults when its site.toml leaves them out)
OWN_DATA = {"path": "", "test_path": "", "test_fraction": DataConfig.test_fraction}


def site_config(federation: dict, site: SiteSettings) -> Config:
    """The federation's config with this site's own data file, thread count, device and, under
    DP-SGD, privacy unit. (The site's own budget, policy.max_epsilon, is checked over its whole
    privacy ledger, apart from the federation's: fedlora.apps.contribution.)"""
    values = {section: dict(entries) for section, entries in federation.items()}
    # which files the site reads is the site's decision alone, never the server's
    values.setdefault("data", {}).update(OWN_DATA | site.data)
    values.setdefault("train", {})["threads"] = site.threads
    values.setdefault("model", {})["device"] = site.device  # the site's hardware, its choice
    privacy = values.setdefault("privacy", {})
    if site.privacy_unit and privacy.get("level") == "sample":  # who a person is: its own data
        privacy["unit"] = site.privacy_unit
    return load_config(None, [values])


def refusal_entry(msg: Message, reply: Message, federation: str) -> dict | None:
    """The audit line of a request this site's policy refused, else None."""
    if reply.has_error() or records.REFUSAL not in reply.content:
        return None
    refusal = reply.content[records.REFUSAL]
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "federation": federation,
        "run": msg.metadata.run_id,
        "round": refusal[records.ROUND],
        "message": msg.metadata.message_type,
        "refused": refusal[records.REASON],
    }


def tensors(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The tensors of a record as sent: a packed record's own (records.to_record), else its
    arrays (the masked input of secure aggregation is one array, not packed)."""
    if records.PACKED in record:
        return records.from_record(record)
    return {key: array.numpy() for key, array in record.items()}


def audit_entry(
    msg: Message, reply: Message, federation: str, state: RecordDict | None = None
) -> dict | None:
    """The audit line of a reply that carries tensor data (an update) or scores of the site's
    rows (personalisation), else None. Under secure aggregation the site's epsilon is not in
    the reply: it is read from the site's `state`."""
    if reply.has_error():
        return None
    arrays = {
        f"{name}/{key}": array
        for name, record in reply.content.array_records.items()
        for key, array in tensors(record).items()
    }
    metrics = {k: v for m in reply.content.metric_records.values() for k, v in m.items()}
    if not arrays:
        if msg.metadata.message_type != MessageType.EVALUATE:
            return None
        return {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "federation": federation,
            "run": msg.metadata.run_id,
            "message": msg.metadata.message_type,
            "scores": metrics,
        }
    if (
        state is not None
        and records.LOCAL_SPEND in state
        and records.SECAGG_MASKED in reply.content
    ):
        metrics |= dict(state[records.LOCAL_SPEND])
    # the round: in a plaintext train message's round config, in a secure stage's own fields
    configs = msg.content.config_records
    config = configs.get(records.ROUND_CONFIG, configs.get(records.SECAGG, {}))
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "federation": federation,
        "run": msg.metadata.run_id,
        "round": config.get(records.ROUND),
        "message": msg.metadata.message_type,
        "records": sorted(reply.content.array_records),
        "bytes": records.payload_bytes(arrays),
        "sha256": records.payload_digest(arrays),
        "epsilon": metrics.get(records.PRIVACY + "epsilon"),
        "secrets": SITE_CSPRNG,  # a site daemon's noise, batches and coin: its own secret
    }


def append_audit(path: Path, entry: dict) -> None:
    """One JSON line, appended and flushed to disk before the reply leaves the site."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()


class SiteApp(ClientApp):
    """A ClientApp built per federation from the run config (the model stays loaded in the
    process across messages and federations while the model settings do not change)."""

    def __init__(self) -> None:
        super().__init__()
        self._apps: dict[str, ClientApp] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        site = load_site(Path(str(context.node_config[runconfig.SITE_CONFIG])))
        if str(context.node_config[runconfig.SITE_NAME]) != site.name:
            raise FedloraError("The site's node config and its site.toml name different sites.")
        federation = runconfig.federation(context.run_config)
        cfg = site_config(tomllib.loads(str(context.run_config[runconfig.CONFIG])), site)
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        key += repr((site.policy, site.train_during_key_exchange))
        if key not in self._apps:
            background = BACKGROUND if site.train_during_key_exchange else None
            self._apps = {key: make_client_app(cfg, site.policy, background)}
        # the strategy's site state and DP noise secret are kept per federation
        own = dict(context.node_config)
        own[STATE_DIR] = str(site.state_dir / "federations" / federation)
        own[LEDGER_FILE] = str(site.ledger)  # one for all its federations
        if site.auth_key is not None:  # signs its secure-aggregation keys
            own[AUTH_KEY] = str(site.auth_key)
        reply = self._apps[key](message, dataclasses.replace(context, node_config=own))
        entry = refusal_entry(message, reply, federation) or audit_entry(
            message, reply, federation, context.state
        )
        if entry is not None:
            append_audit(site.audit_log, entry)
        return reply


client_app = SiteApp()

server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    raise FedloraError(
        "A fedlora federation's server half runs inside `fedlora server --config server.toml`, "
        "not under `flwr run`."
    )
