"""Data: user files, their errors, partitioning into sites, and the built-in reviews."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from fedlora.config import DataConfig
from fedlora.data import (
    Dataset,
    Example,
    builtin_dataset,
    load_dataset,
    partition,
    partition_summary,
    read_rows,
)
from fedlora.errors import FedloraError

# --- user files ---------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_text_label(tmp_path):
    rows = [{"text": f"review {i}", "label": "good" if i % 2 else "bad"} for i in range(10)]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    ds = load_dataset(DataConfig(path=str(path), test_fraction=0.2), seed=0)
    assert ds.task == "classify" and ds.name == "reviews"
    assert ds.labels == ["bad", "good"]
    assert len(ds.train) + len(ds.test) == 10 and len(ds.test) == 2
    texts = sorted(e.text for e in ds.train + ds.test)
    assert texts == sorted(r["text"] for r in rows)  # every row kept exactly once
    for e in ds.train + ds.test:
        assert e.completion == " " + e.label
        assert e.label in ("good", "bad")


def test_csv_prompt_completion(tmp_path):
    path = tmp_path / "qa.csv"
    lines = ["prompt,completion"] + [f"question {i},{'yes' if i % 2 else 'no'}" for i in range(8)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = load_dataset(DataConfig(path=str(path), test_fraction=0.25), seed=1)
    assert ds.labels == ["no", "yes"]
    assert len(ds.train) == 6 and len(ds.test) == 2
    for e in ds.train + ds.test:
        assert e.text.startswith("question ")
        assert e.completion in (" yes", " no")  # a leading space is added once


def test_task_text(tmp_path):
    rows = [{"text": f"free text number {i}", "group": "a" if i < 3 else "b"} for i in range(6)]
    path = write_jsonl(tmp_path / "notes.jsonl", rows)
    ds = load_dataset(DataConfig(path=str(path), task="text", test_fraction=0.2), seed=0)
    assert ds.task == "text" and ds.labels == []
    assert len(ds.train) + len(ds.test) == 6
    assert all(e.completion == "" and e.label == "" for e in ds.train + ds.test)
    assert {e.group for e in ds.train + ds.test} == {"a", "b"}


def test_separate_test_file(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": str(i), "label": "ab"[i % 2]} for i in range(6)]
    )
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "x", "label": "a"}])
    ds = load_dataset(DataConfig(path=str(train), test_path=str(test)), seed=0)
    assert len(ds.train) == 6 and len(ds.test) == 1


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": oops}\n')
    with pytest.raises(FedloraError) as info:
        read_rows(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message


def test_json_line_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    with pytest.raises(FedloraError, match="line 2"):
        read_rows(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(FedloraError) as info:
        load_dataset(DataConfig(path=str(path)), seed=0)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_csv_wrong_column_count(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,a\ntoo,many,columns\n")
    with pytest.raises(FedloraError) as info:
        read_rows(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    short = tmp_path / "short.csv"
    short.write_text("text,label\nfine,a\nmissing\n")
    with pytest.raises(FedloraError, match="line 3"):
        read_rows(short)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("whatever")
    with pytest.raises(FedloraError, match=r"\.parquet"):
        read_rows(path)


def test_missing_columns_message(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"body": "a", "target": "x"}] * 4)
    with pytest.raises(FedloraError) as info:
        load_dataset(DataConfig(path=str(path)), seed=0)
    message = str(info.value)
    for needed in ("'text'", "'label'", "'prompt'", "'completion'", "body", "target"):
        assert needed in message


def test_empty_file_and_single_label(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(FedloraError, match="no rows"):
        read_rows(empty)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": str(i), "label": "same"} for i in range(5)])
    with pytest.raises(FedloraError, match="two distinct labels"):
        load_dataset(DataConfig(path=str(one)), seed=0)


# --- partitioning -------------------------------------------------------------------------------

LABELS = ["a", "b", "c"]


def synthetic(n_train: int = 90, n_test: int = 30, groups: bool = True) -> Dataset:
    def rows(n, tag):
        return [
            Example(
                "Text: ",
                f"{tag} {i}",
                "\nLabel:",
                " " + LABELS[i % 3],
                LABELS[i % 3],
                f"g{i % 4}" if groups else "",
            )
            for i in range(n)
        ]

    return Dataset("synthetic", "classify", rows(n_train, "train"), rows(n_test, "test"), LABELS)


def assert_cover_once(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_partition_covers_every_row_once(scheme):
    ds = synthetic()
    train_parts, test_parts = partition(ds, 4, scheme, seed=3, alpha=0.5)
    assert len(train_parts) == 4 and len(test_parts) == 4
    assert_cover_once(train_parts, len(ds.train))
    assert_cover_once(test_parts, len(ds.test))
    assert all(part for part in train_parts)  # every site can train


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_partition_is_seeded(scheme):
    ds = synthetic()
    assert partition(ds, 4, scheme, seed=5) == partition(ds, 4, scheme, seed=5)


def test_iid_differs_with_seed_and_is_balanced():
    ds = synthetic()
    one, _ = partition(ds, 4, "iid", seed=0)
    two, _ = partition(ds, 4, "iid", seed=1)
    assert one != two
    sizes = [len(p) for p in one]
    assert max(sizes) - min(sizes) <= 1


def test_more_clients_than_rows():
    ds = synthetic(n_train=5, n_test=3)
    with pytest.raises(FedloraError) as info:
        partition(ds, 6, "iid", seed=0)
    assert "--clients" in str(info.value) and "5" in str(info.value)


def test_natural_needs_group_column():
    with pytest.raises(FedloraError, match="group"):
        partition(synthetic(groups=False), 3, "natural", seed=0)


def test_natural_sites_are_dominated_by_a_group():
    ds = synthetic(n_train=80)
    train_parts, _ = partition(ds, 4, "natural", seed=0)
    for part in train_parts:
        groups = Counter(ds.train[i].group for i in part)
        assert groups.most_common(1)[0][1] / len(part) == 1.0  # 4 groups of 20 into 4 shards


def label_entropy(ds: Dataset, part: list[int]) -> float:
    counts = Counter(ds.train[i].label for i in part)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def mean_max_share(ds: Dataset, parts: list[list[int]]) -> float:
    shares = [Counter(ds.train[i].label for i in p).most_common(1)[0][1] / len(p) for p in parts]
    return sum(shares) / len(shares)


def test_dirichlet_small_alpha_is_skewed():
    ds = synthetic(n_train=600, n_test=60)
    iid_parts, _ = partition(ds, 5, "iid", seed=0)
    skew_entropy, skew_share = [], []
    for seed in range(5):
        parts, _ = partition(ds, 5, "dirichlet", seed=seed, alpha=0.05)
        skew_entropy.append(sum(label_entropy(ds, p) for p in parts) / len(parts))
        skew_share.append(mean_max_share(ds, parts))
    iid_entropy = sum(label_entropy(ds, p) for p in iid_parts) / len(iid_parts)
    # iid sites hold all three labels nearly evenly (entropy near log 3, max share near 1/3)
    assert iid_entropy > 0.95 * math.log(3)
    assert mean_max_share(ds, iid_parts) < 0.45
    assert sum(skew_entropy) / 5 < 0.5 * iid_entropy
    assert sum(skew_share) / 5 > 0.75


def test_dirichlet_needs_classification():
    ds = synthetic()
    text = Dataset(ds.name, "text", ds.train, ds.test, [])
    with pytest.raises(FedloraError, match="classify"):
        partition(text, 3, "dirichlet", seed=0)


def test_unknown_partition():
    with pytest.raises(FedloraError, match="natural, iid or dirichlet"):
        partition(synthetic(), 3, "random", seed=0)


def test_partition_summary_one_line_per_site():
    ds = synthetic()
    train_parts, test_parts = partition(ds, 4, "iid", seed=0)
    lines = partition_summary(ds, train_parts, test_parts).splitlines()
    header, rule, sites = lines[0], lines[1], lines[2:]
    assert len(sites) == 4
    assert set(rule) == {"-"}
    for label in LABELS:
        assert label in header
    for site, (line, part, tpart) in enumerate(zip(sites, train_parts, test_parts, strict=True)):
        fields = line.split()
        assert fields[0] == str(site)
        assert str(len(part)) in fields and str(len(tpart)) in fields


# --- built-in data --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin():
    return builtin_dataset(log=lambda _msg: None)


def test_builtin_sizes_and_labels(builtin):
    assert len(builtin.train) == 600 and len(builtin.test) == 379
    assert builtin.labels == ["negative", "neutral", "positive"]
    assert {e.label for e in builtin.test} <= set(builtin.labels)
    assert builtin.task == "classify"


def test_builtin_reviews_are_clean(builtin):
    for e in builtin.train + builtin.test:
        assert e.text, "empty review"
        assert not e.text.startswith('"'), e.text[:40]
        assert "&#039;" not in e.text and "&amp;" not in e.text and "&quot;" not in e.text
        assert e.completion == " " + e.label
        assert e.prefix.startswith("Condition: ")


def test_builtin_natural_partition_has_specialties(builtin):
    groups = {e.group for e in builtin.train}
    assert len(groups) >= 3
    train_parts, _ = partition(builtin, 3, "natural", seed=0)
    assert_cover_once(train_parts, len(builtin.train))
