"""Typed, validated run configs: flat YAML files (``configs/*.yaml``) plus ``key=value`` overrides.

A schema is a dataclass. :func:`load` reads a YAML mapping, applies overrides and checks every key against the
schema: an unknown key (with a did-you-mean), a value of the wrong type, a missing required key or a value outside
a ``Literal`` is a :class:`ConfigError` naming the key, never a silent default. Keys with a conventional meaning
are range-checked whatever the schema (:data:`RANGES`: ``epochs >= 1``, ``0 <= noise <= 1``, ``meta_lr > 0``,
``seeds`` non-empty, ...), as are the :class:`TrainerConfig` settings a config holds; an override that breaks a
rule is blamed, not the file it overrides.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo(RunConfig):
    ...     epochs: int = 10
    ...     lr: float = 0.1
    >>> load(Demo, overrides=["epochs=3", "lr=1e-3", "seeds=[0, 1]"])
    Demo(experiment=None, seeds=[0, 1], epochs=3, lr=0.001)
    >>> load(Demo, overrides=["epoch=3"])
    Traceback (most recent call last):
    ...
    metareweight.config.ConfigError: override 'epoch=3': unknown config key 'epoch' (did you mean 'epochs'?); valid keys: epochs, experiment, lr, seeds
    >>> load(Demo, overrides=["lr=fast"])
    Traceback (most recent call last):
    ...
    metareweight.config.ConfigError: override 'lr=fast': config key 'lr' must be float, got str ('fast')
    >>> load(Demo, overrides=["epochs=0"])
    Traceback (most recent call last):
    ...
    metareweight.config.ConfigError: override 'epochs=0': config key 'epochs' must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

__all__ = ["ConfigError", "RunConfig", "TrainerConfig", "load", "build", "read_yaml", "parse_overrides",
           "schema_from_defaults", "to_dict", "RANGES", "check_range"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its schema; the message names the key and the fix."""


@dataclass
class RunConfig:
    """Keys every experiment config accepts: which experiment runs it (for the CLI) and the seeds."""

    experiment: Optional[str] = None
    seeds: List[int] = field(default_factory=lambda: [0])


@dataclass
class TrainerConfig:
    """:class:`~metareweight.MetaTrainer`'s settings, checked before any training starts.

    Example:
        >>> TrainerConfig.pick({"hypergrad": "neumann", "epochs": 5}).kwargs()["hypergrad"]
        'neumann'
        >>> TrainerConfig(meta_interval=0)
        Traceback (most recent call last):
        ...
        metareweight.config.ConfigError: config key 'meta_interval' must be >= 1, got 0
    """

    hypergrad: str = "unrolled"
    hypergrad_options: Dict[str, Any] = field(default_factory=dict)
    meta_interval: int = 1
    unroll_steps: int = 1
    real_step: Literal["recompute", "lookahead"] = "recompute"
    adam_preconditioner: Literal["differentiable", "fixed"] = "differentiable"
    grad_clip: Optional[float] = None
    log_dir: Optional[str] = None
    progress: bool = False

    def __post_init__(self) -> None:
        from .core.hypergrad import available_methods

        _check_fields(self)
        methods = available_methods()
        if self.hypergrad not in methods:
            raise ConfigError(f"config key 'hypergrad' must be one of {sorted(methods)}, got {self.hypergrad!r}"
                              + _did_you_mean(self.hypergrad, methods))
        for key in ("meta_interval", "unroll_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"config key 'grad_clip' must be positive or null, got {self.grad_clip}")

    @classmethod
    def pick(cls, cfg: Mapping[str, Any]) -> "TrainerConfig":
        """The trainer settings found among a flat config's keys (others, and ``None`` values, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``MetaTrainer(model, optimizer, loader, objective=..., **kwargs)``."""
        return to_dict(self)


# ---- value ranges by key name ----------------------------------------------------------------------------------
_AT_LEAST_1 = ("epochs", "batch_size", "meta_batch_size", "hidden", "student_hidden", "teacher_hidden", "wr_hidden",
               "ratio_hidden", "unroll_steps", "meta_interval", "passes", "meta_iterations", "teacher_epochs",
               "wr_epochs", "rt_epochs", "n_train", "n_meta", "n_val", "n_test", "n_teacher")
_POSITIVE = ("lr", "meta_lr", "wr_lr", "rt_lr", "temperature")
_FRACTION = ("noise", "outlier_frac", "corrupt_frac")
_BELOW_1 = ("momentum", "wr_dropout", "rt_input_dropout", "dropout")

RANGES: Dict[str, Tuple[str, Any]] = {
    **{k: (">= 1", lambda v: v >= 1) for k in _AT_LEAST_1},
    **{k: ("> 0", lambda v: v > 0) for k in _POSITIVE},
    **{k: ("in [0, 1]", lambda v: 0 <= v <= 1) for k in _FRACTION},
    **{k: ("in [0, 1)", lambda v: 0 <= v < 1) for k in _BELOW_1},
    "weight_decay": (">= 0", lambda v: v >= 0),
    "warmup_epochs": (">= 0", lambda v: v >= 0),
}
"""Rules for keys with a conventional meaning, applied to every schema that has them: ``(description, test)``.
A list value is checked item by item (``noise: [0.0, 0.4]``); ``seeds`` must be a non-empty list of integers >= 0."""


def check_range(key: str, value: Any) -> None:
    """Raise a :class:`ConfigError` if ``value`` breaks the :data:`RANGES` rule of ``key`` (or the seeds rule)."""
    if key == "seeds":
        if isinstance(value, (list, tuple)):
            if not value:
                raise ConfigError("config key 'seeds' must list at least one seed, got []")
            bad = [v for v in value if isinstance(v, int) and v < 0]
            if bad:
                raise ConfigError(f"config key 'seeds' must hold integers >= 0, got {bad[0]}")
        return
    rule = RANGES.get(key)
    if rule is None or value is None:
        return
    what, ok = rule
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v or not ok(v):
            raise ConfigError(f"config key {key!r} must be {what}, got {v}")


# ---- type checking ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any) -> Any:
    """``value`` checked against ``tp`` (ints accepted as floats, numeric strings such as ``1e-3`` too);
    raises ``TypeError`` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        for a in args:
            try:
                return _convert(value, a)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is Literal:
        if value in args:
            return value
        raise TypeError
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        item = args[0] if args else Any
        return origin(_convert(v, item) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        kt, vt = args or (Any, Any)
        return {_convert(k, kt): _convert(v, vt) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is int and isinstance(value, bool):
        raise TypeError
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError


def _did_you_mean(key: str, choices) -> str:
    hint = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _check_value(key: str, value: Any, tp: Any) -> Any:
    try:
        return _convert(value, tp)
    except TypeError:
        extra = _did_you_mean(value, typing.get_args(tp)) if typing.get_origin(tp) is Literal else ""
        raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {type(value).__name__} ({value!r})"
                          + extra) from None


def _check_fields(obj: Any) -> None:
    """Type-check (and coerce) a dataclass instance's fields in place; used by schemas' ``__post_init__``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _check_value(f.name, getattr(obj, f.name), hints[f.name]))


