"""`random:<shape>` bases of published sizes (counted on the meta device: nothing allocated) and
the LoRA target presets on the module names of Llama, Qwen2, Mistral and Gemma (tiny random
models of each architecture, built from the same config classes)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedlora.adapter import add_lora
from fedlora.architectures import SHAPES, architecture_config, parameter_count, shape_of
from fedlora.config import TARGET_PRESETS, LoraSettings
from fedlora.errors import FedloraError
from fedlora.model import resolve_model

#: the parameter counts the releases publish (the models' safetensors index totals)
PUBLISHED = {
    "llama-1b": 1_235_814_400,
    "llama-8b": 8_030_261_248,
    "qwen2-1.5b": 1_543_714_304,
    "mistral-7b": 7_241_732_096,
    "gemma-2b": 2_506_172_416,
}
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=300,
    max_position_embeddings=128,
)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_random_shapes_have_the_published_size(shape):
    assert parameter_count(shape) == PUBLISHED[shape]


def test_unknown_random_shape_is_refused_listing_the_known_ones():
    with pytest.raises(FedloraError, match="random:llama-8b") as err:
        resolve_model("random:llama-80b", log=lambda _: None)
    assert "unknown random architecture 'llama-80b'" in str(err.value)
    assert shape_of("random:qwen2-1.5b") == "qwen2-1.5b"


@pytest.mark.parametrize("shape", ["llama-1b", "qwen2-1.5b", "mistral-7b", "gemma-2b"])
def test_target_presets_resolve_on_each_architecture(shape):
    for preset, modules in TARGET_PRESETS.items():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(architecture_config(shape, **TINY))
        model = add_lora(base, LoraSettings(r=2, targets=preset), seed=0)
        # ...layers.0.self_attn.q_proj.lora_A.default.weight
        wrapped = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
        assert wrapped == set(modules), preset
        ids = torch.tensor([[1, 2, 3]])
        assert model(input_ids=ids).logits.shape == (1, 3, TINY["vocab_size"])


def test_a_random_base_is_built_once_and_loads_like_a_local_model(tmp_path, monkeypatch):
    """The cache folder route every random:<shape> takes (here with a tiny Qwen2 shape)."""
    from fedlora import architectures
    from fedlora.model import load_base

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    monkeypatch.setitem(
        architectures.SHAPES, "qwen2-tiny", architectures.Shape("Qwen2Config", "test", TINY)
    )
    messages: list[str] = []
    model, tokenizer = load_base("random:qwen2-tiny", log=messages.append, dtype="bf16")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == parameter_count("qwen2-tiny")
    assert tokenizer.pad_token_id == 256 and len(tokenizer) == 257  # tiny-random's tokenizer
    assert any("Building random:qwen2-tiny" in m for m in messages)
    messages.clear()
    load_base("random:qwen2-tiny", log=messages.append)  # the second time from the cache
    assert not any("Building" in m for m in messages)
