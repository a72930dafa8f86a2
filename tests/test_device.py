"""One device decision: model.device / dtype / precision resolved once from the config and the
machine's fixed properties, GPU-only choices refused at load on a machine without CUDA, and
every tensor a step makes following the model's own device and dtype. Tests marked `gpu` run
the same checks on CUDA and are skipped without it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedlora import device as fd
from fedlora.adapter import adapter_arrays, adapter_parameters, load_adapter_arrays
from fedlora.config import load_config
from fedlora.errors import FedloraError
from fedlora.privacy.client_level import add_gaussian
from fedlora.privacy.dpsgd import DPSGD, PrivateSteps
from fedlora.runtime import build_runtime
from fedlora.strategies.base import TrainingTerms
from fedlora.train import collate, local_train, make_optimizer, token_losses

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")


def quiet(_msg: str) -> None:
    pass


# --- resolution (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, gpus, expected",
    [("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda:0")]
    + [("cuda:1", 2, "cuda:1")],
)
def test_pick_device(name, gpus, expected):
    assert fd.pick_device(name, gpus) == expected


@pytest.mark.parametrize(
    "name, gpus, message",
    [("cuda", 0, "needs a CUDA GPU"), ("cuda:2", 2, "cuda:0 to cuda:1"), ("gpu", 1, "use ")],
)
def test_impossible_devices_are_refused_naming_the_key(name, gpus, message):
    with pytest.raises(FedloraError, match=message) as err:
        fd.pick_device(name, gpus)
    assert "model.device" in str(err.value)


@pytest.mark.parametrize(
    "precision, device, cuda_bf16, amx, expected",
    [
        ("auto", "cpu", False, True, True),
        ("auto", "cpu", True, False, False),
        ("auto", "cuda", True, False, True),
        ("auto", "cuda", False, True, False),
        ("fp32", "cuda", True, True, False),
        ("bf16", "cpu", False, False, True),
    ],
)
def test_precision_follows_the_device_and_fixed_machine_features(
    precision, device, cuda_bf16, amx, expected
):
    assert fd.choose_bf16(precision, device, cuda_bf16, amx) is expected


def test_auto_precision_takes_no_timing(monkeypatch):
    """The decision may not depend on how busy the machine is: no clock is read for it."""
    from fedlora.model import use_bf16

    fd.cpu_has_bf16_matrix_units.cache_clear()

    def no_clock():
        raise AssertionError("model.precision = auto read a clock")

    monkeypatch.setattr(time, "perf_counter", no_clock)
    monkeypatch.setattr(time, "time", no_clock)
    decided = use_bf16("auto", "cpu")
    assert decided == fd.cpu_has_bf16_matrix_units()
    assert all(use_bf16("auto", "cpu") == decided for _ in range(3))


# --- refused at config load on a machine without CUDA -------------------------------------------


@no_cuda
def test_auto_gives_the_cpu_here():
    cfg = load_config(None, [{"model": {"device": "auto"}}])
    assert fd.resolve_device(cfg.model.device) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize(
    "section, message",
    [
        ({"model": {"device": "cuda"}}, 'model.device = "cuda" needs a CUDA GPU'),
        ({"model": {"device": "cuda:1"}}, "model.device"),
        ({"federation": {"gpus_per_client": 0.25}}, "federation.gpus_per_client = 0.25"),
        ({"model": {"quantization": "4bit"}}, "refused on the CPU"),
    ],
)
def test_gpu_only_choices_are_refused_at_load_without_cuda(section, message):
    with pytest.raises(FedloraError, match=message):
        load_config(None, [section])


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_gpu_share_with_a_device_ray_does_not_give_is_refused(device):
    with pytest.raises(FedloraError, match=f'model.device = "{device}"'):
        load_config(None, [{"model": {"device": device}, "federation": {"gpus_per_client": 0.5}}])


def test_site_device_is_checked_when_the_site_toml_is_read(tmp_path):
    from fedlora.deploy.apps import site_config
    from fedlora.deploy.settings import load_site

    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    base = '[site]\nname = "a"\nserver = "127.0.0.1:9092"\ninsecure = true\n'
    base += '[data]\npath = "train.jsonl"\n'
    site_toml = tmp_path / "site.toml"
    site_toml.write_text(base + '[model]\ndevice = "cpu"\n')
    site = load_site(site_toml)
    assert site.device == "cpu"
    # the server's choice of device never applies at the site
    assert site_config({"model": {"device": "auto"}}, site).model.device == "cpu"
    if not HAS_CUDA:
        site_toml.write_text(base + '[model]\ndevice = "cuda"\n')
        with pytest.raises(FedloraError, match="site.toml: model.device"):
            load_site(site_toml)


def test_the_server_does_not_send_its_device_to_sites(tiny_cfg):
    from fedlora.deploy.server import shared_config

    sent = shared_config(tiny_cfg(model={"device": "cpu"}))
    assert "device" not in sent.split("[lora]")[0]
    assert "gpus_per_client" not in sent and "ray_address" not in sent  # simulation's only


# --- every tensor follows the model -------------------------------------------------------------


@pytest.fixture(scope="module")
def rt(tmp_path_factory, tiny_cfg_at):
    cfg = tiny_cfg_at(tmp_path_factory.mktemp("device"), lora={"dropout": 0.0})
    return build_runtime(cfg, log=quiet)


def dp_streams() -> DPSGD:
    """DP-SGD at noise 1, clip 1, rate 0.5 on fixed test streams (a site draws its own)."""
    return DPSGD(1.0, 1.0, 0.5, noise=np.random.default_rng(7), batches=np.random.default_rng(8))


def check_tensors_follow_the_model(rt) -> None:
    """collate, the loss, DP-SGD's noise (empty and full batches) and the client noise."""
    device = fd.model_device(rt.model)
    assert rt.device == device
    rows = rt.site_rows(0)[:4]
    ids, mask = collate(rows, rt.pad_id, device)
    assert ids.device == device and mask.device == device
    losses, logits, row_of = token_losses(rt.model, rows, rt.pad_id, rt.bf16)
    assert losses.device == logits.device == row_of.device == device
    initial = adapter_arrays(rt.model)
    optimizer = make_optimizer(rt.model, rt.cfg.train)
    private = PrivateSteps(rt.model, optimizer, dp_streams(), rows, steps=1)
    try:
        private._noise_only()  # an empty batch's step: pure noise, drawn where the gradients live
        for p in private.optimizer.params:
            assert p.grad.device == p.device == device and p.grad.dtype == p.dtype
    finally:
        private.close()
    # DP-SGD through the training loop (opacus draws its noise on each parameter's device)
    dp = dp_streams()
    local_train(
        rt.model, rows, 1, rt.cfg.train, TrainingTerms(), np.random.default_rng(0), rt.pad_id,
        bf16=rt.bf16, dp=dp,
    )  # fmt: skip
    # client-level noise acts on what leaves the site: host arrays, float64, shapes kept
    sent = adapter_arrays(rt.model)
    noised = add_gaussian(sent, list(sent), 0.1, np.random.default_rng(0))
    for k, v in sent.items():
        assert isinstance(noised[k], np.ndarray) and noised[k].shape == v.shape
    load_adapter_arrays(rt.model, initial)


