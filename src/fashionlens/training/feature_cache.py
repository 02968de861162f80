"""Backbone feature maps cached on disk, to train necks on a frozen backbone cheaply.

With ``model.freeze_backbone`` the backbone is a fixed function of the image, so its feature
map T can be computed once per image and the necks trained on T alone: on a 2-core CPU this
turns ~20 images/s into thousands, which is what makes the ablations of the retrieval method runnable
here. The price: image-level augmentations (small rotations, colour, erasing) cannot be
applied; :class:`MapAugment` applies the two that are exact symmetries of a map up to the
backbone's own asymmetry - horizontal flip and 180 degree rotation - to the map itself.

A cache folder holds ``meta.json`` (backbone, pretrained, input size, mean/std, map shape) and
one or more parts ``part-NNNN/`` with ``maps.npy`` (float16, (N, C, H, W), written through a
memory map), ``paths.txt`` (the absolute image paths, one per line) and ``state.json``
(``{"done": rows written, "unreadable": [...]}``). Rows are written in order and ``done`` is
updated after each batch, so an interrupted build resumes where it stopped. Asking for paths
that the cache lacks adds a new part; nothing already written is rewritten.

Augmented views (``augment`` and ``view``): a cache whose maps are of photos put through the
image-level training augmentations (crop, flips, small rotation, brightness/contrast, erasing),
one random draw per photo and view. :func:`view_caches` keeps N of them beside a plain cache
and :class:`CachedMapDataset` picks the plain map or one of the views at random, which brings
the augmentations the maps cannot express back into cached training, at the price of one
backbone pass per photo and view. Each part's draws are seeded with (view, part, first row), so
a rebuild draws the same views; a build resumed in the middle of a part draws new ones from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fashionlens.data.augment import AugmentConfig, TrainPreprocess, crop_box
from fashionlens.data.loader import decode_batches
from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.files import atomic_write_json
from fashionlens.locks import exclusive_lock
from fashionlens.models.backbones import create_backbone, split_backbone
from fashionlens.models.runtimes import freeze_traced

META = "meta.json"


def _write_json(path: Path, doc: dict) -> None:
    atomic_write_json(path, doc)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: damaged feature cache file ({exc}); delete {path.parent} and run again") from None


class _Backbone(torch.nn.Module):
    """The backbone's feature map, or with ``stage`` the output of the stages before it."""

    def __init__(self, backbone: torch.nn.Module, stage: str | None = None, input_size: int = 64):
        super().__init__()
        self.backbone = backbone
        self.prefix = split_backbone(backbone, stage, input_size)[0] if stage else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x) if self.prefix is not None else self.backbone.forward_features(x)


