"""Batches prepared on a background thread: same batches in the same order, errors raised in
the consumer, a thread that stops when asked, and the loop's measure of waiting for data."""

import threading
import time

import pytest

from sae.data.prefetch import Prefetched


def test_prefetched_keeps_order_and_applies_put_ahead_of_the_consumer():
    produced = []

    def source():
        for i in range(5):
            produced.append(i)
            yield i

    feed = Prefetched(source(), put=lambda b: b * 10, depth=2)
    time.sleep(0.2)
    # Two ready in the queue and a third prepared, waiting for room, before any is asked for.
    assert produced == [0, 1, 2]
    assert list(feed) == [0, 10, 20, 30, 40]
    with pytest.raises(StopIteration):
        next(feed)


def test_a_producer_error_reaches_the_consumer():
    def source():
        yield 1
        raise ValueError("chunk 7 of part 0 is truncated")

    feed = Prefetched(source())
    assert next(feed) == 1
    with pytest.raises(ValueError, match="truncated"):
        next(feed)


def test_close_stops_the_thread_even_with_a_full_queue():
    feed = Prefetched(iter(range(10**9)), depth=1)
    assert next(feed) == 0
    feed.close()
    assert not any(t.name == feed._thread.name and t.is_alive() for t in threading.enumerate())
