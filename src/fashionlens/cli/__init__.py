"""The ``fashionlens`` command: one module per command group (:mod:`.catalog`, :mod:`.evaluate`,
:mod:`.train`, :mod:`.attributes`, :mod:`.serve`), what they show in :mod:`.console`, and the
application that registers them in :mod:`.app`. The command modules hold no library logic: they
read options, call the stages' functions and print."""

from __future__ import annotations

import os
import sys

if sys.argv[1:2] == ["serve"]:
    # Before torch loads its OpenMP runtime: idle model threads sleep instead of spinning, so the
    # request threads get the cores between batches (a third less CPU per search, measured in
    # docs/experiments/serving.md). Set OMP_WAIT_POLICY yourself to choose otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # numpy's OpenBLAS would start a pool of its own for a matrix product in a request or model
    # thread, and its idle threads spin: 17 ms of CPU a search when IVF-PQ's re-scoring used numpy
    # (docs/experiments, serving). The server parallelises over requests.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from fashionlens.cli.app import app, main  # noqa: E402 (after the environment above)

__all__ = ["app", "main"]
