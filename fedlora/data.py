"""Data sets, prompt formatting, partitioning into sites, and the partition summary.

A row becomes an `Example`: a prompt made of a fixed prefix, a free text cut to a token budget
and a fixed suffix, then a completion on which the loss is taken. For classification the
completion is the label word and the label set gives the candidate answers.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedlora.config import DataConfig
from fedlora.errors import FedloraError
from fedlora.readers import read_text


@dataclass(frozen=True)
class Example:
    prefix: str
    text: str
    suffix: str
    completion: str
    label: str = ""  # class name for classification, "" for plain text
    group: str = ""  # natural key (e.g. the specialty of a condition)
    unit: str = ""  # privacy unit (e.g. a patient id) under privacy.unit; "" = the row itself


@dataclass(frozen=True)
class Dataset:
    name: str
    task: str
    train: list[Example]
    test: list[Example]
    labels: list[str]  # candidate class names ([] for plain text)

    def completion_of(self, label: str) -> str:
        return " " + label


# --- Built-in Drugs.com reviews -------------------------------------------------------------

#: Conditions grouped into medical specialties: each specialty is a natural "hospital site".
SPECIALTY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "women's health": (
        "birth control",
        "contracept",
        "pregnan",
        "menopaus",
        "menstrua",
        "vagin",
        "uterine",
        "endometriosis",
        "ovar",
        "hot flash",
        "female",
        "postpartum",
        "lactation",
        "infertility",
        "premenstrual",
        "polycystic",
    ),
    "mental health": (
        "depress",
        "anxiety",
        "bipolar",
        "adhd",
        "insomnia",
        "schizo",
        "panic",
        "obsessive",
        "ptsd",
        "smoking",
        "alcohol",
        "opiate",
        "dependence",
        "psychos",
        "narcolepsy",
        "mood",
        "autism",
        "agitation",
    ),
    "pain": (
        "pain",
        "migraine",
        "headache",
        "arthritis",
        "fibromyalgia",
        "neuropath",
        "gout",
        "back",
        "sciatica",
        "spondyl",
        "muscle spasm",
        "tendon",
        "bursitis",
    ),
}


def specialty(condition: str) -> str:
    c = condition.lower()
    for name, words in SPECIALTY_KEYWORDS.items():
        if any(w in c for w in words):
            return name
    return "other"


def _drugs_examples(path: Path) -> list[Example]:
    out: list[Example] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            condition = (row.get("condition") or "unknown").strip()
            out.append(
                Example(
                    prefix=f"Condition: {condition}\nReview: ",
                    text=html.unescape((row.get("review") or "").strip().strip('"')).strip(),
                    suffix="\nSentiment:",
                    completion=" " + row["rating"].strip(),
                    label=row["rating"].strip(),
                    group=specialty(condition),
                )
            )
    return out


def builtin_dataset(log=print) -> Dataset:
    from fedlora.assets import default_data_files

    train_path, test_path = default_data_files(log=log)
    train, test = _drugs_examples(train_path), _drugs_examples(test_path)
    labels = sorted({e.label for e in train})
    return Dataset("drugscom", "classify", train, test, labels)


# --- Built-in WordNet 3.0 glosses -----------------------------------------------------------

#: data.path values that name a built-in data set instead of a file ("" = drugscom).
BUILTIN_DATA = ("drugscom", "wordnet")

#: WordNet lexicographer class -> (label word, family). The ten best-populated noun classes
#: (2,983 to 11,587 synsets each); each label is one word whose first token differs from the
#: others' in the default model's tokenizer, so one forward pass scores every class. The family
#: is the natural key: a site holds mostly living things, things, or abstractions.
WORDNET_CLASSES: dict[str, tuple[str, str]] = {
    "noun.person": ("person", "living"),
    "noun.animal": ("animal", "living"),
    "noun.plant": ("plant", "living"),
    "noun.artifact": ("artifact", "things"),
    "noun.substance": ("substance", "things"),
    "noun.location": ("location", "things"),
    "noun.act": ("act", "abstract"),
    "noun.communication": ("communication", "abstract"),
    "noun.state": ("state", "abstract"),
    "noun.attribute": ("attribute", "abstract"),
}
#: one synset in WORDNET_TEST_EVERY is held out, chosen by a hash of its key (not the run seed),
#: so every run and every tool sees the same test rows.
WORDNET_TEST_EVERY = 10
_ADJ_MARKER = re.compile(r"\([a-z]+\)$")


@dataclass(frozen=True)
class Synset:
    key: str  # part of speech and byte offset, e.g. "n00001740": unique in WordNet
    lexname: str  # lexicographer class, e.g. "noun.artifact"
    lemmas: list[str]
    gloss: str  # definition, then any example sentences


def parse_lexnames(text: str) -> dict[int, str]:
    """The `lexnames` file: "04<TAB>noun.act<TAB>1" per line -> {4: "noun.act"}."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            out[int(fields[0])] = fields[1]
    return out


