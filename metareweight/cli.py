"""The ``metareweight`` command: run any experiment from a YAML config, and list what the library offers.

    metareweight run configs/mwnet_quick.yaml epochs=1             # experiments/mwnet.py --config ... --set epochs=1
    metareweight run configs/classic.yaml seeds=[0] -- --out r.json  # arguments after -- go to the script as they are
    metareweight run mwnet -- --quick                              # an experiment by name, without a config
    metareweight run --plugin my_pkg.mine configs/mine.yaml        # your own objective/method/experiment first
    metareweight list                                              # experiments, objectives, hypergradient methods

The experiment is the longest ``_``-separated prefix that names a script of the config's ``experiment:`` key, or of
the file name when there is no such key (``classic_quick.yaml`` → ``classic``). Experiments are the scripts in
``experiments/`` (at the root of a source checkout, next to the package) that define ``main(argv)``; ``run`` calls
that ``main`` with ``--config FILE --set key=value ...``.

Example:
    >>> "mwnet" in discover_experiments()
    True
    >>> experiment_for("configs/classic_quick.yaml", {}, ["classic", "mwnet"])
    'classic'
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .config import ConfigError, read_yaml

__all__ = ["main", "experiments_dir", "discover_experiments", "discover_objectives", "experiment_for"]

ENV_VAR = "METAREWEIGHT_EXPERIMENTS"


def experiments_dir() -> Path:
    """``$METAREWEIGHT_EXPERIMENTS``, or ``experiments/`` next to the installed package (an editable install)."""
    root = Path(os.environ.get(ENV_VAR) or Path(__file__).resolve().parent.parent / "experiments")
    if not root.is_dir():
        raise ConfigError(
            f"no experiments directory at {root}: the experiment scripts live in the source checkout, not in the "
            f"installed package. Install from a checkout with `pip install -e .`, "
            f"or set {ENV_VAR}=/path/to/experiments")
    return root


def _script_summary(path: Path) -> Optional[str]:
    """First docstring line of a script that defines a top-level ``main``; None otherwise (read, not imported)."""
    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError):
        return None
    if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
        return None
    return (ast.get_docstring(tree) or "").strip().split("\n")[0]


def discover_experiments(root: Optional[Path] = None) -> Dict[str, str]:
    """Experiment name → one-line summary, for every ``experiments/*.py`` with a ``main`` function."""
    root = root or experiments_dir()
    found = {}
    for path in sorted(root.glob("*.py")):
        summary = None if path.name.startswith("_") else _script_summary(path)
        if summary is not None:
            found[path.stem] = summary
    return found


def discover_objectives() -> Dict[str, str]:
    """``ClassName (module)`` → one-line summary for every :class:`MetaObjective` in ``metareweight.objectives``."""
    from . import objectives
    from .objectives.base import MetaObjective

    found = {}
    for info in pkgutil.iter_modules(objectives.__path__):
        try:
            module = importlib.import_module(f"{objectives.__name__}.{info.name}")
        except Exception as e:  # noqa: BLE001 - a broken module is reported, not fatal for --help
            found[f"({info.name})"] = f"import failed: {type(e).__name__}: {e}"
            continue
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, MetaObjective) and cls is not MetaObjective and cls.__module__ == module.__name__:
                found[f"{name} ({info.name})"] = (inspect.getdoc(cls) or "").split("\n")[0]
    return found


def experiment_for(config: str, raw: Dict, known: Sequence[str]) -> str:
    """The experiment a config runs: the longest ``_``-separated prefix naming a script of its ``experiment:`` key
    (``domain_weights_prm`` → ``domain_weights``), or of the file name when the key is absent."""
    label = raw.get("experiment")
    if label is not None and not isinstance(label, str):
        raise ConfigError(f"{config}: config key 'experiment' must be str, got {label!r}")
    parts = (label or Path(config).stem).split("_")
    for n in range(len(parts), 0, -1):
        if "_".join(parts[:n]) in known:
            return "_".join(parts[:n])
    if label is not None:
        raise ConfigError(f"{config}: experiment {label!r} names none of {sorted(known)}")
    raise ConfigError(f"{config}: no 'experiment:' key, and the file name names no experiment; add e.g. "
                      f"'experiment: {sorted(known)[0] if known else 'NAME'}' (experiments: {sorted(known)})")


def _load_main(name: str, root: Path):
    path = root / f"{name}.py"
    if (root / "__init__.py").exists():  # the checkout's experiments package: import it as the scripts do
        if str(root.parent) not in sys.path:
            sys.path.insert(0, str(root.parent))
        return importlib.import_module(f"{root.name}.{name}").main
    spec = importlib.util.spec_from_file_location(f"metareweight_experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run(target: str, overrides: Sequence[str] = (), extra: Sequence[str] = (), plugins: Sequence[str] = ()):
    """Run an experiment (a config file or a name) in this process; returns what its ``main`` returns.

    ``plugins`` are modules to import first (:mod:`metareweight.plugins`); a config's ``plugins:`` key adds more."""
    from .plugins import load_plugins, plugin_experiments

    load_plugins(plugins)
    is_config = target.endswith((".yaml", ".yml")) or Path(target).is_file()
    raw = read_yaml(target) if is_config else {}  # imports the config's plugins
    try:
        root = experiments_dir()
        known = discover_experiments(root)
    except ConfigError:
        if not plugin_experiments():
            raise
        root, known = None, {}
    known.update({k: "(plugin)" for k in plugin_experiments()})
    if is_config:
        name = experiment_for(target, raw, list(known))
        argv = ["--config", target] + (["--set", *overrides] if overrides else [])
    else:
        if target not in known:
            raise ConfigError(f"unknown experiment {target!r}; experiments: {sorted(known)} "
                              "(or give a config file: metareweight run configs/NAME.yaml)")
        if overrides:
            raise ConfigError(f"key=value overrides need a config file; pass the script's own arguments after "
                              f"'--' instead: metareweight run {target} -- ARGS")
        name, argv = target, []
    main = plugin_experiments().get(name) or _load_main(name, root)
    return main([*argv, *extra])


def _listing() -> str:
    from .core.hypergrad import available_methods

    try:
        experiments = discover_experiments()
    except ConfigError as e:
        experiments = {"(none)": str(e)}

    def block(title: str, items: Dict[str, str]) -> str:
        width = max(map(len, items), default=0)
        return title + ":\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in items.items())

    return "\n\n".join([block("experiments (metareweight run configs/NAME.yaml | NAME)", experiments),
                        block("objectives (metareweight.objectives)", discover_objectives()),
                        "hypergradient methods (hypergrad=...):\n  " + ", ".join(available_methods())])


TRACEBACK_VAR = "METAREWEIGHT_TRACEBACK"
# what a bad config or bad data raises inside an experiment: reported on one line, exit 2
USER_ERRORS = (ConfigError, ValueError, TypeError, LookupError, OSError, ImportError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ConfigError) else f"{type(e).__name__}: {text}"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``metareweight`` command; returns the exit status (2 for a bad config or input, reported
    as one line ``metareweight: error: ...`` without a traceback; set ``METAREWEIGHT_TRACEBACK=1`` to see it)."""
    try:
        return _main(argv)
    except USER_ERRORS as e:
        if os.environ.get(TRACEBACK_VAR) or not isinstance(e, ConfigError) and _is_programming_error(e):
            raise
        hint = "" if isinstance(e, ConfigError) else f" (set {TRACEBACK_VAR}=1 for the traceback)"
        print(f"metareweight: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2


def _is_programming_error(e: BaseException) -> bool:
    """A TypeError from calling a function wrongly is a bug to show in full, not a bad input."""
    return isinstance(e, TypeError) and ("positional argument" in str(e) or "keyword argument" in str(e))


def _main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="metareweight", description="Meta-learned sample reweighting: run "
                                     "experiments from YAML configs, list objectives and hypergradient methods.",
                                     epilog=_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{run,list}")
    p_run = sub.add_parser("run", help="run an experiment from a YAML config (or by name)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_run.add_argument("target", help="configs/NAME.yaml, or an experiment name")
    p_run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied in order")
    p_run.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                       help="import a module of your own objectives, hypergradient methods or experiments first "
                            "(repeatable; also the config key 'plugins')")
    sub.add_parser("list", help="list experiments, objectives and hypergradient methods")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(_listing())
        return 0
    if args.command != "run":
        parser.print_help()
        return 0
    run(args.target, args.overrides, extra, plugins=args.plugin)  # errors: see main
    return 0


if __name__ == "__main__":
    sys.exit(main())
