"""Text generation from a keras-hub Gemma with a steering vector added to one block's output.

The loop is keras-hub's `GemmaCausalLM.generate_step` (and Gemma3CausalLM's, for Gemma 3's
text model) written out over the backbone's own layers (token embedding, decoder blocks with
their KV caches, final norm, tied logits with Gemma 2's soft-cap): one forward over the padded
prompt seeds the caches, then one token per step. The only change is
`x += strength * direction` after `decoder_block_<layer>`, at every position (prompt and
generated), which is how SAE features are steered.

Everything that varies between calls of a sweep (each batch row's steering vector, the
sampling key) is a traced argument of a single `jax.jit` function, and the weights are
arguments too (bound through a `keras.StatelessScope`, as keras-hub does): so a sweep over
strengths or features compiles once per (layer, batch, length), and the weights are never
baked into the compiled program as constants.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sae.errors import InputError  # noqa: E402
from sae.io import presets  # noqa: E402
from sae.model import lm  # noqa: E402


def right_padded(prompt_ids: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows, length] token ids, each row's prompt then zeros, and its padding mask (True on
    the prompt): the layout the generation loop and `choice_logits` read."""
    token_ids = np.zeros((len(prompt_ids), length), np.int32)
    padding_mask = np.zeros(token_ids.shape, bool)
    for row, ids in enumerate(prompt_ids):
        token_ids[row, : len(ids)], padding_mask[row, : len(ids)] = ids, True
    return token_ids, padding_mask


@dataclass(frozen=True)
class Generation:
    """One generated row: the prompt's ids, the new ids (up to and without EOS), the text."""

    strength: float
    prompt_ids: list[int]
    new_ids: list[int]
    text: str


