"""Classification losses: identity (softmax) loss and multi-head attribute loss.

* :class:`IdentityLoss` - the retrieval method's ID loss, and the per-stripe identity classifiers of its
  multi-granularity split (point 6): a list of logits (one per stripe) is averaged.
* :class:`AttributeLoss` - the attribute method's per-attribute heads (and the retrieval method's
  "attribute loss"; both in docs/METHODS.md):
  all heads' logits side by side in one ``(N, total_values)`` tensor, ``slices`` saying
  which columns belong to which attribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fashionlens.losses.terms import LOSS_TERMS, LossTerm, Targets
from fashionlens.models.necks.base import IDENTITY_LOGITS


class IdentityLoss(nn.Module):
    """Softmax cross-entropy over identity logits; a list of logits gives the mean of their losses.

    Samples whose label is ``ignore_index`` (e.g. mined negatives without an identity class)
    are left out; if every sample is ignored the loss is 0 (attached to the graph).
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        heads = [logits] if isinstance(logits, Tensor) else list(logits)
        if not heads:
            raise ValueError("IdentityLoss needs at least one logits tensor")
        labels = torch.as_tensor(labels, device=heads[0].device).reshape(-1).long()
        if not bool((labels != self.ignore_index).any()):
            return sum(h.sum() for h in heads) * 0.0
        losses = [
            F.cross_entropy(h, labels, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index)
            for h in heads
        ]
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


def probabilities(logits: Tensor, slices: Mapping[str, slice], mode: str) -> Tensor:
    """Attribute scores in [0, 1] from concatenated logits: sigmoid per value, or softmax within
    each attribute (``mode`` as :class:`AttributeLoss` trains them)."""
    if mode == "sigmoid":
        return torch.sigmoid(logits)
    return torch.cat([torch.softmax(logits[:, s], dim=1) for s in slices.values()], dim=1)


def pair_losses(x: Tensor, t: Tensor, mode: str) -> Tensor:
    """Loss of each row of one attribute: logits ``x`` and targets ``t`` (N, values), NaN = a
    masked value (each row needs one known value). sigmoid: binary cross-entropy averaged over
    the known values; softmax: cross-entropy of the known value with the largest target."""
    known = ~torch.isnan(t)
    # NaN replaced by 0 before the loss: a NaN target gives NaN gradients even where masked out.
    t = torch.where(known, t, torch.zeros_like(t))
    if mode == "sigmoid":
        per_value = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        return (per_value * known).sum(1) / known.sum(1)
    scores = torch.where(known, t, torch.full_like(t, float("-inf")))
    return F.cross_entropy(x, scores.argmax(1), reduction="none")


class AttributeLoss(nn.Module):
    """Loss of several attribute heads whose logits are concatenated: ``(N, total_values)``.

    ``targets`` ``(N, total_values)``: 1 = y, 0 = n (the caller resolves "maybe"; a NaN left
    over masks that single value). ``mask`` ``(N, n_attributes)`` bool: whether the attribute is
    labeled for that image (None = all). ``slices``: the columns of each attribute (given here
    or to :meth:`forward`).

    * ``mode="sigmoid"`` (the attribute method's): binary cross-entropy with logits per value, averaged over
      the attribute's non-NaN values.
    * ``mode="softmax"``: cross-entropy over the attribute's values, the class being the
      argmax of its targets (NaN values ignored).

    The result is the mean over the labeled (image, attribute) pairs: each labeled pair
    counts once; unlabeled attributes (and pairs whose targets are all NaN) contribute nothing
    and do not count, so an image with no label changes neither the sum nor the count. With
    no labeled pair at all the loss is 0 (attached to the graph).
    """

    def __init__(self, mode: Literal["sigmoid", "softmax"] = "sigmoid", slices: Sequence[slice] | None = None):
        super().__init__()
        if mode not in ("sigmoid", "softmax"):
            raise ValueError(f"mode must be 'sigmoid' or 'softmax', got {mode!r}")
        self.mode = mode
        self.slices = list(slices) if slices is not None else None

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        mask: Tensor | None = None,
        slices: Sequence[slice] | None = None,
    ) -> Tensor:
        slices = list(slices) if slices is not None else self.slices
        if slices is None:
            raise ValueError("AttributeLoss needs the attributes' slices (constructor or forward)")
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
        n = logits.shape[0]
        if mask is None:
            mask = torch.ones(n, len(slices), dtype=torch.bool, device=logits.device)
        mask = mask.to(device=logits.device, dtype=torch.bool)
        if mask.shape != (n, len(slices)):
            raise ValueError(f"mask must be (N, n_attributes) = {(n, len(slices))}, got {tuple(mask.shape)}")
        targets = targets.to(device=logits.device, dtype=logits.dtype)

        total = logits.sum() * 0.0
        count = 0
        for a, sl in enumerate(slices):
            x, t = logits[:, sl], targets[:, sl]
            known = ~torch.isnan(t)
            rows = mask[:, a] & known.any(1)
            if not bool(rows.any()):
                continue
            # Select rows first and replace NaN by 0 before the loss: a NaN target would
            # otherwise give NaN gradients even where the result is masked out.
            per_pair = pair_losses(x[rows], t[rows], self.mode)
            total = total + per_pair.sum()
            count += int(rows.sum())
        return total / count if count else total

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def identity_terms(outputs: Mapping, labels: Tensor, id_loss: IdentityLoss, num_classes: int | None = None) -> Tensor:
    """Identity loss of the embedding's classifier plus the mean over the necks' part classifiers
    (outputs ending in ``stripe_logits``: each stripe of a stripes neck has one), when there are any.

    With ``num_classes``, only samples labelled 0..num_classes-1 count (mined target identities
    and their negatives have no classifier); 0, attached to the graph, when the batch has none."""
    if num_classes is not None:
        keep = (labels >= 0) & (labels < num_classes)
        if not bool(keep.any()):  # 0, with every classifier in the graph (DDP expects their gradients)
            parts = [t.sum() for key, value in outputs.items() if key.endswith(IDENTITY_LOGITS) for t in value]
            return (outputs["id_logits"].sum() + sum(parts)) * 0.0
        if not bool(keep.all()):
            outputs = {key: (value[keep] if key == "id_logits" else
                             [t[keep] for t in value] if key.endswith(IDENTITY_LOGITS) else value)
                       for key, value in outputs.items()}
            labels = labels[keep]
    loss = id_loss(outputs["id_logits"].float(), labels)
    part_logits = [t for key, value in outputs.items() if key.endswith(IDENTITY_LOGITS) for t in value]
    if part_logits:
        loss = loss + torch.stack([id_loss(t.float(), labels) for t in part_logits]).mean()
    return loss


@LOSS_TERMS.register("identity")
class IdentityTerm(LossTerm):
    """Softmax cross-entropy of an identity head on the embedding (a BNNeck), plus the necks' part
    classifiers; only the training identities count (mined ones have no class)."""

    def __init__(self, label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0):
        super().__init__()
        self.loss = IdentityLoss(label_smoothing)

    def model_settings(self, num_identities: int) -> dict:
        return {"num_identities": num_identities}

    def forward(self, outputs: Mapping[str, Tensor], targets: Targets) -> Tensor:
        return identity_terms(outputs, targets.labels, self.loss, targets.num_classes)
