"""Per-attribute metrics of a multi-head attribute classifier (docs/METHODS.md, attributes).

Inputs are what the classifier and :func:`fashionlens.data.fashionai.attribute_table` give:
``logits`` (N, total values) with the attributes' columns side by side (``slices``),
``targets`` of the same shape (1 = y, 0 = n, NaN = m), and ``mask`` (N, n attributes), True
where the image is labeled for the attribute. Only labeled (image, attribute) pairs count.

Per attribute:

* ``loss``: the training loss (sigmoid: binary cross-entropy per value, averaged over the
  values that are not ``m``; softmax: cross-entropy of the ``y`` value);
* ``accuracy``: the argmax of the attribute's scores is its ``y`` value;
* ``precision@t`` (the attribute method's, t = 0.6): of the values scored at least ``t`` (sigmoid or softmax
  probability), the share that are ``y``; ``coverage@t``: the share of images with such a value;
* ``mAP``: per value, the average precision of ranking the labeled images by that value's
  score (relevant = ``y``), averaged over the values with at least one ``y``;
* ``images``: the labeled images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fashionlens.evaluation.metrics import average_precision_at_k
from fashionlens.losses.classification import pair_losses, probabilities


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float | None:
    """AP of ranking by ``scores`` (descending, stable) with ``relevant`` the hits; None without hits."""
    n_relevant = int(relevant.sum())
    if n_relevant == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    return average_precision_at_k(relevant[order].tolist(), n_relevant, len(order))


def attribute_metrics(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      slices: Mapping[str, slice], mode: str = "sigmoid", threshold: float = 0.6) -> dict:
    """``{"attributes": {name: {...}}, "mean": {...}}`` (see the module docstring). The mean is
    over the attributes with labeled images, each attribute counting once."""
    logits, targets = logits.float().cpu(), targets.float().cpu()
    mask = mask.bool().cpu()
    probs = probabilities(logits, slices, mode)
    per: dict[str, dict] = {}
    for a, (name, sl) in enumerate(slices.items()):
        rows = mask[:, a]
        n = int(rows.sum())
        if n == 0:
            continue
        x, t, p = logits[rows, sl], targets[rows, sl], probs[rows, sl].numpy()
        yes = (t == 1).numpy()
        loss = float(pair_losses(x, t, mode).mean())
        has_y = yes.any(1)
        accuracy = float((yes[np.arange(n), p.argmax(1)] & has_y).sum() / max(has_y.sum(), 1))
        confident = p >= threshold
        known = ~np.isnan(t.numpy())
        picked = confident & known
        precision = float((picked & yes).sum() / picked.sum()) if picked.any() else None
        aps = [average_precision(p[known[:, v], v], yes[known[:, v], v]) for v in range(p.shape[1])]
        aps = [ap for ap in aps if ap is not None]
        per[name] = {"images": n, "loss": loss, "accuracy": accuracy,
                     f"precision@{threshold:g}": precision,
                     f"coverage@{threshold:g}": float(confident.any(1).mean()),
                     "mAP": float(np.mean(aps)) if aps else None}
    keys = ["loss", "accuracy", f"precision@{threshold:g}", f"coverage@{threshold:g}", "mAP"]
    mean = {}
    for key in keys:
        values = [m[key] for m in per.values() if m[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
    return {"attributes": per, "mean": mean}


def mean_over(metrics: dict, names: list[str], key: str = "accuracy") -> float | None:
    """Mean of ``key`` over the attributes in ``names`` that were measured."""
    values = [metrics["attributes"][n][key] for n in names
              if n in metrics["attributes"] and metrics["attributes"][n][key] is not None]
    return float(np.mean(values)) if values else None


def metrics_table(metrics: dict) -> list[list[str]]:
    """Rows of a text table: attribute, images, loss, accuracy, precision, coverage, mAP."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    header = ["attribute", "images", "loss", "accuracy"]
    keys = [k for k in next(iter(metrics["attributes"].values()), {}) if k.startswith(("precision", "coverage"))]
    header += keys + ["mAP"]
    rows = [header]
    for name, m in metrics["attributes"].items():
        rows.append([name, str(m["images"]), fmt(m["loss"]), fmt(m["accuracy"])] + [fmt(m[k]) for k in keys]
                    + [fmt(m["mAP"])])
    rows.append(["mean", "", fmt(metrics["mean"]["loss"]), fmt(metrics["mean"]["accuracy"])]
                + [fmt(metrics["mean"][k]) for k in keys] + [fmt(metrics["mean"]["mAP"])])
    return rows
