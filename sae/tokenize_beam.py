"""The tokenize stage as an Apache Beam pipeline: corpus files -> packed token shards.

Each corpus file is read and tokenized by one worker (BOS before every document), its tokens
packed into fixed-length sequences, and every sequence assigned deterministically, by a hash
of (file, position), to the eval split or to one of the train shards. Shards are written
through the storage layer, so the same pipeline writes local files or gs:// objects, on the
local runner or on Dataflow.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from sae import corpus, token_shards
from sae.errors import ConfigError
from sae.progress import Progress

COUNTERS = ("documents", "empty_documents", "bad_records")
_NAMESPACE = "tokenize"


@dataclass(frozen=True)
class PackingSpec:
    """How sequences are cut and where they go."""

    sequence_length: int
    num_train_shards: int
    num_eval_shards: int
    eval_fraction: float
    seed: int


def packing_spec(
    sequence_length: int, num_shards: int, eval_fraction: float, seed: int
) -> PackingSpec:
    num_eval = max(1, math.ceil(num_shards * eval_fraction)) if eval_fraction > 0 else 0
    return PackingSpec(sequence_length, num_shards, num_eval, eval_fraction, seed)


def assign_shard(spec: PackingSpec, file_index: int, sequence_index: int) -> tuple[str, int]:
    """Deterministic (split, shard) for a sequence: the same on every runner and every re-run."""
    key = f"{spec.seed}:{file_index}:{sequence_index}".encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    if spec.num_eval_shards and (value % 1_000_000) / 1_000_000 < spec.eval_fraction:
        return "eval", (value >> 20) % spec.num_eval_shards
    return "train", (value >> 20) % spec.num_train_shards


def pack(
    token_streams: Iterator[list[int]], sequence_length: int, pad_id: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Concatenate documents and cut fixed-length sequences; the last one is padded."""
    buffer: list[int] = []
    for tokens in token_streams:
        buffer.extend(tokens)
        while len(buffer) >= sequence_length:
            yield np.asarray(buffer[:sequence_length], np.int32), sequence_length
            del buffer[:sequence_length]
    if buffer:
        length = len(buffer)
        padded = np.full(sequence_length, pad_id, np.int32)
        padded[:length] = buffer
        yield padded, length


class TokenizeFile(beam.DoFn):
    """(file index, URI) -> ((split, shard), (file index, sequence index, tokens, length))."""

    def __init__(
        self,
        tokenizer_proto: bytes,
        fmt: str,
        text_field: str,
        skip_bad: bool,
        spec: PackingSpec,
        total_bytes: int = 0,
    ) -> None:
        self.tokenizer_proto = tokenizer_proto
        self.fmt, self.text_field, self.skip_bad, self.spec = fmt, text_field, skip_bad, spec
        self.total_bytes = total_bytes
        self.counters = {name: Metrics.counter(_NAMESPACE, name) for name in COUNTERS}

    def setup(self) -> None:
        self.processor = spm.SentencePieceProcessor(model_proto=self.tokenizer_proto)
        # Per worker: on the local runner that is the whole job, so the ETA is the job's.
        self.progress = Progress("tokenize", self.total_bytes or None, unit="B")
        self.tokens = 0

    def teardown(self) -> None:
        if getattr(self, "tokens", 0):
            self.progress.close(tokens=self.tokens)

    def process(self, element: tuple[int, str]):
        file_index, uri = element
        sequences = pack(self._documents(uri), self.spec.sequence_length, self.processor.pad_id())
        for sequence_index, (tokens, length) in enumerate(sequences):
            key = assign_shard(self.spec, file_index, sequence_index)
            yield key, (file_index, sequence_index, tokens, length)

    def _documents(self, uri: str) -> Iterator[list[int]]:
        bos = self.processor.bos_id()
        for record in corpus.read_records(uri, self.fmt, self.text_field):
            if record.text is None:
                if not self.skip_bad:
                    raise corpus.BadRecordError(corpus.describe(record))
                self.counters["bad_records"].inc()
                continue
            ids = self.processor.encode(record.text)
            self.tokens += len(ids) + 1
            self.progress.update(len(record.text.encode()), tokens=self.tokens)
            self.tokens += len(ids) + 1
            self.progress.update(len(record.text.encode()), tokens=self.tokens)
            if not ids:
                self.counters["empty_documents"].inc()
                continue
            self.counters["documents"].inc()
            yield [bos, *ids]


class WriteShard(beam.DoFn):
    """Writes one shard, rows in (file, position) order so output is byte-for-byte repeatable."""

    def __init__(self, output_uri: str, sequence_length: int) -> None:
        self.output_uri, self.sequence_length = output_uri, sequence_length

    def process(self, element):
        from sae import storage

        (split, index), rows = element
        rows = sorted(rows, key=lambda row: (row[0], row[1]))
        uri = storage.join(self.output_uri, token_shards.shard_name(split, index))
        token_shards.write_shard(
            uri, [r[2] for r in rows], [r[3] for r in rows], self.sequence_length
        )
        yield uri


def pipeline_options(runner: str, dataflow_args: list[str] | None = None) -> PipelineOptions:
    if runner == "direct":
        # Beam's default local runner may switch to Prism, which downloads a binary; the
        # in-process FnApiRunner (what DirectRunner uses for batch) needs nothing.
        return PipelineOptions(["--direct_running_mode=in_memory"])
    if runner == "dataflow":
        return PipelineOptions(["--runner=DataflowRunner", *(dataflow_args or [])])
    raise ConfigError(f"unknown Beam runner '{runner}'")


def _runner(runner: str):
    if runner == "direct":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None  # taken from the options


def run(
    files: list[str],
    output_uri: str,
    tokenizer_proto: bytes,
    fmt: str,
    text_field: str,
    skip_bad: bool,
    spec: PackingSpec,
    runner: str = "direct",
    dataflow_args: list[str] | None = None,
    total_bytes: int = 0,
) -> dict[str, int]:
    """Run the pipeline to completion; returns the Beam counters (documents, bad records...)."""
    options = pipeline_options(runner, dataflow_args)
    pipeline = beam.Pipeline(runner=_runner(runner), options=options)
    _ = (
        pipeline
        | "ListFiles" >> beam.Create(list(enumerate(files)))
        | "Reshuffle" >> beam.Reshuffle()
        | "Tokenize"
        >> beam.ParDo(TokenizeFile(tokenizer_proto, fmt, text_field, skip_bad, spec, total_bytes))
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShard(output_uri, spec.sequence_length))
    )
    result = pipeline.run()
    result.wait_until_finish()
    return _counters(result)


def _counters(result) -> dict[str, int]:
    counts = dict.fromkeys(COUNTERS, 0)
    query = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))
    for counter in query["counters"]:
        name = counter.key.metric.name
        value = counter.committed if counter.committed is not None else counter.attempted
        counts[name] = counts.get(name, 0) + int(value or 0)
    return counts
