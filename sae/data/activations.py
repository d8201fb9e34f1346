"""Activation streams: token sequences -> language-model activations -> shuffled training batches.

Nothing large is held: one token shard, one language-model batch, and a bounded shuffle buffer.
"""

from __future__ import annotations

import io
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from sae.data import token_shards

# (token_ids, lengths) -> activations per layer: host arrays, or device arrays still being
# computed (read one batch later, so the next forward overlaps the host's work). Any float
# dtype (a bfloat16 model's come as bfloat16); consumers cast to float32 to compute.
TapFn = Callable[[np.ndarray, np.ndarray], list[Any]]


class LockstepTap(Protocol):
    """A tap shared by several hosts (lm.ActivationTap): each call is one step of a program
    that every host runs, so all hosts must call it equally often."""

    def __call__(self, token_ids: np.ndarray, lengths: np.ndarray) -> list[Any]: ...

    def any_host(self, flag: bool) -> Any: ...

    @property
    def mesh(self) -> Any: ...


def content_mask(token_ids: np.ndarray, lengths: np.ndarray, bos_id: int) -> np.ndarray:
    """Positions that are real tokens: not padding and not BOS (whose activations are
    outliers that would dominate an SAE's loss)."""
    positions = np.arange(token_ids.shape[1])[None, :]
    return (positions < lengths[:, None]) & (token_ids != bos_id)


