"""Scorer registry: names used in configs and saved models -> scorer classes.

Built-in scorers register themselves with :func:`register_scorer`; a separate package adds one by
declaring an entry point in the ``anomaly.scorers`` group (``name = "package.module:Class"``),
loaded the first time a name is looked up.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from importlib.metadata import entry_points
from typing import Any, TypeVar

from anomaly.errors import ConfigError
from anomaly.scorers.base import Scorer

__all__ = ["ENTRY_POINT_GROUP", "get_scorer", "list_scorers", "register_scorer", "scorer_class"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "anomaly.scorers"
S = TypeVar("S", bound=type[Scorer])
_REGISTRY: dict[str, type[Scorer]] = {}
_plugins_loaded = False
_failed_plugins: dict[str, str] = {}  # entry point name -> why it could not be loaded


def register_scorer(cls: S) -> S:
    """Class decorator: make ``cls`` available under ``cls.name``; a name is registered once (a class of the same
    module and name, redefined by a re-run notebook cell or a reload, replaces the earlier one)."""
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"register_scorer: {cls!r} is not a Scorer subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_scorer: {cls.__name__} needs a non-empty class attribute 'name'")
    earlier = _REGISTRY.get(name)
    if earlier is not None and (earlier.__module__, earlier.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register_scorer: a scorer named '{name}' is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def list_scorers() -> list[str]:
    """Registered scorer names, plug-ins included."""
    _load_plugins()
    return sorted(_REGISTRY)


def scorer_class(name: str) -> type[Scorer]:
    """The class registered as ``name``."""
    _load_plugins()
    if name in _failed_plugins:
        raise ConfigError(f"scorer.name: '{name}' is unavailable: {_failed_plugins[name]}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"scorer.name: unknown scorer '{name}'{hint}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_scorer(name: str, params: dict[str, Any] | None = None) -> Scorer:
    """Instantiate scorer ``name`` with ``params``, checking keys against its constructor."""
    cls = scorer_class(name)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in params or {}:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"scorer.params.{key}: unknown parameter of '{name}'{hint}")
    try:
        return cls(**(params or {}))
    except ConfigError:  # already names its key
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scorer.params: {exc}") from None


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not break the built-in scorers
            log.warning("scorer plug-in %s could not be loaded: %s", ep.value, exc)
            _failed_plugins[ep.name] = f"its plug-in {ep.value} could not be loaded: {exc}"
            continue
        if getattr(cls, "name", None) != ep.name:
            log.warning("scorer plug-in %s: entry point name '%s' differs from %s.name", ep.value, ep.name, cls)
            continue
        register_scorer(cls)
