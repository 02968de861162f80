"""Dynamic batching: photos from many request threads go through one model call.

A server on a few cores is fastest when the model sees batches, not one photo per thread
fighting for the same cores. Each caller blocks on a future; one worker thread takes what is
queued (up to ``max_batch``, waiting at most ``max_wait`` seconds for more once it has one) and
runs the model once; ``workers`` such threads take batches side by side. Written here because no serving library of ours does this in-process
(TorchServe and Triton are separate servers).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future


def lower_thread_priority(nice: int) -> bool:
    """Lower the calling thread's CPU priority by ``nice`` (Linux gives each thread its own nice
    value; elsewhere, or without permission, nothing changes). True when it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except OSError:
        return False


class Closing(Exception):
    """The batcher was closed: the server is stopping."""


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Complete ``future`` once; a second completion is ignored."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    def __init__(self, fn: Callable[[Sequence], Sequence], max_batch: int = 8, max_wait: float = 0.002,
                 name: str = "batcher", on_batch: Callable[[int], None] | None = None, workers: int = 1,
                 nice: int = 0):
        self.fn, self.max_batch, self.max_wait, self.on_batch = fn, max_batch, max_wait, on_batch
        self.nice = nice
        self._queue: queue.Queue = queue.Queue()
        self._closing, self._closed = threading.Lock(), False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{n}", daemon=True) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def __call__(self, item):
        """The model's output for ``item`` (blocks; re-raises the model's exception, or
        :class:`Closing` once :meth:`close` was called)."""
        future: Future = Future()
        with self._closing:
            if self._closed:
                raise Closing("the server is shutting down")
            self._queue.put((item, future))
        return future.result()

    def close(self) -> None:
        """Finish what is queued, then stop the workers; later calls raise :class:`Closing` (and
        anything a worker could not finish in time gets it too)."""
        with self._closing:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                _settle(left[1], error=Closing("the server is shutting down"))

    def _run(self) -> None:
        if self.nice:
            lower_thread_priority(self.nice)
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                results = list(self.fn([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"the model gave {len(results)} results for {len(batch)} inputs")
                for (_, future), result in zip(batch, results):
                    _settle(future, result=result)
            except BaseException as exc:  # every caller gets the error, the worker lives on
                for _, future in batch:
                    _settle(future, error=exc)
            if self.on_batch:
                self.on_batch(len(batch))
            if stop:
                return
