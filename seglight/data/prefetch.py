"""Batches assembled ahead in a background thread and handed over without polling.

MONAI's ``ThreadDataLoader`` polls its queue on both sides every ``buffer_timeout`` seconds: a thread that wakes
a thousand times a second at the 1 ms seglight used, taking the GIL and a core from the training step each time
(measured on a 2-core CPU: about 100 ms of CPU per 1 s step). Here both sides block until there is an item or
room for one, so the thread runs only while it assembles a batch, and an error raised while assembling one is
raised in the training thread (MONAI's thread dies with it and the epoch just ends early).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from queue import Empty, Queue
from typing import Any, TypeVar

from monai.data import DataLoader

T = TypeVar("T")

_END = object()  # the source is exhausted


class _Raised:
    """An exception raised in the background thread, carried to the training thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """``items`` in order, each computed in a background thread while the previous ones are used (``depth`` ahead).

    Closing the iterator early (the end of a shortened epoch, an exception in the step) stops the thread after
    the item it is computing.
    """
    queue: Queue[Any] = Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                queue.put(item)  # blocks while the queue is full
                if stop.is_set():
                    return
            queue.put(_END)
        except BaseException as error:  # carried to the training thread and raised there
            queue.put(_Raised(error))

    thread = threading.Thread(target=produce, name="seglight-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()  # blocks until the thread has put something
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # make room for a thread blocked on a full queue, so that it sees the stop
            with contextlib.suppress(Empty):
                queue.get(timeout=0.01)
        thread.join()


class ThreadLoader(DataLoader):
    """MONAI's ``DataLoader`` whose batches are assembled in a background thread, ``prefetch`` batches ahead.

    For cached data bound for a GPU, where only the random augmentation and the collation are left per step
    (MONAI's fast-training recipe), without worker processes that would copy every batch through shared memory.

    Args:
        dataset: the dataset, as for ``DataLoader``.
        prefetch: batches assembled ahead of the one in use.
        kwargs: other ``DataLoader`` arguments (``num_workers`` stays 0: the thread is the worker).
    """

    def __init__(self, dataset: Any, prefetch: int = 1, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.prefetch = int(prefetch)

    def __iter__(self) -> Iterator[Any]:
        yield from prefetched(super().__iter__(), self.prefetch)
