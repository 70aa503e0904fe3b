"""User plugins: your own modules, imported by ``metareweight run``, make your objectives, hypergradient methods
and experiments selectable by name from YAML.

    metareweight run --plugin my_pkg.reweighting configs/mine.yaml      # or, in the YAML: plugins: [my_pkg.reweighting]

Importing a plugin module is what registers its contents:

- a :class:`~metareweight.core.hypergrad.HypergradMethod` subclass with ``name = "mine"`` is then accepted as
  ``hypergrad: mine`` (by :class:`~metareweight.MetaTrainer` and every config);
- a :class:`~metareweight.MetaObjective` subclass is found by its class name with :func:`objective_class` /
  :func:`make_objective` (``objective: MyObjective`` in your experiment's config);
- a top-level ``main(argv)`` makes the module an experiment, named by the module's ``EXPERIMENT`` attribute or else
  its last dotted component, run with ``--config FILE --set key=value ...`` like the bundled scripts.

Modules are imported with the current directory on ``sys.path``. ``tests/plugins/toy_reweighting.py`` is a complete
example (the tests run it).

Example:
    >>> objective_class("MetaWeightNet").__name__
    'MetaWeightNet'
    >>> objective_class("MetaWeightNt")
    Traceback (most recent call last):
    ...
    metareweight.config.ConfigError: unknown objective 'MetaWeightNt' (did you mean 'MetaWeightNet'?); objectives: ...
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List

from .config import ConfigError

__all__ = ["load_plugins", "plugin_experiments", "take_plugins", "objective_class", "make_objective", "CONFIG_KEY"]

CONFIG_KEY = "plugins"
_EXPERIMENTS: Dict[str, Callable] = {}


def load_plugins(modules: Iterable[str]) -> Dict[str, ModuleType]:
    """Import each dotted module name (the current directory first on ``sys.path``); returns ``{name: module}``.

    A module that cannot be imported is a :class:`~metareweight.config.ConfigError` naming it and the fix; an
    error raised *inside* the module while importing propagates as it is (it is the plugin's own bug).
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    loaded = {}
    for name in modules:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"a plugin must be a module name such as 'my_pkg.reweighting', got {name!r}")
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the plugin exists but imports something missing: its own traceback says what
            raise ConfigError(f"cannot import plugin {name!r}: no module {e.name!r} on the path (run from the "
                              "folder that holds it, pip install its package, or add it to PYTHONPATH)") from None
        main = getattr(module, "main", None)
        if callable(main):
            _EXPERIMENTS[str(getattr(module, "EXPERIMENT", name.rsplit(".", 1)[-1]))] = main
        loaded[name] = module
    return loaded


def plugin_experiments() -> Dict[str, Callable]:
    """Experiments registered by the plugins loaded so far: ``{name: main}``."""
    return dict(_EXPERIMENTS)


def take_plugins(raw: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """Import the modules a config's ``plugins:`` key names (a list, or one string) and return the config without
    that key, so experiment schemas never see it. :func:`metareweight.config.read_yaml` calls this."""
    if CONFIG_KEY not in raw:
        return raw
    raw = dict(raw)
    value = raw.pop(CONFIG_KEY) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: config key {CONFIG_KEY!r} must be a list of module names, got {value!r}")
    load_plugins(value)
    return raw


def _subclasses(cls: type) -> List[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def objective_class(name: str) -> type:
    """The :class:`~metareweight.MetaObjective` subclass called ``name``: the library's or a loaded plugin's."""
    importlib.import_module(f"{__package__}.objectives")  # registers the bundled objectives
    from .objectives.base import MetaObjective

    found = {c.__name__: c for c in _subclasses(MetaObjective)
             if getattr(sys.modules.get(c.__module__), c.__name__, None) is c}  # defined at a loaded module's top level
    if name not in found:
        hint = difflib.get_close_matches(str(name), found, n=1)
        raise ConfigError(f"unknown objective {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; objectives: {', '.join(sorted(found))} (load your own with --plugin MODULE)")
    return found[name]


def make_objective(name: str, **kwargs: Any):
    """An instance of :func:`objective_class` ``(name)`` built with ``kwargs``."""
    return objective_class(name)(**kwargs)
