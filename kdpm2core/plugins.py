"""Backend discovery: plugins register through the ``kdpm2`` entry-point group, loaded lazily and once.

First-party backends (numpy, torch, jax) use the same entry-point group as third-party ones, and their
names stay theirs: another plugin's registration of one is refused. A plugin that fails to import, has a
hook kdpm2 does not know (or no hook), raises while registering, or registers something malformed is
reported (a warning, and its row in :func:`backend_report`) and skipped; it never breaks ``import kdpm2core``
or other backends.
``KDPM2_LOAD_PLUGINS=name1,name2`` limits which entry points load (empty string: none).
"""

from __future__ import annotations

import contextlib
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
from kdpm2core.backend import Backend, missing_members
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


def _one_line(text: str) -> str:
    """``text`` with its whitespace runs (pluggy's messages have newlines) as single spaces: one table row."""
    return " ".join(str(text).split())


def _load() -> tuple[_Registry, list[str]]:
    """Read the entry points and register their backends; returns the registry and the warnings to emit."""
    manager = pluggy.PluginManager("kdpm2")
    manager.add_hookspecs(hookspecs)
    failures: list[BackendEntry] = []
    messages: list[str] = []

    def fail(plugin: str, dist: str | None, reason: str, name: str | None = None) -> None:
        failures.append(BackendEntry(name or plugin, None, (), plugin, dist, _one_line(reason)))
        messages.append(_one_line(f"kdpm2 plugin {plugin!r} from {dist!r}: {reason}"))

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
        except (Exception, SystemExit) as exc:  # a stranger's plugin must not break us, nor exit our process
            fail(plugin, dist, f"import failed: {exc!r}")
            continue
        if manager.is_registered(module):
            continue  # the same plugin module reached through two entry points
        try:
            manager.register(module, name=plugin)  # checks each hook's arguments against its hookspec
            manager.check_pending()  # and that every hook is one of ours (a misspelt register_backend is not)
        except (Exception, SystemExit) as exc:
            manager.unregister(name=plugin)
            if isinstance(exc, pluggy.PluginValidationError):
                fail(plugin, dist, f"invalid hook: {exc}; kdpm2's hook is register_backends(register)")
            else:
                fail(plugin, dist, f"registering failed: {exc!r}")
            continue
        if not any(caller.has_spec() for caller in manager.get_hookcallers(module) or ()):
            manager.unregister(name=plugin)
            fail(plugin, dist, "implements no kdpm2 hook; expected @hookimpl def register_backends(register)")
            continue
        distributions[plugin] = dist

    registered: list[BackendEntry] = []
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
            fail(plugin, dist, f"register_backends raised {exc!r}")
            continue
        registered.extend(pending)

    entries: dict[str, BackendEntry] = {}
    # kdpm2's own registrations first: a name kdpm2 ships stays kdpm2's whatever else is installed
    for entry in sorted(registered, key=lambda entry: entry.distribution != FIRST_PARTY):
        other = entries.get(entry.name)
        if other is not None and other.distribution == FIRST_PARTY and entry.distribution != FIRST_PARTY:
            reason = (
                f"backend {entry.name!r} belongs to kdpm2; its registration by plugin {entry.plugin!r} "
                f"(distribution {entry.distribution!r}) was refused: choose another name"
            )
            fail(entry.plugin, entry.distribution, reason, name=f"{entry.name} ({entry.distribution})")
            continue
        # our own backends' frameworks are optional extras; a third-party plugin without its framework
        # is a broken install worth a warning
        if entry.distribution != FIRST_PARTY and not entry.installed:
            messages.append(
                f"kdpm2 backend {entry.name!r} from {entry.distribution!r} needs {', '.join(entry.requires)}, "
                "which is not installed; skipped"
            )
        if other is None:
            entries[entry.name] = entry
            continue
        message = (
            f"backend {entry.name!r} is registered twice: by plugin {other.plugin!r} (distribution "
            f"{other.distribution!r}) and by plugin {entry.plugin!r} (distribution {entry.distribution!r}); "
            f"uninstall one, or limit loading with {LOAD_ENV}"
        )
        other.error = message
        messages.append(message)
    return _Registry(manager, entries, failures), messages


