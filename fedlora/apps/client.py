"""The site half of a round, as a Flower ClientApp (Message API).

A site receives the global adapter and the strategy's broadcast state, trains locally, and
replies with the strategy's already-weighted contribution vectors: LoRA tensors only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.apps import records as R
from fedlora.apps.site_state import SiteStore
from fedlora.checkpoint import run_state_dir
from fedlora.config import Config, TrainConfig
from fedlora.errors import FedloraError
from fedlora.model import adapter_arrays, load_adapter_arrays
from fedlora.runtime import get_runtime
from fedlora.strategies import strategy_for
from fedlora.strategies.base import LocalWork, TrainingTerms
from fedlora.train import evaluate, local_train


def site_local_steps(train: TrainConfig, site: int, n_sites: int) -> int:
    """Unequal local work: factors spread evenly over [1 - spread, 1 + spread] across sites."""
    if n_sites < 2 or not train.local_steps_spread:
        return train.local_steps
    factor = 1 - train.local_steps_spread + 2 * train.local_steps_spread * site / (n_sites - 1)
    return max(1, round(train.local_steps * factor))


def derive_seed(*parts: int) -> int:
    """A stable seed for (run seed, round, site): same command, same numbers."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


#: node_config key naming a site daemon's state folder
STATE_DIR = "state-dir"


def site_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def site_state_dir(cfg: Config, context: Context) -> Path:
    """A site daemon names its state folder in its node config; simulated sites keep theirs in
    the server's state folder of the run (so `simulate --resume` finds them)."""
    if STATE_DIR in context.node_config:
        return Path(str(context.node_config[STATE_DIR]))
    if not cfg.run.out:
        raise FedloraError("run.out must be set before sites train (simulate resolves it).")
    return run_state_dir(Path(cfg.run.out)) / "sites"


def query_reply(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is (it assigns work by site, not by node id)."""
    return Message(
        RecordDict({R.SITE_METRICS: MetricRecord({R.SITE_ID: site_id(context)})}), reply_to=msg
    )


def train_contribution(
    cfg: Config, msg: Message, context: Context
) -> tuple[dict[str, np.ndarray], MetricRecord]:
    """Train on this site's rows from the global adapter in `msg`; return the strategy's
    contribution (the vectors the server sums) and the site's metrics."""
    site = site_id(context)
    rt = get_runtime(cfg)
    round_ = int(msg.content[R.ROUND_CONFIG][R.ROUND])
    global_arrays = R.from_record(msg.content[R.GLOBAL_ADAPTER])
    broadcast = R.from_record(msg.content[R.BROADCAST])
    store = SiteStore(site_state_dir(cfg, context), site)
    client_state = store.before(round_)
    strategy = strategy_for(cfg)
    load_adapter_arrays(rt.model, global_arrays)
    terms = strategy.training_terms(broadcast, client_state, global_arrays)
    steps = site_local_steps(cfg.train, site, cfg.federation.clients)
    seed = derive_seed(cfg.run.seed, round_, site)
    torch.manual_seed(seed)  # LoRA dropout
    rows = rt.site_rows(site)
    result = local_train(
        rt.model,
        rows,
        steps,
        cfg.train,
        terms,
        np.random.default_rng(seed),
        rt.pad_id,
        bf16=rt.bf16,
    )
    local = adapter_arrays(rt.model)
    delta = {k: local[k] - global_arrays[k] for k in global_arrays}
    work = LocalWork(
        num_examples=len(rows), steps=result.steps, lr=cfg.train.lr, momentum=cfg.train.momentum
    )
    contribution, new_state = strategy.client_contribution(delta, work, broadcast, client_state)
    store.save(round_, new_state)
    metrics = MetricRecord(
        {
            R.SITE_ID: site,
            R.TRAIN_LOSS: result.mean_loss,
            R.LOCAL_STEPS: result.steps,
            R.NUM_EXAMPLES: len(rows),
        }
    )
    return contribution, metrics


def train_reply(cfg: Config, msg: Message, context: Context) -> Message:
    """Plain aggregation: the contribution travels in the clear (inside TLS)."""
    contribution, metrics = train_contribution(cfg, msg, context)
    # vectors travel as float32 (the adapter's own precision); the server sums in float64
    sent = {k: v if v.shape == (1,) else v.astype(np.float32) for k, v in contribution.items()}
    content = RecordDict({R.CONTRIBUTION: R.to_record(sent), R.SITE_METRICS: metrics})
    return Message(content, reply_to=msg)


def personalize_reply(cfg: Config, msg: Message, context: Context) -> Message:
    """Fine-tune the final global adapter on this site's rows only and compare both on the
    site's own held-out share. Nothing but these metrics leaves the site."""
    site = site_id(context)
    rt = get_runtime(cfg)
    steps = int(msg.content[R.ROUND_CONFIG][R.PERSONALIZE_STEPS])
    global_arrays = R.from_record(msg.content[R.GLOBAL_ADAPTER])
    held_out = rt.encoder.encode_all([rt.dataset.test[i] for i in rt.test_parts[site]])
    metrics: dict[str, float | int] = {R.SITE_ID: site, R.HELD_OUT_ROWS: len(held_out)}
    load_adapter_arrays(rt.model, global_arrays)
    if held_out:
        before = evaluate(rt.model, rt.encoder, held_out, rt.pad_id, bf16=rt.bf16)
        metrics |= {R.GLOBAL_LOSS: before.loss, R.GLOBAL_ACCURACY: before.accuracy or 0.0}
    seed = derive_seed(cfg.run.seed, cfg.federation.rounds + 1, site)
    torch.manual_seed(seed)
    local_train(
        rt.model,
        rt.site_rows(site),
        steps,
        cfg.train,
        TrainingTerms(),
        np.random.default_rng(seed),
        rt.pad_id,
        bf16=rt.bf16,
    )
    if held_out:
        after = evaluate(rt.model, rt.encoder, held_out, rt.pad_id, bf16=rt.bf16)
        metrics |= {R.PERSONAL_LOSS: after.loss, R.PERSONAL_ACCURACY: after.accuracy or 0.0}
    return Message(RecordDict({R.SITE_METRICS: MetricRecord(metrics)}), reply_to=msg)


def make_client_app(cfg: Config) -> ClientApp:
    """A ClientApp closed over the (small) config only: the model is loaded in the worker."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return query_reply(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(cfg, msg, context)

    @app.evaluate()
    def personalize(msg: Message, context: Context) -> Message:
        return personalize_reply(cfg, msg, context)

    # secure aggregation: "query.secagg" (key and unmasking stages), "train.secagg" (masked input)
    from fedlora.apps.secure import secure_stage_reply  # it imports this module

    @app.query(R.SECAGG_ACTION)
    def secagg_query(msg: Message, context: Context) -> Message:
        return secure_stage_reply(cfg, msg, context)

    @app.train(R.SECAGG_ACTION)
    def secagg_train(msg: Message, context: Context) -> Message:
        return secure_stage_reply(cfg, msg, context)

    return app
