"""What happens to an adapter after training: find it, check that it fits a base model, export it
(as a peft adapter or merged into a standalone model), run several adapters on one base, and
keep each site's personalised adapter where that site is.

An *adapter source* is what a user names on the command line: a `fedlora simulate` results
folder (config.toml + adapter/), a peft adapter folder (adapter_config.json; an exported adapter
also carries the run's config.toml), or the word ``base`` for the bare base model. Sources are
resolved and checked from their small files only, so a wrong path or an adapter for another model
is refused before any model is loaded. torch, transformers and peft are imported lazily.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import Config, load_config
from fedlora.errors import FedloraError
from fedlora.quiet import quiet_libraries
from fedlora.readers import decode

Log = Callable[[str], None]

BASE_WORD = "base"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RUN_CONFIG = "config.toml"
PROVENANCE = ("config.toml", "summary.json")
#: peft keys look like base_model.model.<module path>.lora_A.weight
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


# --- Sources ----------------------------------------------------------------------------------


@dataclass
class Source:
    """A resolved adapter source (see the module docstring)."""

    text: str  # as the user wrote it
    adapter_dir: Path | None  # None for the bare base model
    cfg: Config | None = None  # the run's effective config, when there is one
    cfg_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # adapter_config.json
    notes: list[str] = field(default_factory=list)

    @property
    def is_base(self) -> bool:
        return self.adapter_dir is None

    @property
    def label(self) -> str:
        return BASE_WORD if self.is_base else self.text

    @property
    def rank(self) -> int | None:
        return self.meta.get("r")

    def trained_on(self) -> list[str]:
        """The base model names this adapter says it was trained on (config.toml, then
        adapter_config.json's base_model_name_or_path)."""
        names = []
        if self.cfg is not None:
            names.append(self.cfg.model.name)
        if self.meta.get("base_model_name_or_path"):
            names.append(str(self.meta["base_model_name_or_path"]))
        return names


def model_key(name: str) -> str:
    """A comparable identity for a model name, folder or hub id: its last path component
    (the cache folder of a built-in is named after it), lower case."""
    return Path(str(name).rstrip("/\\")).name.lower()


def read_run_config(path: Path, log: Log = print) -> tuple[Config, list[str]]:
    """A run's config.toml as a validated Config. Keys that this version no longer knows (a run
    made by an older fedlora) are dropped with a note instead of refusing the run."""
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedloraError(f"Run config {path} cannot be read: {exc}.") from exc
    defaults = Config().to_dict()
    kept: dict[str, dict[str, Any]] = {}
    dropped: list[str] = []
    for section, entries in values.items():
        if section not in defaults or not isinstance(entries, dict):
            dropped.append(section)
            continue
        for key, value in entries.items():
            if key in defaults[section]:
                kept.setdefault(section, {})[key] = value
            else:
                dropped.append(f"{section}.{key}")
    notes = []
    if dropped:
        notes.append(f"{path}: ignoring settings this fedlora does not know: {', '.join(dropped)}")
    try:
        cfg = load_config(None, [kept])
    except FedloraError as exc:
        raise FedloraError(f"Run config {path}: {exc}") from exc
    return cfg, notes


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        meta = json.loads(decode(path.read_bytes(), path, "Adapter config"))
    except OSError as exc:
        raise FedloraError(f"Adapter folder {folder} has no readable {ADAPTER_CONFIG}.") from exc
    except json.JSONDecodeError as exc:
        raise FedloraError(f"{path} is not valid JSON ({exc.msg}).") from exc
    if not isinstance(meta, dict):
        raise FedloraError(f"{path} is not a peft adapter config (expected a JSON object).")
    if str(meta.get("peft_type", "")).upper() != "LORA":
        raise FedloraError(
            f"{path}: peft_type is {meta.get('peft_type')!r}; fedlora handles LoRA adapters only."
        )
    if not isinstance(meta.get("r"), int) or meta["r"] < 1:
        raise FedloraError(f"{path}: the LoRA rank r is missing or invalid ({meta.get('r')!r}).")
    if not any((folder / w).is_file() for w in ADAPTER_WEIGHTS):
        raise FedloraError(
            f"Adapter folder {folder} has {ADAPTER_CONFIG} but no weights "
            f"({' or '.join(ADAPTER_WEIGHTS)})."
        )
    return meta


def resolve_source(text: str, log: Log = print) -> Source:
    """Turn a command-line word into a Source, reading only small files."""
    if text == BASE_WORD:
        return Source(text, None)
    path = Path(text).expanduser()
    if not path.exists():
        raise FedloraError(
            f"Adapter folder {path} does not exist; give a `fedlora simulate` results folder, "
            f"an adapter folder (with {ADAPTER_CONFIG}) or `{BASE_WORD}`."
        )
    if not path.is_dir():
        raise FedloraError(f"{path} is a file; an adapter is a folder (with {ADAPTER_CONFIG}).")
    if (path / ADAPTER_CONFIG).exists():
        adapter_dir = path
        # an exported adapter keeps config.toml beside it; a run's adapter/ has it one level up
        cfg_path = next(
            (p / RUN_CONFIG for p in (path, path.parent) if (p / RUN_CONFIG).is_file()), None
        )
    elif (path / RUN_CONFIG).is_file():
        adapter_dir, cfg_path = path / "adapter", path / RUN_CONFIG
        if not (adapter_dir / ADAPTER_CONFIG).exists():
            hint = ""
            if path.name.endswith(".partial"):
                hint = " (a `.partial` folder is a run that did not finish)"
            raise FedloraError(f"Run folder {path} has no adapter/{ADAPTER_CONFIG}{hint}.")
    else:
        raise FedloraError(
            f"{path} is neither a fedlora results folder ({RUN_CONFIG} + adapter/) nor a peft "
            f"adapter folder ({ADAPTER_CONFIG})."
        )
    meta = read_adapter_config(adapter_dir)
    cfg, notes = (None, [])
    if cfg_path is not None:
        cfg, notes = read_run_config(cfg_path, log)
    return Source(text, adapter_dir, cfg, cfg_path, meta, notes)


def choose_base(sources: list[Source], override: str | None) -> str:
    """The one base model these sources run on: --base, else the model their runs used (they
    must agree), else the default model."""
    if override:
        return override
    named: dict[str, str] = {}
    for s in sources:
        if s.cfg is not None:
            named.setdefault(model_key(s.cfg.model.name), s.cfg.model.name)
        elif s.meta.get("base_model_name_or_path"):
            name = str(s.meta["base_model_name_or_path"])
            named.setdefault(model_key(name), _builtin_or_path(name))
    if len(named) > 1:
        listing = ", ".join(f"{s.label}: {s.trained_on()[0]}" for s in sources if s.trained_on())
        raise FedloraError(
            f"The adapters were trained on different base models ({listing}); they cannot share "
            "one base model. Pass --base to choose one."
        )
    return next(iter(named.values()), Config().model.name)


def _builtin_or_path(name: str) -> str:
    """A built-in's cache folder is named after it: map it back to the built-in name, so a
    moved or rebuilt cache still works."""
    from fedlora.assets import DEFAULT_MODEL_NAME, TINY_RANDOM

    for builtin in (DEFAULT_MODEL_NAME, TINY_RANDOM):
        if model_key(name) == builtin.lower():
            return builtin
    return name


def check_base_name(source: Source, base: str, allow_other: bool = False) -> None:
    """Refuse an adapter trained on a differently named base model (cheap: before loading)."""
    if source.is_base or allow_other:
        return
    trained = source.trained_on()
    if trained and model_key(base) not in {model_key(t) for t in trained}:
        raise FedloraError(
            f"Adapter {source.label} was trained on base model {trained[0]!r}, not {base!r}; "
            f"pass --base {_builtin_or_path(trained[0])} (or --allow-other-base if {base!r} is "
            "the same model under another name)."
        )


# --- Checking an adapter against a loaded base model ------------------------------------------


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of every nn.Linear of a (bare) base model."""
    import torch

    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    path = folder / ADAPTER_WEIGHTS[0]
    if not path.is_file():
        return {}  # a legacy .bin adapter: peft checks the shapes when it loads
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise FedloraError(f"{path} cannot be read as safetensors: {exc}.") from exc


def check_fits(source: Source, linears: dict[str, tuple[int, int]], base: str) -> None:
    """Refuse an adapter whose target modules, rank or tensor shapes do not fit the base model,
    naming the mismatch (peft would fail with a size-mismatch traceback, or worse, not at all)."""
    if source.is_base:
        return
    where = f"Adapter {source.label}"
    available = sorted({n.rsplit(".", 1)[-1] for n in linears})
    targets = source.meta.get("target_modules")
    if isinstance(targets, list | tuple):
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in available]
        if unknown:
            raise FedloraError(
                f"{where} targets module(s) {unknown} that base model {base!r} does not have; "
                f"its linear modules are: {', '.join(available)}. Was it trained on another "
                "base model? (--base)"
            )
    r = source.meta["r"]
    patterned = bool(source.meta.get("rank_pattern"))
    shapes = adapter_shapes(source.adapter_dir)
    if not shapes and (source.adapter_dir / ADAPTER_WEIGHTS[0]).is_file():
        raise FedloraError(f"{where} has no tensors in {ADAPTER_WEIGHTS[0]}.")
    for key, shape in sorted(shapes.items()):
        m = _KEY.match(key)
        if m is None:
            continue  # not a LoRA matrix (e.g. a saved module); peft handles it
        module, which = m["module"], m["which"]
        short = module.removeprefix("model.")
        if module not in linears:
            raise FedloraError(
                f"{where} has weights for {short}, which base model {base!r} does not have "
                f"(it has {_layer_count(linears)} layers); was it trained on another base "
                "model? (--base)"
            )
        n_in, n_out = linears[module]
        rank = shape[0] if which == "A" else shape[-1]
        if not patterned and rank != r:
            raise FedloraError(
                f"{where}: tensor {short}.lora_{which} has rank {rank} but adapter_config.json "
                f"says r = {r}; the adapter folder is inconsistent."
            )
        expected = (rank, n_in) if which == "A" else (n_out, rank)
        if len(shape) != 2 or shape != expected:
            size, side = (n_in, "inputs") if which == "A" else (n_out, "outputs")
            raise FedloraError(
                f"{where} does not fit base model {base!r}: {short}.lora_{which} has shape "
                f"{tuple(shape)} but the model's {short.rsplit('.', 1)[-1]} has {size} {side} "
                f"(expected {expected}); was it trained on another base model? (--base)"
            )


def _layer_count(linears: dict[str, tuple[int, int]]) -> int:
    layers = {int(m[1]) for n in linears if (m := re.search(r"\.layers\.(\d+)\.", n))}
    return len(layers)


# --- One base model, many adapters ------------------------------------------------------------


class AdapterBank:
    """One base model (loaded once) with any number of named LoRA adapters on it (peft's
    multi-adapter support); `using(name)` switches between them, `using(None)` is the bare base.
    """

    def __init__(self, base: str, log: Log = print, device: str = "auto") -> None:
        from fedlora import model as fm
        from fedlora.device import resolve_device

        quiet_libraries()
        self.base_name = base
        self.device = resolve_device(device)  # model.device: "auto" = a GPU when there is one
        self.base, self.tokenizer = fm.load_base(base, log=log, device=self.device)
        self.linears = linear_shapes(self.base)
        self.peft = None  # the PeftModel wrapping self.base, once an adapter is added
        self.names: list[str] = []

    def add(self, name: str, source: Source, allow_other_base: bool = False) -> None:
        """Check the adapter against this base and attach it as `name`."""
        from peft import PeftModel

        if source.is_base:
            raise FedloraError("`base` is the bare model, not an adapter to load.")
        if name in self.names:
            raise FedloraError(f"Adapter name {name!r} is used twice.")
        check_base_name(source, self.base_name, allow_other_base)
        check_fits(source, self.linears, self.base_name)
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.base, str(source.adapter_dir), adapter_name=name
                )
            else:
                self.peft.load_adapter(str(source.adapter_dir), adapter_name=name)
        except (ValueError, RuntimeError, OSError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FedloraError(f"Adapter {source.label} could not be loaded: {first}") from exc
        self.peft.eval()
        self.names.append(name)

    @contextmanager
    def using(self, name: str | None) -> Iterator[Any]:
        """The model with adapter `name` active (None: the bare base model)."""
        if name is None:
            if self.peft is None:
                yield self.base
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        if name not in self.names:
            raise FedloraError(f"No adapter named {name!r} is loaded.")
        self.peft.set_adapter(name, inference_mode=True)
        yield self.peft


# --- Per-site (personalised) adapters --------------------------------------------------------

#: a results folder keeps each simulated site's personalised adapter in sites/site-<k>/adapter
SITES_DIR = "sites"
#: a site daemon keeps its personalised adapter in its own state folder under this name
PERSONAL_ADAPTER = "personal-adapter"
_SITE_FOLDER = re.compile(r"^site-(\d+)$")


def site_adapter_dir(results: Path, site: int) -> Path:
    """Where a simulated site's personalised adapter lies in a results folder."""
    return results / SITES_DIR / f"site-{site}" / "adapter"


def personal_adapter_dir(site: int, run_out: str, site_state: str | None = None) -> Path:
    """Where a site keeps its personalised adapter. It never travels: a site daemon keeps it in
    its own state folder (`site_state`); a simulated site stands for a machine of its own, and
    its adapter goes into the run's results folder (the `.partial` folder until the run ends)."""
    if site_state is not None:
        return Path(site_state) / PERSONAL_ADAPTER
    if not run_out:
        raise FedloraError("run.out must be set before sites personalise (simulate resolves it).")
    from fedlora.results import work_dir

    return site_adapter_dir(work_dir(Path(run_out).expanduser()), site)


def save_site_adapter(model, folder: Path) -> Path:
    """Write `model`'s (a PeftModel) adapter as a standard peft adapter into `folder`. It is
    written beside and renamed into place, so a kill never leaves a half-written adapter, and a
    resumed run replaces the older one."""
    work = folder.with_name(folder.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model.save_pretrained(str(work), save_embedding_layers=False)  # (as fedlora.adapter's)
    if folder.exists():
        shutil.rmtree(folder)
    work.rename(folder)
    return folder


def find_site_adapters(results: Path) -> dict[int, Path]:
    """Site index -> personalised adapter folder, for every sites/site-<k>/adapter of a
    results folder that has an adapter config."""
    found: dict[int, Path] = {}
    root = results / SITES_DIR
    if root.is_dir():
        for sub in root.iterdir():
            m = _SITE_FOLDER.match(sub.name)
            if m and (sub / "adapter" / ADAPTER_CONFIG).is_file():
                found[int(m[1])] = sub / "adapter"
    return dict(sorted(found.items()))


def parse_site_specs(specs: list[str]) -> list[tuple[int, str]]:
    """`K=DIR` or `site-K=DIR` pairs, checked: whole site numbers, each named once."""
    out: list[tuple[int, str]] = []
    for spec in specs:
        key, sep, folder = spec.partition("=")
        key = key.strip().removeprefix("site-")
        if not sep or not folder.strip() or not key.isdigit():
            raise FedloraError(
                f"--site-adapter {spec!r}: expected SITE=DIR with a site number, e.g. "
                "--site-adapter 0=runs/x/sites/site-0/adapter."
            )
        if int(key) in (k for k, _ in out):
            raise FedloraError(f"--site-adapter: site {int(key)} is given twice.")
        out.append((int(key), folder.strip()))
    return out


# --- Export -----------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedloraError(
            f"Output folder {out} already exists; choose another --out or remove it."
        )


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Write into `<out>.partial/` and rename it to `out` only when everything is written."""
    check_out_dir(out)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    yield work
    if out.exists():
        out.rmdir()  # empty (checked above)
    work.rename(out)


def copy_provenance(source: Source, work: Path) -> list[str]:
    """config.toml and summary.json of the run the adapter came from, when there is one."""
    copied = []
    if source.cfg_path is not None:
        for name in PROVENANCE:
            path = source.cfg_path.parent / name
            if path.is_file() and not (work / name).exists():
                shutil.copy2(path, work / name)
                copied.append(name)
    return copied


def export(
    source: Source,
    out: Path,
    merge: bool = False,
    base: str | None = None,
    allow_other_base: bool = False,
    log: Log = print,
) -> Path:
    """Copy the adapter in peft format, or (merge) fold it into the base weights and save a
    standalone transformers model with its tokenizer. Returns `out`."""
    if source.is_base:
        raise FedloraError("`base` has no adapter to export; give a results or adapter folder.")
    check_out_dir(out)
    if not merge:
        with staged(out) as work:
            for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
                if (source.adapter_dir / name).is_file():
                    shutil.copy2(source.adapter_dir / name, work / name)
            files = sorted(p.name for p in work.iterdir()) + copy_provenance(source, work)
        log(f"Exported the adapter to {out}/ ({', '.join(files)}).")
        return out

    base_name = choose_base([source], base)
    check_base_name(source, base_name, allow_other_base)
    log(f"Loading base model {base_name} ...")
    bank = AdapterBank(base_name, log)
    bank.add("default", source, allow_other_base)
    from transformers import AutoTokenizer

    from fedlora.model import resolve_model

    merged = bank.peft.merge_and_unload()
    # load_base adjusts the tokenizer for training (length limit, pad token): save the original
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(base_name, log))
    with staged(out) as work:
        merged.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        copy_provenance(source, work)
    r = source.meta["r"]
    alpha = source.meta.get("lora_alpha", r)
    log(
        f"Merged the adapter (alpha/r = {alpha}/{r}) into {base_name} and saved a standalone "
        f"model to {out}/ (load it with AutoModelForCausalLM.from_pretrained)."
    )
    return out


# --- Generate ---------------------------------------------------------------------------------


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs, checked: valid, unique names."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not folder.strip():
            raise FedloraError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter fed=runs/x.")
        if not _ADAPTER_NAME.match(name) or name == BASE_WORD:
            raise FedloraError(
                f"--adapter {spec!r}: the name must start with a letter and contain only letters, "
                f"digits, '-' and '_' (and not be `{BASE_WORD}`)."
            )
        if name in (n for n, _ in out):
            raise FedloraError(f"--adapter: the name {name!r} is used twice.")
        out.append((name, folder.strip()))
    return out


def complete(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy completion of `prompt` (the new text only)."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def generate(
    adapters: list[tuple[str, Source]],
    prompt: str,
    base: str | None = None,
    max_new_tokens: int = 32,
    show_base: bool = False,
    allow_other_base: bool = False,
    log: Log = print,
) -> dict[str, str]:
    """Greedy completions of `prompt` by each adapter (and the bare base when `show_base`),
    all on one base model loaded once. Returns {name: completion} in order."""
    base_name = choose_base([s for _, s in adapters], base)
    for _, source in adapters:  # refuse before loading anything
        check_base_name(source, base_name, allow_other_base)
    log(f"Loading base model {base_name} ...")
    bank = AdapterBank(base_name, log)
    for name, source in adapters:
        bank.add(name, source, allow_other_base)
    results: dict[str, str] = {}
    for name in ([None] if show_base else []) + [n for n, _ in adapters]:
        with bank.using(name) as model:
            results[name or BASE_WORD] = complete(model, bank.tokenizer, prompt, max_new_tokens)
    return results
