"""Sparse probing (SAEBench's definition): do a handful of an SAE's latents carry a label that
belongs to whole documents (a genre, a topic, a language)?

Each labelled document runs through the model once. Per document, the mean over its content
tokens (BOS and padding left out, as in training) of the raw activations at each tapped site
and of every SAE's latents. Each class with enough documents is a balanced task: the class
against as many documents of the other classes (seeded), split into documents that fit the
probe and documents held out from it. On the fitting documents the k latents whose means
differ most between the two sides are chosen and a logistic regression (L2, scipy's L-BFGS,
on standardised inputs) is fitted on them; its accuracy on the held-out documents is reported
for each k (chance: 0.5), beside the same probe on all of the site's raw dimensions and on its
top-k raw dimensions. Names follow SAEBench (`sae_top_{k}_test_accuracy`, `llm_test_accuracy`).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from sae.analysis.evaluation import latent_encoder
from sae.data.activations import content_mask, sequence_batches
from sae.errors import InputError
from sae.io import storage

# L2 penalty of the logistic probes, on standardised inputs (sklearn's default C=1).
L2 = 1.0


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    labels: list[str]


def read_labelled(uri: str, text_field: str, label_field: str, max_documents: int) -> Labelled:
    """The first `max_documents` (text, label) pairs of a JSONL or Parquet file."""
    if not storage.exists(uri):
        raise InputError(f"report.probing.data: no file at {uri}")
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        missing = [f for f in (text_field, label_field) if f not in table.column_names]
        if missing:
            raise InputError(f"{uri} has no column {missing[0]!r} (report.probing.*_field)")
        records = table.select([text_field, label_field]).slice(0, max_documents).to_pylist()
    else:
        records = []
        for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
            if len(records) == max_documents:
                break
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{uri} line {number}: not JSON") from None
    texts, labels = [], []
    for number, record in enumerate(records, 1):
        for name in (text_field, label_field):
            if not isinstance(record, dict) or record.get(name) is None:
                raise InputError(
                    f"{uri} record {number} has no {name!r} field (report.probing.*_field)"
                )
        if not isinstance(record[text_field], str):
            raise InputError(f"{uri} record {number}: {text_field!r} is not text")
        texts.append(record[text_field])
        labels.append(str(record[label_field]))
    if len(set(labels)) < 2:
        raise InputError(f"{uri}: probing needs at least two labels, found {sorted(set(labels))}")
    return Labelled(texts, labels)


@dataclass(frozen=True)
class Task:
    """One balanced binary task: `positive` against the other classes."""

    positive: str
    train: np.ndarray  # document indices
    train_y: np.ndarray  # 1: the positive class
    test: np.ndarray
    test_y: np.ndarray


def balanced_tasks(
    labels: Sequence[str], min_documents: int, test_fraction: float, seed: int
) -> list[Task]:
    """A task per class with at least `min_documents` documents, as many negatives drawn from
    the other classes (or as many positives as there are negatives), each side split alike."""
    labels_array = np.asarray(labels)
    tasks = []
    for name, count in sorted(Counter(labels).items()):
        if count < min_documents:
            continue
        rng = np.random.default_rng([seed, count, len(tasks)])
        positives = rng.permutation(np.flatnonzero(labels_array == name))
        negatives = rng.permutation(np.flatnonzero(labels_array != name))
        size = min(len(positives), len(negatives))
        sides = [negatives[:size], positives[:size]]
        held = max(1, round(size * test_fraction))
        train = np.concatenate([side[held:] for side in sides])
        test = np.concatenate([side[:held] for side in sides])
        y_train = np.repeat([0, 1], size - held)
        y_test = np.repeat([0, 1], held)
        tasks.append(Task(name, train, y_train, test, y_test))
    if not tasks:
        raise InputError(
            f"no label has report.probing.min_class_documents ({min_documents}) documents"
        )
    return tasks


def fit_probe(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A logistic regression on standardised `x` (L2 = `L2`); returns the predictor of 0/1."""
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-8
    z = (x - mean) / scale
    n, d = z.shape

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        logits = z @ w + b
        # log(1 + exp(-s * logit)) with s = 2y - 1, stably.
        signed = (2 * y - 1) * logits
        value = np.logaddexp(0, -signed).sum() + 0.5 * L2 * w @ w
        p_wrong = 1 / (1 + np.exp(signed))
        grad_logits = -(2 * y - 1) * p_wrong
        return value, np.concatenate([z.T @ grad_logits + L2 * w, [grad_logits.sum()]])

    theta = scipy.optimize.minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B").x
    return lambda new: (((new - mean) / scale) @ theta[:d] + theta[d] > 0).astype(int)


