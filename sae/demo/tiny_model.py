"""A tiny Gemma 2- or Gemma 3-shaped language model, trained offline on the demo corpus.

The build machines have no model hub, so the local pipeline needs a Gemma preset that is
made here: a SentencePiece tokenizer trained on the corpus, a small GemmaBackbone with
Gemma 2 settings (or a text-only Gemma3Backbone with Gemma 3's: QK norm, no soft-caps,
sliding-window layers with RoPE base 10k and every sixth layer global with base 1M), and a
short next-token training run. A model with random weights would give an SAE nothing to
find; one that has learned the corpus has structured activations.

The result is an ordinary keras-hub preset directory, loadable with
`keras_hub.models.GemmaCausalLM.from_preset(dir)` (Gemma3CausalLM for Gemma 3) like a real
Gemma.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import dataclasses
import io
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np

from sae.errors import InputError

# Gemma's special token ids; keras-hub's GemmaTokenizer looks the pieces up by name.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
PAD_PIECE, EOS_PIECE, BOS_PIECE, UNK_PIECE = "<pad>", "<eos>", "<bos>", "<unk>"

ProgressCallback = Callable[[int, int, float], None]  # (step, total_steps, train_loss)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Shape and training recipe of the tiny model (Gemma 2 or 3 settings at toy scale)."""

    # gemma: keras-hub's GemmaBackbone with Gemma 2 settings; gemma3: Gemma3Backbone.
    family: Literal["gemma", "gemma3"] = "gemma"
    vocabulary_size: int = 1024
    num_layers: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512  # keras-hub counts both gate halves: MLP width is 256
    num_query_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    query_head_dim_normalize: bool = True
    use_post_ffw_norm: bool = True
    use_post_attention_norm: bool = True
    attention_logit_soft_cap: float | None = 50.0
    final_logit_soft_cap: float | None = 30.0
    use_sliding_window_attention: bool = True
    sliding_window_size: int = 64
    sequence_length: int = 128
    # 307k tokens, about 0.6 epoch of the 4000-document demo corpus: ~45 s on 2 idle CPU cores.
    train_steps: int = 150
    batch_size: int = 16
    learning_rate: float = 6e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    heldout_fraction: float = 0.05
    max_eval_sequences: int = 256  # held-out loss is measured on at most this many
    byte_fallback: bool = False  # 256 byte pieces buy nothing on an all-ASCII corpus
    seed: int = 0

    def backbone_kwargs(self, vocabulary_size: int) -> dict[str, Any]:
        if self.family == "gemma3":
            # Gemma 3: QK norm instead of soft-caps; the layer pattern is Gemma3Backbone's.
            return {
                **self._shape(vocabulary_size),
                "image_size": None,  # text only: no vision encoder
                "use_query_key_norm": True,
                "use_post_ffw_norm": True,
                "use_post_attention_norm": True,
                "use_sliding_window_attention": True,
                "sliding_window_size": self.sliding_window_size,
                "vision_encoder": None,
            }
        return {
            **self._shape(vocabulary_size),
            "query_head_dim_normalize": self.query_head_dim_normalize,
            "use_post_ffw_norm": self.use_post_ffw_norm,
            "use_post_attention_norm": self.use_post_attention_norm,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "use_sliding_window_attention": self.use_sliding_window_attention,
            "sliding_window_size": self.sliding_window_size,
        }

    def _shape(self, vocabulary_size: int) -> dict[str, Any]:
        return {
            "vocabulary_size": vocabulary_size,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "head_dim": self.head_dim,
        }


# --- tokenizer -----------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], vocabulary_size: int, seed: int = 0, byte_fallback: bool = False
) -> bytes:
    """Train a SentencePiece BPE model in memory with Gemma's special ids; returns the proto.

    Deterministic: one trainer thread and a fixed seed give the same bytes for the same
    texts. If the texts cannot support vocabulary_size pieces, the vocabulary is smaller
    (read it back from the proto, never assume it).
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="bpe",  # as Gemma's tokenizer
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece=PAD_PIECE,
        eos_piece=EOS_PIECE,
        bos_piece=BOS_PIECE,
        unk_piece=UNK_PIECE,
        # Keep text as written: code indentation and newlines are part of the corpus.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        split_digits=True,  # as Gemma: numbers are digit sequences
        byte_fallback=byte_fallback,
        character_coverage=1.0,
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,  # multi-threaded training is not bit-reproducible
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_processor(proto: bytes):
    """A plain sentencepiece processor (no TensorFlow) for a serialized model."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto)


# --- model ---------------------------------------------------------------------------------


