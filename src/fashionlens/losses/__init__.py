"""Training losses: batch-all triplet (thesis A), identity and attribute losses, weighted sum."""

from fashionlens.losses.classification import AttributeLoss, IdentityLoss
from fashionlens.losses.combined import WeightedSum
from fashionlens.losses.triplet import (
    BatchAllTripletLoss,
    CosineDistance,
    EuclideanDistance,
    MeanAllValid,
    MeanNonZero,
    valid_triplet_mask,
)

__all__ = [
    "AttributeLoss",
    "BatchAllTripletLoss",
    "CosineDistance",
    "EuclideanDistance",
    "IdentityLoss",
    "MeanAllValid",
    "MeanNonZero",
    "WeightedSum",
    "valid_triplet_mask",
]
