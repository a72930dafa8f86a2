"""What a process needs to train or evaluate: the base model with LoRA, the tokenised data and
the partition. Built once per process (a Ray worker serves many sites and rounds) and reused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedlora.adapter import adapter_arrays, add_lora
from fedlora.config import Config
from fedlora.data import Dataset, load_dataset, partition
from fedlora.device import resolve_device
from fedlora.errors import FedloraError, told_the_server
from fedlora.model import load_base, set_threads, use_bf16
from fedlora.train import Encoded, Encoder


@dataclass
class Runtime:
    cfg: Config
    model: object  # peft.PeftModel
    tokenizer: object
    dataset: Dataset
    encoder: Encoder
    train_parts: list[list[int]]
    test_parts: list[list[int]]
    bf16: bool = False  # the resolved model.precision
    device: object = None  # torch.device: the resolved model.device, where the model lives
    #: the adapter as add_lora made it from run.seed, before any training: what round 1 sends
    #: (a site with a roster checks that it is: fedlora.apps.evidence)
    initial_adapter: dict[str, np.ndarray] = field(default_factory=dict)
    _site_rows: dict[int, list[Encoded]] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def site_rows(self, site: int) -> list[Encoded]:
        if site not in self._site_rows:
            rows = [self.dataset.train[i] for i in self.train_parts[site]]
            self._site_rows[site] = self.encoder.encode_all(rows)
        return self._site_rows[site]

    def eval_set(self) -> tuple[list[Encoded], list[int]]:
        """Held-out rows (at most data.eval_rows, a seeded subset) and each row's site."""
        site_of = {i: s for s, rows in enumerate(self.test_parts) for i in rows}
        idx = list(range(len(self.dataset.test)))
        limit = self.cfg.data.eval_rows
        if limit and limit < len(idx):
            rng = np.random.default_rng(self.cfg.run.seed)
            idx = sorted(int(i) for i in rng.choice(len(idx), size=limit, replace=False))
        rows = self.encoder.encode_all([self.dataset.test[i] for i in idx])
        return rows, [site_of.get(i, -1) for i in idx]


def load_data(cfg: Config, log: Callable[[str], None] = print, own_site: int | None = None):
    """The data set and its partition: cheap, so it runs before any model is loaded. A site
    daemon (`own_site`) reads only its own file, so every row of it is that site's; what is
    wrong with that file (its labels, its row counts) is for the site's log alone, as the
    reason of a failed request goes back to the server."""
    try:
        dataset = load_dataset(cfg.data, cfg.run.seed, log=log, unit=cfg.privacy.unit)
    except FedloraError as exc:
        if own_site is None:
            raise
        raise told_the_server(
            FedloraError(
                "this site's data file cannot be used for this federation (the site's log says why)"
            ),
            str(exc),
        ) from None
    if own_site is not None:
        n = cfg.federation.clients
        train_parts = [list(range(len(dataset.train))) if s == own_site else [] for s in range(n)]
        test_parts = [list(range(len(dataset.test))) if s == own_site else [] for s in range(n)]
        return dataset, train_parts, test_parts
    train_parts, test_parts = partition(
        dataset, cfg.federation.clients, cfg.data.partition, cfg.run.seed, cfg.data.dirichlet_alpha
    )
    return dataset, train_parts, test_parts


def build_runtime(
    cfg: Config,
    log: Callable[[str], None] = print,
    threads: int | None = None,
    own_site: int | None = None,
) -> Runtime:
    """`threads` defaults to train.threads (a site worker); the simulation's server process
    evaluates while the workers wait, so it takes every core."""
    set_threads(threads or cfg.train.threads)
    dataset, train_parts, test_parts = load_data(cfg, log, own_site)
    device = resolve_device(cfg.model.device)  # once per process (cached)
    base, tokenizer = load_base(
        cfg.model.name,
        log=log,
        quantization=cfg.model.quantization,
        device=device,
        dtype=cfg.model.dtype,
    )
    if cfg.train.gradient_checkpointing:
        # non-reentrant: the frozen embeddings need not require grad for the LoRA grads to flow
        base.activation_checkpointing_enable({"use_reentrant": False})
    model = add_lora(base, cfg.lora, cfg.run.seed)
    encoder = Encoder(tokenizer, dataset, cfg.data.max_text_tokens)
    bf16 = use_bf16(cfg.model.precision, device)
    return Runtime(
        cfg,
        model,
        tokenizer,
        dataset,
        encoder,
        train_parts,
        test_parts,
        bf16,
        device,
        adapter_arrays(model),
    )


_CACHE: dict[str, Runtime] = {}


def get_runtime(
    cfg: Config, log: Callable[[str], None] = print, own_site: int | None = None
) -> Runtime:
    """One runtime per process and config: the base model is loaded once per worker (and once
    per site daemon, for as long as the federation's model settings stay the same)."""
    key = json.dumps(
        {k: v for k, v in cfg.to_dict().items() if k in ("model", "lora", "data", "federation")}
        | {"seed": cfg.run.seed, "threads": cfg.train.threads, "own_site": own_site},
        sort_keys=True,
    )
    if key not in _CACHE:
        _CACHE.clear()  # a worker serves one federation at a time: free the previous model
        _CACHE[key] = build_runtime(cfg, log, own_site=own_site)
    return _CACHE[key]
