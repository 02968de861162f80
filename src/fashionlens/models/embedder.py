"""Image -> L2-normalised embedding, in batches."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.models.backbones import OFFLINE_MODELS, create_backbone, is_model_name, offline_name


class Embedder:
    """A frozen model with its preprocessing: images in, unit-length float32 vectors out."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, name: str, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.name = name
        self.device = torch.device(device)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, preprocess.size, preprocess.size, device=self.device)
            self.dim = int(self.model(probe).shape[-1])

    @torch.inference_mode()
    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch (N, 3, S, S)."""
        feats = self.model(batch.to(self.device, non_blocking=True))
        feats = torch.nn.functional.normalize(feats.float(), dim=1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed decoded RGB images as one batch."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_tensors(torch.stack([self.preprocess(im) for im in images]))

    def optimize(self, mode: str = "auto", batch_size: int = 8) -> str:
        """Speed up inference; returns the mode used.

        ``jit`` traces and freezes the model with TorchScript, which folds batch norms into the
        convolutions and picks oneDNN kernels: about 1.6x the eager speed for Lite0 on a 2-core
        CPU (see docs/BENCHMARKS.md). The traced model is checked against the eager one on a
        random batch and dropped if they differ. ``auto`` means ``jit`` on CPU, eager elsewhere.
        """
        if not wants_jit(mode, self.device):
            return "none"
        size = self.preprocess.size
        probe = torch.randn(batch_size, 3, size, size, device=self.device).contiguous(
            memory_format=torch.channels_last)
        traced = freeze_traced(self.model, probe)
        if traced is None:
            return "none"
        self.model = traced
        return "jit"

    def describe(self) -> dict:
        """What an index records about the model that made its vectors."""
        return {"model": self.name, "dim": self.dim, "pooling": "gap", "normalise": "l2",
                **self.preprocess.describe()}


def wants_jit(mode: str, device: str | torch.device) -> bool:
    """Whether an ``optimize`` setting asks for a TorchScript trace: ``jit``, or ``auto`` on a CPU."""
    return mode == "jit" or (mode == "auto" and torch.device(device).type == "cpu")


def freeze_traced(model: nn.Module, probe: torch.Tensor, atol: float = 1e-3) -> nn.Module | None:
    """``model`` traced on ``probe`` and frozen with TorchScript, or None when it cannot be
    traced or its outputs (a tensor or a tuple of tensors) differ from the eager model's
    (checked on another batch size)."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(model.eval(), probe))
            odd = probe[:3]  # another batch size than the traced one
            got, want = traced(odd), model(odd)
            got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            if len(got) != len(want) or not all(
                    torch.allclose(g, w, atol=atol, rtol=1e-3) for g, w in zip(got, want)):
                return None
    except Exception:  # a model TorchScript cannot trace stays eager
        return None
    return traced


def build_embedder(name: str = "lite0", input_size: int | None = None, device: str = "cpu",
                   pretrained: bool = True, optimize: str = "auto") -> Embedder:
    """The embedder for ``name``: ``lite0`` (offline ImageNet EfficientNet-Lite0), a timm name,
    a checkpoint folder written by ``fashionlens train``, or a train / adapt run folder (its
    chosen checkpoint: :func:`~fashionlens.models.builder.resolve_checkpoint`).

    ``input_size`` defaults to the model's own (224 for Lite0); 227 as in thesis A works too,
    any backbone here being fully convolutional with global pooling.
    """
    from fashionlens.models.builder import EmbeddingOnly, chosen_model, is_checkpoint, load_checkpoint

    name = chosen_model(name)  # a train / adapt run folder: the checkpoint it chose
    if is_checkpoint(name):  # trained by `fashionlens train` or `adapt`
        trained, model_cfg, _ = load_checkpoint(name, device)
        model, cfg = EmbeddingOnly(trained), trained.data_config  # set by build_model
        size = int(input_size or model_cfg.input_size or cfg["input_size"][-1])
        canonical = f"checkpoint {Path(name).resolve()}"
        return _finish(model, size, cfg, canonical, device, optimize)
    name = str(name)
    if Path(name).is_dir() and not is_model_name(name):
        raise UserError(f"{name}: neither a checkpoint (model.safetensors + config.json) nor a train or adapt run "
                        "folder (best/, or best.json naming a checkpoint)")
    model, cfg = create_backbone(name, pretrained=pretrained)
    size = int(input_size or cfg["input_size"][-1])
    offline = offline_name(name)
    canonical = OFFLINE_MODELS[offline].timm_name + " (offline ImageNet weights)" if offline else name
    return _finish(model, size, cfg, canonical, device, optimize)


def _finish(model: nn.Module, size: int, cfg: dict, canonical: str, device: str, optimize: str) -> Embedder:
    model = model.to(memory_format=torch.channels_last)
    embedder = Embedder(model, Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"])), canonical, device)
    embedder.optimize(optimize)
    return embedder
