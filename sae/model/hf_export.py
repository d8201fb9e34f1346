"""A keras-hub Gemma preset in Hugging Face transformers' format, so the tools that read
circuits from a model (circuit-tracer, Neuronpedia's) can run the model our dictionaries were
trained on.

- Gemma 3 (`Gemma3Backbone`): keras-hub's own exporter (`export_to_transformers`), which
  writes `Gemma3ForCausalLM` correctly.
- Gemma 2 (a `GemmaBackbone` with post-norms, soft-caps and a sliding window): keras-hub
  0.32 writes a Gemma 1 config for it and drops the post-norms, soft-caps and window (logits
  off by ~2) and fails with more than one KV head, so it is converted here, one weight to one
  weight, to `Gemma2ForCausalLM`.

Both get a fast tokenizer (`tokenizer.json`, sae.io.hf_tokenizer) that gives our token ids
(BOS added, no EOS), and the SentencePiece model itself as `tokenizer.model`. Checked against
transformers' own forward (tests/test_hf_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sae.errors import InputError
from sae.io import hf_tokenizer, presets

# transformers' Gemma activation (the tanh approximation keras-hub's Gemma uses too).
_ACTIVATION = "gelu_pytorch_tanh"
# keras-hub's Gemma 1/2 attention: rotary embeddings with this base.
_ROPE_THETA = 10_000.0


def export(preset_uri: str, out_dir: str) -> list[str]:
    """Write `preset_uri`'s model and tokenizer under the local directory `out_dir` in
    transformers' format; returns the files written. The family comes from the preset's
    config, so a refused preset is refused before anything is loaded or written."""
    import sentencepiece as spm

    kind = presets.backbone_class(preset_uri)
    gemma2 = kind == "GemmaBackbone" and presets.backbone_config(preset_uri).get(
        "use_post_ffw_norm", False
    )
    if kind != "Gemma3Backbone" and not gemma2:
        raise InputError(
            f"{preset_uri}: a {kind} without post-norms (Gemma 1) is not exported; Gemma 2 "
            "and Gemma 3 are"
        )
    proto = presets.tokenizer_proto(preset_uri)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if gemma2:
        _gemma2(preset_uri, processor, out)
    else:
        _gemma3(preset_uri, out)
    _tokenizer(proto, processor, out)
    return sorted(str(p) for p in out.iterdir())


def _gemma3(preset_uri: str, out: Path) -> None:
    import keras_hub

    causal_lm = keras_hub.models.Gemma3CausalLM.from_preset(preset_uri, preprocessor=None)
    causal_lm.export_to_transformers(str(out))


def gemma2_config(backbone: Any, special: dict[str, int]) -> dict[str, Any]:
    """transformers' Gemma2Config for a keras-hub GemmaBackbone with Gemma 2 settings."""
    head_dim = int(backbone.head_dim)
    heads = int(backbone.num_query_heads)
    window = int(backbone.sliding_window_size) if backbone.use_sliding_window_attention else None
    layers = int(backbone.num_layers)
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": int(backbone.vocabulary_size),
        "hidden_size": int(backbone.hidden_dim),
        # keras-hub counts both halves of the gated MLP.
        "intermediate_size": int(backbone.intermediate_dim) // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(backbone.num_key_value_heads),
        "head_dim": head_dim,
        "hidden_activation": _ACTIVATION,
        "max_position_embeddings": 8192,
        "rms_norm_eps": float(backbone.layer_norm_epsilon),
        "rope_theta": _ROPE_THETA,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # keras-hub scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads).
        "query_pre_attn_scalar": (
            head_dim if backbone.query_head_dim_normalize else int(backbone.hidden_dim) // heads
        ),
        # keras-hub windows the even blocks, as Gemma 2 does; without a window none is.
        "sliding_window": window or 8192,
        "layer_types": [
            "sliding_attention" if window and i % 2 == 0 else "full_attention"
            for i in range(layers)
        ],
        "attn_logit_softcapping": backbone.attention_logit_soft_cap,
        "final_logit_softcapping": backbone.final_logit_soft_cap,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        **special,
    }


def gemma2_weights(backbone: Any) -> dict[str, np.ndarray]:
    """transformers' Gemma2ForCausalLM state dict from a keras-hub GemmaBackbone: the same
    tensors, reshaped and transposed (keras kernels are [in, out], torch's [out, in])."""

    def value(variable: Any) -> np.ndarray:
        return np.asarray(variable.numpy(), np.float32)

    hidden = int(backbone.hidden_dim)
    weights = {
        "model.embed_tokens.weight": value(backbone.token_embedding.embeddings),
        "model.norm.weight": value(backbone.layer_norm.scale),
    }
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}."
        attention = block.attention
        # query/key/value: [heads, hidden, head_dim] -> [heads * head_dim, hidden].
        for name, layer in (
            ("q_proj", attention.query_dense),
            ("k_proj", attention.key_dense),
            ("v_proj", attention.value_dense),
        ):
            kernel = value(layer.kernel)
            weights[f"{prefix}self_attn.{name}.weight"] = kernel.transpose(0, 2, 1).reshape(
                -1, hidden
            )
        # output: [heads, head_dim, hidden] -> [hidden, heads * head_dim].
        weights[f"{prefix}self_attn.o_proj.weight"] = (
            value(attention.output_dense.kernel).reshape(-1, hidden).T
        )
        weights[f"{prefix}mlp.gate_proj.weight"] = value(block.gating_ffw.kernel).T
        weights[f"{prefix}mlp.up_proj.weight"] = value(block.gating_ffw_2.kernel).T
        weights[f"{prefix}mlp.down_proj.weight"] = value(block.ffw_linear.kernel).T
        # Both libraries' Gemma RMSNorm multiplies by (1 + scale): the scales carry over.
        for name, norm in (
            ("input_layernorm", block.pre_attention_norm),
            ("post_attention_layernorm", block.post_attention_norm),
            ("pre_feedforward_layernorm", block.pre_ffw_norm),
            ("post_feedforward_layernorm", block.post_ffw_norm),
        ):
            weights[f"{prefix}{name}.weight"] = value(norm.scale)
    return {name: np.ascontiguousarray(w) for name, w in weights.items()}


def _pad_id(processor: Any) -> int:
    return processor.pad_id() if processor.pad_id() >= 0 else processor.unk_id()


def _gemma2(preset_uri: str, processor: Any, out: Path) -> None:
    from safetensors.numpy import save_file

    from sae.model import lm

    backbone = lm.load_backbone(preset_uri, "float32")
    special = {
        "bos_token_id": processor.bos_id(),
        "eos_token_id": processor.eos_id(),
        "pad_token_id": _pad_id(processor),
    }
    config = gemma2_config(backbone, special)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(gemma2_weights(backbone), str(out / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer(proto: bytes, processor: Any, out: Path) -> None:
    """tokenizer.json (a fast tokenizer giving our ids: BOS added, no EOS), its config, and
    the SentencePiece model itself."""
    piece = processor.id_to_piece
    special = {
        "bos_token": piece(processor.bos_id()),
        "eos_token": piece(processor.eos_id()),
        "unk_token": piece(processor.unk_id()),
        "pad_token": piece(_pad_id(processor)),
    }
    (out / "tokenizer.json").write_text(hf_tokenizer.tokenizer_json(proto, processor.bos_id()))
    (out / "tokenizer_config.json").write_text(hf_tokenizer.config(special))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer.model").write_bytes(proto)
