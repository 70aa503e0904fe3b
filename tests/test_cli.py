"""The ``metareweight`` command: help lists experiments/objectives/methods, configs run, typos fail by name."""

import json
import sys
from pathlib import Path

import pytest

from metareweight import available_methods
from metareweight.cli import discover_experiments, discover_objectives, experiment_for, main
from metareweight.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "mwnet_quick.yaml")


def test_help_lists_experiments_objectives_and_methods(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("mwnet", "classic", "MetaWeightNet (mwnet)", *available_methods()):
        assert name in out, name
    assert "import failed" not in out
    assert main(["list"]) == 0 and "MetaWeightNet" in capsys.readouterr().out


def test_discovery_finds_every_script_with_a_main_and_every_objective():
    scripts = {p.stem for p in (ROOT / "experiments").glob("*.py")
               if not p.name.startswith("_") and "\ndef main(" in p.read_text()}
    assert set(discover_experiments()) == scripts and {"mwnet", "classic"} <= scripts
    assert any(k.startswith("MetaWeightNet") for k in discover_objectives())


def test_the_console_script_is_declared_and_installed():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"metareweight": "metareweight.cli:main"}
    exe = Path(sys.executable).parent / "metareweight"
    if not exe.exists():
        pytest.skip("console script not installed in this environment (pip install -e . creates it)")
    assert "from metareweight.cli import main" in exe.read_text()


def test_run_a_config_with_overrides_and_script_arguments(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", QUICK, "epochs=1", "hidden=16", "batch_size=512", "--", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["epochs"] == 1 and result["config"]["hidden"] == 16
    assert 0.0 <= result["acc_meta"] <= 1.0 and [r["seed"] for r in result["per_seed"]] == [0]


def test_a_typo_key_fails_naming_the_key_before_training(tmp_path, capsys):
    assert main(["run", QUICK, "epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'epoch'" in err and "did you mean 'epochs'" in err
    bad = tmp_path / "mwnet_bad.yaml"
    bad.write_text("extends: " + QUICK + "\nlearning_rate: 0.1\n")
    assert main(["run", str(bad)]) == 2
    assert "'learning_rate'" in capsys.readouterr().err


def test_experiment_comes_from_the_key_or_the_file_name(tmp_path, capsys):
    known = ["classic", "mwnet", "source_tasks"]
    assert experiment_for("configs/source_tasks_quick.yaml", {}, known) == "source_tasks"
    assert experiment_for("x.yaml", {"experiment": "mwnet"}, known) == "mwnet"
    with pytest.raises(ConfigError, match="no 'experiment:' key"):
        experiment_for("configs/other.yaml", {}, known)
    assert experiment_for("x.yaml", {"experiment": "source_tasks_text"}, known) == "source_tasks"
    with pytest.raises(ConfigError, match="'mwnett' names none of"):
        experiment_for("x.yaml", {"experiment": "mwnett"}, known)
    assert main(["run", "mwnett"]) == 2 and "unknown experiment 'mwnett'" in capsys.readouterr().err


def test_a_missing_experiments_directory_says_how_to_fix_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("METAREWEIGHT_EXPERIMENTS", str(tmp_path / "nowhere"))
    assert main(["run", QUICK]) == 2
    assert "pip install -e ." in capsys.readouterr().err


def test_every_config_names_an_experiment_and_every_experiment_takes_config_and_set():
    from metareweight.config import read_yaml

    known = discover_experiments()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert experiment_for(str(path), read_yaml(path), list(known)) in known, path
    for name in known:  # what `metareweight run configs/NAME.yaml key=value` passes the script
        source = (ROOT / "experiments" / f"{name}.py").read_text()
        assert ("--config" in source and "--set" in source) or "add_config_args(" in source, name
