"""Auto-interpretability, as delphi (EleutherAI) does it: an explainer model reads a feature's
top and quantile-sampled contexts, the tokens where it fires marked <<like this>>, and writes
a one-line explanation; then, given only that explanation, it says which of a shuffled set of
unmarked held-out contexts make the feature fire (detection scoring). Half of the scored
contexts are activating (quantile samples the explainer never saw), half are windows of the
same held-out text where the feature is zero everywhere, so chance is 0.5 balanced accuracy.

The explainer is pluggable (`Explainer`): an OpenAI-compatible chat endpoint (vLLM, a hosted
API) or an in-process keras-hub Gemma run through the compiled generation loop. This module is
only prompts, parsing, sampling and arithmetic; the explainer's quality is its own.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sae.analysis.features import Pieces, piece_text

# Longest explanation kept (characters): a runaway answer is not an explanation.
MAX_EXPLANATION = 300

EXPLAIN_PROMPT = """You are studying one feature of a language model. It fires on some tokens of \
the text excerpts below; each token where it fires is marked <<like this>>.

{examples}

In one short phrase, say what the marked tokens have in common: the word itself, what it \
means, or the context around it. Answer on one line that starts with "Explanation:"."""

DETECT_ONE_PROMPT = """A feature of a language model has this explanation: "{explanation}"

Here is a text excerpt:
{excerpt}

Would the feature fire somewhere in this excerpt? Answer 1 for yes or 0 for no, with that \
one digit only."""

# The two answers of DETECT_ONE_PROMPT, no then yes.
OPTIONS = ("0", "1")

DETECT_PROMPT = """A feature of a language model has this explanation: "{explanation}"

Below are {count} text excerpts. For each one, answer 1 if the feature would fire somewhere \
in it and 0 if it would not.

{examples}

Answer with a list of {count} numbers, each 0 or 1, in the order of the excerpts, for \
example [{sample}], and nothing else."""


class ExplainerError(Exception):
    """The explainer could not answer (an endpoint down or refusing): auto-interp is
    skipped with this reason, the rest of the report stands."""


class Explainer(Protocol):
    """Answers prompts (plain user messages), one answer per prompt, in order."""

    name: str

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt's answer, greedy."""
        ...

    def option_probabilities(
        self, prompts: Sequence[str], options: Sequence[str]
    ) -> list[list[float] | None]:
        """For each prompt, the probabilities of answering with each of `options` (single
        tokens) first, normalised over them; None where the explainer gives none of them."""
        ...


@dataclass(frozen=True)
class Example:
    """A context: its tokens as they read, the feature's activation at each, and whether the
    feature fires in it (the detection truth)."""

    tokens: list[str]
    values: list[float]
    activating: bool

    def marked(self) -> str:
        """The text with each run of firing tokens wrapped in << >>."""
        out, inside = [], False
        for token, value in zip(self.tokens, self.values, strict=True):
            fires = value > 0
            if fires and not inside:
                out.append("<<")
            elif inside and not fires:
                out.append(">>")
            out.append(token)
            inside = fires
        if inside:
            out.append(">>")
        return "".join(out).strip()

    def plain(self) -> str:
        return "".join(self.tokens).strip()


def _numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"Excerpt {n}: {text}" for n, text in enumerate(texts, 1))


def explanation_prompt(examples: Sequence[Example]) -> str:
    return EXPLAIN_PROMPT.format(examples=_numbered([e.marked() for e in examples]))


def detection_prompt(explanation: str, examples: Sequence[Example]) -> str:
    sample = ", ".join("1" if n % 2 == 0 else "0" for n in range(len(examples)))
    return DETECT_PROMPT.format(
        explanation=explanation,
        count=len(examples),
        examples=_numbered([e.plain() for e in examples]),
        sample=sample,
    )


def detection_prompt_one(explanation: str, example: Example) -> str:
    return DETECT_ONE_PROMPT.format(explanation=explanation, excerpt=example.plain())


