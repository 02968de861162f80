"""Explaining a garment's attributes (docs/METHODS.md, attributes): value, confidence, where, and
its feature.

For each photo and attribute of an attribute classifier (``fashionlens train-attributes``):

1. the predicted value (argmax of the attribute's scores) and its confidence;
2. Grad-CAM of that value's logit on the last feature map (:mod:`fashionlens.explain.cam`;
   the closed form for the model's linear heads on the average-pooled map, or the ``grad-cam``
   library with ``method="gradcam"``: the same maps);
3. the box of the CAM's largest region above ``box_threshold`` of its peak;
4. RoI max pooling of the last feature map in the box to 7 x 7, and its mean over the cells
   (L2-normalised): the attribute's feature, which search compares between garments.

Boxes and maps are computed on the letterboxed model input and given back in the photo's own
pixels (:class:`~fashionlens.data.transforms.Letterbox` undoes the letterbox).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from fashionlens.data.transforms import Letterbox, Preprocess
from fashionlens.explain.cam import grad_cams, largest_region_box, linear_gap_cams, pooled_vector, roi_features
from fashionlens.explain.wording import phrase
from fashionlens.losses.classification import probabilities
from fashionlens.models.backbones import backbone_stages
from fashionlens.models.runtimes import prepare


@dataclass
class AttributeResult:
    attribute: str
    value: str
    index: int
    confidence: float
    scores: dict[str, float]
    box: tuple[int, int, int, int] | None  # photo pixels
    input_box: tuple[int, int, int, int] | None  # model input pixels
    phrase: str
    cam: np.ndarray | None = field(default=None, repr=False)  # (size, size) input map in [0, 1]
    feature: np.ndarray | None = field(default=None, repr=False)  # (C,) pooled RoI feature

    def to_json(self) -> dict:
        return {"attribute": self.attribute, "value": self.value, "confidence": round(self.confidence, 4),
                "scores": {k: round(v, 4) for k, v in self.scores.items()}, "phrase": self.phrase,
                "box": list(self.box) if self.box else None}


class AttributeExplainer:
    """Predicted attributes with their CAMs, boxes and RoI features for batches of photos."""

    def __init__(self, model, mode: str = "sigmoid", box_threshold: float = 0.5, method: str = "auto",
                 device: str = "cpu", roi_size: int = 7):
        if method not in ("auto", "gradcam"):
            raise ValueError(f"method must be auto or gradcam, got {method!r}")
        self.model = model.to(device).eval()
        self.mode, self.box_threshold, self.method, self.device, self.roi_size = (
            mode, box_threshold, method, device, roi_size)
        head = model.attr_head
        self.schema, self.slices = head.schema, head.slices
        self.weight = head.weight.detach()
        self.size = int(model.data_config["input_size"][-1])
        self.preprocess = Preprocess(self.size, model.data_config["mean"], model.data_config["std"])
        self.target_layer = backbone_stages(model.backbone)[-1][1]
        self._eager = _LogitsAndMap(self.model)
        self._fast = None  # the traced forward pass (optimize)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.slices, self.mode)

    def cams(self, x: torch.Tensor, feature_map: torch.Tensor, columns: list[list[int]]) -> np.ndarray:
        """(N, A, size, size) maps of ``columns[n][a]`` for each image n."""
        if self.method == "auto":
            return np.stack([linear_gap_cams(feature_map[n:n + 1], self.weight, cols, (self.size, self.size))[0]
                             for n, cols in enumerate(columns)])
        per_attribute = [grad_cams(_Logits(self), self.target_layer, x, [cols[a] for cols in columns])
                         for a in range(len(columns[0]))]
        return np.stack(per_attribute, axis=1)

    @property
    def concurrent(self) -> bool:
        """Whether several threads may call :meth:`explain` at once: the closed-form CAMs
        (``auto``) only run the model forward; Grad-CAM hooks the model for each call."""
        return self.method == "auto"

    def optimize(self, mode: str = "auto", batch_size: int = 4) -> str:
        """Run the forward pass with the runtime ``mode`` names (:mod:`fashionlens.models.runtimes`:
        ``jit`` traces and freezes it with TorchScript; ``auto``: on CPU), as
        :meth:`Embedder.optimize <fashionlens.models.embedder.Embedder.optimize>` does; checked
        against the eager model, kept eager if it differs. Grad-CAM still hooks the eager model.
        Returns the runtime used."""
        probe = torch.randn(batch_size, 3, self.size, self.size, device=self.device)
        fast, used = prepare(self._eager, mode, probe)
        self._fast = None if used == "none" else fast
        return used

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tmap = (self._eager if self._fast is None else self._fast)(x)
        return logits.float(), tmap.float()

    def explain(self, images: Sequence[Image.Image], attributes: Sequence[str] | None = None,
                with_cams: bool = True) -> list[list[AttributeResult]]:
        """Per image, one :class:`AttributeResult` per attribute (schema order, or ``attributes``)."""
        names = list(attributes) if attributes else list(self.schema)
        x = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        logits, tmap = self._forward(x)
        probs = self.scores(logits).cpu()
        picked = [[self.slices[a].start + int(probs[n, self.slices[a]].argmax()) for a in names]
                  for n in range(len(images))]
        maps = self.cams(x, tmap, picked) if with_cams else None
        results = []
        for n, img in enumerate(images):
            geometry = Letterbox(img.width, img.height, self.size)
            boxes = [largest_region_box(maps[n, a], self.box_threshold) if maps is not None else None
                     for a in range(len(names))]
            features = self._features(tmap[n:n + 1], boxes)
            row = []
            for a, name in enumerate(names):
                values, s = self.schema[name], self.slices[name]
                index = picked[n][a] - s.start
                row.append(AttributeResult(
                    name, values[index], index, float(probs[n, picked[n][a]]),
                    {v: float(p) for v, p in zip(values, probs[n, s].tolist())},
                    geometry.box_to_photo(boxes[a]) if boxes[a] else None, boxes[a],
                    phrase(name, values[index], values), maps[n, a] if maps is not None else None,
                    features[a]))
            results.append(row)
        return results

    def _features(self, tmap: torch.Tensor, boxes: list) -> list[np.ndarray | None]:
        """Pooled RoI features of one image's boxes (None where there is no box)."""
        have = [i for i, b in enumerate(boxes) if b is not None]
        out: list[np.ndarray | None] = [None] * len(boxes)
        if have:
            rois = torch.tensor([boxes[i] for i in have], dtype=torch.float32, device=tmap.device)
            vectors = pooled_vector(roi_features(tmap, rois, None, (self.size, self.size), self.roi_size))
            for i, v in zip(have, vectors.cpu().numpy()):
                out[i] = v
        return out


class _Logits(torch.nn.Module):
    """The model as Grad-CAM wants it: images -> logits."""

    def __init__(self, explainer: AttributeExplainer):
        super().__init__()
        self.net = explainer.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["attr_logits"]


class _LogitsAndMap(torch.nn.Module):
    """The model as a traceable function: images -> (attribute logits, final feature map)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x, return_map=True)
        return out["attr_logits"], out["feature_map"]