class FeatureCache:
    """Feature maps of ``backbone`` at ``input_size`` for a growing set of image paths."""

    def __init__(self, folder: str | Path, backbone: str, input_size: int, pretrained: bool = True,
                 stage: str | None = None, augment: dict | None = None, view: int | None = None):
        self.folder = Path(folder)
        if (augment is None) != (view is None):
            raise ValueError("an augmented view needs both augment and view")
        augment = AugmentConfig(**augment).model_dump() if augment is not None else None
        self.key = {"backbone": backbone, "pretrained": bool(pretrained), "input_size": int(input_size),
                    "stage": stage, "augment": augment, "view": view}
        meta_path = self.folder / META
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder}: the feature cache must be a folder")
        if meta_path.is_file():
            self.meta = _read_json(meta_path)
            saved = {k: self.meta.get(k) for k in self.key}  # keys added later ("stage", "augment"): None
            if saved != self.key:
                raise UserError(f"{self.folder}: this feature cache holds maps of {saved}, not {self.key}; "
                                "use another feature_cache folder")
        else:
            self.meta = dict(self.key)
        self._model = None
        self._rows: dict[str, tuple[int, int]] = {}  # path -> (part, row)
        self._unreadable: set[str] = set()  # paths a part could not decode
        self._maps: list[np.ndarray] = []
        self._load_parts()

    @classmethod
    def for_model(cls, folder: str | Path, model_cfg, input_size: int, augment: dict | None = None,
                  view: int | None = None) -> FeatureCache:
        """The cache of the frozen part of the model of ``model_cfg`` (a ModelConfig); with
        ``augment`` and ``view``, of one augmented view of each photo."""
        return cls(folder, model_cfg.backbone, input_size, model_cfg.pretrained, model_cfg.trainable_from,
                   augment, view)

    # -- reading ---------------------------------------------------------------------------
    def _parts(self) -> list[Path]:
        """Complete part folders (a part is renamed into place only once its files exist)."""
        return sorted(self.folder.glob("part-[0-9]*")) if self.folder.is_dir() else []

    def _load_parts(self) -> None:
        self._rows.clear()
        self._unreadable.clear()
        self._maps = []
        for p_idx, part in enumerate(self._parts()):
            state = _read_json(part / "state.json")
            bad = set(state.get("unreadable", {}))
            self._unreadable |= bad
            try:
                paths = (part / "paths.txt").read_text().splitlines()[: state["done"]]
                self._maps.append(np.load(part / "maps.npy", mmap_mode="r"))
            except (OSError, ValueError, KeyError) as exc:
                raise UserError(f"{part}: damaged feature cache part ({exc}); delete it and run again") from None
            for row, path in enumerate(paths):
                if path not in bad:
                    self._rows[path] = (p_idx, row)

    @property
    def shape(self) -> tuple[int, int, int] | None:
        return tuple(self.meta["shape"]) if "shape" in self.meta else None

    def locate(self, path: str | Path) -> tuple[int, int] | None:
        """Where the map of ``path`` is stored (part, row), or None when it is not cached."""
        return self._rows.get(str(Path(path).resolve()))

    def __contains__(self, path: str | Path) -> bool:
        return self.locate(path) is not None

    def load(self, location: tuple[int, int]) -> torch.Tensor:
        """The (C, H, W) float32 map stored at a :meth:`locate` location."""
        part, row = location
        return torch.from_numpy(np.asarray(self._maps[part][row], dtype=np.float32))

    def get(self, path: str | Path) -> torch.Tensor:
        """The (C, H, W) float32 map of one image."""
        location = self.locate(path)
        if location is None:
            raise KeyError(f"{path} is not in the feature cache {self.folder}")
        return self.load(location)

    def stack(self, paths: Sequence[str | Path]) -> torch.Tensor:
        return torch.stack([self.get(p) for p in paths]) if paths else torch.zeros((0, *(self.shape or (0, 0, 0))))

    # -- building --------------------------------------------------------------------------
    def _backbone(self, device: str):
        if self._model is None:
            backbone, data_cfg = create_backbone(self.key["backbone"], pretrained=self.key["pretrained"])
            model = _Backbone(backbone, self.key["stage"], self.key["input_size"]).eval().to(device).to(memory_format=torch.channels_last)
            size = self.key["input_size"]
            if device == "cpu":  # TorchScript-frozen, BatchNorms folded (as the indexer does)
                model = freeze_traced(model, torch.randn(8, 3, size, size).contiguous(
                    memory_format=torch.channels_last)) or model
            mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
            plain = Preprocess(size, mean, std)
            augment = self.key["augment"]
            self._model = (model, plain if augment is None else TrainPreprocess(size, mean, std, augment), plain)
        return self._model

    def ensure(self, paths: Sequence[str | Path], device: str = "cpu", batch_size: int = 32, workers: int = 0,
               progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Compute the maps of the ``paths`` not cached yet (and finish an interrupted part).

        Returns the paths that could not be decoded (they stay out of the cache, listed in the
        part's state). ``progress(done, total)`` is called after each batch.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._holds(paths):  # a complete cache is read by any number of runs at once: no writer lock
            return []
        lock = exclusive_lock(self.folder, "feature cache")
        try:
            with torch.random.fork_rng(devices=[]):  # building draws (weights, views) leave the caller's alone
                return self._ensure(paths, device, batch_size, workers, progress)
        finally:
            lock.close()

    def _holds(self, paths: Sequence[str | Path]) -> bool:
        """Whether every one of ``paths`` is cached (or known unreadable) already, read without the lock
        (a part's rows count once its state says they are written)."""
        try:
            self._load_parts()
        except (UserError, OSError, ValueError, KeyError):  # a part being created or repaired: ask the writer
            return False
        known = set(self._rows) | self._unreadable
        return all(str(Path(p).resolve()) in known for p in paths)

    def _ensure(self, paths, device, batch_size, workers, progress) -> list[str]:
        unreadable: list[str] = []
        for stale in self.folder.glob(".part-*"):  # a part whose creation was interrupted
            shutil.rmtree(stale, ignore_errors=True)
        for part in self._parts():  # resume an interrupted part first
            state = _read_json(part / "state.json")
            paths_in_part = (part / "paths.txt").read_text().splitlines()
            if state["done"] < len(paths_in_part):
                unreadable += self._fill(part, paths_in_part, state, device, batch_size, workers, progress)
        self._load_parts()
        known = set(self._rows) | self._unreadable
        todo = list(dict.fromkeys(str(Path(p).resolve()) for p in paths))
        todo = [p for p in todo if p not in known]
        if todo:
            # the part's files are made in a hidden folder and renamed into place together
            name = f"part-{len(self._parts()):04d}"
            tmp, part = self.folder / f".{name}", self.folder / name
            tmp.mkdir()
            (tmp / "paths.txt").write_text("\n".join(todo) + "\n")
            state = {"done": 0, "unreadable": {}}
            _write_json(tmp / "state.json", state)
            self._shape(device)
            np.lib.format.open_memmap(tmp / "maps.npy", mode="w+", dtype=np.float16,
                                      shape=(len(todo), *self.meta["shape"]))
            os.replace(tmp, part)
            unreadable += self._fill(part, todo, state, device, batch_size, workers, progress)
            self._load_parts()
        return unreadable

    def _shape(self, device: str) -> None:
        """The map shape and preprocessing into meta.json (computed with a probe, once)."""
        if "shape" not in self.meta:
            model, _, plain = self._backbone(device)
            with torch.inference_mode():
                probe = torch.zeros(1, 3, plain.size, plain.size, device=device)
                self.meta["shape"] = list(model(probe).shape[1:])
            self.meta.update(plain.describe())
            _write_json(self.folder / META, self.meta)

    def _fill(self, part: Path, paths: list[str], state: dict, device: str, batch_size: int, workers: int,
              progress) -> list[str]:
        model, preprocess, _ = self._backbone(device)
        self._shape(device)
        try:
            maps = np.load(part / "maps.npy", mmap_mode="r+")
        except (OSError, ValueError) as exc:
            raise UserError(f"{part}: damaged feature cache part ({exc}); delete it and run again") from None
        start = state["done"]
        rows = list(enumerate(paths))[start:]
        if self.key["view"] is not None:  # the view's draws for this part, from this row on
            seed = hashlib.sha256(f"{self.key['view']}/{part.name}/{start}".encode()).digest()[:8]
            torch.default_generator.manual_seed(int.from_bytes(seed, "little"))  # CPU only: fork_rng saved it
        for keys, batch, errors, _ in decode_batches(rows, preprocess, batch_size, workers, device.startswith("cuda")):
            if batch is not None:
                with torch.inference_mode():
                    out = model(batch.to(device).contiguous(memory_format=torch.channels_last))
                arr = out.float().cpu().numpy().astype(np.float16)
                maps[np.asarray(keys)] = arr  # keys are row numbers; unreadable rows are skipped
            for k, err in errors:
                state["unreadable"][paths[k]] = err
            done = max([*keys, *(k for k, _ in errors)]) + 1
            maps.flush()
            state["done"] = done
            _write_json(part / "state.json", state)
            if progress:
                progress(done, len(paths))
        del maps
        return list(state["unreadable"])


class MapAugment:
    """Augmentations that act on a feature map (torch's global generator): horizontal flip and
    180 degree rotation, each with its probability, and - standing in for the image-level crop -
    a random window of the map (area fraction in [crop_min, 1], as :func:`crop_box` draws it)
    resized back to the map's size with bilinear interpolation."""

    def __init__(self, hflip: float = 0.5, rot180: float = 0.1, crop: float = 0.0, crop_min: float = 0.35):
        self.hflip, self.rot180, self.crop, self.crop_min = hflip, rot180, crop, crop_min

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.hflip and torch.rand(()) < self.hflip:
            t = t.flip(-1)
        if self.rot180 and torch.rand(()) < self.rot180:
            t = t.flip(-1).flip(-2)
        if self.crop and torch.rand(()) < self.crop:
            h, w = t.shape[-2:]
            left, top, right, bottom = crop_box(w, h, self.crop_min)
            window = t[..., top:bottom, left:right]
            t = torch.nn.functional.interpolate(window[None], size=(h, w), mode="bilinear",
                                                align_corners=False)[0]
        return t


def view_cache(folder: str | Path, model_cfg, input_size: int, augment: dict | None, view: int) -> FeatureCache:
    """Augmented view ``view`` (1, 2 ...) beside the plain cache ``folder``:
    ``folder/views-<hash of the augmentation settings>/v<view>``, so that other settings get other folders."""
    settings = AugmentConfig(**(augment or {})).model_dump()
    if not settings["background"]:  # added later: caches made without it keep their folder
        del settings["background"], settings["background_level"]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return FeatureCache.for_model(Path(folder) / f"views-{digest}" / f"v{view}", model_cfg, input_size, settings, view)


def view_caches(folder: str | Path, model_cfg, input_size: int, augment: dict | None, views: int
                ) -> list[FeatureCache]:
    """Views 1 .. ``views`` (:func:`view_cache`)."""
    return [view_cache(folder, model_cfg, input_size, augment, v) for v in range(1, views + 1)]


def fill_cache(cache: FeatureCache, paths: Sequence[str | Path], device: str, workers: int,
               emit: Callable[[dict], None]) -> FeatureCache:
    """``cache`` with the maps of ``paths`` computed, reporting ``cache`` / ``cache_step`` /
    ``cache_unreadable`` events (the training progress' own; ``view`` for an augmented view)."""
    view = cache.key["view"]
    emit({"event": "cache", "images": len(paths), **({"view": view} if view else {})})
    unreadable = cache.ensure(paths, device=device, workers=workers,
                              progress=lambda d, n: emit({"event": "cache_step", "done": d, "total": n}))
    if unreadable:
        emit({"event": "cache_unreadable", "images": unreadable})
    return cache


def prepare_cache(folder: str | Path, model_cfg, input_size: int, paths: Sequence[str | Path], device: str,
                  workers: int, emit: Callable[[dict], None]) -> FeatureCache:
    """The cache of ``model_cfg``'s frozen part in ``folder`` with the maps of ``paths`` computed
    (:func:`fill_cache`)."""
    return fill_cache(FeatureCache.for_model(folder, model_cfg, input_size), paths, device, workers, emit)


class CachedMapDataset(Dataset):
    """``ds[i]`` -> (cached feature map, label) for ``samples`` of (image path, label).

    With ``views`` (augmented-view caches, :func:`view_caches`), each item is the plain map or
    one of the photo's views, uniformly at random (torch's global generator); a photo missing
    from a view is drawn from the others."""

    def __init__(self, samples: Sequence[tuple[Path, int]], cache: FeatureCache,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 views: Sequence[FeatureCache] = ()):
        self.samples = []
        for p, label in samples:  # paths resolved here, once per cache
            plain = cache.locate(p)
            if plain is None:  # not in the plain cache: left out, as the trainer does
                continue
            self.samples.append(([(cache, plain)] + [(v, loc) for v in views if (loc := v.locate(p)) is not None],
                                 label))
        self.labels = [label for _, label in self.samples]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        found, label = self.samples[index]
        cache, location = found[int(torch.randint(len(found), ())) if len(found) > 1 else 0]
        t = cache.load(location)
        return (self.augment(t) if self.augment else t), label
