"""Batches prepared on a background thread, so the training step does not wait on the host.

`Prefetched(batches, put)` pulls from `batches` (reading files or a store, gathering rows)
and hands each batch to `put` (a device transfer) on its own thread, keeping up to `depth`
ready. The train loop times its wait for each batch and logs the share of its wall time that
went to it as `data_wait_fraction`.

Only for sources whose position is their step count (files, the activation store): a
streaming source's position is its shuffle buffer, which a thread running ahead would move
past the step a checkpoint saves, and its hosts agree on forwards through collectives that
must not be issued from two threads. A streaming source prepares its batches in-line while
the device runs the steps already dispatched (and keeps model forwards in flight itself).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


class Prefetched:
    """`put(batch)` of each of `batches`, prepared on a background thread `depth` ahead."""

    def __init__(
        self, batches: Iterator[Any], put: Callable[[Any], Any] = lambda b: b, depth: int = 2
    ) -> None:
        self._ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(batches, put), daemon=True)
        self._thread.start()

    def __iter__(self) -> Prefetched:
        return self

    def _offer(self, item: Any) -> bool:
        """Queue `item` unless stopped first."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, batches: Iterator[Any], put: Callable[[Any], Any]) -> None:
        try:
            for batch in batches:
                if not self._offer(put(batch)):
                    return
            self._offer(_END)
        except BaseException as error:  # raised again in the consumer, on its thread
            self._offer(error)

    def __next__(self) -> Any:
        item = self._ready.get()
        if item is _END or isinstance(item, BaseException):
            self._ready.put(item)  # stays exhausted (or failed) for later calls
            if item is _END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (after the batch it is preparing)."""
        self._stop.set()
        self._thread.join(timeout=30)
