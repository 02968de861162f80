"""Training speed: images per second of the training step (decode + augment + forward +
backward + optimizer step) for a training config, without validation or checkpoints.

    python benchmarks/train_throughput.py configs/train-cpu.yaml [--batches 20] [--set key=value ...]

With ``feature_cache`` in the config it measures the cached-map path instead (maps per second;
the cache must exist). The first ``--warmup`` batches are not timed.
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
    from torch.utils.data import DataLoader

    from fashionlens.data.sampler import PKSampler
    from fashionlens.losses import IdentityLoss
    from fashionlens.models.builder import build_model
    from fashionlens.training import load_train_config
    from fashionlens.training.identities import make_split
    from fashionlens.training.feature_cache import FeatureCache
    from fashionlens.training.engine import _optimizer
    from fashionlens.losses.classification import identity_terms
    from fashionlens.training.retrieval_task import train_dataset, triplet_loss_for

    cfg = load_train_config(args.config, args.sets)
    if cfg.ema is not None:
        raise SystemExit("this script's own training loop has no ema: --set ema=null")
    split = make_split(cfg.catalog, cfg.identity_columns, cfg.min_images_per_identity, 0.0, cfg.seed)
    model_cfg = cfg.model.model_copy(update={"num_identities": len(split.train_identities) if cfg.identity else None})
    model, data_cfg = build_model(model_cfg)
    size = int(data_cfg["input_size"][-1])
    model.to(cfg.device).train()
    cached = cfg.feature_cache is not None
    cache = FeatureCache.for_model(cfg.feature_cache, model_cfg, size) if cached else None
    dataset = train_dataset(cfg, split.train, cache, size, data_cfg["mean"], data_cfg["std"])
    sampler = PKSampler(dataset.labels, cfg.p, cfg.k, cfg.seed, args.batches + args.warmup)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers)
    optimizer = _optimizer(cfg, model)
    triplet = triplet_loss_for(cfg)
    id_loss = IdentityLoss()
    use_amp = cfg.amp and cfg.device.startswith("cuda")
    n_images, t0 = 0, time.perf_counter()
    for i, (x, labels) in enumerate(loader):
        if i == args.warmup:
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            n_images, t0 = 0, time.perf_counter()
        x, labels = x.to(cfg.device), labels.to(cfg.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = model(x, from_map=cached)
        loss = cfg.triplet * triplet(out["embedding"].float(), labels)
        if cfg.identity:
            loss = loss + cfg.identity * identity_terms(out, labels, id_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n_images += len(labels)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    emit({"benchmark": "train_throughput", "config": args.config, "sets": args.sets,
          "input": "cached feature maps" if cached else f"images {size} px",
          "batch": cfg.p * cfg.k, "batches": args.batches, "seconds": round(seconds, 2),
          "images_per_second": round(n_images / seconds, 2), "device": cfg.device, "workers": cfg.workers})


if __name__ == "__main__":
    main()