def parse_wordnet(lines: Iterable[str], lexnames: dict[int, str]) -> Iterator[Synset]:
    """Synsets of a WordNet `data.*` file. A data line is `offset lex_filenum ss_type w_cnt
    (word lex_id){w_cnt} p_cnt ... | gloss` with w_cnt in hex; the licence header lines start
    with a space. Lines without a gloss are skipped (there are none in WordNet 3.0)."""
    for line in lines:
        if not line.strip() or line.startswith(" "):
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 4:
            continue
        n_words = int(fields[3], 16)
        words = fields[4 : 4 + 2 * n_words : 2]
        lemmas = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in words]
        yield Synset(fields[2] + fields[0], lexnames[int(fields[1])], lemmas, gloss.strip())


def wordnet_example(synset: Synset) -> Example | None:
    """A synset of one of WORDNET_CLASSES as a row (None for the other classes)."""
    if synset.lexname not in WORDNET_CLASSES:
        return None
    label, family = WORDNET_CLASSES[synset.lexname]
    return Example(
        prefix=f"Word: {', '.join(synset.lemmas[:3])}\nDefinition: ",
        text=synset.gloss,
        suffix="\nClass:",
        completion=" " + label,
        label=label,
        group=family,
    )


def is_wordnet_test(key: str) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") % WORDNET_TEST_EVERY == 0


def wordnet_split(synsets: Iterable[Synset]) -> tuple[list[Example], list[Example]]:
    """(train, test) rows of the synsets in WORDNET_CLASSES, test chosen by is_wordnet_test."""
    train: list[Example] = []
    test: list[Example] = []
    for synset in synsets:
        ex = wordnet_example(synset)
        if ex is not None:
            (test if is_wordnet_test(synset.key) else train).append(ex)
    return train, test


def wordnet_dataset(log=print) -> Dataset:
    from fedlora.assets import wordnet_dir

    folder = wordnet_dir(log=log)
    lexnames = parse_lexnames((folder / "lexnames").read_text(encoding="utf-8"))
    with (folder / "data.noun").open(encoding="utf-8") as fh:
        train, test = wordnet_split(parse_wordnet(fh, lexnames))
    labels = [label for label, _ in WORDNET_CLASSES.values()]
    return Dataset("wordnet", "classify", train, test, sorted(labels))


# --- User files -------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a .jsonl or .csv file as dicts; errors name the file and line."""
    return read_numbered_rows(path)[0]


