"""A bounded prefetch: an iterator run in a background thread, at most ``depth`` items ahead of
its consumer, so that reading and decoding the next batches overlap the current batch's
inference and writing.

Items come out exactly once and in order. An exception in the producer is raised in the consumer,
where the item it failed to make would have come. When the consumer stops early (it breaks, or
fails), :meth:`Prefetcher.close` stops the producer at its next item and waits for it, so the
producer's files are closed before the task returns. ``depth=0`` runs the iterator in the
consumer's thread, with no thread at all.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has stopped


class _Done:
    """The producer's last item: the iterator is exhausted."""


class _Failed:
    """The producer's last item: the iterator raised ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """``with Prefetcher(make, depth) as items: for item in items: ...`` iterates ``make()`` in a
    background thread that keeps at most ``depth`` finished items waiting."""

    def __init__(self, make: Callable[[], Iterator[T]], depth: int, name: str = "prefetch"):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._make, self.depth = make, depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True) if depth else None

    def __enter__(self) -> Prefetcher[T]:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        if self._thread is None:
            yield from self._make()
            return
        while True:
            item = self._queue.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the producer (at its next item) and wait until it has closed its iterator."""
        if self._thread is None or self._thread.ident is None:
            return
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():  # batches made but never consumed: free them now
            self._queue.get_nowait()

    def _produce(self) -> None:
        items = None
        try:
            items = self._make()
            for item in items:
                if not self._put(item):
                    return
            self._put(_Done())
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator stopped early closes its files here, in its own thread
                close()

    def _put(self, item: object) -> bool:
        """Wait for room in the queue; False when the consumer has stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
