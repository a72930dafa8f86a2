"""Config: defaults, file < override precedence, override parsing, validation, round trip."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedlora.config import (
    STRATEGY_RECIPES,
    Config,
    FederationConfig,
    LoraSettings,
    TrainConfig,
    load_config,
    parse_override,
    write_config,
)
from fedlora.errors import FedloraError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_load_and_equal_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.lora.r == LoraSettings().r
    assert cfg.federation.clients == FederationConfig().clients
    assert cfg.train.optimizer == TrainConfig().optimizer
    assert cfg.lora.target_modules()  # the default preset names modules


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        "[train]\nlr = 0.25\nlocal_steps = 7\n\n"
        "[federation]\nclients = 4\n\n"
        '[lora]\ntargets = "qkv"\n'
    )
    cfg = load_config(path, [{"train": {"lr": 0.5}}, {"train": {"lr": 0.75}}])
    assert cfg.train.lr == 0.75  # the last override wins over the earlier one and the file
    assert cfg.train.local_steps == 7  # from the file, not overridden
    assert cfg.federation.clients == 4
    assert cfg.lora.target_modules() == ["q_proj", "k_proj", "v_proj"]
    assert cfg.lora.r == LoraSettings().r  # untouched default


def test_int_in_float_field_becomes_float():
    cfg = load_config(None, [{"train": {"lr": 1}}])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


@pytest.mark.parametrize(
    ("text", "section", "key", "value", "kind"),
    [
        ("train.lr=1e-3", "train", "lr", 0.001, float),
        ("model.precision=bf16", "model", "precision", "bf16", str),
        ("lora.targets=['q_proj', 'o_proj']", "lora", "targets", ["q_proj", "o_proj"], list),
        ("lora.targets=o_proj", "lora", "targets", "o_proj", str),
        ("federation.clients=12", "federation", "clients", 12, int),
        ('data.path="my file.jsonl"', "data", "path", "my file.jsonl", str),
    ],
)
def test_parse_override_keeps_types(text, section, key, value, kind):
    parsed = parse_override(text)
    assert parsed == {section: {key: value}}
    assert type(parsed[section][key]) is kind


@pytest.mark.parametrize("text", ["train.lr", "lr=0.1", "=3"])
def test_parse_override_malformed(text):
    with pytest.raises(FedloraError, match="section.key=value"):
        parse_override(text)


def test_override_applies_through_load_config():
    overrides = [parse_override("train.lr=5e-4"), parse_override("lora.targets=o_proj")]
    cfg = load_config(None, overrides)
    assert cfg.train.lr == 5e-4
    assert cfg.lora.target_modules() == ["o_proj"]


def test_unknown_section_is_named():
    with pytest.raises(FedloraError, match=r"\[optim\]"):
        load_config(None, [{"optim": {"lr": 0.1}}])


def test_unknown_key_is_named():
    with pytest.raises(FedloraError, match=r"train\.learning_rate"):
        load_config(None, [{"train": {"learning_rate": 0.1}}])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[lora]\nrank = 4\n")
    with pytest.raises(FedloraError) as info:
        load_config(path)
    assert "lora.rank" in str(info.value) and str(path) in str(info.value)


def test_wrong_type_and_choice_are_refused():
    with pytest.raises(FedloraError, match=r"federation\.clients"):
        load_config(None, [{"federation": {"clients": "three"}}])
    with pytest.raises(FedloraError, match="fedavg"):  # lists the valid choices
        load_config(None, [{"strategy": {"name": "fedsgd"}}])


@pytest.mark.parametrize("final", [0.0, -0.1, 1.5])
def test_lr_schedule_choice_and_final_fraction_are_checked(final):
    with pytest.raises(FedloraError, match="cosine"):  # lists the valid choices
        load_config(None, [{"train": {"lr_schedule": "exponential"}}])
    with pytest.raises(FedloraError, match=r"train\.lr_final must be in \(0, 1\]"):
        load_config(None, [{"train": {"lr_schedule": "cosine", "lr_final": final}}])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"train": {"loraplus_ratio": 0.0}}, "must be positive"),
        ({"train": {"loraplus_ratio": 4.0}, "lora": {"aggregation": "freeze-a"}}, "only B trains"),
        (
            {"train": {"loraplus_ratio": 4.0}, "strategy": {"name": "scaffold"}},
            "SCAFFOLD's control variates",
        ),
    ],
)
def test_loraplus_ratio_is_refused_where_it_cannot_hold(overrides, words):
    with pytest.raises(FedloraError, match=words):
        load_config(None, [overrides])


def test_server_momentum_is_refused_with_an_adaptive_server_optimizer():
    with pytest.raises(FedloraError, match=r"server_momentum.*server_beta1"):
        load_config(None, [{"strategy": {"server_optimizer": "adam", "server_momentum": 0.9}}])
    with pytest.raises(FedloraError, match="adagrad"):  # lists the valid choices
        load_config(None, [{"strategy": {"server_optimizer": "rmsprop"}}])
    cfg = load_config(None, [{"strategy": {"server_optimizer": "yogi", "server_lr": 0.01}}])
    assert cfg.strategy.server_optimizer == "yogi"


def test_missing_and_invalid_config_file(tmp_path):
    with pytest.raises(FedloraError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = \n")
    with pytest.raises(FedloraError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("lora", "r", 0),
        ("federation", "rounds", 0),
        ("data", "dirichlet_alpha", 0),
        ("federation", "clients", 0),
        ("train", "lr", 0),
        ("train", "local_steps", 0),
        ("lora", "dropout", 1.0),
        ("strategy", "server_beta1", 1.0),
        ("strategy", "server_beta2", -0.1),
        ("strategy", "server_tau", 0),
    ],
)
def test_impossible_numbers_name_the_key(section, key, value):
    with pytest.raises(FedloraError) as info:
        load_config(None, [{section: {key: value}}])
    assert f"{section}.{key}" in str(info.value)


@pytest.mark.parametrize("strategy", ["scaffold", "fednova"])
def test_scaffold_fednova_refuse_adamw(strategy):
    with pytest.raises(FedloraError) as info:
        load_config(None, [{"strategy": {"name": strategy}, "train": {"optimizer": "adamw"}}])
    message = str(info.value)
    assert "train.optimizer" in message and "sgd" in message and strategy in message


@pytest.mark.parametrize("strategy", ["scaffold", "fednova"])
def test_scaffold_fednova_accept_sgd(strategy):
    cfg = load_config(None, [{"strategy": {"name": strategy}, "train": {"optimizer": "sgd"}}])
    assert cfg.strategy.name == strategy and cfg.train.optimizer == "sgd"


@pytest.mark.parametrize("strategy", ["scaffold", "fednova"])
def test_naming_scaffold_or_fednova_brings_its_recipe(strategy):
    """The strategy alone runs: its measured local-SGD recipe, said in the config's notes."""
    cfg = load_config(None, [{"strategy": {"name": strategy}}])
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.momentum) == ("sgd", 0.05, 0.9)
    assert len(cfg.notes) == 1 and "recipe" in cfg.notes[0] and "train.optimizer" in cfg.notes[0]
    # a key the user did set is kept; the rest of the recipe still applies
    cfg = load_config(None, [{"strategy": {"name": strategy}, "train": {"lr": 0.01}}])
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.momentum) == ("sgd", 0.01, 0.9)


