"""The training engine: one epoch loop for every kind of training.

A run folder ``cfg.out`` holds ``config.yaml`` (the run's settings), ``metrics.csv`` (one row per
epoch), ``curves.png``, ``last/`` (every epoch, with the optimizer state and, with ``ema``, the
moving average beside the weights) and ``best/`` (the epoch with the best validation score).
Checkpoints are :func:`~fashionlens.models.checkpoints.save_checkpoint` folders plus
``optimizer.safetensors``: no pickle anywhere.

The engine owns what every training shares: building or resuming the model (a run continues
from ``out/last`` up to ``epochs``; a run whose model differs is refused), the optimizer and its
state, the moving average of the weights, seeding (every epoch reseeds torch with (seed, epoch,
rank), so a resumed run draws what an uninterrupted one would), autocast, the check for a
non-finite loss, progress events, the metrics file and curves, and ``last/`` / ``best/``. What
differs - the data, the batches, the loss and the validation - is a :class:`Task`:
:class:`~fashionlens.training.retrieval_task.RetrievalTask` (``fashionlens train``, and each
round of ``fashionlens adapt``) and :class:`~fashionlens.training.attribute_task.AttributeTask`
(``fashionlens train-attributes``).

DDP: when ``torch.distributed`` is initialised, or ``WORLD_SIZE`` > 1 (torchrun), each process
trains on its share of the batches (nccl on CUDA, gloo on CPU); rank 0 validates and writes every
file. Logged losses are rank 0's.

Progress events (``progress(event: dict)``, rank 0 only): ``{"event": "start", ...}``, ``{"event":
"step", "epoch", "batch", "batches", "loss"}`` (the epoch's mean loss so far), ``{"event": "epoch",
**row}``, and the task's own (feature caches).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from fashionlens.errors import UserError
from fashionlens.files import atomic_write_text
from fashionlens.models.builder import ModelConfig, RetrievalModel, build_model
from fashionlens.models.checkpoints import is_checkpoint, load_checkpoint, save_checkpoint
from fashionlens.training.run_files import (
    load_optimizer,
    plot_curves,
    read_rows,
    save_average,
    save_optimizer,
    start_average,
    write_rows,
)

Emit = Callable[[dict], None]


class Task(Protocol):
    """What one kind of training plugs into the :class:`Engine` (its ``cfg`` has ``out``, ``epochs``,
    ``seed``, ``device``, ``amp``, ``optimizer``, ``lr``, ``weight_decay``, optionally ``ema``)."""

    cfg: Any
    model_cfg: ModelConfig  # the model to build (or that ``last/`` must hold)
    # optional: ``distributed = False`` (one process only), ``model_change`` (what a resume refused for
    # another model is said to have: "a different model config" by default)
    columns: list[str]  # of metrics.csv
    best_key: str  # the checkpoint extra holding the best score so far
    curves: dict  # plot_curves keywords: losses, scores, score_label

    def check_resume(self, extra: dict) -> None:
        """Refuse to continue a run saved with other settings (a :class:`UserError`)."""

    def init_weights(self, model: RetrievalModel) -> None:
        """Starting weights of a new run (e.g. from ``init``)."""

    def prepare(self, model: RetrievalModel, evaluated: RetrievalModel, device: str, emit: Emit, rank: int,
                world: int) -> dict:
        """Data, caches and loaders; returns what the start event tells (``batches`` at least)."""

    def lr(self, epoch: int) -> float | None:
        """The learning rate of ``epoch`` (None: as the optimizer has it)."""

    def batches(self, epoch: int) -> Iterable:
        """The batches of ``epoch`` (torch is already reseeded for it)."""

    def forward(self, net: torch.nn.Module, batch) -> tuple[dict, Any]:
        """(the model's outputs for ``batch``, what the loss needs besides them); runs under autocast."""

    def loss(self, outputs: dict, context) -> tuple[torch.Tensor, dict[str, float], int]:
        """(the loss to minimise, numbers averaged over the epoch into its row, images in the batch)."""

    def summary(self, sums: dict[str, float], batches: int, lr: float | None) -> dict:
        """The epoch's training columns from the summed numbers of its ``batches``."""

    def validate(self, model: RetrievalModel) -> dict:
        """The epoch's validation columns (rank 0)."""

    def score(self, row: dict) -> float | None:
        """The number that picks ``best/`` (higher is better; None: not measured)."""

    def extra(self, row: dict) -> dict:
        """What the task records in the epoch's checkpoints."""


def setup_distributed(device: str) -> tuple[int, int, bool, str]:
    """(rank, world_size, whether we initialised the group, device)."""
    owned = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a long timeout: rank 0 alone builds feature caches and mines targets while the others wait
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6))
        owned = True
    if not dist.is_initialized():
        return 0, 1, False, device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), owned, device


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the trainable parameters: SGD with momentum 0.9, or AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed torch for ``epoch`` of process ``rank``: a resumed run draws what an uninterrupted one would."""
    torch.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)


class Engine:
    """Runs (or resumes) a :class:`Task` in its run folder; :meth:`run` returns the last epoch's row."""

    def __init__(self, task: Task, progress: Emit | None = None, rank: int = 0, world: int = 1,
                 device: str | None = None):
        self.task, self.rank, self.world = task, rank, world
        self.device = device or task.cfg.device
        self.emit = progress or (lambda event: None)

    def _model(self, last_dir: Path) -> tuple[RetrievalModel, dict]:
        """The model to train and the extra of ``last/`` ({} for a new run)."""
        task = self.task
        torch.manual_seed(task.cfg.seed)
        if not is_checkpoint(last_dir):
            model, _ = build_model(task.model_cfg)
            task.init_weights(model)
            return model, {}
        model, saved_cfg, extra = load_checkpoint(last_dir)
        if saved_cfg.model_dump(exclude={"pretrained"}) != task.model_cfg.model_dump(exclude={"pretrained"}):
            what = getattr(task, "model_change", "a different model config")
            raise UserError(f"{last_dir}: trained with {what}; choose a new out folder")
        task.check_resume(extra)
        return model, extra

    def run(self) -> dict:
        task, cfg, rank, world, device, emit = self.task, self.task.cfg, self.rank, self.world, self.device, self.emit
        out = Path(cfg.out)
        last_dir, best_dir = out / "last", out / "best"
        model, extra = self._model(last_dir)
        start_epoch, step, best = 1, 0, float("-inf")
        if extra:
            start_epoch, step = int(extra["epoch"]) + 1, int(extra["step"])
            best = float("-inf") if extra.get(task.best_key) is None else float(extra[task.best_key])
        model.to(device).train()
        optimizer = make_optimizer(cfg, model)
        if extra:
            load_optimizer(last_dir, optimizer, extra["optimizer_param_groups"])
        ema = getattr(cfg, "ema", None)
        averaged = start_average(model, ema, last_dir if extra else None, extra, step)  # None without ema
        evaluated = averaged.module if averaged is not None else model
        net = DistributedDataParallel(model) if world > 1 else model
        info = task.prepare(model, evaluated, device, emit, rank, world)
        use_amp = cfg.amp and device.startswith("cuda")

        rows = read_rows(out / "metrics.csv", start_epoch - 1)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        emit({"event": "start", "start_epoch": start_epoch, "epochs": cfg.epochs, **info, "world_size": world,
              "device": device})
        row: dict = rows[-1] if rows else {}
        for epoch in range(start_epoch, cfg.epochs + 1):
            seed_epoch(cfg.seed, epoch, rank)
            lr = task.lr(epoch)
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            sums: dict[str, float] = {}
            n_batches = n_images = 0
            t0 = time.perf_counter()
            for batch in task.batches(epoch):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    outputs, context = task.forward(net, batch)
                loss, values, images = task.loss(outputs, context)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"epoch {epoch}: the loss is {float(loss)}; lower lr?")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                step, n_batches, n_images = step + 1, n_batches + 1, n_images + images * world
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value
                emit({"event": "step", "epoch": epoch, "batch": n_batches, "batches": info["batches"],
                      "loss": sums.get("loss", 0.0) / n_batches})
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "step": step, **task.summary(sums, n_batches, lr), "seconds": round(seconds, 3),
                   "images_per_second": round(n_images / seconds, 2) if seconds else None}
            if rank == 0:
                row.update(task.validate(evaluated))
                rows.append(row)
                write_rows(out / "metrics.csv", rows, task.columns)
                plot_curves(rows, out / "curves.png", **task.curves)
                score = task.score(row)
                improved = score is not None and not math.isnan(score) and score > best
                best = score if improved else best
                ckpt_extra = {"epoch": epoch, "step": step, "ema": ema, "metrics": row,
                              task.best_key: None if best == float("-inf") else best,
                              "data_config": model.data_config, "plugins": list(getattr(cfg, "plugins", [])),
                              **task.extra(row)}
                last_dir.mkdir(parents=True, exist_ok=True)
                ckpt_extra["optimizer_param_groups"] = save_optimizer(last_dir, optimizer)
                if averaged is not None:
                    save_average(last_dir, averaged)
                save_checkpoint(last_dir, model, task.model_cfg, ckpt_extra)
                if improved:
                    save_checkpoint(best_dir, evaluated, task.model_cfg, ckpt_extra)
                emit({"event": "epoch", **row})
            if world > 1:
                dist.barrier()
        return row


def run_task(task: Task, progress: Emit | None = None) -> dict:
    """Run ``task`` in this process, or as one of a torchrun group (the group is set up and, when
    this call made it, torn down); a task that cannot share its batches (``distributed = False``)
    refuses a group."""
    if not getattr(task, "distributed", True) and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise UserError(f"{type(task).__name__} trains in one process: start it without torchrun")
    rank, world, owned, device = setup_distributed(task.cfg.device)
    try:
        return Engine(task, progress if rank == 0 else None, rank, world, device).run()
    finally:
        if owned:
            dist.destroy_process_group()
