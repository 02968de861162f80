"""Registries: a new neck, loss term, vector-index type or embedding runtime is one file that
registers itself (the pattern of timm's ``register_model`` and open-metric-learning's registries).

A :class:`Registry` maps names (and old names kept as aliases) to classes. Its built-in entries
live in one package, every module of which is imported the first time the registry is read, so
a module dropped into that package is found without editing any list; entries of your own come
from plugins (:mod:`fashionlens.plugins`: a module named in a config's ``plugins``, in
``$FASHIONLENS_PLUGINS`` or by an installed package's ``fashionlens.plugins`` entry point).

Typed arguments: :meth:`Registry.arguments` validates a config mapping against the signature of
the entry's constructor with pydantic (types from its annotations, defaults from its defaults,
unknown keys refused), so a typo in a YAML file is a one-line error naming the entry's settings.

Written by hand: the registries of timm and OML are tied to their own model and loss classes.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, ConfigDict, ValidationError, create_model

from fashionlens.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> classes (or factories) of one kind, e.g. ``NECKS = Registry("neck", "fashionlens.models.necks")``."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package  # its built-in entries: every module of this package
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str, *, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator: ``@NECKS.register("rings")`` above the class. ``aliases``: other names that
        mean it (old names that configs and checkpoints may still hold)."""
        def add(obj: T) -> T:
            self._load_builtins()  # a plugin's entry meets the built-in ones, whatever came first
            for taken in (name, *aliases):
                owner = self._entries.get(self._aliases.get(taken, taken))
                if owner is not None and owner is not obj and _qualname(owner) != _qualname(obj):
                    raise ValueError(f"{self.kind} {taken!r} is registered twice ({_qualname(owner)}, {_qualname(obj)})")
            self._entries[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            return obj
        return add

    def unregister(self, name: str) -> None:
        """Take ``name`` (and its aliases) out: for tests that register entries of their own."""
        self._entries.pop(name, None)
        for alias in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[alias]

    def _load_builtins(self) -> None:
        if self._loaded or not self.package:
            return
        self._loaded = True  # first: the modules imported here register themselves
        try:
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
        except BaseException:
            self._loaded = False  # a later read tries again (and fails the same way, not half-loaded)
            raise

    def _load(self) -> None:
        self._load_builtins()
        self._loaded = True
        from fashionlens.plugins import load_plugins  # the plugins named outside any config

        load_plugins()

    def names(self) -> list[str]:
        """The registered names, in registration order (aliases left out)."""
        self._load()
        return list(self._entries)

    def canonical(self, name: str) -> str:
        """The registered name ``name`` means (itself, or the entry it is an alias of); a
        :class:`UserError` listing the known names when there is none."""
        self._load()
        name = self._aliases.get(name, name)
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)} (one of your own "
                            "needs its module among the plugins: fashionlens.plugins)")
        return name

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and self._aliases.get(name, name) in self._entries

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def setting(self, *also: str) -> Any:
        """The type of a config field naming an entry (or one of the words ``also``, e.g. ``auto``):
        a str checked when the config loads, the message listing what it may be."""
        def check(value: str) -> str:
            if value not in also:
                try:
                    self.canonical(value)
                except UserError as exc:
                    raise ValueError(f"{exc}" + (f" or {', '.join(also)}" if also else "")) from None
            return value
        return Annotated[str, AfterValidator(check)]

    def arguments(self, name: str, config: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
        """``config`` validated against the constructor of entry ``name`` (``skip``: parameters
        the caller supplies itself, such as ``in_channels``): values converted to the annotated
        types, unknown or missing settings a one-line :class:`UserError`."""
        model = _arguments_model(self.get(name), tuple(skip))
        try:
            validated = model(**dict(config))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            known = ", ".join(model.model_fields) or "none"
            raise UserError(f"{self.kind} {name!r}: {where + ': ' if where else ''}{first['msg']} "
                            f"(its settings: {known})") from None
        return {key: getattr(validated, key) for key in validated.model_fields_set}

    def complete(self, name: str, config: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
        """:meth:`arguments` with every setting the config leaves out at its default: the settings as
        the entry will run, for a record that compares equal however they were written."""
        model = _arguments_model(self.get(name), tuple(skip))
        given = self.arguments(name, config, skip)
        return {key: given[key] if key in given else field.default for key, field in model.model_fields.items()
                if key in given or not field.is_required()}

    def describe(self, skip: Iterable[str] = ()) -> str:
        """One line per entry: ``name(setting=default, ...)`` and its aliases, for ``--help``."""
        parts = []
        for name in self.names():
            model = _arguments_model(self._entries[name], tuple(skip))
            settings = ", ".join(name if f.is_required() else f"{name}={f.default!r}"
                                 for name, f in model.model_fields.items())
            aliases = [a for a, n in self._aliases.items() if n == name]
            parts.append(f"{name}({settings})" + (f" (also {', '.join(aliases)})" if aliases else ""))
        return "; ".join(parts)


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


_MODELS: dict[tuple[object, tuple[str, ...]], type] = {}


def _arguments_model(obj: object, skip: tuple[str, ...]) -> type:
    """A pydantic model of the keyword arguments of ``obj`` (a class: its ``__init__``)."""
    key = (obj, skip)
    if key not in _MODELS:
        target = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(target, include_extras=True)  # Annotated constraints kept
        fields = {}
        for param in list(inspect.signature(target).parameters.values()):
            if param.name in ("self", *skip) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (hints.get(param.name, Any), default)
        _MODELS[key] = create_model(f"{getattr(obj, '__name__', 'entry')}Settings",
                                    __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields)
    return _MODELS[key]