def top_k_by_mean_difference(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns whose means differ most (in absolute value) between y == 1 and y == 0."""
    difference = np.abs(x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0))
    return np.argsort(-difference, kind="stable")[:k]


def probe_accuracies(
    features: np.ndarray, tasks: Sequence[Task], k_values: Sequence[int]
) -> dict[str, dict[str, float]]:
    """{task: {"k": held-out accuracy}} of the top-k probe for each k, and "all" (every
    column) when the features are few enough to fit on (raw activations)."""
    results = {}
    for task in tasks:
        x_train, x_test = features[task.train], features[task.test]
        scores = {}
        for k in k_values:
            chosen = top_k_by_mean_difference(x_train, task.train_y, k)
            predict = fit_probe(x_train[:, chosen], task.train_y)
            scores[str(k)] = float(np.mean(predict(x_test[:, chosen]) == task.test_y))
        results[task.positive] = scores
    return results


def full_probe_accuracies(features: np.ndarray, tasks: Sequence[Task]) -> dict[str, float]:
    """{task: held-out accuracy} of the probe on every column (SAEBench's LLM probe)."""
    return {
        task.positive: float(
            np.mean(
                fit_probe(features[task.train], task.train_y)(features[task.test]) == task.test_y
            )
        )
        for task in tasks
    }


def document_sequences(
    texts: Sequence[str], encode: Callable[[str], list[int]], bos_id: int, sequence_length: int
) -> list[tuple[np.ndarray, int]]:
    """Each document as one sequence (BOS, then its first tokens), padded to the length."""
    sequences = []
    for text in texts:
        ids = [bos_id, *encode(text)][:sequence_length]
        padded = np.zeros(sequence_length, np.int32)
        padded[: len(ids)] = ids
        sequences.append((padded, len(ids)))
    return sequences


def pooled_activations(
    tap,
    encoders: Sequence[tuple[object, dict, int]],
    sequences: Sequence[tuple[np.ndarray, int]],
    lm_batch_size: int,
    bos_id: int,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per document: the mean raw activation at each tapped site [docs, d], the mean latents
    of each (sae, params, site index) of `encoders` [docs, d_sae], and its content-token
    count (0: a document with no token besides BOS, which callers drop)."""
    encode = [latent_encoder(sae, params) for sae, params, _ in encoders]
    raw: list[list[np.ndarray]] = [[] for _ in tap.sites]
    latents: list[list[np.ndarray]] = [[] for _ in encoders]
    counts = []
    for token_ids, lengths in sequence_batches(iter(sequences), lm_batch_size):
        mask = content_mask(token_ids, lengths, bos_id)
        count = mask.sum(axis=1)
        weights = mask / np.maximum(count, 1)[:, None]  # [batch, seq]: a mean per document
        outputs = [np.asarray(a, np.float32) for a in tap(token_ids, lengths)]
        for pooled, site_rows in zip(raw, outputs, strict=True):
            pooled.append(np.einsum("bs,bsd->bd", weights, site_rows))
        for pooled, (_, _, site), latents_of in zip(latents, encoders, encode, strict=True):
            z = np.asarray(latents_of(outputs[site]))
            pooled.append(np.einsum("bs,bsf->bf", weights, z))
        counts.append(count)
    documents = len(sequences)
    return (
        [np.concatenate(p)[:documents] for p in raw],
        [np.concatenate(p)[:documents] for p in latents],
        np.concatenate(counts)[:documents],
    )


def sparse_probing(
    tap,
    saes: dict[str, tuple[object, dict, int]],
    labelled: Labelled,
    encode: Callable[[str], list[int]],
    *,
    bos_id: int,
    sequence_length: int,
    lm_batch_size: int,
    k_values: Sequence[int] = (1, 2, 5, 20),
    test_fraction: float = 0.2,
    min_class_documents: int = 20,
    seed: int = 0,
) -> dict:
    """Sparse probing of every SAE of `saes` ({name: (sae, params, index of the tapped site
    it reads)}) on `labelled` documents: one model pass for all of them. Returns the JSON
    document the report writes (per SAE: mean held-out accuracy per k and per task; per
    site: the raw-activation probes)."""
    sequences = document_sequences(labelled.texts, encode, bos_id, sequence_length)
    raw, latents, counts = pooled_activations(
        tap, list(saes.values()), sequences, lm_batch_size, bos_id
    )
    kept = np.flatnonzero(counts > 0)  # documents with at least one token besides BOS
    labels = [labelled.labels[i] for i in kept]
    tasks = balanced_tasks(labels, min_class_documents, test_fraction, seed)

    def summary(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
        return {k: float(np.mean([s[k] for s in per_task.values()])) for k in map(str, k_values)}

    sites = {}
    for site, features in zip(tap.sites, raw, strict=True):
        x = features[kept]
        full = full_probe_accuracies(x, tasks)
        top = probe_accuracies(x, tasks, k_values)
        sites[site.label] = {
            "llm_test_accuracy": float(np.mean(list(full.values()))),
            "llm_top_k_test_accuracy": summary(top),
            "per_task": {t: {"all": full[t], **top[t]} for t in full},
        }
    results = {}
    for (name, (_, _, site_index)), features in zip(saes.items(), latents, strict=True):
        per_task = probe_accuracies(features[kept], tasks, k_values)
        results[name] = {
            "site": tap.sites[site_index].label,
            "sae_top_k_test_accuracy": summary(per_task),
            "per_task": per_task,
        }
    return {
        "documents": len(kept),
        "dropped_empty_documents": len(sequences) - len(kept),
        "labels": dict(sorted(Counter(labels).items())),
        "tasks": [
            {"positive": t.positive, "train_documents": len(t.train), "test_documents": len(t.test)}
            for t in tasks
        ],
        "k_values": list(k_values),
        "chance": 0.5,
        "sites": sites,
        "saes": results,
    }
