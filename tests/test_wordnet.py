"""The built-in WordNet glosses: the data-file parser on a fabricated snippet, the class mapping,
the fixed held-out split, partitions and load errors. No download: the real data is checked by
the slow test in test_assets.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedlora import assets
from fedlora.config import DataConfig
from fedlora.data import (
    WORDNET_CLASSES,
    Synset,
    is_wordnet_test,
    load_dataset,
    parse_lexnames,
    parse_wordnet,
    partition,
    wordnet_example,
    wordnet_split,
)
from fedlora.errors import FedloraError

LEXNAMES = "03\tnoun.Tops\t1\n05\tnoun.animal\t1\n06\tnoun.artifact\t1\n18\tnoun.person\t1\n"
# the shape of WordNet's data.noun: licence lines start with two spaces; w_cnt is hex
SNIPPET = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n"
    "00001740 03 n 01 entity 0 000 | that which is perceived or known  \n"
    "00015388 05 n 02 animal 0 animate_being 0 001 @ 00004475 n 0000 | a living organism; "
    '"animals breathe"  \n'
    "02958343 06 n 0b car 0 auto 0 automobile 0 machine 0 motorcar 0 a 0 b 0 c 0 d 0 e 0 f 0 "
    "000 | a motor vehicle with four wheels  \n"
    "10787470 18 n 01 woman 0 002 @ 09619168 n 0000 ~ 10788852 n 0000 | an adult female person\n"
)


def test_parser_reads_lemmas_class_and_gloss():
    synsets = list(parse_wordnet(SNIPPET.splitlines(), parse_lexnames(LEXNAMES)))
    assert [s.key for s in synsets] == ["n00001740", "n00015388", "n02958343", "n10787470"]
    assert [s.lexname for s in synsets] == [
        "noun.Tops",
        "noun.animal",
        "noun.artifact",
        "noun.person",
    ]
    assert synsets[1].lemmas == ["animal", "animate being"]
    assert synsets[1].gloss == 'a living organism; "animals breathe"'
    assert len(synsets[2].lemmas) == 11  # 0b words: the count is hexadecimal
    assert synsets[2].gloss == "a motor vehicle with four wheels"
    assert synsets[3].gloss == "an adult female person"


def test_class_mapping_and_prompt():
    animal = Synset("n00015388", "noun.animal", ["animal", "animate being"], "a living organism")
    ex = wordnet_example(animal)
    assert ex is not None
    assert (ex.label, ex.completion, ex.group) == ("animal", " animal", "living")
    assert ex.prefix + ex.text + ex.suffix == (
        "Word: animal, animate being\nDefinition: a living organism\nClass:"
    )
    assert wordnet_example(Synset("n1", "noun.Tops", ["entity"], "x")) is None
    labels = [label for label, _ in WORDNET_CLASSES.values()]
    assert len(set(labels)) == len(labels) == 10
    assert all(" " not in label for label in labels)  # one short word per class
    assert {family for _, family in WORDNET_CLASSES.values()} == {"living", "things", "abstract"}


def test_held_out_split_is_fixed_and_about_a_tenth():
    keys = [f"n{i:08d}" for i in range(5000)]
    held = [k for k in keys if is_wordnet_test(k)]
    assert 400 < len(held) < 600
    assert held == [k for k in keys if is_wordnet_test(k)]  # a hash, not a random draw
    synsets = [Synset(k, "noun.person", ["x"], "y") for k in keys]
    train, test = wordnet_split(synsets)
    assert len(train) + len(test) == 5000 and len(test) == len(held)


def fake_wordnet(folder: Path, n: int = 400) -> Path:
    """A WordNet folder with `n` synsets spread over the ten classes, and one unused class."""
    folder.mkdir(parents=True, exist_ok=True)
    lexnames = {i: name for i, name in enumerate(["noun.Tops", *WORDNET_CLASSES])}
    (folder / "lexnames").write_text(
        "".join(f"{i:02d}\t{name}\t1\n" for i, name in lexnames.items())
    )
    lines = ["  1 licence header line  "]
    for i in range(n):
        lex = i % len(lexnames)
        lines.append(f"{i:08d} {lex:02d} n 01 word{i} 0 000 | gloss number {i}  ")
    (folder / "data.noun").write_text("\n".join(lines) + "\n")
    for name in ("LICENSE", "data.verb", "data.adj", "data.adv"):
        (folder / name).write_text("")
    return folder


@pytest.fixture
def wordnet(tmp_path, monkeypatch):
    folder = fake_wordnet(tmp_path / "wordnet-3.0")
    monkeypatch.setattr(assets, "wordnet_dir", lambda log=print: folder)
    return load_dataset(DataConfig(path="wordnet"), seed=0, log=lambda _m: None)


def test_data_path_wordnet_loads_the_built_in_glosses(wordnet):
    assert wordnet.name == "wordnet" and wordnet.task == "classify"
    assert wordnet.labels == sorted(label for label, _ in WORDNET_CLASSES.values())
    n_used = sum(1 for i in range(400) if i % 11)  # class 0 (noun.Tops) is not a label
    assert len(wordnet.train) + len(wordnet.test) == n_used
    assert wordnet.test and {e.label for e in wordnet.test} <= set(wordnet.labels)


def test_partitions_of_wordnet(wordnet):
    n_train, n_test = len(wordnet.train), len(wordnet.test)
    train_parts, test_parts = partition(wordnet, 6, "natural", seed=1)
    assert sorted(len(p) for p in train_parts)[-1] - sorted(len(p) for p in train_parts)[0] <= 1
    assert sum(map(len, train_parts)) == n_train and sum(map(len, test_parts)) == n_test
    for part in train_parts:  # each site is mostly one family of classes
        families = Counter(wordnet.train[i].group for i in part)
        assert families.most_common(1)[0][1] >= len(part) / 2
    for scheme in ("iid", "dirichlet"):
        train_parts, test_parts = partition(wordnet, 6, scheme, seed=1, alpha=0.3)
        assert sorted(i for p in train_parts for i in p) == list(range(n_train))
        assert sorted(i for p in test_parts for i in p) == list(range(n_test))


def test_built_in_data_refuses_what_it_cannot_be(wordnet):
    with pytest.raises(FedloraError, match="'wordnet' is a classification task"):
        load_dataset(DataConfig(path="wordnet", task="text"), seed=0)
    with pytest.raises(FedloraError, match="no such column"):
        load_dataset(DataConfig(path="wordnet"), seed=0, unit="patient_id")
