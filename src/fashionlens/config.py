"""One configuration object per command, loadable from YAML, overridable on the command line.

:class:`Config` is the base of every command's settings (each lives beside its stage:
``index.config.IndexConfig``, ``training.config.TrainConfig``, ``serving.config.ServeConfig`` ...).
Every artefact records the configuration that made it (an index stores it in its SQLite
``meta`` table, a checkpoint in its ``config.json``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fashionlens.errors import UserError


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def read_yaml_mapping(path: Path | str) -> dict:
    """A YAML config file as a dict, or a one-line UserError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the YAML config ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of settings")
    return data


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def load(cls, path: Path | None = None, **overrides):
        """Defaults, then the YAML file (if any), then command-line values that are not None."""
        data = read_yaml_mapping(path) if path is not None else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise UserError(f"config setting {where!r}: {msg}" if where else f"config: {msg}") from None

    @classmethod
    def help_lines(cls, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
        """One ``prefix+name = default: meaning`` line per setting (required ones marked)."""
        def shown(field) -> str:
            if field.is_required():
                return "(required)"
            default = field.get_default(call_default_factory=True)
            return f"{type(default).__name__} defaults" if isinstance(default, BaseModel) else repr(default)

        return [f"{prefix}{name} = {shown(field)}: {field.description or ''}"
                for name, field in cls.model_fields.items() if name not in skip]

    @classmethod
    def help_text(cls) -> str:
        """The settings, defaults and meanings, for ``--help``."""
        return "\n\n".join(cls.help_lines())


def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise UserError(f"--set {dotted!r}: empty key")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif hasattr(child, "model_dump"):
            child = node[key] = child.model_dump()
        elif not isinstance(child, dict):
            raise UserError(f"--set {dotted!r}: {key!r} is a value, not a group of settings")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each ``"a.b.c=value"`` applied (value parsed by yaml.safe_load:
    ``128`` -> int, ``true`` -> bool, ``[a, b]`` -> list, ``null`` -> None)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value, e.g. model.neck.dim=128")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: cannot parse the value ({exc})") from None
        _set_path(out, key.strip(), value)
    return out
