"""Inference runtimes (eager, TorchScript; each module of this package registers one)."""

from fashionlens.models.runtimes.base import RUNTIMES, Optimize, Runtime, prepare, resolve
from fashionlens.models.runtimes.torchscript import freeze_traced

__all__ = ["RUNTIMES", "Optimize", "Runtime", "freeze_traced", "prepare", "resolve"]
