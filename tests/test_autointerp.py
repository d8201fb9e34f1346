"""Auto-interpretability (sae.analysis.autointerp): prompts, parsing, sampling and the scores'
arithmetic with scripted explainers; the OpenAI-compatible client against a local HTTP fake
that checks each request (no real endpoint is reachable here); the in-process explainer with
the local run's tiny model (its answers are poor: the tests check the machinery, against
keras-hub's own forward); and the report's auto-interp on the local run."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest

from sae.analysis import autointerp
from sae.analysis.autointerp import Example, FeatureExamples

from .conftest import SMALL_SAES, local_http_server


def _example(text: str, activating: bool, fires_on: str = "") -> Example:
    tokens = [w if i == 0 else " " + w for i, w in enumerate(text.split())]
    values = [1.5 if fires_on and fires_on in t else 0.0 for t in tokens]
    return Example(tokens, values, activating)


def test_marked_wraps_each_run_of_firing_tokens():
    example = Example(["The", " cat", " cat", " sat", " cat"], [0, 2.0, 1.0, 0, 0.5], True)
    assert example.marked() == "The<< cat cat>> sat<< cat>>"
    assert example.plain() == "The cat cat sat cat"
    prompt = autointerp.explanation_prompt([example, _example("a dog", True, "dog")])
    assert "Excerpt 1: The<< cat cat>> sat<< cat>>" in prompt
    assert "Excerpt 2: a<< dog>>" in prompt


@pytest.mark.parametrize(
    ("answer", "explanation"),
    [
        ("Let me see.\nExplanation: the word 'cat' in stories", "the word 'cat' in stories"),
        ("explanation:  \"numbers after 'Step'\"", "numbers after 'Step'"),
        ("first: x\nExplanation: a\nExplanation: b", "b"),
        ("cooking verbs\nmore text", "cooking verbs"),  # no marker: the first line
        ("Explanation:\n  The word 'the'\nmore", "The word 'the'"),  # on the next line
        ("\n\n", None),
        ("Explanation: " + "x" * 400, None),
    ],
)
def test_explanations_are_parsed_or_refused(answer, explanation):
    assert autointerp.parse_explanation(answer) == explanation


def test_detection_lists_are_parsed_only_when_complete():
    assert autointerp.parse_detection("Sure: [1, 0, 0, 1]", 4) == [1, 0, 0, 1]
    assert autointerp.parse_detection("[1 0 1]\n", 3) == [1, 0, 1]
    assert autointerp.parse_detection("[0, 1] then [1, 1, 0]", 3) == [1, 1, 0]
    assert autointerp.parse_detection("[1, 0]", 3) is None
    assert autointerp.parse_detection("[1, 2, 0]", 3) is None
    assert autointerp.parse_detection("1, 0, 1", 3) is None


def test_scores_arithmetic():
    truth = [True, True, True, False, False, False, True]
    predicted = [1, 1, 0, 0, 1, 0, None]
    scores = autointerp.detection_scores(truth, predicted)
    # Scored: tp 2, fn 1, tn 2, fp 1; the last has no answer.
    assert scores["examples"] == 7 and scores["scored"] == 6 and scores["unparsed"] == 1
    assert scores["activating"] == 4
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    # Activating examples, none found: F1 is 0, not undefined.
    assert autointerp.detection_scores([True, False], [0, 0])["f1"] == 0.0
    # One class only among the answered: balanced accuracy is undefined, not 0 or 1.
    assert autointerp.detection_scores([True, False], [1, None])["balanced_accuracy"] is None
    assert autointerp.detection_scores([True], [None])["accuracy"] is None
    # AUROC: positives 0.9, 0.4; negatives 0.4, 0.1 -> (1 + 1 + 0.5 + 1) / 4.
    assert autointerp.auroc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert autointerp.auroc([1, 0], [0.9, None]) is None


def _context(sequence: int, position: int, activation: float) -> dict:
    """A context whose firing token names where it comes from."""
    return {
        "activation": activation,
        "sequence": sequence,
        "position": position,
        "tokens": ["a ", f"s{sequence}p{position} ", "b "],
        "highlight": 1,
        "values": [0.0, activation, 0.0],
    }


def test_the_explainer_never_sees_the_contexts_it_is_scored_on():
    top = [_context(s, 5, 10.0 - s) for s in range(4)]
    # Three quantile bands of three samples; one sample repeats a top context, one lies in
    # a shown window (sequence 1, two tokens after the top context there).
    bands = [
        {"samples": [_context(10 + 3 * b + i, 2, 1.0 + b) for i in range(3)]} for b in range(3)
    ]
    bands[0]["samples"][1] = top[0]
    bands[2]["samples"][2] = _context(1, 6, 1.5)
    summary = {"index": 7, "contexts": top, "quantiles": bands}
    held_out = autointerp.feature_examples(summary, 3, 2, 4)
    assert held_out.feature == 7
    explained = [e.plain().split()[1] for e in held_out.explain]
    # The 3 strongest, then quantile samples one band at a time (band 0's first, band 1's).
    assert explained == ["s0p5", "s1p5", "s2p5", "s10p2", "s13p2"]
    activating = sorted(e.plain().split()[1] for e in held_out.detect)
    # Held out: the next four in that order (band by band), less the repeated top context
    # and the sample inside a shown window.
    assert activating == sorted(["s16p2", "s14p2", "s17p2", "s12p2"])
    assert (1, 4, 7) in held_out.spans  # what the explainer read of sequence 1
    negatives = [_example(f"quiet {n}", False) for n in range(10)]
    examples = autointerp.with_negatives(held_out, negatives, random.Random(0))
    quiet = sorted(e.plain() for e in examples.detect if not e.activating)
    assert quiet == [f"quiet {n}" for n in range(4)]  # as many as the activating ones
    assert sorted(e.plain().split()[1] for e in examples.detect if e.activating) == activating


def test_non_activating_windows_are_zero_everywhere():
    class Pieces:
        def id_to_piece(self, token_id: int) -> str:
            return f"\u2581t{token_id}"

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 50, size=40) for _ in range(6)]
    activations = {s: (rng.random((40, 3)) < 0.05).astype(np.float32) for s in range(6)}
    found = autointerp.non_activating_examples(
        sequences, activations, 1, Pieces(), 3, 5, random.Random(0)
    )
    assert 0 < len(found) <= 5
    # Windows the explainer read are never scored as non-activating.
    avoid = [(s, 0, 40) for s in range(6)]
    assert (
        autointerp.non_activating_examples(
            sequences, activations, 1, Pieces(), 3, 5, random.Random(0), avoid=avoid
        )
        == []
    )
    for example in found:
        assert not example.activating and len(example.tokens) <= 7
        ids = [int(t.strip()[1:]) for t in example.tokens]
        # The window's position in some sequence, where column 1 is zero throughout.
        assert any(
            list(seq[i : i + len(ids)]) == ids and not activations[s][i : i + len(ids), 1].any()
            for s, seq in enumerate(sequences)
            for i in range(len(seq) - len(ids) + 1)
        )


class Scripted:
    """An explainer that knows the truth: it explains with `explanation`, and says an excerpt
    activates when it contains `word` (contrary=True: the opposite)."""

    name = "scripted"

    def __init__(self, explanation: str, word: str, contrary: bool = False) -> None:
        self.explanation, self.word, self.contrary = explanation, word, contrary
        self.prompts: list[str] = []

    def _says(self, excerpt: str) -> bool:
        return (self.word in excerpt) != self.contrary

    def complete(self, prompts):
        self.prompts += prompts
        answers = []
        for prompt in prompts:
            if "Explanation:" in prompt and "<<" in prompt:
                answers.append(f"Thinking...\nExplanation: {self.explanation}")
            else:
                excerpts = [line for line in prompt.splitlines() if line.startswith("Excerpt ")]
                answers.append(str([int(self._says(e)) for e in excerpts]))
        return answers

    def option_probabilities(self, prompts, options):
        assert tuple(options) == autointerp.OPTIONS
        self.prompts += prompts
        excerpts = [p.split("Here is a text excerpt:\n")[1].split("\n\n")[0] for p in prompts]
        return [[0.2, 0.8] if self._says(e) else [0.9, 0.1] for e in excerpts]


def _cat_features(count: int = 2) -> list[FeatureExamples]:
    features = []
    for f in range(count):
        explain = [_example(f"the cat number {i}", True, "cat") for i in range(3)]
        detect = [_example(f"a cat {i} again", True, "cat") for i in range(4)]
        detect += [_example(f"a dog {i} again", False) for i in range(4)]
        random.Random(f).shuffle(detect)
        features.append(FeatureExamples(f, explain, detect))
    return features


@pytest.mark.parametrize("detection", ["probability", "list"])
def test_a_truthful_explainer_scores_one_and_a_contrary_one_zero(detection):
    for contrary, expected in ((False, 1.0), (True, 0.0)):
        explainer = Scripted("the word cat", "cat", contrary)
        records = autointerp.interpret(explainer, _cat_features(), detection, 3)
        assert [r["feature"] for r in records] == [0, 1]
        for record in records:
            assert record["explanation"] == "the word cat"
            detection_scores = record["detection"]
            assert detection_scores["mode"] == detection
            assert detection_scores["balanced_accuracy"] == expected
            assert detection_scores["scored"] == 8 and detection_scores["activating"] == 4
            if detection == "probability":
                assert detection_scores["auroc"] == expected
            else:
                assert detection_scores["auroc"] is None
            # The scored excerpts are shown unmarked, each once.
            texts = [e["text"] for e in record["detection_examples"]]
            assert len(set(texts)) == 8 and not any("<<" in t for t in texts)
        assert autointerp.mean_balanced_accuracy(records) == expected
    prompts_per_feature = 8 if detection == "probability" else 3  # ceil(8 / 3)
    assert len(explainer.prompts) == 2 * (1 + prompts_per_feature)
    assert all('"the word cat"' in p for p in explainer.prompts[2:])


def test_unusable_answers_are_counted_never_guessed():
    class Mumbles(Scripted):
        def complete(self, prompts):
            return ["Explanation: cats" if "<<" in p else "I am not sure." for p in prompts]

    records = autointerp.interpret(Mumbles("", "cat"), _cat_features(1), "list", 4)
    detection = records[0]["detection"]
    assert detection["scored"] == 0 and detection["unparsed"] == 8
    assert detection["balanced_accuracy"] is None
    assert autointerp.mean_balanced_accuracy(records) is None

    class Silent(Scripted):
        def complete(self, prompts):
            return [""] * len(prompts)

    record = autointerp.interpret(Silent("", "cat"), _cat_features(1))[0]
    assert record["explanation"] is None and "detection" not in record


# --- the OpenAI-compatible client against a local fake ------------------------------------

KEY = "sk-test-not-a-real-key"


class FakeEndpoint(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions as vLLM serves them: HTTP 401 without the key;
    each completion request is checked (model, message shape, greedy) and recorded; `fail`
    makes completions answer HTTP 500."""

    requests: list[dict] = []
    fail = False

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {KEY}":
            return True
        self._send(401, {"error": "invalid api key"})
        return False

    def do_GET(self) -> None:
        assert self.path == "/v1/models", self.path
        if self._authorised():
            self._send(200, {"object": "list", "data": [{"id": "explainer-7b"}]})

    def do_POST(self) -> None:
        assert self.path == "/v1/chat/completions", self.path
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeEndpoint.requests.append(body)
        assert body["model"] == "explainer-7b" and body["temperature"] == 0
        [message] = body["messages"]
        assert message["role"] == "user"
        if FakeEndpoint.fail:
            self._send(500, {"error": "overloaded"})
            return
        prompt = message["content"]
        choice: dict = {"index": 0, "finish_reason": "stop"}
        if body.get("logprobs"):
            assert body["max_tokens"] == 1 and body["top_logprobs"] == 20
            says = "cat" in prompt.split("Here is a text excerpt:\n")[1].split("\n\n")[0]
            first, second = ("1", "0") if says else ("0", "1")
            top = [
                {"token": first, "logprob": -0.1},
                {"token": " " + second, "logprob": -2.5},  # a spaced variant counts too
                {"token": "Yes", "logprob": -4.0},
            ]
            choice["message"] = {"role": "assistant", "content": first}
            choice["logprobs"] = {"content": [{"token": first, "top_logprobs": top}]}
        else:
            choice["message"] = {"role": "assistant", "content": "Explanation: the word cat"}
        self._send(200, {"choices": [choice]})


