"""Evaluation of retrieval: top-k hit rate, recall@k and mAP@k, and their reports."""

from fashionlens.evaluation.metrics import (
    DEFAULT_KS,
    MetricAccumulator,
    average_precision_at_k,
    hit_rate_at_k,
    recall_at_k,
    summarize,
)
from fashionlens.evaluation.report import HtmlReport, plot_hit_rate, write_json

__all__ = [
    "DEFAULT_KS",
    "HtmlReport",
    "MetricAccumulator",
    "average_precision_at_k",
    "hit_rate_at_k",
    "plot_hit_rate",
    "recall_at_k",
    "summarize",
    "write_json",
]
