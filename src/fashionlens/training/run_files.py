"""A training run's files besides its checkpoints: the optimizer state and the weights' moving
average as safetensors, the per-epoch metrics CSV, and the PNG of its curves (see
:mod:`fashionlens.training.engine`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fashionlens.errors import UserError
from fashionlens.files import atomic_write_dict_rows

OPTIMIZER_FILE = "optimizer.safetensors"


def save_optimizer(folder: Path, opt: torch.optim.Optimizer) -> list:
    """Write the optimizer's tensors to ``folder/optimizer.safetensors``; returns its param_groups."""
    state = opt.state_dict()
    tensors = {f"state.{idx}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for idx, entry in state["state"].items() for name, v in entry.items() if v is not None}
    tmp = folder / (OPTIMIZER_FILE + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / OPTIMIZER_FILE)
    return state["param_groups"]


def load_optimizer(folder: Path, opt: torch.optim.Optimizer, param_groups: list) -> None:
    state: dict[int, dict] = {}
    for key, value in load_file(str(folder / OPTIMIZER_FILE)).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": param_groups})


EMA_FILE = "ema.safetensors"


def save_average(folder: Path, averaged: torch.optim.swa_utils.AveragedModel) -> None:
    """Write an AveragedModel's weights and count to ``folder/ema.safetensors``."""
    tensors = {f"module.{k}": v.detach().cpu().clone().contiguous() for k, v in averaged.module.state_dict().items()}
    tensors["n_averaged"] = averaged.n_averaged.detach().cpu().clone()
    tmp = folder / (EMA_FILE + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / EMA_FILE)


def load_average(folder: Path, averaged: torch.optim.swa_utils.AveragedModel) -> None:
    """Restore what :func:`save_average` wrote (on the average's device)."""
    if not (folder / EMA_FILE).is_file():
        raise UserError(f"{folder}: no {EMA_FILE} beside the weights; choose a new out folder")
    tensors = load_file(str(folder / EMA_FILE))
    averaged.module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    averaged.n_averaged.copy_(tensors["n_averaged"])


def start_average(model: torch.nn.Module, decay: float | None, resume: Path | None, extra: dict, step: int
                  ) -> torch.optim.swa_utils.AveragedModel | None:
    """The moving average of ``model``'s weights with ``decay`` (None: no average), restored from
    the checkpoint folder ``resume`` (whose JSON ``extra`` says the ``step`` it reached). A
    resume never mixes kinds of weights: the best score so far was measured on the run's own."""
    if resume is not None and extra.get("ema") != decay:
        raise UserError(f"{resume}: trained with ema={extra.get('ema')}, asked for ema={decay}; continue with "
                        "the same setting or choose a new out folder")
    if decay is None:
        return None
    swa = torch.optim.swa_utils
    averaged = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay))
    if resume is not None:
        load_average(resume, averaged)
        if int(averaged.n_averaged) != step:  # e.g. stopped between writing the average and the weights
            raise UserError(f"{resume}: its average ({int(averaged.n_averaged)} steps) does not match its "
                            f"weights ({step} steps); choose a new out folder")
    return averaged


def read_rows(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if int(row["epoch"]) <= upto_epoch]


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    atomic_write_dict_rows(path, columns, rows)


def plot_curves(rows: list[dict], path: Path, losses: tuple[str, ...] = ("loss", "triplet", "identity"),
                scores: tuple[str, ...] = ("val_top1", "val_top4", "query_top1", "query_top4"),
                score_label: str = "hit rate") -> None:
    """Two panels: the training losses and the validation scores, per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(name):
        pts = [(int(r["epoch"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for name in losses:
        x, y = series(name)
        if x:
            ax1.plot(x, y, marker="o", label=name)
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax1.legend()
    for name in scores:
        x, y = series(name)
        if x:
            ax2.plot(x, y, marker="o", label=name)
    ax2.set(xlabel="epoch", ylabel=score_label, title="validation", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