@pytest.fixture
def endpoint(monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("TEST_EXPLAINER_KEY", KEY)
    FakeEndpoint.requests, FakeEndpoint.fail = [], False
    with local_http_server(FakeEndpoint) as url:
        yield url + "/v1"


def test_endpoint_explainer_explains_and_reads_log_probabilities(endpoint):
    explainer = autointerp.EndpointExplainer(endpoint + "/", "explainer-7b", "TEST_EXPLAINER_KEY")
    assert explainer.check() is None
    records = autointerp.interpret(explainer, _cat_features())
    assert len(FakeEndpoint.requests) == 2 + 2 * 8
    for record in records:
        assert record["explanation"] == "the word cat"
        assert record["detection"]["balanced_accuracy"] == 1.0
        assert record["detection"]["auroc"] == 1.0
        for example in record["detection_examples"]:
            # Renormalised over "0" and "1": e^-0.1 / (e^-0.1 + e^-2.5).
            p = np.exp(-0.1) / (np.exp(-0.1) + np.exp(-2.5))
            assert example["probability"] == pytest.approx(p if example["activating"] else 1 - p)
    # The key is a header only: never in what the report writes.
    assert KEY not in json.dumps(records) and KEY not in explainer.name
    assert "127.0.0.1" not in explainer.name  # nor the endpoint's address


def test_endpoint_failures_are_reasons_not_crashes(endpoint):
    explainer = autointerp.EndpointExplainer(endpoint, "explainer-7b", "TEST_EXPLAINER_KEY")
    FakeEndpoint.fail = True
    with pytest.raises(autointerp.ExplainerError, match="answered HTTP 500"):
        autointerp.interpret(explainer, _cat_features(1))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = autointerp.EndpointExplainer(f"http://127.0.0.1:{closed}/v1", "m", timeout=5)
    assert down.check() == (
        f"the explainer endpoint http://127.0.0.1:{closed}/v1 is unreachable (ConnectionError)"
    )
    wrong_key = autointerp.EndpointExplainer(endpoint, "explainer-7b", "NO_SUCH_VARIABLE_SET")
    assert wrong_key.check() == f"the explainer endpoint {endpoint}/models answered HTTP 401"


# --- the in-process explainer on the tiny model ---------------------------------------------


@pytest.fixture(scope="module")
def model_explainer(local_run):
    from sae.io import presets
    from sae.model import lm
    from sae.model.generation import SteeredGenerator

    preset = str(local_run / "model")
    generator = SteeredGenerator(lm.load_backbone(preset), presets.tokenizer_proto(preset))
    return autointerp.ModelExplainer(generator, "tiny", max_new_tokens=12, batch_size=4)


def test_model_explainer_answers_each_prompt_as_if_alone(model_explainer):
    prompts = [f"Say something about recipe number {i}." for i in range(6)] + ["Hi"]
    together = model_explainer.complete(prompts)  # two batches of 4, the last one padded
    assert len(together) == 7
    alone = [model_explainer.complete([p])[0] for p in (prompts[0], prompts[5], prompts[6])]
    assert alone == [together[0], together[5], together[6]]


def test_model_explainer_probabilities_are_keras_hubs_next_token(model_explainer):
    import keras_hub

    g = model_explainer.generator
    prompts = ["Is this about cats? Answer 1 or 0.", "A longer prompt, about dogs and 7 cats."]
    found = model_explainer.option_probabilities(prompts, autointerp.OPTIONS)
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=g.backbone, preprocessor=None)
    choices = [g.processor.piece_to_id(o) for o in autointerp.OPTIONS]
    for prompt, probabilities in zip(prompts, found, strict=True):
        ids = np.array([g.prompt_ids(autointerp.USER_TURN.format(prompt=prompt))])
        logits = np.asarray(
            causal_lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}), np.float64
        )[0, -1, choices]
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(probabilities, expected, rtol=1e-4)
        assert sum(probabilities) == pytest.approx(1.0)


