"""A SentencePiece BPE model as a Hugging Face fast tokenizer (`tokenizer.json`) that gives
the same ids as SentencePiece itself, whatever its whitespace settings: transformers'
GemmaTokenizer assumes Gemma's (no dummy prefix), which a tokenizer trained with
SentencePiece's defaults (the demo's) does not share.

The model file is read with a small protocol-buffer reader (its few fields are stable;
sentencepiece's generated module is tied to one protobuf version). The BPE merges are
derived from the vocabulary as transformers' converter does: every split of a piece into two
pieces, ranked by the piece's score (SentencePiece merges the highest-scoring piece first).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from sae.errors import InputError

# SentencePiece piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: list[tuple[str, int]]  # (piece, type), in id order
    scores: list[float]  # each piece's score: BPE merges the highest-scoring piece first
    model_type: int
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protocol-buffer message: ints for varints, bytes else."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            yield number, value
        elif wire == 1:
            yield number, data[i : i + 8]
            i += 8
        elif wire == 2:
            size, i = _varint(data, i)
            yield number, data[i : i + size]
            i += size
        elif wire == 5:
            yield number, data[i : i + 4]
            i += 4
        else:
            raise InputError(f"not a SentencePiece model (wire type {wire})")


def read_model(proto: bytes) -> SentencePieceModel:
    pieces: list[tuple[str, int]] = []
    scores: list[float] = []
    model_type, byte_fallback = 1, False
    add_dummy_prefix = remove_extra_whitespaces = True  # the proto's defaults
    for number, value in _fields(proto):
        if number == 1 and isinstance(value, bytes):  # SentencePiece
            fields = dict(_fields(value))
            piece = fields.get(1, b"")
            kind = fields.get(3, _NORMAL)
            pieces.append((bytes(piece).decode("utf-8"), int(kind)))  # type: ignore[arg-type]
            score = fields.get(2)
            scores.append(struct.unpack("<f", score)[0] if isinstance(score, bytes) else 0.0)
        elif number == 2 and isinstance(value, bytes):  # TrainerSpec
            trainer = dict(_fields(value))
            model_type = int(trainer.get(3, 1))  # type: ignore[arg-type]
            byte_fallback = bool(trainer.get(35, 0))
        elif number == 3 and isinstance(value, bytes):  # NormalizerSpec
            normalizer = dict(_fields(value))
            add_dummy_prefix = bool(normalizer.get(3, 1))
            remove_extra_whitespaces = bool(normalizer.get(4, 1))
    if not pieces:
        raise InputError("not a SentencePiece model: no pieces")
    return SentencePieceModel(
        pieces, scores, model_type, byte_fallback, add_dummy_prefix, remove_extra_whitespaces
    )


def _merges(model: SentencePieceModel, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces, the highest-scoring piece's first (then
    by id), as SentencePiece's BPE prefers it."""
    ranked = []
    for (piece, kind), score in zip(model.pieces, model.scores, strict=True):
        if kind != _NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[piece], k, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def tokenizer_json(proto: bytes, bos_id: int) -> str:
    """The fast tokenizer's JSON: SentencePiece's pieces, merges and whitespace handling,
    BOS added in front (as our tokenizer adds it), control and user-defined pieces matched
    whole."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    model = read_model(proto)
    if model.model_type != _BPE:
        raise InputError("only SentencePiece BPE tokenizers (Gemma's kind) are exported")
    if model.remove_extra_whitespaces:
        raise InputError(
            "the tokenizer collapses whitespace (remove_extra_whitespaces), which the export "
            "does not reproduce"
        )
    vocab = {piece: i for i, (piece, _) in enumerate(model.pieces)}
    unk = next((p for p, kind in model.pieces if kind == _UNKNOWN), None)
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=_merges(model, vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=model.byte_fallback,
        )
    )
    user_defined = [p for p, kind in model.pieces if kind == _USER_DEFINED]
    # Spaces become "\u2581" and, with a dummy prefix, one goes in front of the whole text;
    # the text is then cut into SentencePiece's words (a run of "\u2581" with what follows
    # it), so that no merge crosses one.
    steps = [normalizers.Prepend("\u2581")] if model.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    words = "\u2581*[^\u2581]+|\u2581+"
    if model.add_dummy_prefix:
        # Added tokens would split the text before the prefix goes in, so that each part got
        # one: user-defined pieces (single characters, as the demo's newline) are words of
        # their own instead, which BPE leaves whole.
        if any(len(p) != 1 for p in user_defined):
            raise InputError(
                "a tokenizer with a dummy prefix and multi-character user-defined pieces is "
                "not exported"
            )
        escaped = "".join(re.escape(p) for p in user_defined)
        if escaped:
            words = f"[{escaped}]|\u2581*[^\u2581{escaped}]+|\u2581+"
        user_defined = []
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(words), behavior="isolated")
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    # Control pieces, and user-defined ones without a dummy prefix (Gemma's), are matched
    # whole in the raw text, as transformers' Gemma converter does.
    tokenizer.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, kind in model.pieces
         if kind in (_CONTROL, _UNKNOWN)]
    )  # fmt: skip
    tokenizer.add_tokens([AddedToken(p, normalized=False) for p in user_defined])
    bos = model.pieces[bos_id][0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tokenizer.to_str()


def config(special: dict[str, str]) -> str:
    """tokenizer_config.json: tokenizer.json as it is (no class-specific pipeline)."""
    return json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, **special},
        indent=2,
    )