# keras-hub's classes per family: (backbone, tokenizer, preprocessor, causal LM).
_CLASSES = {
    "gemma": ("GemmaBackbone", "GemmaTokenizer", "GemmaCausalLMPreprocessor", "GemmaCausalLM"),
    "gemma3": (
        "Gemma3Backbone",
        "Gemma3Tokenizer",
        "Gemma3CausalLMPreprocessor",
        "Gemma3CausalLM",
    ),
}


def _classes(family: str) -> tuple[Any, Any, Any, Any]:
    import keras_hub

    return tuple(getattr(keras_hub.models, name) for name in _CLASSES[family])


def _tokenizer(family: str, **kwargs: Any):
    tokenizer_class = _classes(family)[1]
    if family == "gemma3":
        kwargs["has_vision_tokens"] = False  # a text-only model: no image pieces
    return tokenizer_class(**kwargs)


def build_tiny_gemma(spec: TinyModelSpec, proto: bytes):
    """A causal LM (backbone, tokenizer, preprocessor) of `spec.family` with seeded random
    weights."""
    import keras

    backbone_class, _, preprocessor_class, causal_lm_class = _classes(spec.family)
    tokenizer = _tokenizer(spec.family, proto=proto)
    keras.utils.set_random_seed(spec.seed)  # same seed, same initial weights
    backbone = backbone_class(**spec.backbone_kwargs(tokenizer.vocabulary_size()), dtype="float32")
    preprocessor = preprocessor_class(tokenizer=tokenizer, sequence_length=spec.sequence_length)
    return causal_lm_class(backbone=backbone, preprocessor=preprocessor)


def count_parameters(causal_lm) -> int:
    return int(sum(np.prod(v.shape) for v in causal_lm.backbone.weights))


# --- data ----------------------------------------------------------------------------------


def pack_documents(token_lists: Sequence[Sequence[int]], sequence_length: int) -> np.ndarray:
    """Pack <bos> doc <eos> streams into [n, sequence_length + 1] windows.

    Windows overlap by one token so that every token is a prediction target once: the
    model sees sequence_length inputs, the labels are the same window shifted by one.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.append(BOS_ID)
        stream.extend(ids)
        stream.append(EOS_ID)
    tokens = np.asarray(stream, dtype=np.int32)
    n = (len(tokens) - 1) // sequence_length
    if n < 1:
        return np.zeros((0, sequence_length + 1), np.int32)
    starts = np.arange(n) * sequence_length
    return tokens[starts[:, None] + np.arange(sequence_length + 1)[None, :]]


def split_heldout(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Train on the first documents, hold out the last `fraction` (at least one)."""
    if len(texts) < 2:
        raise ValueError("need at least two documents to hold some out")
    n_held = min(max(1, round(len(texts) * fraction)), len(texts) - 1)
    return list(texts[:-n_held]), list(texts[-n_held:])


# --- training ------------------------------------------------------------------------------