def sequence_batches(
    sequences: Iterator[tuple[np.ndarray, int]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Group sequences into (token_ids [batch, seq], lengths [batch]); the last batch is padded
    with empty rows (length 0) so every forward pass has the same, compiled-once shape."""
    tokens: list[np.ndarray] = []
    lengths: list[int] = []
    for sequence, length in sequences:
        tokens.append(sequence)
        lengths.append(length)
        if len(tokens) == batch_size:
            yield np.stack(tokens), np.asarray(lengths, np.int32)
            tokens, lengths = [], []
    if tokens:
        pad = batch_size - len(tokens)
        yield (
            np.concatenate([np.stack(tokens), np.zeros((pad, tokens[0].shape[0]), np.int32)]),
            np.asarray(lengths + [0] * pad, np.int32),
        )


@dataclass
class StreamPosition:
    """Where a streaming run's data stands after a step, exactly: the shuffle buffer's rows
    and generator state, the rows already computed by the model but not yet buffered, and
    how many sequences of the (seeded) stream the model has been run on. Saved with each
    checkpoint, it lets a resumed run continue the same stream without re-running the model
    over everything before it."""

    buffer_rows: np.ndarray
    rng_state: dict[str, Any]
    pending_rows: np.ndarray
    sequences: int

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        # .npz has no bfloat16: such rows go as their 16-bit patterns.
        bf16 = self.buffer_rows.dtype == ml_dtypes.bfloat16
        np.savez(
            out,
            buffer_rows=self.buffer_rows.view(np.uint16) if bf16 else self.buffer_rows,
            pending_rows=self.pending_rows.view(np.uint16) if bf16 else self.pending_rows,
            bfloat16=np.bool_(bf16),
            sequences=np.int64(self.sequences),
            rng_state=np.frombuffer(json.dumps(self.rng_state).encode(), np.uint8),
        )
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamPosition:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            rows, pending = saved["buffer_rows"], saved["pending_rows"]
            if bool(saved["bfloat16"]):
                rows, pending = rows.view(ml_dtypes.bfloat16), pending.view(ml_dtypes.bfloat16)
            return cls(
                rows,
                json.loads(saved["rng_state"].tobytes().decode()),
                pending,
                int(saved["sequences"]),
            )


class ShuffleBuffer:
    """A fixed-capacity pool of rows; batches are drawn at random once it is full, so rows from
    many sequences and documents mix while memory stays at `capacity` rows."""

    def __init__(self, capacity: int, dim: int, seed: int, dtype: Any = np.float32) -> None:
        # The tap's dtype (bfloat16 for a bfloat16 model): batches cross to the device at the
        # width the model computed, and the step casts them to float32 (exactly).
        self.data = np.empty((capacity, dim), dtype)
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def restore(self, rows: np.ndarray, rng_state: dict[str, Any]) -> None:
        self.data[: len(rows)] = rows
        self.size = len(rows)
        self.rng.bit_generator.state = rng_state

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def fill(self, rows: np.ndarray) -> np.ndarray:
        """Take as many of `rows` as fit; returns the rest."""
        take = min(len(rows), self.capacity - self.size)
        self.data[self.size : self.size + take] = rows[:take]
        self.size += take
        return rows[take:]

    def batches(
        self, chunks: Iterator[np.ndarray], batch_size: int, drain: bool = True
    ) -> Iterator[np.ndarray]:
        for chunk in chunks:
            while len(chunk):
                chunk = self.fill(chunk)
                while self.full:
                    yield self.pop(batch_size)
        while drain and self.size >= batch_size:
            yield self.pop(batch_size)

    def pop(self, batch_size: int) -> np.ndarray:
        """`batch_size` rows drawn at random, removed from the buffer."""
        chosen = self.rng.choice(self.size, size=batch_size, replace=False)
        batch = self.data[chosen].copy()
        # Swap-remove: rows from the tail fill the chosen slots that lie before it.
        new_size = self.size - batch_size
        holes = chosen[chosen < new_size]
        tail = np.setdiff1d(np.arange(new_size, self.size), chosen, assume_unique=True)
        self.data[holes] = self.data[tail]
        self.size = new_size
        return batch


def activation_chunks(
    sequences: Iterator[tuple[np.ndarray, int]],
    tap: TapFn,
    lm_batch_size: int,
    bos_id: int,
) -> Iterator[np.ndarray]:
    """Rows [n, layers * hidden]: every tapped layer side by side (so SAEs on different layers
    see the same tokens), BOS and padding positions dropped. One forward stays in flight: the
    next batch is dispatched before the previous one's activations are read."""

    in_flight = None
    for token_ids, lengths in sequence_batches(sequences, lm_batch_size):
        dispatched = (tap(token_ids, lengths), token_ids, lengths, bos_id)
        if in_flight is not None:
            yield _content_rows(*in_flight)
        in_flight = dispatched
    if in_flight is not None:
        yield _content_rows(*in_flight)


def _content_rows(
    outputs: list[Any], token_ids: np.ndarray, lengths: np.ndarray, bos_id: int
) -> np.ndarray:
    """The layers' activations side by side at the content positions, in the tap's dtype."""
    layers = [np.asarray(out) for out in outputs]
    activations = layers[0] if len(layers) == 1 else np.concatenate(layers, axis=-1)
    return activations[content_mask(token_ids, lengths, bos_id)]


def lockstep_chunks(
    sequences: Iterator[tuple[np.ndarray, int]],
    tap: LockstepTap,
    lm_batch_size: int,
    sequence_length: int,
    bos_id: int,
) -> Iterator[np.ndarray]:
    """`activation_chunks` for hosts that each stream their own sequences through one shared
    tap. Hosts rarely have equally many batches (shards differ, a row limit cuts one short),
    but every host must run the same forwards: so a host out of sequences feeds empty batches,
    and all stop after the first batch in which no host had a real one. Each batch carries
    that flag (`tap.any_host`), read with its activations one batch later, so deciding to stop
    adds no barrier; the cost is one or two empty forwards at the end."""
    batches = sequence_batches(sequences, lm_batch_size)
    empty = (
        np.zeros((lm_batch_size, sequence_length), np.int32),
        np.zeros(lm_batch_size, np.int32),
    )
    in_flight = None
    while True:
        batch = next(batches, None)
        token_ids, lengths = empty if batch is None else batch
        dispatched = (tap(token_ids, lengths), token_ids, lengths, bos_id)
        flag = tap.any_host(batch is not None)
        if in_flight is not None:
            if not bool(in_flight[1]):
                return  # every host is out of batches; they all read the same flag
            yield _content_rows(*in_flight[0])
        in_flight = (dispatched, flag)


# Combines one number from every host into their maximum (a collective every host calls in
# the same order): returns it, or a handle that int() reads once it is computed.
HostMaxFn = Callable[[int], Any]

# A host's vote when its sequences ran out: every host then stops at that step.
_DRY = np.iinfo(np.int32).max


class LockstepBatches:
    """Shuffled batches of this host's rows for training steps that every host runs together.

    Each host streams its own sequences through a shared tap into its own shuffle buffer, so
    the forwards one step needs differ between hosts (their content tokens differ), while
    every host must run the same forwards. A host's need is known from its token ids alone
    (content positions), before any forward runs: step N needs `capacity + N * batch_size`
    rows pushed in all. So the hosts vote the forwards they need for a step `ahead` steps
    early, `host_max` combines the votes, and before each step every host runs the agreed
    number of forwards (one more stays in flight, overlapping the step); a host ahead of its
    need keeps the surplus rows for later steps. The votes of step N are computed on the
    device before step N - ahead's forwards, so reading them waits for nothing. The batches
    equal those of one ShuffleBuffer over this host's rows, whatever the other hosts do.

    When a host's sequences run out, all hosts stop at the same step (StopIteration)."""

    def __init__(
        self,
        sequences: Iterator[tuple[np.ndarray, int]],
        tap: TapFn,
        buffer: ShuffleBuffer,
        lm_batch_size: int,
        batch_size: int,
        bos_id: int,
        host_max: HostMaxFn = int,
        ahead: int = 2,
        resume: StreamPosition | None = None,
    ) -> None:
        """`sequences` start where `resume` (if given) says the model stopped reading."""
        self.tap, self.buffer, self.bos_id = tap, buffer, bos_id
        self.batch_size, self.host_max, self.ahead = batch_size, host_max, ahead
        self._batches = sequence_batches(sequences, lm_batch_size)
        self._upcoming: deque[tuple[np.ndarray, np.ndarray]] = deque()  # peeked, not run
        # Rows pushed in all through forward `_first + i` (run or peeked), from the first
        # forward that a future step can still need; and through the last one peeked.
        self._ends: deque[int] = deque()
        self._first = 0
        self._total = 0
        self._shape: tuple[int, int] | None = None  # of a model batch
        self._dispatched = 0  # forwards run, the same count on every host
        self._in_flight: deque[tuple[list[Any], np.ndarray, np.ndarray]] = deque()
        self._rows = np.empty((0, buffer.data.shape[1]), buffer.data.dtype)  # not yet buffered
        self._votes: deque[Any] = deque()
        self._step = self._voted = 0
        self._sequences = 0  # of the stream, in forwards dispatched (its position)
        # Rows available before any forward of this object: a resumed position's.
        self._prefilled = 0
        if resume is not None:
            buffer.restore(resume.buffer_rows, resume.rng_state)
            self._rows = resume.pending_rows.astype(buffer.data.dtype)
            self._sequences = resume.sequences
            self._prefilled = self._total = buffer.size + len(self._rows)

    @property
    def forwards(self) -> int:
        """Model forwards run so far (the same count on every host)."""
        return self._dispatched

    def position(self) -> StreamPosition:
        """The data position after the batches returned so far (waits for the forwards in
        flight: their rows are part of it)."""
        in_flight = [_content_rows(*f, self.bos_id) for f in self._in_flight]
        pending = np.concatenate([self._rows, *in_flight]).astype(self.buffer.data.dtype)
        return StreamPosition(
            self.buffer.data[: self.buffer.size].copy(),
            self.buffer.rng.bit_generator.state,
            pending,
            self._sequences,
        )

    def __iter__(self) -> LockstepBatches:
        return self

    def __next__(self) -> np.ndarray:
        while self._voted <= self._step + self.ahead:
            self._votes.append(self.host_max(self._forwards_for(self._voted)))
            self._voted += 1
        agreed = int(self._votes.popleft())
        if agreed == _DRY:
            raise StopIteration
        while self._dispatched <= agreed:  # the agreed forwards, and one more in flight
            self._dispatch()
        while not self.buffer.full:
            if not len(self._rows):
                self._rows = _content_rows(*self._in_flight.popleft(), self.bos_id)
            self._rows = self.buffer.fill(self._rows)
        self._step += 1
        return self.buffer.pop(self.batch_size)

    def _forwards_for(self, step: int) -> int:
        """How many forwards in all this host needs run before `step`, or _DRY if its
        sequences cannot fill it. Steps are asked in order, so forwards that fill an earlier
        step only are forgotten."""
        needed = self.buffer.capacity + step * self.batch_size
        if needed <= self._prefilled:
            return 0  # a resumed position's rows cover it
        while self._total < needed:
            if not self._peek():
                return _DRY
        while self._ends[0] < needed:
            self._ends.popleft()
            self._first += 1
        return self._first + 1

    def _peek(self) -> bool:
        batch = next(self._batches, None)
        if batch is None:
            return False
        self._shape = batch[0].shape
        self._upcoming.append(batch)
        self._total += int(content_mask(*batch, self.bos_id).sum())
        self._ends.append(self._total)
        return True

    def _dispatch(self) -> None:
        if not self._upcoming and not self._peek():
            # Out of sequences while another host still needs forwards: an empty batch
            # keeps this host in step (all stop at the step this host cannot fill).
            if self._shape is None:
                raise RuntimeError("no sequences to run the model on")
            empty = (np.zeros(self._shape, np.int32), np.zeros(self._shape[0], np.int32))
            self._upcoming.append(empty)
            self._ends.append(self._total)
        token_ids, lengths = self._upcoming.popleft()
        self._in_flight.append((self.tap(token_ids, lengths), token_ids, lengths))
        self._dispatched += 1
        self._sequences += int(np.sum(lengths > 0))


def training_batches(
    shards: list[str],
    tap: TapFn,
    row_dim: int,
    lm_batch_size: int,
    batch_size: int,
    buffer_rows: int,
    bos_id: int,
    seed: int,
    host_max: HostMaxFn = int,
    resume: StreamPosition | None = None,
) -> LockstepBatches:
    """An endless, seeded stream of shuffled activation batches over the train shards (epochs
    repeat with a new shard and row order). The same seed gives the same stream; `resume` (a
    checkpoint's `position()`) continues it exactly where that left off, running the model
    only on sequences after it. With several hosts, each passes its own shards, seed and
    share of `batch_size`, and `host_max` keeps their forwards in lockstep (see
    LockstepBatches)."""
    start = 0 if resume is None else resume.sequences
    sequences = token_shards.iter_sequences(shards, seed=seed, epochs=None, start=start)
    # bfloat16 rows stay bfloat16 (half the host memory and the host-to-device bytes).
    dtype = (
        ml_dtypes.bfloat16
        if np.dtype(getattr(tap, "dtype", np.float32)) == ml_dtypes.bfloat16
        else np.float32
    )
    buffer = ShuffleBuffer(buffer_rows, row_dim, seed, dtype)
    return LockstepBatches(
        sequences, tap, buffer, lm_batch_size, batch_size, bos_id, host_max, resume=resume
    )