# ---- reading ----------------------------------------------------------------------------------------------------
def read_yaml(path: Union[str, Path], _seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping).

    ``extends: other.yaml`` (relative to this file) reads that config first and lays this one over it, so a
    quick variant names only what it changes. ``plugins: [my_pkg.module, ...]`` imports those modules (see
    :mod:`metareweight.plugins`) and is not passed on.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {', '.join(str(p) for p in _seen)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(raw).__name__}")
    from .plugins import take_plugins
    raw = take_plugins(raw, str(path))  # `plugins: [my_pkg.module]` imports the user's modules (metareweight.plugins)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: config key 'extends' must be a file name, got {base!r}")
    return {**read_yaml(path.parent / base, (*_seen, path.resolve())), **raw}


def parse_overrides(items: Sequence[str]) -> List[Tuple[str, str, Any]]:
    """``["epochs=3", "lr=0.1"]`` → ``[(item, key, value), ...]`` with values parsed as YAML."""
    import yaml

    out = []
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out.append((item, key.strip(), value))
    return out


def build(schema: Type[T], raw: Mapping[str, Any], source: str = "config") -> T:
    """An instance of the dataclass ``schema`` from ``raw``, every key and value checked (see module docs)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    try:
        kwargs = {}
        for key, value in raw.items():
            if key not in fields:
                raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, fields)}; "
                                  f"valid keys: {', '.join(sorted(fields))}")
            kwargs[key] = _check_value(key, value, hints[key])
            check_range(key, kwargs[key])
        if schema is not TrainerConfig:  # the trainer settings a config holds, blamed on this source
            TrainerConfig.pick(kwargs)
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing required config key(s) {', '.join(map(repr, missing))}")
        return schema(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(schema: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> T:
    """The YAML file at ``path`` (optional), then ``overrides`` (``key=value``), validated against ``schema``.

    Each override is checked on its own first, so an error names the override that caused it.
    """
    raw: Dict[str, Any] = read_yaml(path) if path else {}
    if path:
        build(schema, raw, source=str(path))
    for item, key, value in parse_overrides(overrides):
        build(schema, {**raw, key: value}, source=f"override {item!r}")
        raw[key] = value
    return build(schema, raw, source=str(path) if path else "config")


def schema_from_defaults(defaults: Mapping[str, Any], name: str = "Config", base: type = RunConfig) -> type:
    """A dataclass schema whose fields are ``defaults``' keys, typed by their values (``None`` allows anything),
    on top of ``base``'s fields (a default given for one of those replaces the base's default, keeping its type).

    Example:
        >>> S = schema_from_defaults({"epochs": 10, "noise": 0.4, "names": ["a"], "seeds": [0, 1, 2]})
        >>> cfg = load(S, overrides=["noise=1"])
        >>> cfg.noise, cfg.seeds
        (1.0, [0, 1, 2])
    """
    def infer(v: Any) -> Any:
        if v is None:
            return Any
        if isinstance(v, list):
            kinds = {type(x) for x in v}
            return List[kinds.pop()] if len(kinds) == 1 else list
        return type(v)

    def default(v: Any):
        return field(default_factory=lambda v=v: _copy(v)) if isinstance(v, (list, dict)) else field(default=v)

    inherited = typing.get_type_hints(base)  # a default for a base key (e.g. seeds) keeps the base's type
    spec = [(k, inherited.get(k) or infer(v), default(v)) for k, v in defaults.items()]
    return dataclasses.make_dataclass(name, spec, bases=(base,))


def _copy(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A config instance as a plain dict (for JSON results)."""
    return dataclasses.asdict(cfg)