def registry() -> _Registry:
    """The loaded plugin registry (entry points are read on first use, once)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry, messages = _load()
            # warn only once the registry is stored: under ``-W error`` the first warning raises here, in the
            # first lookup, and every later lookup still works
            for message in messages:
                _warn(message)
        return _registry


def reload_plugins() -> None:
    """Forget what was loaded; the next lookup reads the entry points again (for tests and long sessions)."""
    global _registry
    with _lock:
        _registry = None


def available_backends() -> list[str]:
    """Names of the backends that are registered, not known to be broken, and whose framework can be found.

    Cheap: it builds nothing and imports no framework, so a backend whose factory raises is listed until
    something builds it (:func:`get_backend`, or ``backend_report(build=True)``).
    """
    return sorted(name for name, entry in registry().entries.items() if entry.installed)


def get_backend(name: str | None = None):
    """The backend object called ``name`` (``None``: ``$KDPM2_BACKEND``, else ``"numpy"``), built once."""
    if name is None:
        name = os.environ.get("KDPM2_BACKEND") or "numpy"
    if isinstance(name, Backend):
        return name  # already a backend object
    if not isinstance(name, str):
        raise TypeError(f"backend must be a backend name (str), got {type(name).__name__}")
    reg = registry()
    entry = reg.entries.get(name)
    if entry is None:
        raise BackendError(
            f"unknown backend {name!r}; available backends: {', '.join(available_backends()) or 'none'}"
            + "".join(f"; plugin {e.plugin!r} ({e.distribution}) failed: {e.error}" for e in reg.failures)
        )
    with _lock:  # the error check too: another thread may have just failed to build this backend
        if entry.error is not None:
            raise BackendError(entry.error)
        if entry.instance is None:
            missing = [module for module in entry.requires if not _findable(module)]
            if missing:
                extra = f" (pip install 'kdpm2[{name}]')" if entry.distribution == FIRST_PARTY else ""
                raise BackendError(
                    f"backend {name!r} needs {', '.join(missing)}, which is not installed{extra}; "
                    f"available backends: {', '.join(available_backends()) or 'none'}"
                )
            source = f"plugin {entry.plugin!r}, distribution {entry.distribution!r}"
            try:
                backend = entry.factory()
            except (Exception, SystemExit) as exc:
                raise _broken(entry, f"backend {name!r} ({source}) failed to load: {exc!r}") from exc
            problems = missing_members(backend)
            if problems or backend.name != name:
                raise _broken(
                    entry,
                    f"backend {name!r} ({source}) is malformed: "
                    + (f"missing {', '.join(problems)}" if problems else f"its .name is {backend.name!r}"),
                )
            entry.instance = backend
        return entry.instance


def _broken(entry: BackendEntry, message: str) -> BackendError:
    """Mark ``entry`` failed (its report row says why; later lookups fail fast), warn, return the error."""
    entry.error = _one_line(message)
    _warn(entry.error)
    return BackendError(entry.error)


def backend_report(build: bool = False) -> list[dict]:
    """One row per registered backend and per failed plugin: name, plugin, distribution, status.

    By default nothing is built or imported: ``ok`` means registered, not known to be broken, and its framework
    can be found. With ``build=True`` every such backend is built first (importing its framework), so ``ok``
    means it loads; this is what ``kdpm2 backends`` shows.
    """
    reg = registry()
    if build:
        for name, entry in reg.entries.items():
            if entry.error is None and entry.installed:
                with contextlib.suppress(BackendError):  # the failure is now the entry's error: its row says why
                    get_backend(name)
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