@pytest.mark.parametrize("strategy", ["scaffold", "fednova"])
def test_strategy_recipes_equal_the_shipped_configs(strategy):
    shipped = tomllib.loads((CONFIGS / f"{strategy}.toml").read_text())["train"]
    recipe = STRATEGY_RECIPES[strategy]
    assert {k: shipped[k] for k in recipe} == recipe


def test_explicit_sgd_takes_no_recipe():
    cfg = load_config(None, [{"strategy": {"name": "scaffold"}, "train": {"optimizer": "sgd"}}])
    assert (cfg.train.lr, cfg.train.momentum) == (Config().train.lr, 0.0) and not cfg.notes


@pytest.mark.parametrize(
    ("overrides", "key", "fix"),
    [
        ({"privacy": {"noise_multiplier": 2.0}}, "privacy.noise_multiplier", "--privacy"),
        ({"privacy": {"max_grad_norm": 5.0}}, "privacy.max_grad_norm", "--privacy"),
        ({"privacy": {"max_epsilon": 4.0}}, "privacy.max_epsilon", "--privacy"),
        (
            {"privacy": {"level": "sample", "client_noise": "distributed"}},
            "privacy.client_noise",
            "--privacy client",
        ),
        ({"secure": {"threshold": 2}}, "secure.threshold", "--secure-agg"),
        ({"secure": {"pipeline": False}}, "secure.pipeline", "--secure-agg"),
        ({"train": {"momentum": 0.9}}, "train.momentum", "train.optimizer"),
        ({"train": {"lr_final": 0.5}}, "train.lr_final", "train.lr_schedule"),
    ],
)
def test_a_key_the_mode_ignores_is_refused(overrides, key, fix):
    with pytest.raises(FedloraError) as info:
        load_config(None, [overrides])
    assert key in str(info.value) and fix in str(info.value)


def test_a_key_at_its_default_is_not_refused():
    """The effective config lists every key: reloading one must not trip the rule above."""
    cfg = load_config(None, [{"privacy": {"noise_multiplier": 1.0}, "secure": {"threshold": 0}}])
    assert cfg.privacy.level == "none"


