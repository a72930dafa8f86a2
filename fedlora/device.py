"""One device decision per process: which device the model lives on, the dtype of its frozen
base weights, and whether it runs under bf16 autocast.

Everything here is decided from the config and the machine's fixed properties (CUDA devices,
CPU feature flags), never from a timing, so the same command on the same machine always takes
the same decision. Code that makes tensors does not ask this module: it follows the model's own
parameters (`device=param.device`, `tensor.new_*`), so no training or evaluation path needs to
know where it runs.
"""

from __future__ import annotations

import functools
import re

from fedlora.errors import FedloraError

DEVICE_FORMS = '"auto", "cpu", "cuda" or "cuda:N"'
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")

#: model.dtype -> torch dtype name (the frozen base's weights; LoRA factors stay fp32)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_device_name(name: str) -> None:
    """Refuse a device string fedlora does not understand, naming the key."""
    if not _DEVICE.match(name):
        raise FedloraError(f"model.device = {name!r} is not valid; use {DEVICE_FORMS}.")


def cuda_count() -> int:
    """CUDA devices this process can see (0 on a CPU-only build or machine)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(name: str, cuda_devices: int) -> str:
    """The device `name` means on a machine with `cuda_devices` CUDA devices ("auto": the first
    CUDA device when there is one, else the CPU). A CUDA device the machine lacks is refused."""
    check_device_name(name)
    if name == "auto":
        return "cuda:0" if cuda_devices else "cpu"
    if name == "cpu":
        return "cpu"
    index = int(name.partition(":")[2] or 0)
    if cuda_devices == 0:
        raise FedloraError(
            f'model.device = "{name}" needs a CUDA GPU, and this machine (or this torch build) '
            'has none; use model.device = "auto" or "cpu".'
        )
    if index >= cuda_devices:
        raise FedloraError(
            f'model.device = "{name}": this machine has {cuda_devices} CUDA device(s) '
            f'(cuda:0 to cuda:{cuda_devices - 1}); choose one of them or "cuda".'
        )
    return f"cuda:{index}"


@functools.cache
def resolve_device(name: str):
    """The torch.device for model.device on this machine, decided once per process."""
    import torch

    return torch.device(pick_device(name, cuda_count()))


def torch_dtype(name: str):
    """model.dtype ("fp32", "bf16", "fp16") as a torch dtype."""
    import torch

    return getattr(torch, DTYPES[name])


@functools.cache
def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX), which is what makes
    bf16 autocast faster than fp32 on the CPU (BENCHMARKS.md): a fixed property of the machine,
    the same in every run (torch also checks that the OS lets the process use the tiles)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def choose_bf16(precision: str, device_type: str, cuda_bf16: bool, cpu_amx: bool) -> bool:
    """Resolve model.precision: "fp32" / "bf16" force it; "auto" takes bf16 autocast on a GPU
    that supports bfloat16 and on a CPU with bf16 matrix units, fp32 otherwise."""
    if precision != "auto":
        return precision == "bf16"
    return cuda_bf16 if device_type == "cuda" else cpu_amx


def use_bf16_on(precision: str, device) -> bool:
    """choose_bf16 for this machine and `device` (a torch.device)."""
    cuda_bf16 = False
    if device.type == "cuda":
        import torch

        cuda_bf16 = bool(torch.cuda.is_bf16_supported())
    return choose_bf16(precision, device.type, cuda_bf16, cpu_has_bf16_matrix_units())


def model_device(model):
    """Where a model's parameters live (its first parameter's device)."""
    return next(model.parameters()).device
