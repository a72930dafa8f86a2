"""GPUs and clusters in simulation: the Ray settings fedlora hands to Flower (GPU shares, the
number of workers they allow, attaching to a running cluster), a quick clear failure for an
address where no cluster answers, and a real run on a local head node started with `ray start`.
Also resume and precision: a resumed "auto" keeps its run's decision, and a refused resume
names the keys that differ."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora import checkpoint
from fedlora.config import load_config
from fedlora.deploy.ports import free_port
from fedlora.errors import FedloraError
from fedlora.results import settle_precision
from fedlora.simulate import backend_config, check_ray_address, worker_count


def test_gpu_shares_set_client_resources_and_bound_the_workers(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cfg = load_config(None, [{"federation": {"clients": 10}}])
    cfg.federation.gpus_per_client = 0.25  # set after load: this machine has no GPU to check
    settings = backend_config(cfg, gpus=1)
    assert settings["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert settings["init_args"]["num_gpus"] == 1
    assert worker_count(cfg, gpus=1) == 4  # four share the one GPU
    assert worker_count(cfg, gpus=2) == 8
    cfg.federation.gpus_per_client = 0.0
    assert worker_count(cfg) == 10  # CPUs alone: one per core, at most one per site
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.0


@pytest.mark.parametrize("source", ["config", "environment"])
def test_a_cluster_address_is_passed_without_cpu_or_gpu_counts(monkeypatch, source):
    if source == "environment":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
        cfg = load_config(None, [])
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        cfg = load_config(None, [{"federation": {"ray_address": "10.0.0.5:6379"}}])
    init = backend_config(cfg)["init_args"]
    assert init["address"] == "10.0.0.5:6379"
    assert not {"num_cpus", "num_gpus", "object_store_memory", "_node_ip_address"} & set(init)


def test_gpus_on_a_cluster_are_not_checked_against_this_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(
        None, [{"federation": {"ray_address": "10.0.0.5:6379", "gpus_per_client": 0.5}}]
    )
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.5


def test_an_unreachable_cluster_fails_within_seconds_naming_it():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(FedloraError, match=address):
        check_ray_address(address)
    assert time.monotonic() - started < 6
    with pytest.raises(FedloraError, match="host:port"):
        check_ray_address("no-port-here")


def test_the_cli_refuses_an_unreachable_cluster_before_loading_anything(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("fedlora")), "simulate", "--model", "tiny-random"]
        + ["--out", str(tmp_path / "run"), "--set", f"federation.ray_address={address}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert address in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


def stop_tree(proc: subprocess.Popen) -> None:
    """End `proc` and every process under it (the head's GCS, raylet and workers), and only
    those: `ray stop` would end every Ray instance on the machine, other users' included."""
    import psutil

    with contextlib.suppress(psutil.Error):
        tree = psutil.Process(proc.pid)
        procs = [*tree.children(recursive=True), tree]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=15)