def test_tensors_follow_the_model_device(rt):
    check_tensors_follow_the_model(rt)


# --- memory knobs: base dtype, gradient checkpointing, accumulation ------------------------------


def one_step_adapter(rt, **train) -> dict[str, np.ndarray]:
    """The adapter after one optimiser step from the initial adapter (restored afterwards)."""
    import dataclasses

    initial = adapter_arrays(rt.model)
    cfg = dataclasses.replace(rt.cfg.train, optimizer="sgd", lr=0.5, **train)
    local_train(
        rt.model, rt.site_rows(0)[:8], 1, cfg, TrainingTerms(), np.random.default_rng(3),
        rt.pad_id,
    )  # fmt: skip
    after = adapter_arrays(rt.model)
    load_adapter_arrays(rt.model, initial)
    return after


def test_accumulation_gives_the_gradient_of_the_whole_logical_batch(rt):
    """4 micro-batches of 2 rows = one batch of 8 rows (the same rows: one permutation)."""
    whole = one_step_adapter(rt, batch_size=8, accumulation=1)
    split = one_step_adapter(rt, batch_size=2, accumulation=4)
    first_micro_only = one_step_adapter(rt, batch_size=2, accumulation=1)
    for k in whole:
        np.testing.assert_allclose(split[k], whole[k], rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(first_micro_only[k], whole[k]) for k in whole)