def parse_explanation(answer: str) -> str | None:
    """The text after the last "Explanation:", else the answer's first non-empty line;
    None when nothing usable is left (empty, or longer than MAX_EXPLANATION)."""
    markers = list(re.finditer(r"explanation\s*:", answer, flags=re.IGNORECASE))
    # After the last marker: the rest of its line, or the next line when that is empty.
    rest = answer[markers[-1].end() :] if markers else answer
    lines = [line for line in rest.splitlines() if line.strip()][:1]
    text = lines[0].strip().strip("*` ") if lines else ""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":  # quoted whole
        text = text[1:-1].strip()
    return text if 0 < len(text) <= MAX_EXPLANATION else None


def parse_detection(answer: str, count: int) -> list[int] | None:
    """The first bracketed list of exactly `count` 0/1 values in the answer; None when there
    is none (the prompt's excerpts are then left unscored, never guessed)."""
    for inside in re.findall(r"\[([^\[\]]*)\]", answer):
        items = [item.strip() for item in re.split(r"[,\s]+", inside) if item.strip()]
        if len(items) == count and all(item in ("0", "1") for item in items):
            return [int(item) for item in items]
    return None


def detection_scores(truth: Sequence[bool], predicted: Sequence[int | None]) -> dict[str, Any]:
    """Accuracy, balanced accuracy (chance 0.5 whatever the class balance), precision, recall
    and F1 over the examples with a prediction; scores are None where undefined."""
    pairs = [(bool(t), bool(p)) for t, p in zip(truth, predicted, strict=True) if p is not None]
    tp = sum(t and p for t, p in pairs)
    tn = sum(not t and not p for t, p in pairs)
    fp = sum(not t and p for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    recall, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    precision = ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)  # 0 when it finds none of the activating ones
    return {
        "auroc": None,
        "examples": len(truth),
        "activating": sum(bool(t) for t in truth),
        "scored": len(pairs),
        "unparsed": len(truth) - len(pairs),
        "accuracy": ratio(tp + tn, len(pairs)),
        "balanced_accuracy": (
            (recall + specificity) / 2 if recall is not None and specificity is not None else None
        ),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def auroc(truth: Sequence[bool], scores: Sequence[float | None]) -> float | None:
    """The area under the ROC curve of `scores` for `truth` (the chance that an activating
    example scores above a non-activating one, ties half), over the scored examples; None
    without both kinds."""
    pairs = [(bool(t), float(p)) for t, p in zip(truth, scores, strict=True) if p is not None]
    positive = np.array([p for t, p in pairs if t])
    negative = np.array([p for t, p in pairs if not t])
    if not len(positive) or not len(negative):
        return None
    above = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((above + 0.5 * ties) / (len(positive) * len(negative)))


@dataclass
class FeatureExamples:
    """One feature's contexts: those shown to the explainer, those it is scored on, and the
    held-out token spans the shown ones cover ((sequence, start, stop): nothing scored may
    overlap them, or the explainer would have read it)."""

    feature: int
    explain: list[Example]
    detect: list[Example] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)


def _example(context: dict[str, Any]) -> Example:
    values = context.get("values")
    if values is None:  # only the firing token's value is known
        values = [0.0] * len(context["tokens"])
        values[context["highlight"]] = context["activation"]
    return Example(list(context["tokens"]), [float(v) for v in values], True)


def _span(context: dict[str, Any]) -> tuple[int, int, int]:
    start = int(context["position"]) - int(context["highlight"])
    return int(context["sequence"]), start, start + len(context["tokens"])


def _overlaps(span: tuple[int, int, int], spans: Sequence[tuple[int, int, int]]) -> bool:
    sequence, start, stop = span
    return any(s == sequence and start < b and a < stop for s, a, b in spans)


