"""Issue 3 experiment: the cached recipe plus a domain-adversarial loss (DANN) on unlabeled buyers' photos.

    python benchmarks/domain_adversarial.py configs/recipe-cached-cpu.yaml --set ema=null --weight 0.3 --features lan.embedding

The recipe's own loop on cached maps (triplet + identity on P x K catalog batches), and each step
also one batch of unlabeled target photos (consumer ``train/``, labels ignored) through the same
neck. A small discriminator (Linear-ReLU-Linear) tells catalog from target by ``--features`` (an
output of the model: ``embedding``, or one neck's, e.g. ``lan.embedding``) behind a gradient
reversal layer with DANN's schedule (lambda = 2 / (1 + exp(-10 p)) - 1 over the run's progress p),
so the neck learns features the discriminator cannot tell apart. ``--weight 0`` is the control
(the same loop without the domain loss: the target photos still pass through the neck, so its
BatchNorm layers normalise over both domains); ``--no-target`` leaves them out (the recipe itself). Validation only: consumer ``validation/`` -> catalog
each epoch; ``--save DIR`` keeps the best epoch's model. Prints JSON with every epoch's row.

An experiment, not a training option: the gradient reversal layer is written here because no
library we depend on has one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from _common import SHARED, emit
from fashionlens.data.catalog import iter_image_folder
from fashionlens.data.sampler import PKSampler
from fashionlens.data.transforms import Preprocess
from fashionlens.losses import Targets, WeightedSum, build_terms
from fashionlens.models.builder import build_model
from fashionlens.models.checkpoints import save_checkpoint
from fashionlens.training.config import load_train_config
from fashionlens.training.engine import make_optimizer, seed_epoch
from fashionlens.training.feature_cache import prepare_cache
from fashionlens.training.identities import split_for
from fashionlens.training.model_outputs import make_embed
from fashionlens.training.retrieval_task import train_dataset
from fashionlens.training.validation import QueryValidation


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times -lambda backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x, lam: float):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a cached-map training config, e.g. configs/recipe-cached-cpu.yaml")
    parser.add_argument("--weight", type=float, default=0.3, help="weight of the domain loss (0: the control)")
    parser.add_argument("--features", default="lan.embedding", help="the model output the discriminator sees")
    parser.add_argument("--target", default=str(SHARED / "consumer" / "train"), help="unlabeled target photos")
    parser.add_argument("--no-target", action="store_true", help="with --weight 0: no target photos in the batches "
                        "at all (the recipe itself; with them, the neck's BatchNorm sees both domains)")
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for fashionlens train")
    parser.add_argument("--save", help="write the best epoch's model here (a checkpoint folder for --model)")
    args = parser.parse_args()
    cfg = load_train_config(args.config, args.set)
    if cfg.ema is not None:
        raise SystemExit("this script's own training loop has no ema: --set ema=null")
    if not cfg.feature_cache or not cfg.val_queries:
        parser.error("the config needs feature_cache and val_queries")
    if args.no_target and args.weight > 0:
        parser.error("--no-target is the control without target photos: it needs --weight 0")
    device = cfg.device

    split = split_for(cfg)
    terms = build_terms(cfg.losses)
    model_update = {"num_identities": None}
    for _, term in terms.values():
        model_update.update(term.model_settings(len(split.train_identities)))
    model_cfg = cfg.model.model_copy(update=model_update)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(model_cfg)
    size, mean, std = int(model.data_config["input_size"][-1]), model.data_config["mean"], model.data_config["std"]
    queries = QueryValidation.load(cfg.val_queries, cfg.val_mapping, cfg.catalog, cfg.val_field)
    target = [item.path for item in iter_image_folder(Path(args.target))]
    needed = [p for p, _ in split.train] + queries.all_paths() + target
    cache = prepare_cache(cfg.feature_cache, model_cfg, size, needed, device, cfg.workers, lambda event: None)
    source_ds = train_dataset(cfg, split.train, cache, size, mean, std)
    target_ds = train_dataset(cfg, [(p, 0) for p in target], cache, size, mean, std)

    model.to(device).eval()  # the probe must not move the neck's BatchNorm statistics
    with torch.no_grad():
        probe = model(torch.stack([target_ds[0][0]] * 2).to(device), from_map=True)
    model.train()
    if args.features not in probe:
        parser.error(f"--features {args.features!r}: the model's outputs are {sorted(probe)}")
    width = probe[args.features].shape[1]
    disc = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(device)
    optimizer = make_optimizer(cfg, model)
    optimizer.add_param_group({"params": list(disc.parameters())})
    embed = make_embed(model, device, cache, Preprocess(size, mean, std))
    sampler = PKSampler(source_ds.labels, cfg.identities_per_batch, cfg.images_per_identity, cfg.seed,
                        cfg.batches_per_epoch)
    source = DataLoader(source_ds, batch_sampler=sampler)
    target_loader = DataLoader(target_ds, batch_size=cfg.identities_per_batch * cfg.images_per_identity,
                               shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    weighted = WeightedSum({**{name: weight for name, (weight, _) in terms.items()}, "domain": args.weight})

    rows, step, total = [], 0, cfg.epochs * len(sampler)
    targets = iter(target_loader)
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        seed_epoch(cfg.seed, epoch)
        sampler.set_epoch(epoch)
        accuracy, domain_loss = [], []
        for images, labels in source:
            try:
                target_maps, _ = next(targets)
            except StopIteration:
                targets = iter(target_loader)
                target_maps, _ = next(targets)
            if args.no_target:  # drawn all the same, so both controls use the same random numbers
                target_maps = target_maps[:0]
            images, labels, target_maps = images.to(device), labels.to(device), target_maps.to(device)
            n = len(labels)
            outputs = model(torch.cat([images, target_maps]), from_map=True)
            ours = {key: value[:n] for key, value in outputs.items()}
            batch_terms = {name: term(ours, Targets(labels, None, len(split.train_identities)))
                           for name, (_, term) in terms.items()}
            if args.weight > 0:
                lam = 2.0 / (1.0 + math.exp(-10.0 * step / total)) - 1.0
                logits = disc(GradientReversal.apply(outputs[args.features], lam)).squeeze(1)
                domain = torch.cat([torch.zeros(n), torch.ones(len(target_maps))]).to(device)
                batch_terms["domain"] = F.binary_cross_entropy_with_logits(logits, domain)
                accuracy.append(float(((logits > 0).float() == domain).float().mean()))
                domain_loss.append(float(batch_terms["domain"].detach()))
            loss, _ = weighted(batch_terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        row = {"epoch": epoch, **queries.evaluate(embed)}
        if accuracy:
            row["discriminator_accuracy"] = round(sum(accuracy) / len(accuracy), 3)
            row["domain_loss"] = round(sum(domain_loss) / len(domain_loss), 3)
        if args.save and row["query_top1"] > max((r["query_top1"] for r in rows), default=-1.0):
            save_checkpoint(args.save, model, model_cfg, {"epoch": epoch, "metrics": row, "data_config": model.data_config,
                                                          "train_identities": split.train_identities})
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: r["query_top1"])
    emit({"benchmark": "domain_adversarial", "config": args.config, "sets": args.set, "weight": args.weight,
          "no_target": args.no_target,
          "features": args.features, "target": args.target, "target_photos": len(target), "epochs": rows,
          "best_epoch": best["epoch"], "best_query_top1": best["query_top1"], "best_query_top4": best["query_top4"],
          "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
