"""Backend discovery: plugins register through the ``kdpm2`` entry-point group, loaded lazily and once.

First-party backends (numpy, torch, jax) use the same entry-point group as third-party ones. A plugin
that fails to import, raises while registering, or registers something malformed is reported (a warning,
and its row in :func:`backend_report`) and skipped; it never breaks ``import kdpm2core`` or other backends.
``KDPM2_LOAD_PLUGINS=name1,name2`` limits which entry points load (empty string: none).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pluggy

from kdpm2core import hookspecs
from kdpm2core.hookspecs import hookimpl

__all__ = ["available_backends", "get_backend", "backend_report", "hookimpl", "BackendError", "PluginWarning"]

ENTRY_POINT_GROUP = "kdpm2"
FIRST_PARTY = "kdpm2"  # the distribution of the numpy, torch and jax backends
LOAD_ENV = "KDPM2_LOAD_PLUGINS"
_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


class BackendError(LookupError):
    """A backend is unknown, not installed, or failed to load."""


class PluginWarning(UserWarning):
    """A plugin failed to load or register; it was skipped."""


@dataclass
class BackendEntry:
    """One registered backend: how to build it, and what happened when we tried."""

    name: str
    factory: Callable[[], object] | None
    requires: tuple[str, ...]
    plugin: str
    distribution: str | None
    error: str | None = None
    instance: object | None = field(default=None, repr=False)

    @property
    def installed(self) -> bool:
        """True when every module the backend needs can be found (found, not imported)."""
        return self.error is None and all(_findable(module) for module in self.requires)


@dataclass
class _Registry:
    manager: pluggy.PluginManager
    entries: dict[str, BackendEntry]
    failures: list[BackendEntry]


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_lock = threading.RLock()
_registry: _Registry | None = None  # the one piece of module state: the plugin manager and what it found


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def _selected() -> set[str] | None:
    value = os.environ.get(LOAD_ENV)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _load() -> _Registry:
    manager = pluggy.PluginManager("kdpm2")
    manager.add_hookspecs(hookspecs)
    entries: dict[str, BackendEntry] = {}
    failures: list[BackendEntry] = []
    distributions: dict[str, str | None] = {}
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    wanted = _selected()
    for ep in eps:
        if wanted is not None and ep.name not in wanted:
            continue
        dist = ep.dist.name if ep.dist is not None else None
        # another distribution may reuse an entry point name: load it under a distinct plugin name, so that
        # a clash of backend names is reported below instead of one plugin silently shadowing the other
        plugin = ep.name if not manager.has_plugin(ep.name) else f"{ep.name} ({dist})"
        try:
            module = ep.load()
            if manager.is_registered(module):
                continue  # the same plugin module reached through two entry points
            manager.register(module, name=plugin)
        except (Exception, SystemExit) as exc:  # a stranger's plugin must not break us, nor exit our process
            failures.append(BackendEntry(plugin, None, (), plugin, dist, f"import failed: {exc!r}"))
            _warn(f"kdpm2 plugin {ep.name!r} from {dist!r} failed to load and was skipped: {exc!r}")
            continue
        distributions[plugin] = dist

    for impl in manager.hook.register_backends.get_hookimpls():
        plugin, dist = impl.plugin_name, distributions.get(impl.plugin_name)
        pending: list[BackendEntry] = []

        def register(name, factory, requires=(), *, _pending=pending, _plugin=plugin, _dist=dist):
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"backend name must be a lowercase identifier, got {name!r}")
            if not callable(factory):
                raise TypeError(f"backend {name!r}: factory must be callable, got {type(factory).__name__}")
            if isinstance(requires, str) or not all(isinstance(m, str) for m in requires):
                raise TypeError(f"backend {name!r}: requires must be a tuple of module names, got {requires!r}")
            _pending.append(BackendEntry(name, factory, tuple(requires), _plugin, _dist))

        try:
            impl.function(register=register)
        except (Exception, SystemExit) as exc:
            failures.append(BackendEntry(plugin, None, (), plugin, dist, f"register_backends raised {exc!r}"))
            _warn(f"kdpm2 plugin {plugin!r} from {dist!r} failed to register backends and was skipped: {exc!r}")
            continue
        for entry in pending:
            # our own backends' frameworks are optional extras; a third-party plugin without its framework
            # is a broken install worth a warning
            if dist != FIRST_PARTY and not entry.installed:
                _warn(f"kdpm2 backend {entry.name!r} from {dist!r} needs {', '.join(entry.requires)}, which is not installed; skipped")
            other = entries.get(entry.name)
            if other is None:
                entries[entry.name] = entry
                continue
            message = (
                f"backend {entry.name!r} is registered twice: by plugin {other.plugin!r} (distribution "
                f"{other.distribution!r}) and by plugin {entry.plugin!r} (distribution {entry.distribution!r}); "
                f"uninstall one, or limit loading with {LOAD_ENV}"
            )
            other.error = message
            _warn(message)
    return _Registry(manager, entries, failures)


def registry() -> _Registry:
    """The loaded plugin registry (entry points are read on first use, once)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _load()
        return _registry


