"""``make_embed``: a model's outputs for a list of photos, from cached maps or from images, in
eval mode; what validation, mining and the benchmarks embed with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fashionlens.data.loader import decode_batches
from fashionlens.data.transforms import Preprocess
from fashionlens.training.feature_cache import FeatureCache


def make_embed(model, device: str, cache: FeatureCache | None, preprocess: Preprocess | None,
               batch_size: int = 64, workers: int = 0, key: str = "embedding", dim: int | None = None,
               flip: bool = False) -> Callable[[Sequence[Path]], torch.Tensor]:
    """``embed(paths) -> (N, D)``: the model's output ``key`` (default the embedding; e.g.
    ``"attr_logits"`` with its width ``dim``) in eval mode, from cached maps or from images
    (decoded in ``workers`` processes). The row of an image that is not in the cache or cannot
    be decoded is NaN, so that validation can leave it out instead of mixing it up with another.
    ``flip``: the mean output of each image and its mirror image (test-time augmentation; from
    images only, a cached map has no mirror)."""
    width = dim if dim is not None else (model.embedding_dim or 0)
    if flip and cache is not None:
        raise ValueError("flip needs images, not cached feature maps")

    def run(x: torch.Tensor, from_map: bool) -> torch.Tensor:
        if key == "embedding" and not from_map:
            return model.embed(x)  # the neck alone: no heads computed
        return model(x, from_map=from_map)[key]

    @torch.no_grad()
    def embed(paths: Sequence[Path]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out = torch.full((len(paths), width), float("nan"))
        try:
            if cache is not None:
                located = [(i, loc) for i, loc in enumerate(map(cache.locate, paths)) if loc is not None]
                for start in range(0, len(located), 4 * batch_size):
                    chunk = located[start:start + 4 * batch_size]
                    maps = torch.stack([cache.load(loc) for _, loc in chunk]).to(device)
                    out[[i for i, _ in chunk]] = run(maps, True).float().cpu()
            else:
                pairs = [(i, str(p)) for i, p in enumerate(paths)]
                for keys, batch, _errors, _ in decode_batches(pairs, preprocess, batch_size, workers):
                    if batch is not None:
                        batch = batch.to(device)
                        y = run(batch, False).float()
                        if flip:
                            y = (y + run(batch.flip(-1), False).float()) / 2
                        out[keys] = y.cpu()
        finally:
            model.train(was_training)
        return out

    return embed
