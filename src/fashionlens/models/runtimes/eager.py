"""Eager PyTorch: the model as it is (``optimize: none``)."""

from __future__ import annotations

from fashionlens.models.runtimes.base import RUNTIMES, Runtime


@RUNTIMES.register("none", aliases=("eager",))
class Eager(Runtime):
    def prepare(self, model, probe):
        return model
