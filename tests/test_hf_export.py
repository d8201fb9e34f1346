"""`gemma-sae export-transformers` (sae.model.hf_export) against the real transformers (5.x, in
.venv-saelens beside SAELens): the exported Gemma 2-style model (the local run's tiny model:
post-norms, soft-caps, a sliding window, 2 KV heads, which keras-hub's own exporter gets
wrong) and a random Gemma 3 load as Gemma2ForCausalLM and Gemma3ForCausalLM, and give our
logits on a sequence longer than the window (float32, eager attention); the exported
tokenizer gives our ids on the demo corpus, whitespace runs and newlines included."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import sentencepiece as spm

from jobs.cli import main
from sae.errors import InputError
from sae.io import hf_tokenizer, presets
from sae.model import hf_export

from .test_interop import _saelens_python

pytestmark = pytest.mark.slow

# What runs in transformers' environment: its logits on the ids, its tokenizer on the texts.
HF_SIDE = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, ids_path, texts_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(
    out, dtype=torch.float32, attn_implementation="eager"
).eval()
with torch.no_grad():
    logits = model(torch.tensor(np.load(ids_path), dtype=torch.long)).logits.numpy()
np.save(out + "/hf_logits.npy", logits)
tokenizer = AutoTokenizer.from_pretrained(out)
texts = json.load(open(texts_path))
ids = [tokenizer(t)["input_ids"] for t in texts]
print(json.dumps({"class": type(model).__name__, "ids": ids}))
"""


def _texts(local_run) -> list[str]:
    corpus = sorted((local_run / "corpus").glob("*.jsonl"))
    texts = [json.loads(line)["text"] for line in corpus[0].read_text().splitlines()[:300]]
    return texts + ["", "\n", "\n\n  x", "  two  spaces ", "tab\there", "Ünïcödé — ok"]


def _compare(out, ids: np.ndarray, ours: np.ndarray, texts: list[str], proto: bytes, tmp_path):
    """transformers' class name, and checks of its logits and token ids against ours."""
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "hf_side.py").write_text(HF_SIDE)
    done = subprocess.run(
        [_saelens_python(), str(tmp_path / "hf_side.py"), str(out), str(tmp_path / "ids.npy"),
         str(tmp_path / "texts.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    theirs = np.load(out / "hf_logits.npy").astype(np.float64)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    expected = [[processor.bos_id(), *processor.encode(t)] for t in texts]
    assert answer["ids"] == expected
    return answer["class"]


def _long_ids(processor: spm.SentencePieceProcessor, texts: list[str], length: int) -> np.ndarray:
    ids = [processor.bos_id()] + processor.encode(" ".join(texts))[: length - 1]
    assert len(ids) == length
    return np.array([ids], np.int32)


def test_gemma2_style_export_gives_our_logits_and_ids(local_run, tmp_path):
    import keras_hub

    from sae.model import lm

    preset = str(local_run / "model")
    out = tmp_path / "hf"
    assert main(["export-transformers", "--preset", preset, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    backbone = lm.load_backbone(preset, "float32")
    assert config["model_type"] == "gemma2" and config["num_key_value_heads"] == 2
    assert config["sliding_window"] == backbone.sliding_window_size
    assert config["final_logit_softcapping"] == backbone.final_logit_soft_cap
    proto = presets.tokenizer_proto(preset)
    texts = _texts(local_run)
    # Past the sliding window (64), so that both kinds of layer are exercised.
    ids = _long_ids(spm.SentencePieceProcessor(model_proto=proto), texts, 100)
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    ours = np.asarray(
        causal_lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}), np.float64
    )
    assert _compare(out, ids, ours, texts, proto, tmp_path) == "Gemma2ForCausalLM"


def test_gemma3_export_gives_our_logits_and_ids(local_run, tmp_path):
    from sae.demo.tiny_model import TinyModelSpec, build_tiny_gemma
    from sae.model import lm

    proto = presets.tokenizer_proto(str(local_run / "model"))
    spec = TinyModelSpec(
        family="gemma3",
        num_layers=3,
        hidden_dim=64,
        intermediate_dim=128,
        num_query_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window_size=16,
    )
    causal_lm = build_tiny_gemma(spec, proto)  # seeded random weights
    causal_lm.save_to_preset(str(tmp_path / "preset"))
    out = tmp_path / "hf"
    hf_export.export(str(tmp_path / "preset"), str(out))
    texts = _texts(local_run)
    ids = _long_ids(spm.SentencePieceProcessor(model_proto=proto), texts, 60)
    backbone = causal_lm.backbone
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
    ours = np.asarray(lm.final_logits(backbone, hidden), np.float64)
    assert _compare(out, ids, ours, texts, proto, tmp_path) == "Gemma3ForCausalLM"


def test_bad_presets_are_one_line_errors(tmp_path, capsys):
    assert main(["export-transformers", "--preset", str(tmp_path / "none"), "--out", "x"]) == 2
    assert "--preset: no keras-hub preset at" in capsys.readouterr().err
    assert main(["export-transformers", "--preset", "p", "--out", "gs://b/x"]) == 2
    assert "--out must be a local directory" in capsys.readouterr().err
    # A Gemma 1-style backbone is refused from its config: no model loaded, nothing written.
    gemma1 = tmp_path / "gemma1"
    gemma1.mkdir()
    saved = {"class_name": "GemmaBackbone", "config": {"use_post_ffw_norm": False}}
    (gemma1 / "config.json").write_text(json.dumps(saved))
    out = tmp_path / "refused"
    assert main(["export-transformers", "--preset", str(gemma1), "--out", str(out)]) == 2
    assert "without post-norms (Gemma 1) is not exported" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(InputError, match="not a SentencePiece model"):
        hf_tokenizer.read_model(b"\x0f")
