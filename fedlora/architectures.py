"""`--model random:<shape>`: random-initialised bases with the published shapes of public model
families, for throughput and memory work at the sizes users run, without any download.

The shapes come from each model's published config (transformers' config classes with the
sizes of the release); the weights are random (seeded) and the tokenizer is tiny-random's
byte-level one (every byte is a token, ids below 257, which every shape's vocabulary holds), so
the text a model sees is the same as tiny-random's and only the model's size changes. The model
is written once into the fedlora cache (bf16 weights, which halve the disk; loading casts them
to model.dtype), so that every loader, quantisation and export path treats it like any local
model folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError

PREFIX = "random:"
RANDOM_FORMAT = 1
_SEED = 0


@dataclass(frozen=True)
class Shape:
    family: str  # transformers config class: LlamaConfig, Qwen2Config, ...
    source: str  # the published model whose config this is
    settings: dict[str, Any]


#: published configs (the release's config.json, sizes only)
SHAPES: dict[str, Shape] = {
    "llama-1b": Shape(
        "LlamaConfig",
        "meta-llama/Llama-3.2-1B",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
    "llama-8b": Shape(
        "LlamaConfig",
        "meta-llama/Llama-3.1-8B",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2-1.5b": Shape(
        "Qwen2Config",
        "Qwen/Qwen2-1.5B",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=131072,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
    "mistral-7b": Shape(
        "MistralConfig",
        "mistralai/Mistral-7B-v0.1",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=32768,
            rope_theta=10000.0,
            sliding_window=4096,
            tie_word_embeddings=False,
        ),
    ),
    "gemma-2b": Shape(
        "GemmaConfig",
        "google/gemma-2b",
        dict(
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=256000,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
    ),
}


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def shape_of(name: str) -> str:
    """ "random:llama-8b" -> "llama-8b", refusing shapes fedlora does not know."""
    shape = name[len(PREFIX) :] if is_random(name) else name
    if shape not in SHAPES:
        raise FedloraError(
            f"Model {name!r}: unknown random architecture {shape!r}; known: "
            + ", ".join(PREFIX + s for s in SHAPES)
            + "."
        )
    return shape


def architecture_config(shape: str, special_id: int = 256, **changes: Any):
    """The transformers config of a shape (with `changes`, e.g. tiny sizes for tests); the
    special token of tiny-random's tokenizer is its bos/eos/pad token."""
    import transformers

    spec = SHAPES[shape_of(shape)]
    cls = getattr(transformers, spec.family)
    ids = dict(bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)
    return cls(**(spec.settings | ids | changes))


def parameter_count(shape: str) -> int:
    """Parameters of a shape's model, counted on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture_config(shape))
    return sum(p.numel() for p in model.parameters())


def random_model_dir(name: str, log: Callable[[str], None] = print) -> Path:
    """A local model folder holding `name`'s random model, built once in the fedlora cache."""
    from fedlora import assets

    shape = shape_of(name)
    final = assets.cache_dir() / "models" / f"random-{shape}"
    asset = PREFIX + shape
    required = ("config.json", "tokenizer.json", "tokenizer_config.json")
    if assets._is_complete(final, asset, RANDOM_FORMAT, required):
        return final
    billions = parameter_count(shape) / 1e9
    log(
        f"Building {asset} ({billions:.2f}B random parameters, about {2 * billions:.0f} GB on "
        "disk in bf16; once) ..."
    )

    def build(out: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        tok = assets._tiny_tokenizer()
        special = tok.convert_tokens_to_ids(assets._SPECIAL_TOKEN)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            model = AutoModelForCausalLM.from_config(
                architecture_config(shape, special), dtype=torch.bfloat16
            )
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return {"seed": _SEED, "shape": SHAPES[shape].source}

    return assets._build_atomically(
        final, asset, RANDOM_FORMAT, required, build, needs=f"about {2 * billions:.0f} GB"
    )
