"""Base models: resolving a name (built-in default, tiny-random, `random:<shape>`, local folder,
hub id) to something `from_pretrained` opens, and loading the frozen base on its device.

The LoRA adapter on top of it (its arrays and arithmetic) is `fedlora.adapter`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedlora.errors import FedloraError


def resolve_model(name: str, log: Callable[[str], None] = print) -> str:
    """Map a model name to something `from_pretrained` can open without surprises."""
    from fedlora import assets

    if name == assets.DEFAULT_MODEL_NAME:
        return str(assets.default_model_dir(log=log))
    if name == assets.TINY_RANDOM:
        return str(assets.tiny_random_model_dir(log=log))
    from fedlora import architectures

    if architectures.is_random(name):
        return str(architectures.random_model_dir(name, log=log))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedloraError(
                f"Model folder {path} has no config.json; is it a transformers model?"
            )
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id: needs access to the hub
    raise FedloraError(
        f"Model {name!r} is neither a built-in "
        f"({assets.DEFAULT_MODEL_NAME}, {assets.TINY_RANDOM}, random:<shape> such as "
        "random:llama-1b), an existing folder, nor a hub id like org/name."
    )


def load_base(
    name: str,
    log: Callable[[str], None] = print,
    quantization: str = "none",
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
) -> tuple[PreTrainedModel, object]:
    """The frozen base on `device`, its weights in `dtype` (model.dtype) or quantised."""
    from fedlora.device import torch_dtype

    where = resolve_model(name, log)
    device = torch.device(device)
    weights = torch_dtype(dtype)
    kwargs: dict = {"dtype": weights}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=weights,
        )
        if device.type == "cuda":  # bitsandbytes quantises while placing the weights
            kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedloraError(
            f"Model {name!r}: no usable tokenizer in {where} ({first}); a model folder needs "
            "the tokenizer files saved with it (tokenizer.json and tokenizer_config.json)."
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise FedloraError(f"Could not load model {name!r}: {exc}") from exc
    except (ImportError, RuntimeError, ValueError) as exc:
        if quantization == "none":
            raise
        raise FedloraError(
            f"A {quantization} base could not be loaded on this machine ({exc}); "
            'use model.quantization = "none".'
        ) from exc
    name_portably(model, name)
    tokenizer.model_max_length = 1 << 30  # fedlora cuts texts itself (data.max_text_tokens)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if "device_map" not in kwargs and quantization == "none":
        model.to(device)
    model.eval()
    return model, tokenizer


def name_portably(model: PreTrainedModel, name: str) -> None:
    """Make the loaded base go by its public identity, which is what every adapter saved on it
    writes as `base_model_name_or_path` and `revision` (peft takes them from the base): a
    built-in by its name and recipe revision (fedlora registers it in Hugging Face's cache
    under both), a hub id by the id and the commit it was loaded at, a local folder as the user
    gave it. Never this machine's cache folder, which no other machine has."""
    from fedlora import assets

    model.name_or_path = model.config._name_or_path = name
    if name in (assets.DEFAULT_MODEL_NAME, assets.TINY_RANDOM):
        model.config._commit_hash = assets.builtin_revision(name)


def use_bf16(precision: str, device: torch.device | str = "cpu") -> bool:
    """Resolve model.precision for `device` (fedlora.device.choose_bf16 says how)."""
    from fedlora.device import use_bf16_on

    return use_bf16_on(precision, torch.device(device))


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