def test_write_config_round_trips(tmp_path):
    original = load_config(
        None,
        [
            {
                "model": {"name": "tiny-random", "precision": "bf16"},
                "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "o_proj"]},
                "data": {"path": 'dir with "quotes"\\and\\backslash.jsonl', "eval_rows": 60},
                "train": {"lr": 1e-4, "optimizer": "sgd", "momentum": 0.9},
                "strategy": {"name": "fednova"},
                "federation": {"clients": 3, "rounds": 2},
                "run": {"seed": 7, "out": "runs/x"},
            }
        ],
    )
    path = tmp_path / "config.toml"
    write_config(original, path)
    again = load_config(path)
    assert again == original
    assert dataclasses.asdict(again) == dataclasses.asdict(original)


def test_write_config_round_trips_defaults(tmp_path):
    path = tmp_path / "config.toml"
    write_config(Config(), path)
    assert load_config(path) == Config()


def test_svd_with_scaffold_is_refused_with_the_reason_and_the_alternative():
    with pytest.raises(FedloraError) as err:
        load_config(
            None,
            [
                {
                    "strategy": {"name": "scaffold"},
                    "train": {"optimizer": "sgd"},
                    "lora": {"aggregation": "svd"},
                }
            ],
        )
    assert "control variates" in str(err.value) and "freeze-a" in str(err.value)


def test_default_toml_lists_every_key_with_its_default():
    """configs/default.toml is the reference of every key: it must name each one, and loading
    it must give the defaults."""
    import tomllib
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "default.toml"
    listed = tomllib.loads(path.read_text())
    defaults = Config().to_dict()
    assert {s: set(v) for s, v in listed.items()} == {s: set(v) for s, v in defaults.items()}
    assert load_config(path).to_dict() == defaults


def test_every_shipped_config_loads():
    """The configs/ a README points to are valid with today's keys and rules."""
    from pathlib import Path

    paths = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert len(paths) >= 5
    for path in paths:
        load_config(path)
    dp = load_config(Path(__file__).parent.parent / "configs" / "dp.toml")
    assert (dp.privacy.level, dp.privacy.target_epsilon, dp.train.optimizer) == ("sample", 8, "sgd")
    wordnet = load_config(Path(__file__).parent.parent / "configs" / "dp-wordnet.toml")
    assert (wordnet.data.path, wordnet.privacy.level, wordnet.train.optimizer) == (
        "wordnet",
        "sample",
        "sgd",
    )
    assert (wordnet.lora.targets, wordnet.lora.aggregation) == ("all-linear", "freeze-a")
    assert (wordnet.train.batch_size, wordnet.train.lr, wordnet.train.lr_schedule) == (
        32,
        2.0,
        "cosine",
    )


def test_readme_configs_and_validation_agree_on_scaffold_with_momentum():
    """configs/scaffold.toml runs SCAFFOLD with SGD momentum; validation accepts it, refuses
    Adam, and the README says exactly that."""
    root = Path(__file__).parent.parent
    cfg = load_config(root / "configs" / "scaffold.toml")
    assert cfg.strategy.name == "scaffold" and cfg.train.momentum > 0
    with pytest.raises(FedloraError, match="train.optimizer"):
        load_config(None, [{"strategy": {"name": "scaffold"}, "train": {"optimizer": "adamw"}}])
    readme = " ".join((root / "README.md").read_text().split())
    assert "SCAFFOLD with `train.momentum = 0`" not in readme
    assert "SGD momentum (`train.momentum`" in readme and "allowed with both" in readme


def test_class_balance_reads_the_former_booleans_as_its_ends(tmp_path):
    """train.class_balance was a switch: a saved config.toml's true / false still loads (as the
    strength 1 / 0), from a file and from --set, and a number is kept as given."""
    for word, value in (("true", 1.0), ("false", 0.0), ("0.5", 0.5), ("1", 1.0)):
        path = tmp_path / f"{word}.toml"
        path.write_text(f"[train]\nclass_balance = {word}\n")
        for cfg in (
            load_config(path),
            load_config(None, [parse_override(f"train.class_balance={word}")]),
        ):
            assert cfg.train.class_balance == value
            assert type(cfg.train.class_balance) is float
    again = tmp_path / "again.toml"
    write_config(load_config(None, [{"train": {"class_balance": True}}]), again)
    assert load_config(again).train.class_balance == 1.0


@pytest.mark.parametrize(
    ("value", "words"), [(1.5, "in [0, 1]"), (-0.1, "in [0, 1]"), ("yes", "must be a number")]
)
def test_class_balance_outside_0_1_or_not_a_number_is_refused(value, words):
    with pytest.raises(FedloraError) as info:
        load_config(None, [{"train": {"class_balance": value}}])
    assert "train.class_balance" in str(info.value) and words in str(info.value)
    text = "yes" if value == "yes" else str(value)
    with pytest.raises(FedloraError, match=r"train\.class_balance"):
        load_config(None, [parse_override(f"train.class_balance={text}")])
