"""Runs in the GGUF environment (`.venv-gguf`, made by scripts/ensure_gguf.sh: torch, transformers,
gguf), never imported by the library: `sae.io.model_sources` starts it as a script.

    python gguf_worker.py convert MODEL.gguf OUT_DIR
        the GGUF dequantized by transformers into a float32 Hugging Face directory
        (config.json, model.safetensors, tokenizer.json) plus the SentencePiece model rebuilt
        from the GGUF's vocabulary (tokenizer.model), which keras-hub converts itself;
    python gguf_worker.py reference MODEL.gguf TOKENS.npy LAYER OUT.npz
        transformers' float32 logits and the residual stream after block LAYER for the token
        ids in TOKENS.npy: the reference the real-model test compares keras-hub with.

A problem with the input prints one line starting "error: " on stderr and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SUPPORTED = ("gemma3",)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def architecture(path: Path) -> str:
    """general.architecture of a GGUF file (its header is read, not its tensors)."""
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            _fail(f"{path} is not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as error:  # truncated or malformed
        _fail(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})")
    raise AssertionError("unreachable")


# Text whose ids the rebuilt SentencePiece model must give exactly as transformers' tokenizer
# does: spaces, tabs and newline runs (user-defined pieces), digits, bytes, code.
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces,\ttabs\nand new lines\n\n\n",
    "Numbers 12345 and 3.14159; émigré café naïve 日本語 🙂",
    "def f(x):\n    return x**2  # comment",
    "<b>markup</b> &amp; entities",
)


def sentencepiece_model(reader) -> bytes:
    """The SentencePiece model the GGUF's vocabulary came from: pieces, scores and types are
    stored as in tokenizer.model (llama.cpp's enum is SentencePiece's), except that
    user-defined pieces hold spaces where SentencePiece writes U+2581 and <unk> is marked a
    control token."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    def values(key: str) -> list:
        field = reader.fields[key]
        return [field.parts[i] for i in field.data]

    def scalar(key: str) -> int:
        return int(values(key)[0][0])

    model = pb.ModelProto()
    pieces = zip(
        (bytes(p).decode() for p in values("tokenizer.ggml.tokens")),
        (float(p[0]) for p in values("tokenizer.ggml.scores")),
        (int(p[0]) for p in values("tokenizer.ggml.token_type")),
        strict=True,
    )
    for text, score, kind in pieces:
        piece = model.pieces.add()
        piece.piece = (
            text.replace(" ", "\u2581")
            if kind == pb.ModelProto.SentencePiece.USER_DEFINED
            else text
        )
        piece.score, piece.type = score, kind
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = (
        pb.TrainerSpec.BPE,
        len(model.pieces),
        True,
    )
    spec.unk_id = scalar("tokenizer.ggml.unknown_token_id")
    # llama.cpp stores <unk> as a control token; SentencePiece needs its one UNKNOWN piece.
    model.pieces[spec.unk_id].type = pb.ModelProto.SentencePiece.UNKNOWN
    spec.bos_id = scalar("tokenizer.ggml.bos_token_id")
    spec.eos_id = scalar("tokenizer.ggml.eos_token_id")
    spec.pad_id = scalar("tokenizer.ggml.padding_token_id")
    # SentencePiece finds its special ids by these pieces' names, not by the ids above.
    spec.unk_piece, spec.bos_piece = (
        model.pieces[spec.unk_id].piece,
        model.pieces[spec.bos_id].piece,
    )
    spec.eos_piece, spec.pad_piece = (
        model.pieces[spec.eos_id].piece,
        model.pieces[spec.pad_id].piece,
    )
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.remove_extra_whitespaces = "identity", False
    normalizer.add_dummy_prefix = bool(scalar("tokenizer.ggml.add_space_prefix"))
    return model.SerializeToString()


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    found = architecture(gguf_path)
    if found not in SUPPORTED:
        _fail(f"{gguf_path} holds a {found!r} model; only Gemma 3 GGUF files are supported")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: copy its (dequantized) weights into a
    # plain model of the same config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # keras-hub would rebuild a SentencePiece model from tokenizer.json, but that needs a
    # newer protobuf than the training environment has: give it tokenizer.model instead.
    import gguf
    import sentencepiece as spm

    proto = sentencepiece_model(gguf.GGUFReader(str(gguf_path)))
    rebuilt = spm.SentencePieceProcessor(model_proto=proto)
    specials = (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.pad_id(), rebuilt.unk_id())
    expected = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if specials[:3] != expected or specials[3] < 0:
        _fail(f"the SentencePiece model rebuilt from {gguf_path} has special ids {specials}")
    for text in CHECK_TEXTS:
        if rebuilt.encode(text) != tokenizer.encode(text, add_special_tokens=False):
            _fail(
                f"the SentencePiece model rebuilt from {gguf_path} tokenizes {text!r} "
                "differently from transformers"
            )
    (out / "tokenizer.model").write_bytes(proto)


def reference(gguf_path: Path, tokens: Path, layer: int, out: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    ids = torch.from_numpy(np.load(tokens).astype(np.int64))
    with torch.no_grad():
        result = model(ids, output_hidden_states=True)
    # hidden_states[0] is the embedding output; [i + 1] the output of block i.
    np.savez(
        out,
        logits=result.logits.float().numpy(),
        residual=result.hidden_states[layer + 1].float().numpy(),
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["convert"] and len(argv) == 3:
        path = Path(argv[1])
        if not path.is_file():
            _fail(f"no GGUF file at {path}")
        convert(path, Path(argv[2]))
    elif argv[:1] == ["reference"] and len(argv) == 5:
        reference(Path(argv[1]), Path(argv[2]), int(argv[3]), Path(argv[4]))
    else:
        _fail(
            "usage: gguf_worker.py convert MODEL.gguf OUT_DIR | reference HF_DIR TOKENS LAYER OUT"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