def _learning_rate_schedule(spec: TinyModelSpec):
    import optax

    warmup = max(1, min(spec.warmup_steps, spec.train_steps // 2))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=spec.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(spec.train_steps, warmup + 1),
        end_value=spec.learning_rate * 0.1,
    )


def _make_step_functions(causal_lm, optimizer):
    """Jitted pure functions over (trainable, non_trainable) weight lists."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(trainable, non_trainable, windows):
        inputs = {
            "token_ids": windows[:, :-1],
            "padding_mask": jnp.ones_like(windows[:, :-1], dtype=bool),
        }
        logits, _ = causal_lm.stateless_call(trainable, non_trainable, inputs, training=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), windows[:, 1:]
        )
        return losses.mean()

    @jax.jit
    def train_step(trainable, opt_state, non_trainable, windows):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, non_trainable, windows)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    # Evaluated in one call on one fixed set: a single compile, same tokens before and after.
    return train_step, jax.jit(loss_fn)


def train_language_model(
    causal_lm,
    texts: Sequence[str],
    spec: TinyModelSpec,
    progress_callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Train causal_lm in place as a next-token model; returns losses (nats per token).

    Own jitted loop (stateless_call + optax AdamW) rather than keras fit: it bypasses the
    TF string preprocessor and is the fastest option on a small CPU.
    """
    import jax
    import optax

    started = time.perf_counter()
    proto = causal_lm.preprocessor.tokenizer.proto
    sp = sentencepiece_processor(proto)
    train_texts, held_texts = split_heldout(texts, spec.heldout_fraction)
    train_windows = pack_documents(sp.encode(train_texts), spec.sequence_length)
    held_windows = pack_documents(sp.encode(held_texts), spec.sequence_length)
    held_windows = held_windows[: spec.max_eval_sequences]
    if len(train_windows) == 0 or len(held_windows) == 0:
        raise ValueError("corpus too small for one training and one held-out sequence")

    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(_learning_rate_schedule(spec), weight_decay=spec.weight_decay),
    )
    train_step, eval_loss = _make_step_functions(causal_lm, optimizer)
    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]
    opt_state = optimizer.init(trainable)
    heldout_initial = float(eval_loss(trainable, non_trainable, held_windows))

    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(train_windows))
    cursor, losses = 0, []
    for step in range(1, spec.train_steps + 1):
        if cursor + spec.batch_size > len(order):  # next epoch, fresh shuffle
            order, cursor = rng.permutation(len(train_windows)), 0
        idx = order[cursor : cursor + spec.batch_size]
        cursor += spec.batch_size
        trainable, opt_state, loss = train_step(
            trainable, opt_state, non_trainable, train_windows[idx]
        )
        losses.append(loss)
        if progress_callback is not None and (step % 10 == 0 or step == spec.train_steps):
            progress_callback(step, spec.train_steps, float(loss))
    losses = [float(x) for x in jax.device_get(losses)]
    train_seconds = time.perf_counter() - started

    # Write the trained values back into the keras variables (the preset saves those).
    for variable, value in zip(causal_lm.trainable_variables, trainable, strict=True):
        variable.assign(value)
    heldout_final = float(eval_loss(trainable, non_trainable, held_windows))
    tail = losses[-max(1, min(20, len(losses) // 5)) :]
    tokens_trained = spec.train_steps * spec.batch_size * spec.sequence_length
    return {
        "initial_train_loss": losses[0],
        "final_train_loss": float(np.mean(tail)),
        "initial_heldout_loss": heldout_initial,
        "final_heldout_loss": heldout_final,
        "uniform_loss": math.log(sp.vocab_size()),
        "train_steps": spec.train_steps,
        "train_sequences": int(len(train_windows)),
        "heldout_sequences": int(len(held_windows)),
        "train_documents": len(train_texts),
        "heldout_documents": len(held_texts),
        "tokens_trained": tokens_trained,
        "epochs": tokens_trained / (len(train_windows) * spec.sequence_length),
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_trained / train_seconds,
    }


# --- preset --------------------------------------------------------------------------------


def verify_preset(
    local_preset_dir: str, causal_lm, sequence_length: int = 32, family: str = "gemma"
) -> None:
    """Load the saved preset back the three ways users do, and check it is the same model."""
    import keras_hub

    _, tokenizer_class, _, causal_lm_class = _classes(family)
    tokenizer = tokenizer_class.from_preset(local_preset_dir)
    if tokenizer.token_to_id(BOS_PIECE) != BOS_ID or tokenizer.token_to_id(EOS_PIECE) != EOS_ID:
        raise InputError(f"preset tokenizer in {local_preset_dir} has wrong special ids")
    loaded_lm = causal_lm_class.from_preset(local_preset_dir)
    backbone = keras_hub.models.Backbone.from_preset(local_preset_dir)
    rng = np.random.default_rng(0)
    vocab = causal_lm.backbone.vocabulary_size
    inputs = {
        "token_ids": rng.integers(4, vocab, size=(2, sequence_length)).astype("int32"),
        "padding_mask": np.ones((2, sequence_length), dtype=bool),
    }
    expected = np.asarray(causal_lm.backbone(inputs))
    for name, model in (("backbone", backbone), ("causal_lm", loaded_lm.backbone)):
        got = np.asarray(model(inputs))
        if not np.array_equal(expected, got):
            raise InputError(
                f"reloaded {name} from {local_preset_dir} differs from the trained one"
            )


def make_tiny_preset(
    texts: Sequence[str],
    preset_dir: str,
    spec: TinyModelSpec = TinyModelSpec(),  # noqa: B008 (frozen dataclass: immutable)
    progress_callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Tokenizer, model, training, saved preset (local dir or any storage URI); returns stats."""
    from sae.io import storage

    started = time.perf_counter()
    texts = list(texts)
    proto = train_tokenizer(texts, spec.vocabulary_size, spec.seed, spec.byte_fallback)
    causal_lm = build_tiny_gemma(spec, proto)
    stats = train_language_model(causal_lm, texts, spec, progress_callback)
    saving = time.perf_counter()
    # Save and check locally first, then copy through the storage layer, which knows
    # every kind of destination (a local path, file://, gs://).
    with tempfile.TemporaryDirectory(prefix="tiny-gemma-") as tmp:
        causal_lm.save_to_preset(tmp)
        verify_preset(tmp, causal_lm, family=spec.family)
        storage.upload_tree(tmp, preset_dir)
    stats["save_seconds"] = time.perf_counter() - saving
    stats.update(
        {
            "preset_dir": preset_dir,
            "parameters": count_parameters(causal_lm),
            "vocabulary_size": int(causal_lm.backbone.vocabulary_size),
            "documents": len(texts),
            "spec": dataclasses.asdict(spec),
            "seconds": time.perf_counter() - started,
        }
    )
    return stats
