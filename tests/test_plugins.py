"""`metareweight run` loads a user's module so its objective, hypergradient method and experiment are selectable by
name from YAML (the example plugin is tests/plugins/toy_reweighting.py)."""

import json
import sys
from pathlib import Path

import pytest

from metareweight import available_methods
from metareweight.cli import main
from metareweight.config import ConfigError
from metareweight.core.hypergrad import base as hypergrad_base
from metareweight import plugins

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "toy_reweighting"
HERE = ROOT / "tests" / "plugins"
TOY = HERE / "toy.yaml"


@pytest.fixture
def clean_registries(monkeypatch):
    """Run from the plugin's folder (as a user runs from their project); forget the plugin's registrations
    afterwards (they are process-global)."""
    monkeypatch.chdir(HERE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    methods, experiments = dict(hypergrad_base._REGISTRY), dict(plugins._EXPERIMENTS)
    yield
    hypergrad_base._REGISTRY.clear()
    hypergrad_base._REGISTRY.update(methods)
    plugins._EXPERIMENTS.clear()
    plugins._EXPERIMENTS.update(experiments)
    for name in [m for m in sys.modules if m == PLUGIN or m.startswith(PLUGIN + ".")]:
        del sys.modules[name]


def test_plugin_flag_selects_its_experiment_objective_and_method(clean_registries, tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--plugin", PLUGIN, str(TOY), "epochs=2", "--", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["objective"] == "FlooredWeightNet" and result["hypergrad"] == "toy_clipped_unrolled"
    assert result["epochs"] == 2 and result["min_weight"] >= 0.1 and result["hypergrad_norm"] > 0
    assert "toy_clipped_unrolled" in available_methods()


def test_plugins_key_in_the_config(clean_registries, tmp_path, capsys):
    assert main(["run", str(TOY.with_name("toy_with_key.yaml"))]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["objective"] == "FlooredWeightNet"


def test_without_the_plugin_the_names_are_unknown(clean_registries, capsys):
    assert main(["run", str(TOY)]) == 2
    assert "toy_reweighting" in capsys.readouterr().err


def test_a_missing_plugin_module_is_named(clean_registries, capsys):
    assert main(["run", "--plugin", "no_such_pkg.reweighting", str(TOY)]) == 2
    err = capsys.readouterr().err
    assert "cannot import plugin 'no_such_pkg.reweighting'" in err and "PYTHONPATH" in err
    with pytest.raises(ConfigError, match="must be a list of module names"):
        plugins.take_plugins({"plugins": 3})


def test_objectives_by_name_include_the_library_and_plugins(clean_registries):
    assert plugins.objective_class("MetaWeightNet").__name__ == "MetaWeightNet"
    with pytest.raises(ConfigError, match="FlooredWeightNet"):
        plugins.make_objective("FlooredWeightNet")
    plugins.load_plugins([PLUGIN])
    assert plugins.make_objective("FlooredWeightNet", floor=0.2).floor == 0.2
