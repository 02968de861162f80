"""Checkpoints: save and load a model with the configuration that made it.

A checkpoint is a folder with ``model.safetensors`` (the state_dict; never a pickle) and
``config.json`` (``{"model": ModelConfig, "extra": {...}, "checkpoint_id": ...}``). Each
file is written to a temporary name and renamed into place; both carry the same random
``checkpoint_id`` so that a save interrupted between the two renames is detected on load.

* :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`is_checkpoint`;
* :func:`resolve_checkpoint` (a run folder -> its chosen checkpoint), :func:`chosen_model`,
  :data:`CheckpointPath` (a config field naming a checkpoint);
* :func:`load_attribute_model`: an attribute classifier written by ``fashionlens train-attributes``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fashionlens.errors import UserError
from fashionlens.models.backbones import is_model_name
from fashionlens.models.builder import ModelConfig, RetrievalModel, build_model
from fashionlens.plugins import ENV

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _tensors_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict on CPU, contiguous, with no two entries sharing memory (safetensors
    refuses shared storage; a tied weight is stored twice and loads back into both keys)."""
    seen: set[int] = set()
    out = {}
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy arrays / scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint extra: {type(obj).__name__} is not JSON serialisable")


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def save_checkpoint(path_dir: str | Path, model: RetrievalModel, cfg: ModelConfig,
                    extra: dict | None = None) -> Path:
    """Write ``path_dir/model.safetensors`` + ``path_dir/config.json``; returns the folder.

    ``extra`` (epoch, metrics, data config ...) must be JSON-serialisable (numpy / torch
    values are converted). Other files in the folder are left alone.
    """
    folder = Path(path_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: a checkpoint is a folder, and this is a file")
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_id = uuid.uuid4().hex
    doc = {"format": "fashionlens-checkpoint", "version": 1, "checkpoint_id": ckpt_id,
           "model": cfg.model_dump(mode="json"), "extra": dict(extra or {})}
    text = json.dumps(doc, indent=2, default=_json_default)  # fails before anything is written
    suffix = f".tmp-{os.getpid()}"
    weights_tmp = folder / (WEIGHTS_FILE + suffix)
    config_tmp = folder / (CONFIG_FILE + suffix)
    try:
        save_file(_tensors_for_saving(model), str(weights_tmp),
                  metadata={"format": "pt", "checkpoint_id": ckpt_id})
        config_tmp.write_text(text + "\n")
        _replace(weights_tmp, folder / WEIGHTS_FILE)
        _replace(config_tmp, folder / CONFIG_FILE)
    finally:
        for tmp in (weights_tmp, config_tmp):
            tmp.unlink(missing_ok=True)
    return folder


def _files(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    return (p / WEIGHTS_FILE, p / CONFIG_FILE) if p.is_dir() else (p, p.parent / CONFIG_FILE)


def is_checkpoint(path: str | Path) -> bool:
    """A folder with ``model.safetensors`` + ``config.json``, or a ``.safetensors`` file
    with a ``config.json`` beside it."""
    weights, config = _files(path)
    return weights.suffix == ".safetensors" and weights.is_file() and config.is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``: a checkpoint itself; a ``fashionlens train`` run
    folder (its ``best/``); or a ``fashionlens adapt`` run folder (the round its ``best.json``
    hands over: ``round-N/train/best``, or the recorded model, e.g. round 0's ``init``; a
    UserError when it names none that exists). Anything else is returned unchanged, for the
    caller's own message (a model name such as ``lite0``)."""
    p = Path(path)
    if is_checkpoint(p) or not p.is_dir():
        return p
    best_json = p / "best.json"
    if best_json.is_file():  # an adapt run
        try:
            doc = json.loads(best_json.read_text())
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict):
            found = [p / f"round-{doc['round']}" / "train" / "best"] if isinstance(doc.get("round"), int) else []
            found += [Path(doc["model"])] if isinstance(doc.get("model"), str) else []
            for candidate in found:
                if is_checkpoint(candidate):
                    return candidate
            if found:
                raise UserError(f"{best_json} hands over {found[-1]}, which is not a checkpoint here (a relative "
                                "path is read from the current folder)")
    return p / "best" if is_checkpoint(p / "best") else p


def chosen_model(name: str) -> str:
    """A model as a user names it, as it should be recorded: a train / adapt run folder becomes the
    checkpoint it chose (:func:`resolve_checkpoint`); a checkpoint, a model name (``lite0``, a timm
    name, even where a folder of that name exists) and anything else stay as they are."""
    # the file-system checks first: listing timm's models is the slow one, and most names are no folder
    if is_checkpoint(name) or not Path(name).is_dir() or is_model_name(str(name)):
        return name
    chosen = resolve_checkpoint(name)
    return str(chosen) if is_checkpoint(chosen) else name


# a config field naming a checkpoint: a run folder given there is stored as the checkpoint it chose
CheckpointPath = Annotated[str, AfterValidator(chosen_model)]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[RetrievalModel, ModelConfig, dict]:
    """(model in eval mode, its config, the saved extra) from a checkpoint folder or its
    ``.safetensors`` file. The model is built with ``pretrained=False`` and the weights
    loaded strictly; any mismatch is a :class:`UserError`."""
    weights, config = _files(path)
    if not is_checkpoint(path):
        raise UserError(f"{path}: not a model checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        doc = json.loads(config.read_text())
        cfg = ModelConfig(**{**doc["model"], "pretrained": False})
    except ValidationError as exc:
        plugins = (doc.get("extra") or {}).get("plugins")
        hint = (f"; it was trained with the plugins {plugins}: name them in ${ENV} (fashionlens.plugins)"
                if plugins else "")
        raise UserError(f"{config}: not a valid checkpoint config ({exc.errors()[0]['msg']}){hint}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{config}: not a valid checkpoint config ({exc})") from None
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            saved_id = (fh.metadata() or {}).get("checkpoint_id")
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{weights}: cannot read the weights ({exc})") from None
    if doc.get("checkpoint_id") and saved_id and saved_id != doc["checkpoint_id"]:
        raise UserError(f"{weights.parent}: {weights.name} and {config.name} come from different "
                        "saves (an interrupted save?)")
    model, _ = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        detail = " ".join(line.strip() for line in lines[:4]) + (" ..." if len(lines) > 4 else "")
        raise UserError(f"{weights}: the weights do not fit the model of {config.name} ({detail})") from None
    cfg = cfg.model_copy(update={"pretrained": bool(doc["model"].get("pretrained", True))})
    return model.to(device).eval(), cfg, doc.get("extra", {})


def load_attribute_classifier(path: str | Path, device: str = "cpu") -> tuple[RetrievalModel, dict]:
    """(model in eval mode, the checkpoint's extra) of an attribute classifier written by
    ``fashionlens train-attributes`` (or its run folder: ``best/``); a clear error for any other
    folder. ``extra["config"]`` holds the settings of the run that trained it."""
    if not is_checkpoint(path := resolve_checkpoint(path)):
        raise UserError(f"{path}: not a model checkpoint (needs model.safetensors and config.json)")
    try:
        model, _, extra = load_checkpoint(path, device)
    except (RuntimeError, AssertionError) as exc:  # e.g. a cuda device without a GPU
        raise UserError(f"{path}: cannot load the model on {device} ({' '.join(str(exc).split())[:200]})") from None
    if extra.get("kind") != "attributes" or model.attr_head is None:
        raise UserError(f"{path}: not an attribute classifier (written by 'fashionlens train-attributes')")
    return model, extra