@pytest.mark.cluster
def test_simulation_on_a_running_ray_cluster(tmp_path):
    """`ray start --head --block` on 127.0.0.1, a tiny federation attached to it, the head's
    processes ended afterwards whatever happened."""
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}"]
    head += ["--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    log = (tmp_path / "head.log").open("w")
    proc = subprocess.Popen(head, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "head.log"
            ).read_text()[-2000:]
            time.sleep(0.5)
        out = tmp_path / "run"
        done = subprocess.run(
            [str(Path(sys.executable).with_name("fedlora")), "simulate", "--model", "tiny-random"]
            + ["--clients", "2", "--rounds", "1", "--out", str(out)]
            + ["--set", "model.precision=fp32", "--set", "data.eval_rows=30"]
            + ["--set", f"federation.ray_address=127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["clients"] == 2
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        stop_tree(proc)
        log.close()


# --- resume and precision -----------------------------------------------------------------------


def partial_with_precision(tmp_path: Path, precision: str) -> Path:
    out = tmp_path / "run"
    work = out.with_name("run.partial")
    work.mkdir(parents=True)
    (work / "config.toml").write_text(f'[model]\nprecision = "{precision}"\n')
    return out


@pytest.mark.parametrize("saved", ["bf16", "fp32"])
def test_a_resumed_auto_precision_keeps_the_interrupted_runs_decision(tmp_path, saved):
    out = partial_with_precision(tmp_path, saved)
    cfg = load_config(None, [{"model": {"precision": "auto"}}])
    # this process decided the other way (a busy machine, another machine)
    assert settle_precision(cfg, saved != "bf16", out) is (saved == "bf16")
    assert cfg.model.precision == saved
    fresh = load_config(None, [{"model": {"precision": "auto"}}])
    assert settle_precision(fresh, True, None) is True
    assert fresh.model.precision == "bf16"  # the effective config records the decision


def test_a_refused_resume_names_the_key_that_differs(tmp_path):
    before = load_config(None, [{"model": {"precision": "bf16"}}]).to_dict()
    after = load_config(None, [{"model": {"precision": "fp32", "device": "cpu"}}]).to_dict()
    ckpt = checkpoint.Checkpoint(
        0, {"global": {}}, [], checkpoint.config_fingerprint(before), {},
        checkpoint.shaping_config(before),
    )  # fmt: skip
    checkpoint.save(tmp_path, ckpt)
    with pytest.raises(FedloraError, match=r"model\.precision \('bf16' -> 'fp32'\)") as err:
        checkpoint.load(
            tmp_path, checkpoint.config_fingerprint(after), checkpoint.shaping_config(after)
        )
    assert "device" not in str(err.value)  # where a run computes may change on resume
    same_place = load_config(None, [{"model": {"precision": "bf16", "device": "cpu"}}])
    assert checkpoint.load(tmp_path, checkpoint.config_fingerprint(same_place.to_dict()))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_sites_share_a_gpu_in_simulation(tmp_path, tiny_cfg):
    """Four sites, half a GPU each: two Ray workers on the GPU, the federation finishes."""
    from fedlora.simulate import simulate

    cfg = tiny_cfg(
        federation={"clients": 4, "rounds": 1, "gpus_per_client": 0.5},
        model={"device": "cuda", "precision": "auto"},
        run={"out": str(tmp_path / "gpu")},
    )
    assert worker_count(cfg) == min(4, 2 * __import__("torch").cuda.device_count())
    out = simulate(cfg, log=lambda _m: None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] in ("bf16 autocast", "fp32") and summary["rounds"] == 1


def private_federation_and_its_tools(tmp_path: Path, cfg) -> dict:
    """A federation as `cfg` says, then `fedlora eval`, `generate` and `export --merge` of its
    adapter (on the device "auto" picks): the summary, the tools' exit codes, the merged model."""
    from fedlora.cli import main
    from fedlora.simulate import simulate

    out = simulate(cfg, log=lambda _m: None)
    summary = json.loads((out / "summary.json").read_text())
    merged = tmp_path / "merged"
    codes = {
        "eval": main(["eval", str(out), "--rows", "20", "--bootstrap", "50"]),
        "generate": main(
            ["generate", "Review: fine", "--adapter", f"g={out}", "--max-new-tokens", "3"]
        ),  # fmt: skip
        "export": main(["export", str(out), "--out", str(merged), "--merge"]),
    }
    return {"summary": summary, "codes": codes, "merged": merged}


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_private_secure_federation_and_its_tools_run_on_a_gpu(tmp_path, tiny_cfg):
    """DP-SGD (opacus's noise on the GPU) and secure aggregation on CUDA with
    a GPU share per site, then eval / generate / export --merge on the GPU (device auto)."""
    cfg = tiny_cfg(
        federation={"clients": 3, "rounds": 1, "gpus_per_client": 0.25},
        model={"device": "cuda"},
        privacy={"level": "sample"},
        secure={"enabled": True},
        run={"out": str(tmp_path / "private")},
    )
    result = private_federation_and_its_tools(tmp_path, cfg)
    assert result["summary"]["rounds"] == 1
    assert result["summary"]["privacy"]["level"] == "sample"
    assert result["codes"] == {"eval": 0, "generate": 0, "export": 0}
    assert (result["merged"] / "config.json").is_file()
