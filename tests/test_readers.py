"""Every file fedlora reads, fed a broken one (bad encoding, truncated, wrong types or shapes):
one FedloraError that names the file and what is wrong, never another exception."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedlora import checkpoint
from fedlora.apps.site_state import SiteStore
from fedlora.config import DataConfig, load_config
from fedlora.data import load_dataset
from fedlora.deploy.settings import read_toml
from fedlora.errors import FedloraError
from fedlora.lifecycle import adapter_shapes, read_adapter_config
from fedlora.secure.certs import load_site_public_key

LATIN1 = "Caf\xe9 tr\xe8s bon".encode("latin-1")


def good_rows(n: int = 12) -> bytes:
    rows = [{"text": f"row {i}", "label": "abc"[i % 3]} for i in range(n)]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def data(name: str) -> Callable[[Path], object]:
    return lambda p: load_dataset(DataConfig(path=str(p / name)), seed=0)


def adapter_config(p: Path) -> object:
    (p / "adapter_model.safetensors").write_bytes(b"")
    return read_adapter_config(p)


def site_state(p: Path) -> object:
    (p / "site-0.npz").write_bytes((p / "f").read_bytes())
    return SiteStore(p, 0).before(3)


def saved_state(p: Path) -> object:
    (p / checkpoint.FILE).write_bytes((p / "f").read_bytes())
    return checkpoint.load(p, "x")


def _npz_prefix() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(100))
    return buffer.getvalue()[:60]


# name: (file name, bytes, reader, words the message must contain)
CASES: dict[str, tuple[str, bytes, Callable[[Path], object], list[str]]] = {
    "jsonl not UTF-8": (
        "d.jsonl",
        good_rows() + b'{"text": "' + LATIN1 + b'", "label": "a"}\n',
        data("d.jsonl"),
        ["d.jsonl", "line 13", "UTF-8", "0xe9"],
    ),
    "csv not UTF-8": (
        "d.csv",
        b"text,label\n"
        + b"".join(b"r%d,%s\n" % (i, b"abc"[i % 3 : i % 3 + 1]) for i in range(9))
        + LATIN1
        + b",a\n",
        data("d.csv"),
        ["d.csv", "line 11", "UTF-8"],
    ),
    "jsonl truncated": (
        "d.jsonl",
        good_rows() + b'{"text": "cut',
        data("d.jsonl"),
        ["d.jsonl", "line 13", "not valid JSON"],
    ),
    "jsonl wrong type": ("d.jsonl", good_rows() + b"[1, 2]\n", data("d.jsonl"), ["line 13"]),
    "label typo": (
        "d.jsonl",
        good_rows() + b'{"text": "x", "label": "cc"}\n',
        data("d.jsonl"),
        ["d.jsonl", "line 13", "'cc'", "typo"],
    ),
    "config not UTF-8": (
        "c.toml",
        b'[run]\nout = "' + LATIN1 + b'"\n',
        lambda p: load_config(p / "c.toml"),
        ["c.toml", "line 2", "UTF-8"],
    ),
    "config truncated": (
        "c.toml",
        b"[federation]\nrounds = ",
        lambda p: load_config(p / "c.toml"),
        ["c.toml", "TOML"],
    ),
    "config wrong type": (
        "c.toml",
        b'[federation]\nrounds = "three"\n',
        lambda p: load_config(p / "c.toml"),
        ["federation.rounds"],
    ),
    "site settings not UTF-8": (
        "site.toml",
        b'[site]\nname = "' + LATIN1 + b'"\n',
        lambda p: read_toml(p / "site.toml"),
        ["site.toml", "line 2", "UTF-8"],
    ),
    "site key garbage": (
        "auth.pub",
        LATIN1,
        lambda p: load_site_public_key(p / "auth.pub"),
        ["auth.pub", "OpenSSH public key"],
    ),
    "site key truncated": (
        "auth.pub",
        b"ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAy",
        lambda p: load_site_public_key(p / "auth.pub"),
        ["auth.pub", "OpenSSH public key"],
    ),
    "adapter config not UTF-8": (
        "adapter_config.json",
        b'{"peft_type": "' + LATIN1 + b'"}',
        adapter_config,
        ["adapter_config.json", "UTF-8"],
    ),
    "adapter config wrong type": (
        "adapter_config.json",
        b'{"peft_type": "LORA", "r": "8"}',
        adapter_config,
        ["adapter_config.json", "rank"],
    ),
    "adapter weights truncated": (
        "adapter_model.safetensors",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{",
        lambda p: adapter_shapes(p),
        ["adapter_model.safetensors", "safetensors"],
    ),
    "server state truncated": ("f", _npz_prefix(), saved_state, [checkpoint.FILE, "unreadable"]),
    "site state truncated": ("f", _npz_prefix(), site_state, ["site-0.npz"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_file_is_one_clear_error(case, tmp_path):
    name, content, reader, words = CASES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FedloraError) as info:
        reader(tmp_path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_model_folder_without_tokenizer(tmp_path):
    from fedlora.model import load_base

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FedloraError, match="tokenizer") as info:
        load_base(str(tmp_path), log=lambda _: None)
    assert str(tmp_path) in str(info.value)


def test_site_daemon_refuses_a_broken_data_file_before_joining(tmp_path):
    """No server is listening: a daemon that got past its data check would wait for one."""
    import subprocess
    import sys

    (tmp_path / "rows.jsonl").write_bytes(good_rows() + b'{"text": "' + LATIN1 + b'"}\n')
    (tmp_path / "site.toml").write_text(
        '[site]\nname = "st-marys"\nserver = "127.0.0.1:9"\ninsecure = true\n\n'
        '[data]\npath = "rows.jsonl"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "client", "--config", str(tmp_path / "site.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "unreachable" not in proc.stdout
    assert f"{tmp_path / 'rows.jsonl'}, line 13: not UTF-8" in proc.stderr
