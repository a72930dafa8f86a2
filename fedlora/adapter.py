"""The LoRA adapter: its structure on a base, its state as arrays, and its arithmetic.

Only the LoRA A/B matrices are trainable and only they leave a site: `adapter_parameters` is
the one place that decides what an adapter is. A lower-rank site trains a leading slice of the
global adapter's slots (`truncate_lora`, `mask_slot_gradients`, `restore_lora`); `save_adapter`
writes the standard peft format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from fedlora.config import LoraSettings
from fedlora.errors import FedloraError

Arrays = dict[str, np.ndarray]
ADAPTER_NAME = "default"
LORA_MARKERS = ("lora_A", "lora_B")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def add_lora(base: PreTrainedModel, lora: LoraSettings, seed: int) -> PeftModel:
    """Wrap the frozen base with LoRA; A is initialised from `seed` so every party agrees
    (with `lora.aggregation = "freeze-a"` it stays there: only B trains)."""
    targets = lora.target_modules()
    available = linear_module_names(base)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise FedloraError(
            f"LoRA target module(s) {unknown} do not exist in this model; "
            f"its linear modules are: {', '.join(available)}."
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        # with base_model_name_or_path (the base's name_or_path): how a saved adapter names its
        # base on any machine (fedlora.model.name_portably)
        revision=getattr(base.config, "_commit_hash", None),
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    trainable = ("lora_B",) if lora.aggregation == "freeze-a" else LORA_MARKERS
    for name, param in model.named_parameters():
        param.requires_grad = any(m in name for m in trainable)
    return model


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name: the only tensors that train and travel (A and B,
    or B alone when A is frozen)."""
    return {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and any(m in n for m in LORA_MARKERS)
    }


def lora_arrays(model: torch.nn.Module) -> Arrays:
    """Every LoRA tensor, frozen ones included (what the saved adapter holds)."""
    return {
        n: p.detach().cpu().numpy().copy()
        for n, p in model.named_parameters()
        if any(m in n for m in LORA_MARKERS)
    }


def adapter_arrays(model: torch.nn.Module) -> Arrays:
    return {n: p.detach().cpu().numpy().copy() for n, p in adapter_parameters(model).items()}


def load_adapter_arrays(model: torch.nn.Module, arrays: Arrays) -> None:
    params = adapter_parameters(model)
    if set(params) != set(arrays):
        missing, extra = set(params) - set(arrays), set(arrays) - set(params)
        raise FedloraError(
            f"Adapter does not match the model's LoRA layout (missing {len(missing)}, "
            f"unexpected {len(extra)} tensors); check lora.r and lora.targets."
        )
    with torch.no_grad():
        for name, param in params.items():
            value = torch.from_numpy(np.asarray(arrays[name], dtype=np.float32))
            if value.shape != param.shape:
                raise FedloraError(
                    f"Adapter tensor {name} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(param.shape)}; check lora.r."
                )
            param.copy_(value)


def _slots_beyond(name: str, rank: int) -> tuple[slice, ...] | None:
    """Index of the slots at or beyond `rank` in a LoRA tensor: rows of A, columns of B."""
    if "lora_A" in name:
        return (slice(rank, None), slice(None))
    if "lora_B" in name:
        return (slice(None), slice(rank, None))
    return None


def truncate_lora(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Make the model a rank-`rank` site's: zero every LoRA slot beyond its leading `rank`
    (A rows and B columns), so its forward is W + (alpha/R)·B[:, :rank]·A[:rank] and the loss
    has gradient exactly 0 on the other slots. The scale stays the global alpha/R: the site's
    model is then exactly the truncation of the global adapter and its delta means the same
    in the global adapter (with alpha/rank its first forward would already differ from the
    global one by R/rank). Returns the frozen LoRA tensors it changed (A under freeze-a: not
    reloaded each round), for `restore_lora`."""
    saved = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            index = _slots_beyond(name, rank) if any(m in name for m in LORA_MARKERS) else None
            if index is None:
                continue
            if not param.requires_grad:
                saved[name] = param.detach().clone()
            param[index] = 0.0
    return saved


def restore_lora(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the frozen tensors `truncate_lora` zeroed."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def mask_slot_gradients(optimizer: torch.optim.Optimizer, model: torch.nn.Module, rank: int):
    """Zero the gradient of every slot beyond `rank` right before each optimiser step: the loss
    gives them none, but SCAFFOLD's correction and DP-SGD's noise would. Returns the hook
    handle (`.remove()` it when the optimiser is reused)."""
    slots = {
        param: index
        for name, param in adapter_parameters(model).items()
        if (index := _slots_beyond(name, rank)) is not None
    }

    def zero_beyond(_optimizer, _args, _kwargs) -> None:
        for param, index in slots.items():
            if param.grad is not None:
                param.grad[index] = 0.0

    return optimizer.register_step_pre_hook(zero_beyond)


def save_adapter(model: PeftModel, arrays: Arrays, out_dir: Path) -> None:
    """Write `arrays` as a standard peft adapter (loads with PeftModel.from_pretrained)."""
    load_adapter_arrays(model, arrays)
    out_dir.mkdir(parents=True, exist_ok=True)
    # LoRA never trains the embeddings here; "auto" would look the base up on the hub
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