def feature_examples(
    summary: dict[str, Any], explain_top: int, explain_quantile: int, detection: int
) -> FeatureExamples:
    """Split a feature summary's contexts (sae.analysis.features) into the explainer's (the
    strongest `explain_top` and the first `explain_quantile` quantile samples, one per band
    in turn) and up to `detection` held-out quantile samples whose windows overlap none of
    the explainer's (the activating half of the detection set; `with_negatives` adds the
    other)."""
    top = summary["contexts"][:explain_top]
    bands = [list(band["samples"]) for band in summary.get("quantiles", [])]
    quantile: list[dict[str, Any]] = []
    for round_ in range(max((len(b) for b in bands), default=0)):
        quantile += [b[round_] for b in bands if round_ < len(b)]
    spans = [_span(c) for c in top]
    quantile = [c for c in quantile if not _overlaps(_span(c), spans)]
    shown = top + quantile[:explain_quantile]
    spans = [_span(c) for c in shown]
    held_out = [c for c in quantile[explain_quantile:] if not _overlaps(_span(c), spans)]
    return FeatureExamples(
        int(summary["index"]),
        [_example(c) for c in shown],
        [_example(c) for c in held_out[:detection]],
        spans,
    )


def with_negatives(
    examples: FeatureExamples, non_activating: Sequence[Example], rng: random.Random
) -> FeatureExamples:
    """The detection set: the held-out activating contexts and as many `non_activating`
    ones, shuffled."""
    detect = list(examples.detect) + list(non_activating[: len(examples.detect)])
    rng.shuffle(detect)
    return FeatureExamples(examples.feature, examples.explain, detect, examples.spans)


def non_activating_examples(
    sequences: Sequence[np.ndarray],
    activations: dict[int, np.ndarray],
    column: int,
    processor: Pieces,
    window: int,
    count: int,
    rng: random.Random,
    avoid: Sequence[tuple[int, int, int]] = (),
) -> list[Example]:
    """Up to `count` windows of 2 * window + 1 tokens of the held-out sequences in
    `activations` (sequence -> [positions, features shown], sae.analysis.context_values) on
    which feature column `column` is zero at every position, none overlapping the spans
    `avoid` (what the explainer read), from distinct sequences first."""
    candidates = [s for s in activations if len(sequences[s]) > 1]
    rng.shuffle(candidates)
    found: list[Example] = []
    for attempt in range(16 * count):
        if len(found) == count or not candidates:
            break
        sequence = candidates[attempt % len(candidates)]
        ids, values = sequences[sequence], activations[sequence][:, column]
        centre = rng.randrange(len(ids))
        start, stop = max(0, centre - window), min(len(ids), centre + window + 1)
        if np.any(values[start:stop] > 0) or _overlaps((sequence, start, stop), avoid):
            continue
        tokens = [piece_text(processor, t) for t in ids[start:stop]]
        found.append(Example(tokens, [0.0] * len(tokens), False))
    return found