def read_numbered_rows(path: Path) -> tuple[list[dict[str, str]], list[int]]:
    """The rows and the line each starts on."""
    if not path.is_file():
        raise FedloraError(
            f"Data file {path} does not exist; pass --data PATH to a .jsonl or .csv."
        )
    suffix = path.suffix.lower()
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    if suffix in (".jsonl", ".json"):
        for i, line in enumerate(read_text(path, "Data file").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedloraError(f"{path}, line {i}: not valid JSON ({exc.msg}).") from exc
            if not isinstance(row, dict):
                raise FedloraError(f"{path}, line {i}: expected a JSON object per line.")
            rows.append({k: "" if v is None else str(v) for k, v in row.items()})
            lines.append(i)
    elif suffix in (".csv", ".tsv"):
        text = io.StringIO(read_text(path, "Data file"), newline="")
        reader = csv.DictReader(text, delimiter="\t" if suffix == ".tsv" else ",")
        try:
            parsed = list(reader)
        except csv.Error as exc:
            raise FedloraError(f"{path}, line {reader.line_num}: not valid CSV ({exc}).") from None
        for i, row in enumerate(parsed, 2):
            if None in row or any(v is None for v in row.values()):
                raise FedloraError(f"{path}, line {i}: wrong number of columns.")
            rows.append(dict(row))
            lines.append(i)
    else:
        raise FedloraError(f"Data file {path}: unknown format {suffix!r}; use .jsonl or .csv.")
    if not rows:
        raise FedloraError(f"Data file {path} has no rows.")
    return rows, lines


def check_rare_labels(examples: list[Example], lines: list[int], path: Path) -> None:
    """Among several labels, one that appears exactly once is most likely a typo ("postive"):
    as a class of its own it would silently change the task."""
    counts = Counter(e.label for e in examples)
    if not 3 <= len(counts) <= 50:  # more are free-form completions: refused below
        return
    for example, line in zip(examples, lines, strict=True):
        if counts[example.label] == 1:
            others = ", ".join(sorted(k for k, n in counts.items() if n > 1)[:8])
            raise FedloraError(
                f"{path}, line {line}: label {example.label!r} appears only once among "
                f"{len(counts)} labels (the others: {others}); is it a typo? Correct it, or add "
                "more rows of that class."
            )


def _examples_from_rows(
    rows: list[dict[str, str]], task: str, path: Path, unit_column: str = ""
) -> list[Example]:
    """Rows as examples; `unit_column` (privacy.unit) must be filled in every row."""
    keys = set(rows[0])
    out: list[Example] = []
    for i, row in enumerate(rows, 1):
        group = row.get("group", "")
        if unit_column and not row.get(unit_column, "").strip():
            missing = "has no" if unit_column not in row else "has an empty"
            raise FedloraError(
                f"{path}, row {i} {missing} {unit_column!r} column: privacy.unit = "
                f"{unit_column!r} protects each {unit_column} as one unit, so every training "
                f'row needs it; add the column or set privacy.unit = "row".'
            )
        if task == "text":
            if "text" not in row:
                raise FedloraError(f"{path}, row {i}: task 'text' needs a 'text' field.")
            out.append(Example("", row["text"], "", "", group=group))
        elif {"text", "label"} <= keys:
            if not row.get("label", "").strip():
                raise FedloraError(f"{path}, row {i}: empty 'label'.")
            label = row["label"].strip()
            out.append(Example("Text: ", row["text"], "\nLabel:", " " + label, label, group))
        elif {"prompt", "completion"} <= keys:
            if not row.get("completion", "").strip():
                raise FedloraError(f"{path}, row {i}: empty 'completion'.")
            completion = row["completion"]
            completion = completion if completion.startswith(" ") else " " + completion
            out.append(Example("", row["prompt"], "", completion, completion.strip(), group))
        else:
            raise FedloraError(
                f"{path}: rows need 'text' and 'label', or 'prompt' and 'completion' "
                f"(or data.task = \"text\" with a 'text' field); found {sorted(keys)}."
            )
        if unit_column:
            out[-1] = replace(out[-1], unit=row[unit_column].strip())
    return out


def check_data_file(path: Path) -> None:
    """What can be checked of a site's file before the federation says the task: it reads
    (encoding, JSON/CSV, rows), and labelled rows have labels and no likely typo."""
    rows, lines = read_numbered_rows(path)
    if "label" in rows[0] and "text" in rows[0]:
        check_rare_labels(_examples_from_rows(rows, "classify", path), lines, path)


def load_dataset(cfg: DataConfig, seed: int, log=print, unit: str = "row") -> Dataset:
    """The data set data.path names (a built-in one or a file). `unit` is privacy.unit: a
    column name other than "row" is read into each training row's Example.unit."""
    unit_column = "" if unit == "row" else unit
    if not cfg.path or cfg.path in BUILTIN_DATA:
        name = cfg.path or "drugscom"
        if cfg.task != "classify":
            raise FedloraError(
                f"The built-in data {name!r} is a classification task; set data.task = "
                '"classify" or pass your own text with --data.'
            )
        if cfg.test_path:
            raise FedloraError("data.test_path needs data.path (your own training file).")
        if unit_column:
            raise FedloraError(
                f"privacy.unit = {unit!r} names a column of your own data file; the built-in "
                f"data {name!r} has one row per record and no such column: set privacy.unit = "
                '"row" or pass your own file with --data.'
            )
        return wordnet_dataset(log) if name == "wordnet" else builtin_dataset(log)
    path = Path(cfg.path).expanduser()
    rows, lines = read_numbered_rows(path)
    examples = _examples_from_rows(rows, cfg.task, path, unit_column)
    if cfg.task == "classify" and "label" in rows[0]:
        check_rare_labels(examples, lines, path)
    if cfg.test_path:
        tpath = Path(cfg.test_path).expanduser()
        train, test = examples, _examples_from_rows(read_rows(tpath), cfg.task, tpath)
    else:
        order = np.random.default_rng(seed).permutation(len(examples))
        n_test = max(1, round(len(examples) * cfg.test_fraction))
        if len(examples) - n_test < 1:
            raise FedloraError(f"{path} has too few rows ({len(examples)}) to hold out a test set.")
        test = [examples[i] for i in sorted(order[:n_test])]
        train = [examples[i] for i in sorted(order[n_test:])]
    labels = sorted({e.label for e in train}) if cfg.task == "classify" else []
    if cfg.task == "classify":
        if len(labels) < 2:
            raise FedloraError(f"{path}: classification needs at least two distinct labels.")
        if len(labels) > 50:
            raise FedloraError(
                f"{path}: {len(labels)} distinct labels/completions; for free-form completions "
                'use data.task = "text".'
            )
        unknown = {e.label for e in test} - set(labels)
        if unknown:
            raise FedloraError(f"Test rows have labels never seen in training: {sorted(unknown)}.")
    return Dataset(path.stem, cfg.task, train, test, labels)


# --- Partitioning -----------------------------------------------------------------------------


def partition(
    dataset: Dataset, n_sites: int, scheme: str, seed: int, alpha: float = 0.5
) -> tuple[list[list[int]], list[list[int]]]:
    """Split train and test rows into `n_sites` sites, the same way for both (so each site's
    share of the test set measures the global model on that site's kind of data)."""
    train, test = dataset.train, dataset.test
    if n_sites > len(train):
        raise FedloraError(
            f"{n_sites} clients but only {len(train)} training rows; use at most {len(train)} "
            "clients (--clients)."
        )
    rng = np.random.default_rng(seed)
    if scheme == "auto":
        scheme = "natural" if any(e.group for e in train) else "iid"
    if scheme == "iid":
        return _iid(len(train), n_sites, rng), _iid(len(test), n_sites, rng)
    if scheme == "dirichlet":
        if dataset.task != "classify":
            raise FedloraError("partition 'dirichlet' splits by label; it needs task 'classify'.")
        props = rng.dirichlet([alpha] * n_sites, size=len(dataset.labels))
        return (
            _by_label_proportions(train, dataset.labels, props, rng, ensure_nonempty=True),
            _by_label_proportions(test, dataset.labels, props, rng, ensure_nonempty=False),
        )
    if scheme == "natural":
        if not any(e.group for e in train):
            raise FedloraError(
                "partition 'natural' needs a 'group' column in the data (the natural key, e.g. "
                "the hospital department); use --partition iid or dirichlet otherwise."
            )
        return _natural(train, test, n_sites, rng)
    raise FedloraError(f"Unknown partition {scheme!r}; choose natural, iid or dirichlet.")


def _iid(n: int, n_sites: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, n_sites)]


