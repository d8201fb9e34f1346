"""The tokenize stage as an Apache Beam pipeline: corpus files -> packed token shards.

Each corpus file is read and tokenized by one worker (BOS before every document, EOS after it
if asked), its tokens packed into fixed-length sequences (or one document per sequence), and
every sequence assigned deterministically, by a hash of (file, position), to the eval split
or to one of the train shards. Shards are written through the storage layer, so the same
pipeline writes local files or gs:// objects, on the local runner or on Dataflow.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from sae.config import DataflowConfig
from sae.data import corpus, token_shards
from sae.errors import ConfigError
from sae.progress import Progress

COUNTERS = ("documents", "empty_documents", "bad_records", "truncated_documents")
_NAMESPACE = "tokenize"


@dataclass(frozen=True)
class PackingSpec:
    """How sequences are cut and where they go."""

    sequence_length: int
    num_train_shards: int
    num_eval_shards: int
    eval_fraction: float
    seed: int
    # "pack": documents concatenated into full sequences; "document": one per sequence.
    packing: str = "pack"


def packing_spec(
    sequence_length: int, num_shards: int, eval_fraction: float, seed: int, packing: str = "pack"
) -> PackingSpec:
    if packing not in ("pack", "document"):
        raise ConfigError(f"unknown packing mode '{packing}'")
    num_eval = max(1, math.ceil(num_shards * eval_fraction)) if eval_fraction > 0 else 0
    return PackingSpec(sequence_length, num_shards, num_eval, eval_fraction, seed, packing)


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


def one_per_sequence(
    token_streams: Iterator[list[int]], sequence_length: int, pad_id: int
) -> Iterator[tuple[np.ndarray, int]]:
    """One document per sequence, cut to sequence_length and padded."""
    for tokens in token_streams:
        length = min(len(tokens), sequence_length)
        padded = np.full(sequence_length, pad_id, np.int32)
        padded[:length] = tokens[:length]
        yield padded, length


class TokenizeFile(beam.DoFn):
    """(file index, URI) -> ((split, shard), (file index, sequence index, int32 tokens as bytes,
    length))."""

    def __init__(
        self,
        tokenizer_proto: bytes,
        fmt: str,
        text_field: str,
        skip_bad: bool,
        spec: PackingSpec,
        total_bytes: int = 0,
        add_eos: bool = False,
    ) -> None:
        self.tokenizer_proto = tokenizer_proto
        self.fmt, self.text_field, self.skip_bad, self.spec = fmt, text_field, skip_bad, spec
        self.total_bytes, self.add_eos = total_bytes, add_eos
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
        for sequence_index, (tokens, length) in enumerate(self._sequences(uri)):
            key = assign_shard(self.spec, file_index, sequence_index)
            # As bytes: Beam encodes them natively, where an array would be pickled.
            yield key, (file_index, sequence_index, tokens.tobytes(), length)

    def _sequences(self, uri: str) -> Iterator[tuple[np.ndarray, int]]:
        length, pad = self.spec.sequence_length, self.processor.pad_id()
        if self.spec.packing == "document":
            return one_per_sequence(self._count_truncated(self._documents(uri)), length, pad)
        return pack(self._documents(uri), length, pad)

    def _count_truncated(self, documents: Iterator[list[int]]) -> Iterator[list[int]]:
        for tokens in documents:
            if len(tokens) > self.spec.sequence_length:
                self.counters["truncated_documents"].inc()
            yield tokens

    def _documents(self, uri: str) -> Iterator[list[int]]:
        bos = self.processor.bos_id()
        eos = [self.processor.eos_id()] if self.add_eos else []
        for record in corpus.read_records(uri, self.fmt, self.text_field):
            if record.text is None:
                if not self.skip_bad:
                    raise corpus.BadRecordError(corpus.describe(record))
                self.counters["bad_records"].inc()
                continue
            ids = self.processor.encode(record.text)
            if ids:
                self.tokens += len(ids) + 1 + len(eos)
            # Once per record: the bytes read, against the corpus size for percent and ETA.
            self.progress.update(len(record.text.encode()), tokens=self.tokens)
            if not ids:
                self.counters["empty_documents"].inc()
                continue
            self.counters["documents"].inc()
            yield [bos, *ids, *eos]


class WriteShard(beam.DoFn):
    """Writes one shard, rows in (file, position) order so output is byte-for-byte repeatable."""

    def __init__(self, output_uri: str, sequence_length: int) -> None:
        self.output_uri, self.sequence_length = output_uri, sequence_length

    def process(self, element):
        from sae.io import storage

        (split, index), rows = element
        rows = sorted(rows, key=lambda row: (row[0], row[1]))
        uri = storage.join(self.output_uri, token_shards.shard_name(split, index))
        tokens = [np.frombuffer(r[2], np.int32) for r in rows]
        token_shards.write_shard(uri, tokens, [r[3] for r in rows], self.sequence_length)
        yield uri


def job_name(output_uri: str) -> str:
    """A Dataflow job name from the output path: lowercase [-a-z0-9], starting with a letter.
    The same output gives the same name, so Dataflow refuses a second concurrent job on it."""
    slug = re.sub(r"[^a-z0-9]+", "-", output_uri.lower().removeprefix("gs://")).strip("-")
    # Dataflow allows longer names, but the console and labels cut them; keep the specific end.
    return f"tokenize-{slug[-80:].lstrip('-')}".rstrip("-")


# DataflowConfig fields passed through as --<name>=<value> when set.
_DATAFLOW_FLAGS = (
    "project",
    "region",
    "temp_location",
    "staging_location",
    "sdk_container_image",
    "requirements_file",
    "setup_file",
    "machine_type",
    "service_account_email",
    "network",
    "subnetwork",
)


def dataflow_args(dataflow: DataflowConfig, output_uri: str) -> list[str]:
    """Beam command-line flags for a Dataflow job. No --save_main_session: the DoFns live in
    this importable module (the workers' `sae` package), and __main__ is only the CLI."""
    args = ["--runner=DataflowRunner", f"--job_name={job_name(output_uri)}"]
    args += [
        f"--{key}={getattr(dataflow, key)}" for key in _DATAFLOW_FLAGS if getattr(dataflow, key)
    ]
    if dataflow.max_num_workers:
        args.append(f"--max_num_workers={dataflow.max_num_workers}")
    if dataflow.no_use_public_ips:
        args.append("--no_use_public_ips")
    return args


def pipeline_options(
    runner: str, dataflow: DataflowConfig | None = None, output_uri: str = ""
) -> PipelineOptions:
    if runner == "direct":
        # Beam's default local runner may switch to Prism, which downloads a binary; the
        # in-process FnApiRunner (what DirectRunner uses for batch) needs nothing.
        return PipelineOptions(["--direct_running_mode=in_memory"])
    if runner == "dataflow":
        return PipelineOptions(dataflow_args(dataflow or DataflowConfig(), output_uri))
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
    dataflow: DataflowConfig | None = None,
    total_bytes: int = 0,
    add_eos: bool = False,
) -> dict[str, int]:
    """Run the pipeline to completion; returns the Beam counters (documents, bad records...)."""
    options = pipeline_options(runner, dataflow, output_uri)
    pipeline = beam.Pipeline(runner=_runner(runner), options=options)
    tokenize = TokenizeFile(
        tokenizer_proto, fmt, text_field, skip_bad, spec, total_bytes, add_eos=add_eos
    )
    _ = (
        pipeline
        | "ListFiles" >> beam.Create(list(enumerate(files)))
        | "Reshuffle" >> beam.Reshuffle()
        | "Tokenize" >> beam.ParDo(tokenize)
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