def interpret(
    explainer: Explainer,
    examples: Sequence[FeatureExamples],
    detection: str = "probability",
    examples_per_prompt: int = 4,
) -> list[dict[str, Any]]:
    """Explain every feature of `examples` (one batch of prompts), then score each
    explanation by detection (a second batch): "probability" asks about one excerpt per
    prompt and reads the explainer's probability of answering 1 rather than 0 (delphi's
    log-prob detection; an AUROC too), "list" shows `examples_per_prompt` excerpts per prompt
    and parses the list of 0/1 it answers. One record per feature, in order."""
    if detection not in ("probability", "list"):
        raise ValueError(f"unknown detection mode {detection!r}")
    explain_answers = explainer.complete([explanation_prompt(f.explain) for f in examples])
    explanations = [parse_explanation(answer) for answer in explain_answers]
    scored = [
        (n, feature, explanation)
        for n, (feature, explanation) in enumerate(zip(examples, explanations, strict=True))
        if explanation is not None
    ]
    probabilities: list[list[float | None]] = [[None] * len(f.detect) for f in examples]
    predicted: list[list[int | None]] = [[None] * len(f.detect) for f in examples]
    if detection == "probability":
        owners = [(n, i) for n, feature, _ in scored for i in range(len(feature.detect))]
        prompts = [
            detection_prompt_one(explanation, example)
            for _, feature, explanation in scored
            for example in feature.detect
        ]
        answers = explainer.option_probabilities(prompts, OPTIONS) if prompts else []
        for (n, i), answer in zip(owners, answers, strict=True):
            if answer is not None:
                probabilities[n][i] = answer[1]
                predicted[n][i] = int(answer[1] > answer[0])
    else:
        owners, prompts = [], []
        for n, feature, explanation in scored:
            for first in range(0, len(feature.detect), examples_per_prompt):
                chunk = feature.detect[first : first + examples_per_prompt]
                prompts.append(detection_prompt(explanation, chunk))
                owners.append((n, first, len(chunk)))
        texts = explainer.complete(prompts) if prompts else []
        for (n, first, count), text in zip(owners, texts, strict=True):
            parsed = parse_detection(text, count)
            if parsed is not None:
                predicted[n][first : first + count] = parsed
    records = []
    for n, (feature, explanation, raw) in enumerate(
        zip(examples, explanations, explain_answers, strict=True)
    ):
        truth = [e.activating for e in feature.detect]
        record: dict[str, Any] = {
            "feature": feature.feature,
            "explainer": explainer.name,
            "explanation": explanation,
            "explainer_answer": raw.strip()[:MAX_EXPLANATION],
            "explained_from": len(feature.explain),
        }
        if explanation is not None:
            scores = detection_scores(truth, predicted[n])
            scores["auroc"] = auroc(truth, probabilities[n])
            record["detection"] = {"mode": detection, **scores}
            record["detection_examples"] = [
                {"text": e.plain(), "activating": e.activating, "predicted": p, "probability": q}
                for e, p, q in zip(feature.detect, predicted[n], probabilities[n], strict=True)
            ]
        records.append(record)
    return records


def mean_balanced_accuracy(records: Sequence[dict[str, Any]]) -> float | None:
    """The mean detection balanced accuracy over the features that got one."""
    scores = [
        r["detection"]["balanced_accuracy"]
        for r in records
        if r.get("detection", {}).get("balanced_accuracy") is not None
    ]
    return float(np.mean(scores)) if scores else None


# --- explainers ---------------------------------------------------------------------------


