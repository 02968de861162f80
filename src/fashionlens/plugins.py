"""Plugins: modules of your own that register necks, loss terms, index types or runtimes
(:mod:`fashionlens.registry`) before a command builds anything.

A plugin is named as a module (``mypackage.necks``, importable from the current environment) or
as the path of a ``.py`` file. They are loaded from, in order:

* installed packages that declare an entry point in the group ``fashionlens.plugins``;
* ``$FASHIONLENS_PLUGINS``: names separated by ``:`` (or ``,``);
* the ``plugins`` setting of ``train``, ``train-attributes`` and ``adapt`` configs, which is
  recorded in every checkpoint the run writes: loading that checkpoint elsewhere needs the same
  plugins available (in the environment variable or installed), never a file the checkpoint names.

A plugin runs code in this process: load only your own.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from fashionlens.errors import UserError

ENV = "FASHIONLENS_PLUGINS"
GROUP = "fashionlens.plugins"
_loaded: set[str] = set()
_environment_done = False


def load_plugin(name: str) -> None:
    """Import one plugin (a module name or a ``.py`` path), once; a clear error if it cannot be."""
    name = name.strip()
    if not name or name in _loaded:
        return
    try:
        if name.endswith(".py"):
            path = Path(name).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"plugin {name}: no such file")
            module_name = f"fashionlens_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
        else:
            importlib.import_module(name)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"plugin {name!r} cannot be imported ({exc})") from None
    except Exception as exc:  # the plugin's own error: named, with its type
        raise UserError(f"plugin {name!r} failed while loading ({type(exc).__name__}: {exc})") from None
    _loaded.add(name)


def _load_entry_point(point) -> None:
    """An installed package's plugin: its module imported, and a function it names (``pkg:register``) called."""
    if point.value in _loaded:
        return
    try:
        obj = point.load()
        if ":" in point.value and callable(obj):
            obj()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"plugin {point.value!r} (entry point {point.name!r}) failed while loading "
                        f"({type(exc).__name__}: {exc})") from None
    _loaded.add(point.value)


def load_plugins(names: Iterable[str] = ()) -> None:
    """The plugins of the environment (entry points, ``$FASHIONLENS_PLUGINS``; once they all loaded),
    then ``names``."""
    global _environment_done
    if not _environment_done:
        for point in entry_points(group=GROUP):
            _load_entry_point(point)
        for name in os.environ.get(ENV, "").replace(",", ":").split(":"):
            load_plugin(name)
        _environment_done = True
    for name in names:
        load_plugin(name)
