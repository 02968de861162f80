"""Training speed: images per second of the training step (decode + augment + forward +
backward + optimizer step) for a training config, without validation or checkpoints.

    python benchmarks/train_throughput.py configs/train-cpu.yaml [--batches 20] [--set key=value ...]

It runs the trainer's own batches, forward pass and loss terms (``RetrievalTask``). With
``feature_cache`` in the config it measures the cached-map path instead (maps per second; a cache
not built yet is built first, untimed). The first ``--warmup`` batches are not timed.
"""

from __future__ import annotations

import argparse
import time

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    if args.batches < 1 or args.warmup < 0:
        parser.error("--batches must be >= 1 and --warmup >= 0")

    import torch

    from fashionlens.models.builder import build_model
    from fashionlens.training import load_train_config
    from fashionlens.training.engine import make_optimizer
    from fashionlens.training.retrieval_task import RetrievalTask

    cfg = load_train_config(args.config, args.sets)
    if cfg.ema is not None:
        raise SystemExit("this script's own training loop has no ema: --set ema=null")
    # the trainer's own batches, forward and loss terms (RetrievalTask), every identity trained, no validation
    cfg = cfg.model_copy(update={"val_fraction": 0.0, "val_queries": None, "val_mapping": None,
                                 "batches_per_epoch": args.batches + args.warmup})
    task = RetrievalTask(cfg)
    model, data_cfg = build_model(task.model_cfg)
    size = int(data_cfg["input_size"][-1])
    model.to(cfg.device).train()
    optimizer = make_optimizer(cfg, model)
    task.prepare(model, model, cfg.device, lambda event: None, 0, 1)
    cached = cfg.feature_cache is not None
    use_amp = cfg.amp and cfg.device.startswith("cuda")
    n_images, t0 = 0, time.perf_counter()
    for i, batch in enumerate(task.batches(1)):
        if i == args.warmup:
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            n_images, t0 = 0, time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            outputs, context = task.forward(model, batch)
        loss, _, images = task.loss(outputs, context)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n_images += images
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    emit({"benchmark": "train_throughput", "config": args.config, "sets": args.sets,
          "input": "cached feature maps" if cached else f"images {size} px",
          "batch": cfg.identities_per_batch * cfg.images_per_identity, "batches": args.batches, "seconds": round(seconds, 2),
          "images_per_second": round(n_images / seconds, 2), "device": cfg.device, "workers": cfg.workers})


if __name__ == "__main__":
    main()