# --- the report ------------------------------------------------------------------------------


def test_the_local_report_explains_and_scores_features_of_both_saes(local_run):
    for name in SMALL_SAES:
        folder = local_run / "report" / name
        written = json.loads((folder / "autointerp.json").read_text())
        assert "the run's own model" in written["explainer"]
        records = written["features"]
        assert len(records) == 4  # report.autointerp.features
        document = json.loads((folder / "features.json").read_text())
        by_index = {f["index"]: f for f in document["features"]}
        # The most frequently active features, each carrying its explanation and score.
        assert [r["feature"] for r in records] == [f["index"] for f in document["features"][:4]]
        for record in records:
            feature = by_index[record["feature"]]
            assert feature["explanation"] == record["explanation"]
            assert feature["autointerp"]["detection"] == record["detection"]
            examples = record["detection_examples"]
            assert sum(e["activating"] for e in examples) == record["detection"]["activating"]
            # The arithmetic holds on what was written.
            recomputed = autointerp.detection_scores(
                [e["activating"] for e in examples], [e["predicted"] for e in examples]
            )
            for key, value in recomputed.items():
                if key != "auroc":
                    assert record["detection"][key] == value
            page = (folder / "features" / f"{record['feature']}.html").read_text()
            assert "<h2>Explanation</h2>" in page
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["autointerp_features"] == 4
        assert metrics["autointerp_detection_balanced_accuracy"] == pytest.approx(
            autointerp.mean_balanced_accuracy(records)
        )


def test_an_unreachable_endpoint_skips_auto_interp_with_a_note():
    from sae import config
    from sae.analysis import report

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = config.load(
        None,
        [
            f"report.autointerp.endpoint=http://127.0.0.1:{closed}/v1",
            "report.autointerp.endpoint_model=m",
            "report.autointerp.timeout_seconds=5",
        ],
    )
    explainer, note = report._explainer(cfg, None, "")
    assert explainer is None
    assert note == (
        f"auto-interp skipped: the explainer endpoint http://127.0.0.1:{closed}/v1 is "
        "unreachable (ConnectionError)"
    )
