"""A small synthetic evaluation for the dashboard tests: a real ReLU SAE and the real
`evaluate` pass, fed by a fake activation tap (a fixed function of the token ids, so a test
can recompute every latent), and a tokenizer whose pieces include hostile HTML."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from sae.analysis import evaluation, feature_report, features, logit_effects
from sae.arch import ReluSAE, SaeSpec

D_MODEL, D_SAE, VOCAB, SEQ_LEN, SEQUENCES = 16, 48, 64, 24, 120
BOS = 1
# Pieces a page must show as text, never interpret ('\u2581' is SentencePiece's word start).
HOSTILE = [
    "<script>alert(1)</script>",
    "</script>",
    "&amp;",
    '"quoted"',
    "'single'",
    "<b>bold</b>",
    "a\nb",
    "<!--",
]


class Pieces:
    """Stands in for a SentencePieceProcessor: id -> piece."""

    def __init__(self) -> None:
        self.pieces = ["<pad>", "<bos>", *HOSTILE]
        self.pieces += [f"\u2581w{i}" for i in range(VOCAB - len(self.pieces))]

    def id_to_piece(self, token_id: int) -> str:
        return self.pieces[token_id]


@dataclass
class Synthetic:
    sae: ReluSAE
    params: dict[str, np.ndarray]
    result: evaluation.EvalResult
    latents: list[np.ndarray]  # per evaluated sequence, [length, d_sae], 0 at BOS
    w_u: np.ndarray


def activations(token_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The fake model: each position's activation mixes its token's and the previous one's
    rows of a fixed table, with a per-token scale spread over four decades."""
    previous = np.roll(token_ids, 1, axis=-1)
    scale = 10.0 ** ((token_ids % 9) / 2.0 - 2.0)
    return (table[token_ids] + 0.5 * table[previous]) * scale[..., None]


def build(batch_size: int = 8) -> Synthetic:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, D_MODEL)).astype(np.float32)
    sae = ReluSAE(SaeSpec(architecture="relu"), d_model=D_MODEL, d_sae=D_SAE)
    w_dec = rng.normal(size=(D_SAE, D_MODEL)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    params = {
        "W_enc": w_dec.T.copy(),
        "b_enc": np.full(D_SAE, -0.2, np.float32),
        "W_dec": w_dec,
        "b_dec": np.zeros(D_MODEL, np.float32),
    }
    sequences = []
    for _ in range(SEQUENCES):
        length = int(rng.integers(SEQ_LEN // 2, SEQ_LEN + 1))
        ids = np.zeros(SEQ_LEN, np.int32)
        ids[0] = BOS
        ids[1:length] = rng.integers(2, VOCAB, length - 1)
        sequences.append((ids, length))

    def tap(token_ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        return [activations(token_ids, table)]

    model = evaluation.EvalModel(sae, params, 0)
    (result,) = evaluation.evaluate(
        [model], iter(sequences), tap, batch_size, BOS, max_tokens=10**9, top_k=6
    )
    encode = lambda x: np.array(sae.encode(params, jnp.asarray(x)))  # noqa: E731
    latents = []
    for ids in result.sequences:
        dense = encode(activations(ids, table))
        dense[ids == BOS] = 0.0
        latents.append(dense)
    w_u = rng.normal(size=(D_MODEL, VOCAB)).astype(np.float32)
    return Synthetic(sae, params, result, latents, w_u)


def summaries(data: Synthetic) -> list[dict]:
    shown = features.most_active(data.result, 0)
    effects = logit_effects.top_logit_effects(data.params["W_dec"], data.w_u, shown, 5)
    return features.feature_summaries(data.result, Pieces(), 4, shown, effects)


def write_report(data: Synthetic, output: str) -> list[str]:
    """The feature report of the synthetic SAE under `output`, as the report stage writes it."""
    records = [
        {"step": s, "syn/loss": 10.0 / s, "syn/l0": 40.0 / s**0.5, "syn/fve": 1 - 1 / s}
        | {"syn/dead_fraction": 0.01}
        for s in range(10, 210, 10)
    ]
    metrics = {"split": "eval", **data.result.metrics}
    run_info = {"model": "synthetic <model>", "layer": "blocks.0.hook_resid_post"}
    return feature_report.write(
        output, "syn", "SAE report: syn", metrics, run_info, data.result, summaries(data), records
    )
