"""Training losses: batch-all triplet, identity and attribute losses, the pointing loss, and the
registry of loss terms that a training config names (:mod:`.terms`)."""

from fashionlens.losses.classification import AttributeLoss, IdentityLoss, identity_terms, probabilities
from fashionlens.losses.combined import WeightedSum
from fashionlens.losses.terms import LOSS_TERMS, LossTerm, Targets, build_terms, check_losses
from fashionlens.losses.triplet import (
    BatchAllTripletLoss,
    CosineDistance,
    EuclideanDistance,
    MeanAllValid,
    MeanNonZero,
    valid_triplet_mask,
)

__all__ = [
    "LOSS_TERMS",
    "AttributeLoss",
    "BatchAllTripletLoss",
    "CosineDistance",
    "EuclideanDistance",
    "IdentityLoss",
    "LossTerm",
    "MeanAllValid",
    "MeanNonZero",
    "Targets",
    "WeightedSum",
    "build_terms",
    "check_losses",
    "identity_terms",
    "probabilities",
    "valid_triplet_mask",
]
