"""Name -> factory registries for plugins, filled by decorators and by entry points.

Three registries exist: policies, partitioners and transports. A plugin package adds its own
with an entry point in its ``pyproject.toml``::

    [project.entry-points."pcpp_runtime.policies"]
    growing = "my_package.policies:GrowingPortion"

Rules: registering a different factory under a taken name raises ``ValueError``; registering the
same factory twice is harmless; an entry point that fails to load raises
:class:`PluginLoadError` naming the entry point.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PluginLoadError", "Registry", "partitioners", "policies", "transports"]

T = TypeVar("T")


class PluginLoadError(ImportError):
    """An entry-point plugin could not be imported."""


class Registry(Generic[T]):
    """Maps plugin names to factories (usually classes).

    Args:
        kind: what the registry holds, for error messages (``"policy"``).
        group: the entry-point group scanned on first lookup (``"pcpp_runtime.policies"``).
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._factories: dict[str, T] = {}
        self._builtin_modules: list[str] = []
        self._entry_points_loaded = False

    def register(self, name: str, factory: T | None = None) -> Callable[[T], T] | T:
        """Register ``factory`` under ``name``; usable as ``@registry.register("name")``."""

        def add(obj: T) -> T:
            if not name or not isinstance(name, str):
                raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
            existing = self._factories.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {_describe(existing)}")
            self._factories[name] = obj
            return obj

        return add if factory is None else add(factory)

    def add_builtin_module(self, module: str) -> None:
        """Import ``module`` lazily on first lookup (it registers the built-in plugins)."""
        self._builtin_modules.append(module)

    def _load(self) -> None:
        while self._builtin_modules:
            importlib.import_module(self._builtin_modules.pop(0))
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            try:
                factory = ep.load()
            except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
                raise PluginLoadError(f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            self.register(ep.name, factory)

    def get(self, name: str) -> T:
        """The factory for ``name``; ``KeyError`` listing the known names otherwise."""
        self._load()
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._factories


def _describe(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


policies: Registry = Registry("policy", "pcpp_runtime.policies")
policies.add_builtin_module("pcpp_runtime.policies")
partitioners: Registry = Registry("partitioner", "pcpp_runtime.partitioners")
partitioners.add_builtin_module("pcpp_runtime.partition")
transports: Registry = Registry("transport", "pcpp_runtime.transports")
transports.add_builtin_module("pcpp_runtime.transports")
