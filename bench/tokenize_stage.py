"""Tokenize throughput: the Beam pipeline (in-process runner) against a plain Python loop over
the same tokenizer and corpus, printed as JSON.

    python bench/tokenize_stage.py                                  # 20k demo documents: < 1 min
    python bench/tokenize_stage.py --documents 200000 --files 16

The corpus is the project's generated demo corpus (JSONL) and the tokenizer a SentencePiece
BPE model trained on part of it, as the demo stage does. The Beam job is the whole
`tokenize_beam.run`: read, tokenize, pack, assign shards, group and write Parquet shards to a
temporary directory. The reference reads the same files, encodes each document with the same
SentencePiece model and packs the tokens in one Python loop, writing nothing, so
`beam_vs_plain` says what the pipeline's machinery and shard writing cost on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date

import apache_beam as beam
import sentencepiece as spm

from sae.data import token_shards, tokenize_beam
from sae.demo import corpus as demo_corpus
from sae.demo.tiny_model import train_tokenizer
from sae.io import storage


def plain_loop(files: list[str], proto: bytes, sequence_length: int) -> dict[str, int]:
    """Read, encode (BOS before each document) and pack, one document at a time."""
    processor = spm.SentencePieceProcessor(model_proto=proto)
    bos, pad = processor.bos_id(), processor.pad_id()
    sequences = tokens = 0
    for uri in files:
        with open(uri, "rb") as handle:
            documents = (
                [bos, *processor.encode(json.loads(line)["text"])]
                for line in handle
                if line.strip()
            )
            for _, length in tokenize_beam.pack(documents, sequence_length, pad):
                sequences += 1
                tokens += length
    return {"sequences": sequences, "tokens": tokens}


def beam_job(
    files: list[str], out: str, proto: bytes, sequence_length: int, shards: int
) -> dict[str, int]:
    spec = tokenize_beam.packing_spec(sequence_length, shards, 0.05, seed=0)
    counters = tokenize_beam.run(files, out, proto, "jsonl", "text", False, spec, "direct")
    sequences = tokens = 0
    for shard in storage.list_files(out):
        shard_sequences, shard_tokens = token_shards.shard_counts(shard)
        sequences += shard_sequences
        tokens += shard_tokens
    return {"documents": counters["documents"], "sequences": sequences, "tokens": tokens}


def _timed(fn, *args) -> tuple[dict[str, int], float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--vocabulary-size", type=int, default=1024)
    parser.add_argument("--tokenizer-documents", type=int, default=2000, help="to train it on")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = demo_corpus.write_demo_corpus(
            os.path.join(tmp, "corpus"), args.documents, args.files, seed=0
        )
        texts = demo_corpus.generate_documents(min(args.tokenizer_documents, args.documents))
        proto = train_tokenizer(texts, args.vocabulary_size, seed=0)
        corpus_bytes = sum(storage.size(uri) for uri in files)
        plain, plain_seconds = _timed(plain_loop, files, proto, args.sequence_length)
        out = os.path.join(tmp, "tokens")
        beam_result, beam_seconds = _timed(
            beam_job, files, out, proto, args.sequence_length, args.shards
        )
    # The same tokens either way (the pipeline packs per file, as the loop does).
    if beam_result["tokens"] != plain["tokens"]:
        raise SystemExit(f"token counts differ: beam {beam_result} vs plain {plain}")
    tokens = plain["tokens"]
    print(
        json.dumps(
            {
                "benchmark": "tokenize",
                "date": date.today().isoformat(),
                "device": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                "host": platform.node(),
                "apache_beam": beam.__version__,
                "shapes": {
                    "documents": beam_result["documents"],
                    "files": args.files,
                    "bytes": corpus_bytes,
                    "tokens": tokens,
                    "sequences": beam_result["sequences"],
                    "sequence_length": args.sequence_length,
                    "vocabulary_size": spm.SentencePieceProcessor(
                        model_proto=proto
                    ).get_piece_size(),
                    "shards": args.shards,
                },
                "beam": {
                    "what": "tokenize_beam.run, in-process runner, Parquet shards written",
                    "seconds": beam_seconds,
                    "tokens_per_second": tokens / beam_seconds,
                    "bytes_per_second": corpus_bytes / beam_seconds,
                },
                "plain": {
                    "what": "one Python loop: json.loads, SentencePiece encode, pack; no writes",
                    "seconds": plain_seconds,
                    "tokens_per_second": tokens / plain_seconds,
                    "bytes_per_second": corpus_bytes / plain_seconds,
                },
                "beam_vs_plain": plain_seconds / beam_seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
