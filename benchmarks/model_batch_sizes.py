"""The embedding model's forward alone on ready tensors, per batch size (photos/s, CPU ms a photo).

No decoding, no letterboxing: what the server's model thread does with a batch. Batch sizes are
interleaved over ``--rounds`` rounds, so that a drift of the machine's speed shows as spread.

    python benchmarks/model_batch_sizes.py [--model lite0] [--sizes 1 2 4 8 16] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=8.0, help="per batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from fashionlens.models.embedder import build_embedder

    embedder = build_embedder(args.model)
    size = embedder.preprocess.size
    x = torch.randn(max(args.sizes), 3, size, size)  # plain NCHW, as the server stacks its photos
    for b in args.sizes:  # warm-up: the first call of each shape is slower
        embedder.embed_tensors(x[:b])
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for b in args.sizes:
            n, start, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < args.seconds:
                embedder.embed_tensors(x[:b])
                n += b
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            row[b] = {"photos_per_s": round(n / wall, 1), "cpu_ms_per_photo": round(cpu / n * 1000, 1)}
        rounds.append(row)
    emit({"benchmark": "model_batch_sizes", "model": embedder.describe(), "input_size": size, "rounds": rounds})


if __name__ == "__main__":
    main()
