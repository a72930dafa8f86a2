"""The site half of a round, as a Flower ClientApp (Message API).

A site receives the global adapter and the strategy's broadcast state, trains locally, and
replies with the strategy's already-weighted contribution vectors: LoRA tensors only. The
training itself is `fedlora.apps.contribution`'s (shared with the secure rounds of
`fedlora.apps.secure`); this module answers the messages.
"""

from __future__ import annotations

import contextlib

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import transport
from fedlora.adapter import load_adapter_arrays
from fedlora.apps import records
from fedlora.apps.contribution import (
    SITE_LOG,
    STATE_DIR,
    refusal_reply,
    seed_training,
    site_id,
    site_runtime,
    site_secret,
    site_state_dir,
    take_round,
    train_contribution,
)
from fedlora.apps.secure import BackgroundTraining, secure_stage_reply
from fedlora.apps.site_state import RoundsTaken
from fedlora.config import Config
from fedlora.privacy.policy import BudgetExhausted
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy
from fedlora.strategies.base import TrainingTerms
from fedlora.train import evaluate, local_train


def query_reply(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is (it assigns work by site, not by node id)."""
    return Message(
        RecordDict({records.SITE_METRICS: MetricRecord({records.SITE_ID: site_id(context)})}),
        reply_to=msg,
    )


def train_reply(
    cfg: Config, msg: Message, context: Context, policy: SitePolicy | None = None
) -> Message:
    """Plain aggregation: the contribution travels in the clear (inside TLS). A site whose
    privacy budget is spent says so instead (the server then leaves it out); a request the
    site's policy refuses is answered with the reason, before any training."""
    round_ = int(msg.content[records.ROUND_CONFIG][records.ROUND])
    policy = policy or SitePolicy.mirroring(cfg)
    try:
        policy.check_request(cfg, secure=False)
        take_round(cfg, context, round_)
        contribution, metrics, release = train_contribution(cfg, msg.content, context, policy)
    except PolicyRefused as exc:
        return refusal_reply(msg, site_id(context), round_, exc.reason)
    except BudgetExhausted as exc:  # no number: the site's own budget spans other federations
        SITE_LOG.info(f"round {round_} not trained: {exc.local_detail}")
        status = MetricRecord({records.SITE_ID: exc.site, records.EXHAUSTED: 1})
        return Message(RecordDict({records.SITE_METRICS: status}), reply_to=msg)
    # vectors travel as transport.dtype (float32: the adapter's own precision); the server
    # sums in float64
    sent = transport.encode(contribution, cfg.transport.dtype)
    if cfg.transport.dtype != "float32":
        error = transport.round_trip_error(contribution, transport.decode(sent))
        metrics = MetricRecord(dict(metrics) | {records.TRANSPORT_ERROR: error})
    content = RecordDict(
        {records.CONTRIBUTION: records.to_record(sent), records.SITE_METRICS: metrics}
    )
    release()
    return Message(content, reply_to=msg)


def personalisation_round(cfg: Config) -> int:
    """Personalisation counts as the round after the last, in the rounds a site has taken part
    in: it answers once, so a server cannot ask for scores under one adapter after another."""
    return cfg.federation.rounds + 1


def personalize_reply(
    cfg: Config, msg: Message, context: Context, policy: SitePolicy | None = None
) -> Message:
    """Fine-tune the final global adapter on this site's rows only and compare both on the
    site's own held-out share. The personalised adapter is kept at the site (a standard peft
    adapter, see fedlora.lifecycle.personal_adapter_dir); nothing but these metrics leaves it,
    and only where the site's policy lets its scores leave in the clear."""
    site = site_id(context)
    policy = policy or SitePolicy.mirroring(cfg)
    steps = int(msg.content[records.ROUND_CONFIG][records.PERSONALIZE_STEPS])
    try:
        policy.check_personalisation(cfg)
        policy.check_work(steps, cfg.train.batch_size)
        if not RoundsTaken(site_state_dir(cfg, context), site).take(personalisation_round(cfg)):
            raise PolicyRefused("personalisation already done: a site answers it once")
    except PolicyRefused as exc:
        return refusal_reply(msg, site, personalisation_round(cfg), exc.reason)
    runtime = site_runtime(cfg, context)
    global_arrays = records.from_record(msg.content[records.GLOBAL_ADAPTER])
    held_out = runtime.encoder.encode_all(
        [runtime.dataset.test[i] for i in runtime.test_parts[site]]
    )
    metrics: dict[str, float | int] = {records.SITE_ID: site, records.HELD_OUT_ROWS: len(held_out)}
    load_adapter_arrays(runtime.model, global_arrays)
    if held_out:
        before = evaluate(
            runtime.model, runtime.encoder, held_out, runtime.pad_id, bf16=runtime.bf16
        )
        metrics |= {
            records.GLOBAL_LOSS: before.loss,
            records.GLOBAL_ACCURACY: before.accuracy or 0.0,
        }
    secret = site_secret(cfg, context, site_state_dir(cfg, context))
    local_train(
        runtime.model,
        runtime.site_rows(site),
        steps,
        cfg.train,
        TrainingTerms(),
        seed_training(secret, personalisation_round(cfg), site),
        runtime.pad_id,
        bf16=runtime.bf16,
    )
    if held_out:
        after = evaluate(
            runtime.model, runtime.encoder, held_out, runtime.pad_id, bf16=runtime.bf16
        )
        metrics |= {
            records.PERSONAL_LOSS: after.loss,
            records.PERSONAL_ACCURACY: after.accuracy or 0.0,
        }
    from fedlora.lifecycle import personal_adapter_dir, save_site_adapter

    own_state = context.node_config.get(STATE_DIR)
    save_site_adapter(
        runtime.model,
        personal_adapter_dir(site, cfg.run.out, None if own_state is None else str(own_state)),
    )
    return Message(RecordDict({records.SITE_METRICS: MetricRecord(metrics)}), reply_to=msg)


def make_client_app(
    cfg: Config, policy: SitePolicy | None = None, background: BackgroundTraining | None = None
) -> ClientApp:
    """A ClientApp closed over the (small) config and the site's policy (a simulation's sites:
    the run config's own choices): the model is loaded in the worker. `background`: a
    long-lived site process trains secure rounds from their keys stage on in a thread of its
    own (fedlora.apps.secure); its other training then waits for that thread's."""
    policy = policy or SitePolicy.mirroring(cfg)
    model_use = background.exclusive() if background else contextlib.nullcontext()
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return query_reply(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        with model_use:
            return train_reply(cfg, msg, context, policy)

    @app.evaluate()
    def personalize(msg: Message, context: Context) -> Message:
        with model_use:
            return personalize_reply(cfg, msg, context, policy)

    # secure aggregation: "query.secagg" (key and unmasking stages), "train.secagg" (masked input)
    @app.query(records.SECAGG_ACTION)
    def secagg_query(msg: Message, context: Context) -> Message:
        return secure_stage_reply(cfg, msg, context, policy, background)

    @app.train(records.SECAGG_ACTION)
    def secagg_train(msg: Message, context: Context) -> Message:
        return secure_stage_reply(cfg, msg, context, policy, background)

    return app
