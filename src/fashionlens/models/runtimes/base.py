"""Inference runtimes and their registry: how a frozen model runs when it embeds or explains.

A runtime turns an eval-mode module (images in, a tensor or a tuple of tensors out) into a
faster callable that computes the same, checked against the module on a probe batch; when it
cannot, the module runs as it is. The ``optimize`` setting of ``index``, ``search``, ``serve`` and
``index-attributes`` names one (``none``: eager PyTorch; ``jit``: TorchScript trace and freeze), or
``auto``: the first runtime that declares itself the default for the device (TorchScript on a
CPU). A new runtime is one module in this package (or a plugin) with::

    @RUNTIMES.register("my_runtime")
    class MyRuntime(Runtime):
        def prepare(self, model, probe): ...   # a module or callable, or None
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fashionlens.registry import Registry

RUNTIMES: Registry[type[Runtime]] = Registry("runtime", "fashionlens.models.runtimes")


class Runtime:
    """Base of every runtime; ``auto_devices``: the device types where ``optimize: auto`` picks it."""

    auto_devices: ClassVar[tuple[str, ...]] = ()

    def prepare(self, model: nn.Module, probe: torch.Tensor) -> nn.Module | None:
        """A callable computing what ``model`` computes (checked on ``probe`` and another batch
        size), or None when this runtime cannot run it."""
        raise NotImplementedError


def resolve(mode: str, device: str | torch.device) -> str:
    """The runtime ``mode`` means on ``device``: itself, or for ``auto`` the first registered runtime
    that is the default for the device's type (``none`` when there is none)."""
    if mode != "auto":
        return RUNTIMES.canonical(mode)
    kind = torch.device(device).type
    return next((name for name in RUNTIMES.names() if kind in RUNTIMES.get(name).auto_devices), "none")


def prepare(model: nn.Module, mode: str, probe: torch.Tensor) -> tuple[nn.Module, str]:
    """(what runs ``model`` under ``mode`` on the probe's device, the runtime used): the eager
    model and ``none`` when the runtime cannot run it."""
    name = resolve(mode, probe.device)
    if name == "none":
        return model, "none"
    fast = RUNTIMES.get(name)().prepare(model, probe)
    return (model, "none") if fast is None else (fast, name)


Optimize = RUNTIMES.setting("auto")
"""A config field naming a runtime, or ``auto``."""