def _by_label_proportions(
    rows: list[Example],
    labels: list[str],
    props: np.ndarray,
    rng: np.random.Generator,
    ensure_nonempty: bool,
) -> list[list[int]]:
    n_sites = props.shape[1]
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for li, label in enumerate(labels):
        idx = rng.permutation([i for i, e in enumerate(rows) if e.label == label])
        cuts = (np.cumsum(props[li])[:-1] * len(idx)).round().astype(int)
        for site, part in enumerate(np.split(idx, cuts)):
            sites[site].extend(int(i) for i in part)
    if ensure_nonempty:  # a site with no rows cannot train: give it one row from the largest
        for site in range(n_sites):
            if not sites[site]:
                donor = max(range(n_sites), key=lambda s: len(sites[s]))
                sites[site].append(sites[donor].pop())
    return [sorted(s) for s in sites]


def _natural(
    train: list[Example], test: list[Example], n_sites: int, rng: np.random.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    """Order rows by natural key (ties shuffled by the seed) and cut into contiguous shards of
    equal size: each site is dominated by one group, as a specialty hospital would be. Test rows
    go to a site holding their group (the one holding most of it)."""
    shuffle = rng.permutation(len(train))
    order = sorted(range(len(train)), key=lambda i: (train[i].group, shuffle[i]))
    shards = [sorted(int(i) for i in part) for part in np.array_split(order, n_sites)]
    home: dict[str, int] = {}
    counts: dict[str, Counter[int]] = {}
    for site, rows in enumerate(shards):
        for i in rows:
            counts.setdefault(train[i].group, Counter())[site] += 1
    for group, c in counts.items():
        home[group] = c.most_common(1)[0][0]
    test_sites: list[list[int]] = [[] for _ in range(n_sites)]
    # a group's test rows are spread over all sites that hold that group, in proportion
    for group in sorted({e.group for e in test}):
        idx = [i for i, e in enumerate(test) if e.group == group]
        holders = counts.get(group)
        if not holders:
            test_sites[int(rng.integers(n_sites))].extend(idx)
            continue
        sites = sorted(holders)
        weights = np.array([holders[s] for s in sites], dtype=float)
        cuts = (np.cumsum(weights / weights.sum())[:-1] * len(idx)).round().astype(int)
        for s, part in zip(sites, np.split(np.array(idx), cuts), strict=True):
            test_sites[s].extend(int(i) for i in part)
    return shards, [sorted(s) for s in test_sites]


def site_label(rows: list[Example]) -> str:
    groups = Counter(e.group for e in rows if e.group)
    return groups.most_common(1)[0][0] if groups else ""


def partition_summary(
    dataset: Dataset, train_parts: list[list[int]], test_parts: list[list[int]]
) -> str:
    """A table of rows and label mix per site, shown before training."""
    labels = dataset.labels
    head = f"{'site':<8}{'group':<16}{'train':>6}{'test':>6}"
    if labels:
        head += "  " + " ".join(f"{lab[:8]:>8}" for lab in labels)
    lines = [head, "-" * len(head)]
    for site, (tr, te) in enumerate(zip(train_parts, test_parts, strict=True)):
        rows = [dataset.train[i] for i in tr]
        line = f"{site:<8}{site_label(rows)[:15]:<16}{len(tr):>6}{len(te):>6}"
        if labels:
            c = Counter(e.label for e in rows)
            line += "  " + " ".join(f"{c[lab] / max(1, len(rows)):>8.0%}" for lab in labels)
        lines.append(line)
    return "\n".join(lines)
