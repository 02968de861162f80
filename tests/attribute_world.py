"""A small real index with attributes whose predictions are known (see ``build_attribute_world``).

Used by the explained-search and the web-service tests.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fashionlens.index.config import IndexAttributesConfig, IndexConfig
from fashionlens.index.attribute_indexing import index_attributes

SCHEMA = {"sleeve_length_labels": ["short sleeves", "long sleeves"], "neckline_labels": ["v-shape", "round", "other"],
          "colour_labels": ["black", "white"], "collar_labels": ["no", "yes"], "pattern_labels": ["solid", "striped"]}
N = 12  # drawn items; item-12 is the large JPEG (red)
RED = {f"item-{i:02d}" for i in range(0, N, 2)} | {"item-12"}


def draw(path: Path, i: int, size=(48, 48)) -> None:
    arr = np.full((size[1], size[0], 3), 235, np.uint8)
    colour = (200 + i, 20, 30) if i % 2 == 0 else (20, 40, 200 + i)
    w, h = size
    x0, y0 = (i * 3) % (w // 4), (i * 5) % (h // 4)
    arr[y0 + h // 8: h - h // 8, x0 + w // 6: w - w // 6 + x0 // 2] = colour
    if i % 3 == 0:
        arr[::6] = 235  # stripes
    Image.fromarray(arr).save(path, quality=95)


def _checkpoint(folder: Path, model, cfg) -> Path:
    from fashionlens.models.checkpoints import save_checkpoint

    extra = {"kind": "attributes", "loss": "sigmoid", "threshold": 0.6,
             "config": {"data": "unused", "model": cfg.model_dump(mode="json")}}
    return save_checkpoint(folder, model, cfg, extra)


def _set_heads(model, feats: np.ndarray, red: np.ndarray) -> None:
    """Heads whose predictions are known (see the module docstring)."""
    f = torch.from_numpy(feats)
    u = f.mean(0) / f.mean(0).square().sum()  # u . f ~ 1
    d = f[red].mean(0) - f[~red].mean(0)
    mid = (f[red].mean(0) + f[~red].mean(0)) / 2
    s = 6.0 / float(((f - mid) @ d).abs().min())
    side = [(s * d, -s * float(d @ mid)), (-s * d, s * float(d @ mid))]
    zero = torch.zeros_like(u)
    rows = {"sleeve_length_labels": [(-u, -2.0), (u, 2.0)], "neckline_labels": [*side, (zero, -6.0)],
            "colour_labels": side, "collar_labels": [(-u, -1.0), (u, 1.0)], "pattern_labels": [(zero, -1.0)] * 2}
    with torch.no_grad():
        for head, name in zip(model.attr_head.heads, SCHEMA):
            head.weight.copy_(torch.stack([w for w, _ in rows[name]]))
            head.bias.copy_(torch.tensor([b for _, b in rows[name]]))


def build_attribute_world(root: Path) -> dict:
    """12 drawn garments + one large JPEG indexed with the embedded Lite0 at 64 px, and a tiny
    attribute checkpoint whose heads are set by hand, so that every prediction is known: red
    garments have a v-shape neckline and are black, blue ones a round neckline and are white,
    every garment has long sleeves and a collar, and the pattern is never confident."""
    from fashionlens.data.images import open_image
    from fashionlens.index.pipeline import build_index
    from fashionlens.models.builder import ModelConfig, build_model
    from fashionlens.models.embedder import build_embedder

    torch.set_num_threads(1)
    (root / "images").mkdir()
    rows = []
    for i in range(N + 1):
        path = root / "images" / f"item-{i:02d}.jpg"
        draw(path, i, (400, 300) if i == N else (48, 48))
        rows.append([f"item-{i:02d}", str(path), "Tops"])
    with open(root / "catalog.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "path", "articleType"], *rows])
    build_index(root / "catalog.csv", root / "index", IndexConfig(input_size=64, workers=0, batch_size=8),
                embedder=build_embedder("lite0", 64, optimize="none"))
    cfg = ModelConfig(backbone="lite0", input_size=64, neck={"type": "gap", "normalize": False}, attributes=SCHEMA)
    model, _ = build_model(cfg)
    model.eval()
    from fashionlens.data.transforms import Preprocess

    pre = Preprocess(64, model.data_config["mean"], model.data_config["std"])
    with torch.no_grad():
        x = torch.stack([pre(open_image(p, draft_size=64)) for _, p, _ in rows])
        feats = model(x)["embedding"].numpy()
    _set_heads(model, feats, np.array([r[0] in RED for r in rows]))
    ckpt, other = _checkpoint(root / "ckpt", model, cfg), _checkpoint(root / "other", model, cfg)
    index_attributes(root / "index", ckpt, IndexAttributesConfig(batch_size=5))
    return {"root": root, "index": root / "index", "ckpt": ckpt, "other": other, "rows": rows}


