"""The tokenize stage: corpus files -> packed Parquet token shards (Apache Beam), and a manifest
recording the shards, their counts per split and the tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib

import sentencepiece as spm

from sae.config import PipelineConfig
from sae.data import corpus, token_shards, tokenize_beam
from sae.errors import InputError
from sae.io import presets, storage
from sae.io.stages import StageOutput, run_stage
from sae.progress import log


def tokenize(config: PipelineConfig, force: bool = False) -> bool:
    """Tokenize `tokenize.input` into `<workdir>/tokens`; returns whether the stage ran (False
    when its manifest already matches the config and inputs)."""
    config.require("tokenize.input")
    cfg = config.tokenize
    files = corpus.find_corpus_files(config.corpus_uri)
    proto = presets.chosen_tokenizer_proto(cfg.tokenizer, config.preset_uri)
    processor = _processor(proto, cfg.tokenizer or f"the tokenizer of {config.preset_uri}")
    if cfg.add_eos and processor.eos_id() < 0:
        raise InputError("tokenize.add_eos is set but the tokenizer has no EOS piece")
    tokenizer_fingerprint = "sha256:" + hashlib.sha256(proto).hexdigest()
    inputs = {uri: storage.fingerprint(uri) for uri in files}
    inputs["tokenizer"] = tokenizer_fingerprint
    tokenizer = {
        "fingerprint": tokenizer_fingerprint,
        "bos_id": processor.bos_id(),
        "eos_id": processor.eos_id(),
        "pad_id": processor.pad_id(),
        "vocabulary_size": processor.get_piece_size(),
    }

    def body() -> StageOutput:
        return _tokenize(config, files, proto, tokenizer)

    return run_stage("tokenize", config.tokens_uri, dataclasses.asdict(cfg), inputs, body, force)


def _processor(proto: bytes, source: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError:
        raise InputError(f"{source} is not a valid SentencePiece model") from None


def _progress_total(fmt: str, files: list[str]) -> int:
    """Corpus bytes for the progress line's percentage; 0 (no percentage) for Parquet, whose
    compressed file sizes do not measure the text read."""
    return 0 if fmt == "parquet" else sum(storage.size(uri) for uri in files)


def _shard_stats(uris: list[str]) -> dict[str, dict[str, int]]:
    stats = {split: {"sequences": 0, "tokens": 0, "shards": 0} for split in token_shards.SPLITS}
    for uri in uris:
        split = storage.basename(uri).split("-")[0]
        sequences, tokens = token_shards.shard_counts(uri)
        stats[split]["sequences"] += sequences
        stats[split]["tokens"] += tokens
        stats[split]["shards"] += 1
    return stats


def _run_beam(config: PipelineConfig, files: list[str], proto: bytes) -> dict[str, int]:
    """The Beam pipeline's counters; a corpus it cannot read is a one-line InputError, with
    nothing left in the output."""
    cfg, output = config.tokenize, config.tokens_uri
    spec = tokenize_beam.packing_spec(
        cfg.sequence_length, cfg.num_shards, cfg.eval_fraction, cfg.seed, cfg.packing
    )
    log("tokenize", f"{len(files)} corpus file(s) -> {output} ({cfg.runner} runner)")
    try:
        return tokenize_beam.run(
            files,
            output,
            proto,
            cfg.format,
            cfg.text_field,
            cfg.on_bad_record == "skip",
            spec,
            cfg.runner,
            cfg.dataflow,
            total_bytes=_progress_total(cfg.format, files),
            add_eos=cfg.add_eos,
        )
    except InputError as error:
        storage.delete_tree(output)
        # Beam appends the failing step (and a traceback) to a DoFn's exception.
        message = str(error).split(" [while running")[0].strip().splitlines()[0]
        if isinstance(error, corpus.BadRecordError):
            raise InputError(
                f"undecodable corpus record: {message} (set tokenize."
                "on_bad_record=skip to count and skip such records)"
            ) from None
        raise InputError(message) from None


def _tokenize(
    config: PipelineConfig, files: list[str], proto: bytes, tokenizer: dict[str, int | str]
) -> StageOutput:
    output = config.tokens_uri
    # A re-run replaces the previous shards wholesale (their count or split may differ).
    storage.delete_tree(output)
    counters = _run_beam(config, files, proto)
    shards = sorted(uri for uri in storage.list_files(output) if uri.endswith(".parquet"))
    stats = _shard_stats(shards)
    if counters["documents"] == 0 or stats["train"]["sequences"] == 0:
        storage.delete_tree(output)
        raise InputError(
            f"corpus '{config.corpus_uri}' has no usable documents "
            f"({counters['empty_documents']} empty, "
            f"{counters['bad_records']} bad records)"
        )
    counts = {
        **counters,
        **{
            f"{split}_{key}": value
            for split, values in stats.items()
            for key, value in values.items()
        },
    }
    log(
        "tokenize",
        f"{counts['documents']} documents -> {counts['train_tokens']} train "
        f"and {counts['eval_tokens']} held-out tokens",
    )
    extra = {
        "sequence_length": config.tokenize.sequence_length,
        "shards": {
            split: [u for u in shards if storage.basename(u).startswith(split)]
            for split in token_shards.SPLITS
        },
        "tokenizer": tokenizer,
    }
    return StageOutput(counts, shards, extra)