def reload_plugins() -> None:
    """Forget what was loaded; the next lookup reads the entry points again (for tests and long sessions)."""
    global _registry
    with _lock:
        _registry = None


def available_backends() -> list[str]:
    """Names of the backends that are registered, healthy and whose framework is installed."""
    return sorted(name for name, entry in registry().entries.items() if entry.installed)


def get_backend(name: str | None = None):
    """The backend object called ``name`` (``None``: ``$KDPM2_BACKEND``, else ``"numpy"``), built once."""
    if name is None:
        name = os.environ.get("KDPM2_BACKEND") or "numpy"
    if not isinstance(name, str) and hasattr(name, "xp") and hasattr(name, "name"):
        return name  # already a backend object
    if not isinstance(name, str):
        raise TypeError(f"backend must be a backend name (str), got {type(name).__name__}")
    reg = registry()
    entry = reg.entries.get(name)
    if entry is None:
        raise BackendError(f"unknown backend {name!r}; available backends: {', '.join(available_backends()) or 'none'}")
    with _lock:  # the error check too: another thread may have just failed to build this backend
        if entry.error is not None:
            raise BackendError(entry.error)
        if entry.instance is None:
            missing = [module for module in entry.requires if not _findable(module)]
            if missing:
                raise BackendError(
                    f"backend {name!r} needs {', '.join(missing)}, which is not installed; "
                    f"available backends: {', '.join(available_backends()) or 'none'}"
                )
            source = f"plugin {entry.plugin!r}, distribution {entry.distribution!r}"
            try:
                backend = entry.factory()
            except (Exception, SystemExit) as exc:
                raise _broken(entry, f"backend {name!r} ({source}) failed to load: {exc!r}") from exc
            problems = [attr for attr in _REQUIRED_ATTRIBUTES if not hasattr(backend, attr)]
            if problems or getattr(backend, "name", None) != name:
                raise _broken(
                    entry,
                    f"backend {name!r} ({source}) is malformed: "
                    + (f"missing {', '.join(problems)}" if problems else f"its .name is {backend.name!r}"),
                )
            entry.instance = backend
        return entry.instance


# what the scheduler calls on every backend; the factory's object is checked for these before first use
_REQUIRED_ATTRIBUTES = ("name", "xp", "owns", "asarray", "to_numpy", "update")


def _broken(entry: BackendEntry, message: str) -> BackendError:
    """Mark ``entry`` failed (its report row says why; later lookups fail fast), warn, return the error."""
    entry.error = message
    _warn(message)
    return BackendError(message)


def backend_report() -> list[dict]:
    """One row per registered backend and per failed plugin: name, plugin, distribution, status."""
    reg = registry()
    rows = []
    for entry in list(reg.entries.values()) + reg.failures:
        if entry.error is not None:
            status = f"failed: {entry.error}"
        elif not entry.installed:
            status = f"not installed (needs {', '.join(entry.requires)})"
        else:
            status = "ok"
        rows.append({"name": entry.name, "plugin": entry.plugin, "distribution": entry.distribution, "status": status})
    return sorted(rows, key=lambda row: row["name"])
