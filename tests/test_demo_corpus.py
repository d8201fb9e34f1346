"""The demo corpus: deterministic, varied, correct facts, JSONL shards through storage."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import json
import re
from collections import Counter

import pytest

from sae.demo import corpus as demo_corpus
from sae.demo.corpus import generate_documents, number_to_words, write_demo_corpus

# A phrase that only its genre's template writes.
GENRE_MARKERS = {
    "story": "Once upon a time",
    "arithmetic": " = ",
    "weather": "Weather report for",
    "recipe": "Recipe for",
    "code": "def ",
    "geography": " is a city in ",
    "dialogue": '" ',
}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(generate_documents(700, seed=0))


def test_same_seed_same_text_other_seed_other_text(docs: list[str]) -> None:
    assert list(generate_documents(700, seed=0)) == docs
    assert list(generate_documents(50, seed=1)) != docs[:50]
    # A prefix of a longer run is the shorter run: documents do not depend on the count.
    assert list(generate_documents(10, seed=0)) == docs[:10]


def test_every_genre_is_present_and_mixed(docs: list[str]) -> None:
    first = docs[:100]
    for genre, marker in GENRE_MARKERS.items():
        share = sum(marker in d for d in first) / len(first)
        assert share > 0.05, f"{genre} missing or rare ({share:.2f})"
    assert set(demo_corpus.GENRES) == set(GENRE_MARKERS)


def test_document_lengths_and_vocabulary(docs: list[str]) -> None:
    lengths = [len(d.split()) for d in docs]
    assert min(lengths) >= 15
    assert max(lengths) <= 220
    words = Counter(w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d))
    assert len(words) > 300  # a few hundred distinct words
    assert len(set(docs)) == len(docs)


def test_arithmetic_statements_are_true(docs: list[str]) -> None:
    checked = 0
    for a, op, b, c in re.findall(r"\b(\d+) ([-+*]) (\d+) = (\d+)\.", "\n".join(docs)):
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c
        checked += 1
    assert checked > 100


def test_city_facts_are_consistent(docs: list[str]) -> None:
    seen: dict[str, set[str]] = {}
    for city, country in re.findall(r"([A-Z][a-z]+) is a city in ([A-Z][a-z]+)", "\n".join(docs)):
        seen.setdefault(city, set()).add(country)
    assert seen
    assert all(len(countries) == 1 for countries in seen.values())


@pytest.mark.parametrize(
    ("n", "words"),
    [(0, "zero"), (7, "seven"), (20, "twenty"), (42, "forty-two"), (90, "ninety"),
     (105, "one hundred and five"), (-3, "minus three")],
)  # fmt: skip
def test_number_to_words(n: int, words: str) -> None:
    assert number_to_words(n) == words


def test_jsonl_round_trip(tmp_path) -> None:
    uris = write_demo_corpus(str(tmp_path / "corpus"), num_documents=41, num_files=4, seed=3)
    names = [os.path.basename(u) for u in uris]
    assert names == [f"demo-{i:05d}-of-00004.jsonl" for i in range(4)]
    shards = []
    for uri in uris:
        with open(uri, encoding="utf-8") as f:
            shards.append([json.loads(line)["text"] for line in f])
    assert sum(len(s) for s in shards) == 41
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    # Round robin: shard i holds documents i, i + 4, ...
    expected = list(generate_documents(41, seed=3))
    for i, shard in enumerate(shards):
        assert shard == expected[i::4]


def test_rejects_zero_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_files"):
        write_demo_corpus(str(tmp_path), num_documents=3, num_files=0)