class SteeredGenerator:
    """A Gemma preset ready to generate with a steering vector at one block's output."""

    def __init__(self, backbone, tokenizer_proto: bytes) -> None:
        import sentencepiece as spm

        lm.check_gemma(backbone, " (steering runs the blocks one by one)")
        self.backbone = backbone
        # Gemma 3's blocks take and return their cache as a (key, value) pair; Gemma 1/2's as
        # one [batch, 2, length, heads, head_dim] array. Ours is stacked over the layers.
        self._pair_cache = type(backbone).__name__ == "Gemma3Backbone"
        self.hidden_dim = int(backbone.hidden_dim)
        self.num_layers = int(backbone.num_layers)
        self.processor = spm.SentencePieceProcessor(model_proto=tokenizer_proto)
        self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()
        self._variables = (backbone.trainable_variables, backbone.non_trainable_variables)
        self._weights = tuple([v.value for v in group] for group in self._variables)
        self.traces = 0  # how many times the generation loop was traced (compiled)
        self._generate = jax.jit(self._generate_ids, static_argnames=("layer", "top_k"))
        self._choices = jax.jit(self._choice_logits)

    @classmethod
    def from_preset(cls, preset_uri: str, dtype: str = "float32") -> SteeredGenerator:
        return cls(lm.load_backbone(preset_uri, dtype), presets.tokenizer_proto(preset_uri))

    def compilations(self) -> int:
        """Programs compiled so far by the jitted generation loop."""
        return self._generate._cache_size()

    def prompt_ids(self, prompt: str) -> list[int]:
        """As GemmaCausalLMPreprocessor.generate_preprocess: BOS, the text, no EOS."""
        return [self.bos_id, *self.processor.encode(prompt)]

    def generate(
        self,
        prompt: str,
        direction: np.ndarray,
        strengths: Sequence[float],
        layer: int,
        max_new_tokens: int = 32,
        top_k: int = 0,
        seed: int = 0,
    ) -> list[Generation]:
        """One continuation of `prompt` per strength (one batch row each), greedy when
        `top_k` is 0, else sampled from the `top_k` most likely tokens."""
        direction = np.asarray(direction, np.float32).reshape(self.hidden_dim)
        vectors = np.asarray(strengths, np.float32)[:, None] * direction[None, :]
        out = self.generate_with_vectors(prompt, vectors, layer, max_new_tokens, top_k, seed)
        return [
            Generation(float(strength), g.prompt_ids, g.new_ids, g.text)
            for strength, g in zip(strengths, out, strict=True)
        ]

    def generate_with_vectors(
        self,
        prompt: str,
        vectors: np.ndarray,
        layer: int,
        max_new_tokens: int = 32,
        top_k: int = 0,
        seed: int = 0,
    ) -> list[Generation]:
        """One continuation of `prompt` per row of `vectors` [rows, hidden] (each row's own
        steering vector, zeros for none); a Generation's strength is its vector's norm."""
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.hidden_dim)
        ids = self.prompt_ids(prompt)
        return self.generate_rows([ids] * len(vectors), vectors, layer, max_new_tokens, top_k, seed)

    def generate_rows(
        self,
        prompt_ids: Sequence[list[int]],
        vectors: np.ndarray,
        layer: int,
        max_new_tokens: int = 32,
        top_k: int = 0,
        seed: int = 0,
        length: int | None = None,
    ) -> list[Generation]:
        """One batch: row i continues `prompt_ids[i]` (BOS included) steered by `vectors[i]`,
        for up to `max_new_tokens` (prompts of different lengths share the batch, each row's
        own prompt kept where it is longer), so a sweep over prompts and vectors is one
        compiled loop. `length`: the prompt room of every row (default: the longest prompt),
        so that batches of nearby lengths share one compiled shape."""
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.hidden_dim)
        longest = max(len(ids) for ids in prompt_ids)
        token_ids, padding_mask = right_padded(prompt_ids, (length or longest) + max_new_tokens)
        out = self._run(token_ids, padding_mask, vectors, layer, top_k, seed)
        return [
            self._decoded(
                float(np.linalg.norm(vector)), list(ids), row[: len(ids) + max_new_tokens]
            )
            for ids, vector, row in zip(prompt_ids, vectors, out, strict=True)
        ]

    def padded(
        self, ids: list[int], batch: int, max_new_tokens: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The prompt repeated on `batch` rows, padded with room for `max_new_tokens`."""
        return right_padded([ids] * batch, len(ids) + max_new_tokens)

    def generate_ids(
        self,
        token_ids: np.ndarray,
        padding_mask: np.ndarray,
        direction: np.ndarray,
        strengths: Sequence[float],
        layer: int,
        top_k: int = 0,
        seed: int = 0,
    ) -> np.ndarray:
        """[batch, length] ids: each row's prompt (where `padding_mask`) then its generation,
        steered by `strengths[row] * direction` after block `layer`."""
        direction = np.asarray(direction, np.float32).reshape(self.hidden_dim)
        vectors = np.asarray(strengths, np.float32)[:, None] * direction[None, :]
        return self._run(token_ids, padding_mask, vectors, layer, top_k, seed)

    def choice_logits(
        self, token_ids: np.ndarray, padding_mask: np.ndarray, choices: Sequence[int]
    ) -> np.ndarray:
        """[batch, len(choices)] next-token logits of the token ids `choices` after each
        row's prompt (the positions where `padding_mask`; right-padded), unsteered: how a
        scorer reads a model's answer without generating it. Only the last prompt
        position's logits are made (a full [batch, length, vocabulary] would not fit)."""
        return np.asarray(
            self._choices(
                self._weights,
                jnp.asarray(token_ids, jnp.int32),
                jnp.asarray(padding_mask, bool),
                jnp.asarray(choices, jnp.int32),
            )
        )

    def _run(self, token_ids, padding_mask, vectors, layer: int, top_k: int, seed: int):
        if not 0 <= layer < self.num_layers:
            raise InputError(f"layer {layer} is out of range (the model has {self.num_layers})")
        out = self._generate(
            self._weights,
            jnp.asarray(token_ids, jnp.int32),
            jnp.asarray(padding_mask, bool),
            jnp.asarray(vectors, jnp.float32),
            jax.random.key(seed),
            layer=layer,
            top_k=top_k,
        )
        return np.asarray(out)

    def _decoded(self, strength: float, prompt_ids: list[int], row: np.ndarray) -> Generation:
        new = [int(i) for i in row[len(prompt_ids) :]]
        if self.eos_id in new:
            new = new[: new.index(self.eos_id)]
        return Generation(strength, prompt_ids, new, self.processor.decode(new))

    # --- traced -----------------------------------------------------------------------------

    def _forward(self, token_ids, cache, index, steer, layer: int):
        """GemmaCausalLM.call_with_cache, with `steer` ([batch, 1, hidden]) added to the
        output of block `layer`."""
        x, cache = self._hidden(token_ids, cache, index, steer, layer)
        return lm.final_logits(self.backbone, x), cache

    def _hidden(self, token_ids, cache, index, steer, layer: int):
        """The last block's output and the updated caches (`_forward` before the logits)."""
        import keras

        backbone = self.backbone
        x = backbone.token_embedding(token_ids)
        x = x * keras.ops.cast(keras.ops.sqrt(self.hidden_dim), x.dtype)
        caches = []
        for i, block in enumerate(backbone.transformer_layers):
            layer_cache = (cache[:, i, 0], cache[:, i, 1]) if self._pair_cache else cache[:, i]
            x, block_cache = block(x, cache=layer_cache, cache_update_index=index)
            if self._pair_cache:
                block_cache = jnp.stack(block_cache, axis=1)
            if i == layer:
                x = x + steer.astype(x.dtype)
            caches.append(block_cache)
        return x, jnp.stack(caches, axis=1)

    def _empty_cache(self, batch: int, length: int) -> jax.Array:
        b = self.backbone
        shape = (batch, b.num_layers, 2, length, b.num_key_value_heads, b.head_dim)
        return jnp.zeros(shape, b.compute_dtype)

    def _next_token(self, logits: jax.Array, key: jax.Array, top_k: int) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if top_k == 0:
            return jnp.argmax(logits, axis=-1)
        top_logits, top_ids = jax.lax.top_k(logits, top_k)
        choice = jax.random.categorical(key, top_logits, axis=-1)
        return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0]

    def _generate_ids(self, weights, token_ids, padding_mask, vectors, key, layer: int, top_k: int):
        self.traces += 1
        steer = vectors[:, None, :]
        with self._bound(weights):
            return self._loop(token_ids, padding_mask, steer, key, layer, top_k)

    def _bound(self, weights):
        """A scope in which the backbone's variables read `weights` (traced arguments)."""
        import keras

        pairs = zip(self._variables, weights, strict=True)
        mapping = itertools.chain(*(zip(v, w, strict=True) for v, w in pairs))
        return keras.StatelessScope(state_mapping=mapping)

    def _choice_logits(self, weights, token_ids, padding_mask, choices):
        batch, length = token_ids.shape
        steer = jnp.zeros((batch, 1, self.hidden_dim), jnp.float32)
        with self._bound(weights):
            x, _ = self._hidden(token_ids, self._empty_cache(batch, length), 0, steer, 0)
            last = jnp.sum(padding_mask.astype(jnp.int32), axis=-1) - 1
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [batch, 1, hidden]
            logits = lm.final_logits(self.backbone, x)[:, 0].astype(jnp.float32)
        return logits[:, choices]

    def _loop(self, token_ids, padding_mask, steer, key, layer: int, top_k: int):
        batch, length = token_ids.shape
        # Seed the caches with one pass over the whole padded prompt, as keras-hub does.
        _, cache = self._forward(token_ids, self._empty_cache(batch, length), 0, steer, layer)
        start = jnp.min(jnp.sum(padding_mask.astype(jnp.int32), axis=-1))

        def unfinished(state):
            ids, _, index, _ = state
            # Stop once every row has generated an EOS (one in the prompt does not count).
            done = jnp.any((ids == self.eos_id) & ~padding_mask, axis=-1)
            return (index < length) & ~jnp.all(done)

        def step(state):
            ids, cache, index, key = state
            key, sample_key = jax.random.split(key)
            previous = jax.lax.dynamic_slice_in_dim(ids, index - 1, 1, axis=1)
            logits, cache = self._forward(previous, cache, index - 1, steer, layer)
            token = self._next_token(logits[:, 0], sample_key, top_k).astype(ids.dtype)
            # Rows whose prompt is longer keep their own token at this position.
            kept = jax.lax.dynamic_index_in_dim(ids, index, axis=1, keepdims=False)
            mask = jax.lax.dynamic_index_in_dim(padding_mask, index, axis=1, keepdims=False)
            token = jnp.where(mask, kept, token)
            ids = jax.lax.dynamic_update_slice_in_dim(ids, token[:, None], index, axis=1)
            return ids, cache, index + 1, key

        ids, *_ = jax.lax.while_loop(unfinished, step, (token_ids, cache, start, key))
        return ids
