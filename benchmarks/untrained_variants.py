"""Changes to the untrained embedded default that need no training, on buyers' photos.

Issue 3 asks for +5 points top-1 over the untrained default on consumer photos; before training
anything, this measures what the cheap, training-free changes are worth: the pooling of the final
map, the input size, the scale of the garment in the query, centring each domain on its mean,
BatchNorm statistics recomputed per domain (AdaBN; the target photos' labels are never read),
linear maps fitted on the catalog's pooled features (PCA whitening, whitening within articleType,
the ImageNet classifier's logits), query / database-side expansion with nearest catalog items, and
test-time flipping (each photo's embedding averaged with its mirror image's; also for the trained
models given with ``--checkpoint``), and the pooled maps of the backbone's middle stages.
Every row: consumer ``validation/`` -> the whole catalog, hit = a listed articleType, exactly as
the trainer's ``query_top*`` (``QueryValidation``); ``test/`` is never touched.

    python benchmarks/untrained_variants.py configs/recipe-cached-cpu.yaml \
        [--cache320 runs/cache-lite0-320] [--only pooling size zoom centring adabn projection expansion flip layers]
        [--checkpoint runs/recipe-cached/best]

Catalog and query maps come from the feature caches (built on first use: ~4 min at 224 px, ~12
at 320 px here); query zoom and AdaBN run the backbone on the photos.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import emit
from PIL import Image

GROUPS = ("pooling", "size", "zoom", "centring", "adabn", "projection", "expansion", "flip", "layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a cached-training config (its catalog, val_queries, feature_cache)")
    parser.add_argument("--cache320", default="runs/cache-lite0-320", help="feature cache at 320 px")
    parser.add_argument("--target", default="../shared/data/consumer/train", help="unlabeled target photos")
    parser.add_argument("--sample", type=int, default=1024, help="photos per domain for means and BatchNorm statistics")
    parser.add_argument("--only", nargs="*", choices=GROUPS, help="groups of rows (default: all)")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="trained models for the flip rows")
    args = parser.parse_args()

    from fashionlens.data.catalog import Missing, open_catalog
    from fashionlens.data.transforms import Preprocess, letterbox
    from fashionlens.data.loader import decode_batches
    from fashionlens.models.builder import build_model
    from fashionlens.training import load_train_config
    from fashionlens.training.feature_cache import FeatureCache
    from fashionlens.training.model_outputs import make_embed
    from fashionlens.training.validation import QueryValidation

    torch.manual_seed(0)
    cfg = load_train_config(args.config, [])
    q = QueryValidation.load(cfg.val_queries, cfg.val_mapping, cfg.catalog, cfg.val_field)
    is_query = set(map(str, q.query_paths)).__contains__
    model, data_cfg = build_model(cfg.model.model_copy(update={"neck": {"type": "gap"}, "num_identities": None}))
    model.eval()
    size = int(data_cfg["input_size"][-1])
    pre = Preprocess(size, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
    caches = {size: FeatureCache.for_model(cfg.feature_cache, cfg.model, size)}
    caches[size].ensure(q.all_paths())
    rng = np.random.default_rng(0)
    target = sorted(Path(it.path) for it in open_catalog(Path(args.target)) if not isinstance(it, Missing))
    target = [target[i] for i in sorted(rng.permutation(len(target))[:args.sample])]
    catalog_sample = [q.gallery_paths[i] for i in sorted(rng.permutation(len(q.gallery_paths))[:args.sample])]

    def pooled(cache, paths, pool) -> torch.Tensor:
        return torch.cat([pool(torch.stack([cache.load(cache.locate(p)) for p in paths[s:s + 512]]).float())
                          for s in range(0, len(paths), 512)])

    def gap(t):
        return t.mean((2, 3))

    def gem(p):
        return lambda t: t.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1 / p)

    def row(query: Callable, gallery: Callable) -> dict:
        return q.evaluate(lambda paths: F.normalize(query(paths) if is_query(str(paths[0])) else gallery(paths), dim=1))

    def forward(m, paths, prep=pre) -> torch.Tensor:
        return make_embed(m, "cpu", None, prep)(paths)  # NaN rows (left out) for unreadable photos

    rows: dict[str, dict] = {}

    def record(name: str, result: dict) -> None:
        rows[name] = result
        print(name, result, file=sys.stderr, flush=True)

    groups = args.only or GROUPS
    cached_gap = lambda paths: pooled(caches[size], paths, gap)  # noqa: E731
    record("gap (the embedded default)", row(cached_gap, cached_gap))
    if "pooling" in groups:
        pools = {"max": lambda t: t.amax((2, 3)), "gem p=1.5": gem(1.5), "gem p=2": gem(2), "gem p=3": gem(3)}
        for name, pool in pools.items():
            fn = lambda paths, pool=pool: pooled(caches[size], paths, pool)  # noqa: E731
            record(f"pooling: {name}", row(fn, fn))
    if "size" in groups:
        caches[320] = FeatureCache.for_model(args.cache320, cfg.model, 320)
        caches[320].ensure(q.all_paths())
        at = {s: (lambda paths, s=s: pooled(caches[s], paths, gap)) for s in (size, 320)}
        record("size: queries and catalog 320 px", row(at[320], at[320]))
        record(f"size: queries {size}, catalog 320 px", row(at[size], at[320]))
        record(f"size: queries 320, catalog {size} px", row(at[320], at[size]))
    if "zoom" in groups:
        # The garment fills a buyer's photo but not a catalog photo (worn by a model): shrink
        # the query inside the canvas so the garment's scale comes nearer the catalog's.
        class Shrunk(Preprocess):
            def __init__(self, side: int):
                super().__init__(size, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
                self.side = side

            def __call__(self, img):
                canvas = Image.new("RGB", (self.size, self.size))
                canvas.paste(letterbox(img, self.side), ((self.size - self.side) // 2,) * 2)
                return super().__call__(canvas)  # the letterbox of a square canvas is the canvas
        for side in (192, 160):
            record(f"zoom: query shrunk to {side} of {size} px",
                   row(lambda paths, s=side: forward(model, paths, Shrunk(s)), cached_gap))
    if "centring" in groups:
        caches[size].ensure(target)
        mu_catalog = pooled(caches[size], catalog_sample, gap).mean(0)
        mu_target = pooled(caches[size], target, gap).mean(0)
        record("centring: both on the catalog's mean",
               row(lambda p: cached_gap(p) - mu_catalog, lambda p: cached_gap(p) - mu_catalog))
        record("centring: each domain on its own mean (queries: unlabeled consumer train/)",
               row(lambda p: cached_gap(p) - mu_target, lambda p: cached_gap(p) - mu_catalog))
    if "adabn" in groups:
        @torch.no_grad()
        def recalibrated(paths) -> torch.nn.Module:
            m = copy.deepcopy(model).eval()  # dropout and drop-path stay off
            for bn in (b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)):
                bn.reset_running_stats()
                bn.momentum = None  # cumulative mean over every batch
                bn.train()
            for _, batch, _, _ in decode_batches(list(enumerate(map(str, paths))), pre, 64, 0):
                if batch is not None:
                    m(batch)
            return m.eval()
        queries = forward(recalibrated(target), q.query_paths)  # used by both rows below
        record("adabn: queries with the target's BatchNorm statistics, catalog ImageNet's",
               row(lambda p: queries, cached_gap))
        on_catalog = recalibrated(catalog_sample)
        gallery = dict(zip(map(str, q.gallery_paths), forward(on_catalog, q.gallery_paths)))
        record("adabn: each domain with its own BatchNorm statistics",
               row(lambda p: queries, lambda p: torch.stack([gallery[str(x)] for x in p])))
        # How far the catalog's own statistics move a catalog photo's embedding (cosine with
        # its embedding under ImageNet's statistics), against two different catalog photos.
        before = F.normalize(cached_gap(catalog_sample), dim=1)
        after = torch.stack([gallery[str(p)] for p in catalog_sample])
        rows["adabn: cosine of a catalog photo's embeddings, catalog vs ImageNet statistics"] = round(
            float((before * after).sum(1).mean()), 4)
        rows["cosine of two different catalog photos, ImageNet statistics"] = round(
            float((before @ before.T).fill_diagonal_(float("nan")).nanmean()), 4)
    if "flip" in groups:
        from fashionlens.models.checkpoints import load_checkpoint

        trained = {"the embedded default": (model, pre)}
        for ckpt in args.checkpoint:
            net, net_cfg, _ = load_checkpoint(ckpt, "cpu")
            dc = net.data_config  # the checkpoint's own input size, as `fashionlens index --model` uses
            side = int(net_cfg.input_size or dc["input_size"][-1])
            trained[ckpt] = (net.eval(), Preprocess(side, tuple(dc["mean"]), tuple(dc["std"])))
        for name, (net, prep) in trained.items():
            for flip in (False, True):
                fn = make_embed(net, "cpu", None, prep, flip=flip)
                record(f"flip: {name}, {'mean with the mirror image' if flip else 'as is'} (from images)", row(fn, fn))
    if "layers" in groups:
        layer_rows(model, pre, q, row, record)
    if "projection" in groups or "expansion" in groups:
        linear_and_expansion(q, pooled(caches[size], q.gallery_paths, gap), cached_gap, row, record, groups,
                             cfg.model.backbone)
    emit({"benchmark": "untrained_variants", "config": args.config, "sample": args.sample, "rows": rows})


@torch.no_grad()
def layer_rows(model, pre, q, row: Callable, record: Callable) -> None:
    """Rows on the pooled maps of the backbone's middle stages, alone and each L2-normalised and
    concatenated to the final pooled feature: mid-level features (parts, textures) may carry
    across domains better than the last, most ImageNet-specific ones."""
    from fashionlens.data.loader import decode_batches

    taps = ("blocks.3", "blocks.4", "blocks.5", "blocks.6")
    modules = dict(model.backbone.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[t].register_forward_hook(lambda m, i, o, t=t: seen.__setitem__(t, o.mean((2, 3))))
             for t in taps]
    feats: dict[str, dict[str, torch.Tensor]] = {t: {} for t in taps + ("final",)}
    paths = list(map(str, q.all_paths()))
    try:
        for keys, batch, _, _ in decode_batches(list(zip(paths, paths)), pre, 64, 1):
            if batch is None:
                continue
            final = model.backbone.forward_features(batch).mean((2, 3))
            for t, out in list(seen.items()) + [("final", final)]:
                feats[t].update(zip(keys, out))
    finally:
        for h in hooks:
            h.remove()

    missing = {t: torch.full_like(next(iter(f.values())), float("nan")) for t, f in feats.items()}  # unreadable

    def embed(parts: tuple[str, ...]) -> Callable:
        def fn(ps):
            return torch.cat([F.normalize(torch.stack([feats[t].get(str(p), missing[t]) for p in ps]), dim=1)
                              for t in parts], dim=1)
        return fn
    for parts in [("final",), *[(t,) for t in taps], ("final", "blocks.6"), ("final", "blocks.5"),
                  ("final", "blocks.4"), ("final", "blocks.5", "blocks.6"), ("final", "blocks.4", "blocks.5")]:
        record(f"layers: {' + '.join(parts)} (pooled, each L2-normalised)", row(embed(parts), embed(parts)))


def linear_and_expansion(q, gallery: torch.Tensor, cached_gap: Callable, row: Callable, record: Callable,
                         groups, backbone: str) -> None:
    """Rows on the pooled features: linear maps fitted on the catalog (``gallery``, its pooled
    maps in ``q.gallery_paths`` order) applied to both domains, and nearest-neighbour expansion."""
    at = {str(p): i for i, p in enumerate(q.gallery_paths)}
    mu = gallery.mean(0)
    if "projection" in groups:
        _, s, vh = torch.linalg.svd(gallery - mu, full_matrices=False)
        eig = s ** 2 / len(gallery)
        for dims, power in ((256, 0.25), (256, 0.5), (1280, 0.25)):
            proj = vh[:dims].T / eig[:dims] ** power
            fn = lambda paths, proj=proj: (cached_gap(paths) - mu) @ proj  # noqa: E731
            record(f"projection: PCA whitening fitted on the catalog, {dims} dims, eigenvalues^-{power}", row(fn, fn))
        labels = sorted(set(q.gallery_values))
        y = torch.tensor([labels.index(v) for v in q.gallery_values])
        means = torch.stack([gallery[y == c].mean(0) for c in range(len(labels))])
        within = gallery - means[y]
        cov = within.T @ within / len(within)
        cov = 0.5 * cov + 0.5 * cov.diagonal().mean() * torch.eye(len(cov))  # shrunk: 71 classes, 1,280 dims
        whiten = torch.linalg.cholesky(torch.linalg.inv(cov))
        fn = lambda paths: (cached_gap(paths) - mu) @ whiten  # noqa: E731
        record("projection: whitening within articleType, fitted on the catalog's labels", row(fn, fn))
        from fashionlens.models.backbones import offline_name, offline_weights_path

        if offline_name(backbone):  # the ImageNet classifier ships in the same state_dict
            state = torch.load(offline_weights_path(backbone), map_location="cpu", weights_only=True)
            w, b = state["_fc.weight"].float(), state["_fc.bias"].float()
            fn = lambda paths: cached_gap(paths) @ w.T + b  # noqa: E731
            record("projection: the ImageNet classifier's 1,000 logits", row(fn, fn))
    if "expansion" in groups:
        unit = F.normalize(gallery, dim=1)

        def expanded(k: int) -> Callable:  # average query expansion (Chum et al. 2007)
            def fn(paths):
                x = F.normalize(cached_gap(paths), dim=1)
                return x + unit[(x @ unit.T).topk(k, dim=1).indices].sum(1)
            return fn
        for k in (1, 3, 10):
            record(f"expansion: query + its {k} nearest catalog items", row(expanded(k), cached_gap))
        for k in (2, 3):  # database-side augmentation: each item + its k-1 nearest (itself first)
            near = torch.cat([(unit[s:s + 2048] @ unit.T).topk(k, dim=1).indices for s in range(0, len(unit), 2048)])
            augmented = unit[near].sum(1)
            fn = lambda paths, a=augmented: a[[at[str(p)] for p in paths]]  # noqa: E731
            record(f"expansion: each catalog item + its {k - 1} nearest catalog items (DBA)", row(cached_gap, fn))


if __name__ == "__main__":
    from fashionlens.errors import UserError

    try:
        main()
    except UserError as exc:  # a bad config or data folder: the message, not a traceback
        sys.exit(f"error: {exc}")