def test_accumulation_is_refused_under_dp_sgd():
    with pytest.raises(FedloraError, match="BatchMemoryManager"):
        load_config(None, [{"train": {"accumulation": 2}, "privacy": {"level": "sample"}}])


def test_gradient_checkpointing_trains_the_same_step(tmp_path, tiny_cfg, rt):
    cfg = tiny_cfg(lora={"dropout": 0.0}, train={"gradient_checkpointing": True})
    checkpointed = build_runtime(cfg, log=quiet)
    # a module inside a checkpointed layer runs again when the backward pass recomputes it
    layer = checkpointed.model.get_base_model().get_decoder().layers[0].self_attn
    calls = []
    hook = layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        recomputed = one_step_adapter(checkpointed)
    finally:
        hook.remove()
    assert len(calls) == 2  # the forward pass, and its recomputation in the backward pass
    plain = one_step_adapter(rt)
    for k in plain:
        np.testing.assert_allclose(recomputed[k], plain[k], rtol=1e-5, atol=1e-7)


def test_a_bf16_base_keeps_fp32_lora_factors_and_trains(tiny_cfg):
    rt16 = build_runtime(tiny_cfg(model={"dtype": "bf16"}), log=quiet)
    frozen = [p for n, p in rt16.model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in adapter_parameters(rt16.model).values()} == {torch.float32}
    before = adapter_arrays(rt16.model)
    after = one_step_adapter(rt16)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


# --- GPU (skipped without CUDA) -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_tensors_follow_the_model_on_cuda(tiny_cfg, dtype):
    rt_gpu = build_runtime(tiny_cfg(model={"device": "cuda", "dtype": dtype}), log=quiet)
    assert fd.model_device(rt_gpu.model).type == "cuda"
    check_tensors_follow_the_model(rt_gpu)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_quantised_base_trains_on_cuda(tiny_cfg, quantization):
    from fedlora.train import evaluate

    rt4 = build_runtime(
        tiny_cfg(model={"device": "cuda", "quantization": quantization}, lora={"dropout": 0.0}),
        log=quiet,
    )
    rows = rt4.site_rows(0)[:8]
    evaluate(rt4.model, rt4.encoder, rows, rt4.pad_id, bf16=rt4.bf16)  # the CPU failure mode
    before = adapter_arrays(rt4.model)
    after = one_step_adapter(rt4)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


# --- same command, same result -------------------------------------------------------------------


def test_two_runs_with_auto_precision_are_bit_identical(tmp_path, tiny_cfg):
    """model.precision = "auto" decides the same every time on a machine, and the effective
    config records what it decided. (The runs are in this process: that the engine repeats a
    run exactly is test_simulation's test_same_config_same_numbers.)"""
    from in_process import run_federation

    outs = []
    for name in ("a", "b"):
        cfg = tiny_cfg(
            model={"precision": "auto"},
            federation={"clients": 2, "rounds": 1},
            run={"out": str(tmp_path / name)},
        )
        outs.append(Path(run_federation(cfg)))
    decided = "bf16" if fd.cpu_has_bf16_matrix_units() else "fp32"
    for out in outs:
        assert f'precision = "{decided}"' in (out / "config.toml").read_text()
    a, b = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and a
    for k in a:
        assert np.array_equal(a[k], b[k]), k