class EndpointExplainer:
    """An OpenAI-compatible chat completions endpoint (vLLM, a hosted API), greedy. The API
    key is read from the environment variable `api_key_env` and sent only as the
    Authorization header; it is never logged or written."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 48,
        timeout: float = 120.0,
    ) -> None:
        self.base_url, self.model = base_url.rstrip("/"), model
        # What the report records: the model, not the endpoint's (maybe internal) address.
        self.name = f"{model} (OpenAI-compatible endpoint)"
        self.max_tokens, self.timeout = max_tokens, timeout
        key = os.environ.get(api_key_env, "")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    def check(self) -> str | None:
        """Why the endpoint cannot be used (unreachable, refusing), or None when it lists
        its models."""
        import requests

        try:
            response = requests.get(
                f"{self.base_url}/models", headers=self._headers, timeout=self.timeout
            )
        except requests.RequestException as error:
            return f"the explainer endpoint {self.base_url} is unreachable ({type(error).__name__})"
        if response.status_code != 200:
            status = response.status_code
            return f"the explainer endpoint {self.base_url}/models answered HTTP {status}"
        return None

    def complete(self, prompts: Sequence[str]) -> list[str]:
        return [
            str(self._chat(prompt, self.max_tokens)["message"]["content"] or "")
            for prompt in prompts
        ]

    def option_probabilities(
        self, prompts: Sequence[str], options: Sequence[str]
    ) -> list[list[float] | None]:
        """From the first answer token's top log-probabilities (`logprobs`, as vLLM and
        OpenAI return them); an option missing from them counts as probability 0."""
        found: list[list[float] | None] = []
        for prompt in prompts:
            choice = self._chat(prompt, 1, {"logprobs": True, "top_logprobs": 20})
            try:
                top = choice["logprobs"]["content"][0]["top_logprobs"]
                logprobs = {str(t["token"]).strip(): float(t["logprob"]) for t in top[::-1]}
            except (KeyError, IndexError, TypeError, ValueError):
                raise ExplainerError(
                    f"the explainer endpoint {self.base_url} returned no log-probabilities "
                    "(set report.autointerp.detection=list for endpoints without them)"
                ) from None
            found.append(_normalised([logprobs.get(option) for option in options]))
        return found

    def _chat(self, prompt: str, max_tokens: int, extra: dict | None = None) -> dict[str, Any]:
        import requests

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **(extra or {}),
        }
        try:
            response = requests.post(
                f"{self.base_url}/chat/completions",
                json=body,
                headers=self._headers,
                timeout=self.timeout,
            )
        except requests.RequestException as error:
            raise ExplainerError(
                f"the explainer endpoint {self.base_url} failed ({type(error).__name__})"
            ) from None
        if response.status_code != 200:
            raise ExplainerError(
                f"the explainer endpoint {self.base_url} answered HTTP {response.status_code}"
            )
        try:
            choice = response.json()["choices"][0]
            choice["message"]["content"]  # noqa: B018 - a completion has one
        except (ValueError, KeyError, IndexError, TypeError):
            raise ExplainerError(
                f"the explainer endpoint {self.base_url} sent no chat completion"
            ) from None
        return choice


def _normalised(logprobs: Sequence[float | None]) -> list[float] | None:
    """Probabilities from log-probabilities, renormalised over the options (None: absent)."""
    if all(lp is None for lp in logprobs):
        return None
    top = max(lp for lp in logprobs if lp is not None)
    weights = [0.0 if lp is None else float(np.exp(lp - top)) for lp in logprobs]
    return [w / sum(weights) for w in weights]


# Gemma's chat turns (keras-hub's and Hugging Face's template): the answer follows the
# model turn's opening and ends with its closing.
USER_TURN = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
END_OF_TURN = "<end_of_turn>"


class ModelExplainer:
    """An in-process keras-hub Gemma, greedy through sae.model.generation's compiled loop
    (no steering); prompts in Gemma's chat template, `batch_size` at a time, each batch
    padded to a multiple of 64 tokens so few shapes compile."""

    def __init__(
        self, generator: Any, name: str, max_new_tokens: int = 48, batch_size: int = 8
    ) -> None:
        self.generator, self.name = generator, name
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def complete(self, prompts: Sequence[str]) -> list[str]:
        g, answers = self.generator, []
        for ids, count, longest in self._batches(prompts):
            unsteered = np.zeros((len(ids), g.hidden_dim), np.float32)
            done = g.generate_rows(ids, unsteered, 0, self.max_new_tokens, length=longest)
            answers += [row.text.split(END_OF_TURN)[0] for row in done[:count]]
        return answers

    def option_probabilities(
        self, prompts: Sequence[str], options: Sequence[str]
    ) -> list[list[float] | None]:
        from sae.model.generation import right_padded

        g = self.generator
        choices = [g.processor.piece_to_id(option) for option in options]
        missing = [o for o, c in zip(options, choices, strict=True) if c == g.processor.unk_id()]
        if missing:
            raise ExplainerError(f"the explainer's vocabulary has no token {missing[0]!r}")
        found: list[list[float] | None] = []
        for ids, count, longest in self._batches(prompts):
            logits = g.choice_logits(*right_padded(ids, longest), choices)[:count]
            found += [_normalised(list(row)) for row in logits.astype(np.float64)]
        return found

    def _batches(self, prompts: Sequence[str]) -> Iterator[tuple[list[list[int]], int, int]]:
        """(prompt ids of `batch_size` rows, how many are real prompts, the rows' prompt room:
        the longest rounded up to a multiple of 64) a batch at a time; filler rows repeat
        the first prompt (one compiled shape per length bucket)."""
        g = self.generator
        for first in range(0, len(prompts), self.batch_size):
            chunk = prompts[first : first + self.batch_size]
            ids = [g.prompt_ids(USER_TURN.format(prompt=p)) for p in chunk]
            ids += [ids[0]] * (self.batch_size - len(ids))
            yield ids, len(chunk), -(-max(len(i) for i in ids) // 64) * 64
