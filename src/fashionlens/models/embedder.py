"""Image -> L2-normalised embedding, in batches: :class:`Embedder`, :func:`build_embedder`, and
:func:`embed_rows` (many photos streamed through it), with :class:`EmbedConfig`, the settings of
every command that embeds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch import nn

from fashionlens.config import Config
from fashionlens.data.crops import CropName
from fashionlens.data.loader import decode_batches
from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.models.backbones import OFFLINE_MODELS, create_backbone, is_model_name, offline_name
from fashionlens.models.runtimes import Optimize, prepare


class EmbedConfig(Config):
    model: str = Field("lite0", description="'lite0' (offline ImageNet EfficientNet-Lite0), a timm model name, "
                       "or a checkpoint or train / adapt run folder (its chosen model)")
    input_size: int | None = Field(None, ge=32, le=1024, description="letterbox size; None = the model's own (224)")
    batch_size: int = Field(8, ge=1, le=1024, description="images embedded together")
    workers: int = Field(0, ge=0, le=64, description="image-decoding processes beside the model (0 = decode in the main process)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    optimize: Optimize = Field(
        "auto", description="inference speed-up: auto = TorchScript freeze on CPU (checked against eager)")
    crop: CropName = Field("none", description="cut each photo before the letterbox: none; person (its box); "
                           "garment (the item's region of a photo with a person: by its metadata, see crop_regions); "
                           "auto (garment with a person, else the salient object's box); needs the 'crop' extra")
    crop_regions: str | None = Field(None, description="YAML mapping catalog metadata (articleType, subCategory) to "
                                     "the region cut (None = the built-in data/crops/regions.yaml)")


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
        """Run the model with the runtime ``mode`` names (:mod:`fashionlens.models.runtimes`);
        returns the runtime used. ``jit`` traces and freezes the model with TorchScript: about
        1.6x the eager speed for Lite0 on a 2-core CPU (docs/experiments/indexing.md), checked against the
        eager model on a random batch and dropped if they differ. ``auto``: ``jit`` on CPU, eager
        elsewhere."""
        size = self.preprocess.size
        probe = torch.randn(batch_size, 3, size, size, device=self.device).contiguous(
            memory_format=torch.channels_last)
        self.model, used = prepare(self.model, mode, probe)
        return used

    def describe(self) -> dict:
        """What an index records about the model that made its vectors."""
        return {"model": self.name, "dim": self.dim, "pooling": "gap", "normalise": "l2",
                **self.preprocess.describe()}


def build_embedder(name: str = "lite0", input_size: int | None = None, device: str = "cpu",
                   pretrained: bool = True, optimize: str = "auto") -> Embedder:
    """The embedder for ``name``: ``lite0`` (offline ImageNet EfficientNet-Lite0), a timm name,
    a checkpoint folder written by ``fashionlens train``, or a train / adapt run folder (its
    chosen checkpoint: :func:`~fashionlens.models.checkpoints.resolve_checkpoint`).

    ``input_size`` defaults to the model's own (224 for Lite0); 227 as in the retrieval method works too,
    any backbone here being fully convolutional with global pooling.
    """
    from fashionlens.models.builder import EmbeddingOnly
    from fashionlens.models.checkpoints import chosen_model, is_checkpoint, load_checkpoint

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


@dataclass
class EmbeddedBatch:
    keys: list
    vectors: np.ndarray
    errors: list[tuple[object, str]]
    crops: list[dict | None] = field(default_factory=list)  # the box of each key's photo (with a crop)


def embed_rows(rows: Sequence[tuple], embedder: Embedder, batch_size: int = 16,
               workers: int = 1, cropper=None) -> Iterator[EmbeddedBatch]:
    """Embed ``rows`` of (key, image path[, crop region]) in order, ``batch_size`` at a time, decoding
    (and cropping, with ``cropper``) in ``workers`` processes; unreadable photos come out as errors
    beside the vectors."""
    pin = embedder.device.type == "cuda"
    for keys, batch, errors, crops in decode_batches(rows, embedder.preprocess, batch_size, workers, pin, cropper):
        if batch is None:
            vectors = np.zeros((0, embedder.dim), np.float32)
        else:
            vectors = embedder.embed_tensors(batch.contiguous(memory_format=torch.channels_last))
        yield EmbeddedBatch(keys, vectors, errors, crops)
