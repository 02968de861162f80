"""The request batcher: every caller gets its own result, batches stay within max_batch, an error
reaches every caller of its batch and no other, and several workers run batches side by side."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fashionlens.serving.batcher import Batcher, Closing


def test_results_go_to_their_callers_in_batches():
    sizes, gate = [], threading.Event()

    def double(items):
        gate.wait(5)  # hold the first batch so that the others queue up
        sizes.append(len(items))
        return [2 * x for x in items]

    batcher = Batcher(double, max_batch=4, max_wait=0.05)
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(batcher, i) for i in range(40)]
            gate.set()
            assert [f.result() for f in futures] == [2 * i for i in range(40)]
    finally:
        batcher.close()
    assert sum(sizes) == 40 and max(sizes) <= 4 and max(sizes) > 1


def test_an_error_reaches_its_batch_only_and_the_worker_lives_on():
    def fn(items):
        if "bad" in items:
            raise ValueError("bad item")
        return items

    batcher = Batcher(fn, max_batch=1)
    try:
        with pytest.raises(ValueError, match="bad item"):
            batcher("bad")
        assert batcher("good") == "good"
    finally:
        batcher.close()


def test_two_workers_run_two_batches_at_once():
    barrier = threading.Barrier(2, timeout=5)

    def fn(items):
        barrier.wait()  # returns only when a second batch is running at the same time
        return items

    batcher = Batcher(fn, max_batch=1, workers=2)
    try:
        with ThreadPoolExecutor(2) as pool:
            assert sorted(pool.map(batcher, ["a", "b"])) == ["a", "b"]
    finally:
        batcher.close()
    one = Batcher(fn, max_batch=1, workers=1)
    try:
        barrier.reset()
        with pytest.raises(threading.BrokenBarrierError):
            one("alone")
    finally:
        one.close()


def test_calls_after_close_are_refused_and_queued_ones_finish():
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        return items

    batcher = Batcher(fn, max_batch=1)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(batcher, 1), pool.submit(batcher, 2)
        closer = threading.Thread(target=batcher.close)
        closer.start()
        gate.set()
        closer.join(10)
        assert (first.result(5), second.result(5)) == (1, 2)
    with pytest.raises(Closing):
        batcher(3)


def test_a_model_that_loses_results_fails_its_callers():
    batcher = Batcher(lambda items: items[:-1], max_batch=1)
    try:
        with pytest.raises(RuntimeError, match="0 results for 1 inputs"):
            batcher("x")
    finally:
        batcher.close()


def test_model_workers_auto_is_a_few_on_cpu_and_one_on_a_gpu(monkeypatch):
    import fashionlens.serving.config as config
    from fashionlens.serving.config import ServeConfig

    for cores, expect in ((1, 1), (2, 2), (3, 3), (5, 1), (6, 3), (8, 4), (16, 4)):  # workers divide the cores
        monkeypatch.setattr(config, "usable_cores", lambda cores=cores: cores)
        assert ServeConfig().resolved_model_workers() == expect
        assert ServeConfig(device="cpu:0").resolved_model_workers() == expect
        assert ServeConfig(device="cuda:1").resolved_model_workers() == 1
        assert ServeConfig(model_workers=5).resolved_model_workers() == 5  # as given
    assert ServeConfig(model_workers="2").model_workers == 2 and ServeConfig(model_workers=" AUTO").model_workers == "auto"
    for bad in (0, 65, "many", True, 2.5):
        with pytest.raises(ValueError, match="model_workers must be 'auto' or a whole number"):
            ServeConfig(model_workers=bad)
    assert config.usable_cores() >= 1


def test_max_batch_is_shared_evenly_among_the_model_workers():
    from fashionlens.serving.config import ServeConfig

    for max_batch, workers, expect in ((8, 1, 8), (8, 2, 4), (7, 2, 4), (8, 3, 3), (2, 4, 1), (1, 1, 1)):
        cfg = ServeConfig(max_batch=max_batch, model_workers=workers)
        assert cfg.worker_batch() == expect == cfg.worker_batch(workers)
    for max_batch in range(1, 21):  # the smallest even share that covers max_batch
        for workers in range(1, 6):
            share = ServeConfig(max_batch=max_batch, model_workers=workers).worker_batch()
            assert share * workers >= max_batch > (share - 1) * workers and share >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_model_threads_run_at_a_lower_priority_than_the_callers():
    import os

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = priority()
    batcher = Batcher(lambda items: [priority() for _ in items], max_batch=2, nice=5)
    try:
        assert batcher(None) == min(19, mine + 5)
    finally:
        batcher.close()
    assert priority() == mine  # the caller's own thread is untouched
    plain = Batcher(lambda items: [priority() for _ in items])
    try:
        assert plain(None) == mine
    finally:
        plain.close()
