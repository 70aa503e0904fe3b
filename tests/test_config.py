"""Config validation: typos and wrong types are errors naming the key; configs/*.yaml fit their experiments."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import pytest

from experiments.common import load_config
from metareweight.config import ConfigError, RunConfig, TrainerConfig, load, read_yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Schema(RunConfig):
    epochs: int = 10
    lr: float = 0.1
    model: Literal["cnn", "mlp"] = "cnn"
    clip: Optional[float] = None
    names: List[str] = field(default_factory=lambda: ["a"])
    options: Dict[str, int] = field(default_factory=dict)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_misspelled_key_in_a_file_names_the_key_the_file_and_the_fix(tmp_path):
    path = write(tmp_path, "epochs: 3\nlearning_rate: 0.1\nlr_: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load(Schema, path)
    msg = str(e.value)
    assert str(path) in msg and "'learning_rate'" in msg and "valid keys" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'lr_' \(did you mean 'lr'\?\)"):
        load(Schema, write(tmp_path, "lr_: 0.2\n"))


@pytest.mark.parametrize("override, match", [
    ("epochs=ten", "'epochs' must be int, got str"),
    ("epochs=true", "'epochs' must be int, got bool"),
    ("epochs=2.5", "'epochs' must be int, got float"),
    ("lr=[1]", "'lr' must be float, got list"),
    ("model=cnnn", r"'model' must be one of 'cnn', 'mlp', got str \('cnnn'\) \(did you mean 'cnn'\?\)"),
    ("names=[1, 2]", r"'names' must be list\[str\]"),
    ("seeds=0", r"'seeds' must be list\[int\]"),
    ("options={a: x}", r"'options' must be dict\[str, int\]"),
    ("epochs", "must look like key=value"),
])
def test_wrong_types_and_malformed_overrides_are_errors_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load(Schema, overrides=[override])
    assert f"override {override!r}" in str(e.value)


def test_values_are_converted_where_unambiguous(tmp_path):
    cfg = load(Schema, write(tmp_path, "lr: 1e-3\nepochs: 4\n"), overrides=["lr=1", "clip=0.5", "epochs=5"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.clip == 0.5 and cfg.epochs == 5
    assert load(Schema, write(tmp_path, "lr: 1e-3\n")).lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert load(Schema).names == ["a"] and load(Schema).seeds == [0]


def test_extends_layers_a_variant_over_its_base_and_catches_cycles(tmp_path):
    write(tmp_path, "epochs: 40\nlr: 0.5\n", "base.yaml")
    variant = write(tmp_path, "extends: base.yaml\nepochs: 2\n", "quick.yaml")
    assert read_yaml(variant) == {"epochs": 2, "lr": 0.5}
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        read_yaml(tmp_path / "a.yaml")


@pytest.mark.parametrize("text, match", [("- 1\n- 2\n", "must be a mapping"), ("a: [1\n", "not valid YAML")])
def test_unreadable_files_are_clear_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        read_yaml(write(tmp_path, text))
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")


def test_trainer_config_checks_methods_and_ranges():
    assert TrainerConfig(hypergrad="neumann", meta_interval=2).kwargs()["meta_interval"] == 2
    with pytest.raises(ConfigError, match=r"'hypergrad' must be one of .*\(did you mean 'unrolled'\?\)"):
        TrainerConfig(hypergrad="unroled")
    with pytest.raises(ConfigError, match="'unroll_steps' must be >= 1"):
        TrainerConfig(unroll_steps=0)
    with pytest.raises(ConfigError, match="'real_step' must be one of"):
        TrainerConfig(real_step="now")


def test_load_config_keeps_its_dict_contract():
    defaults = {"noise": 0.4, "epochs": 40, "hypergrad": "unrolled", "extra": None}
    cfg = load_config(None, defaults, ["epochs=3", "noise=1", "extra=[1]", "seeds=[1, 2]"])
    assert cfg == {"noise": 1.0, "epochs": 3, "hypergrad": "unrolled", "extra": [1], "seeds": [1, 2]}
    assert load_config(None, defaults) == defaults
    with_seeds = {**defaults, "seeds": [0, 1, 2]}
    assert load_config(None, with_seeds)["seeds"] == [0, 1, 2]  # the script's own default, not RunConfig's
    with pytest.raises(ValueError, match=r"'seeds' must be list\[int\]"):
        load_config(None, with_seeds, ["seeds=[a]"])
    with pytest.raises(ValueError, match=r"unknown config key 'epoch' \(did you mean 'epochs'\?\)"):
        load_config(None, defaults, ["epoch=3"])
    with pytest.raises(ValueError, match="did you mean 'unrolled'"):
        load_config(None, defaults, ["hypergrad=unroled"])


@pytest.mark.parametrize("name", ["mwnet", "classic", "finetune"])
def test_shipped_configs_validate_against_their_experiment(name):
    import importlib

    module = importlib.import_module(f"experiments.{name}")
    paths = sorted((ROOT / "configs").glob(f"{name}*.yaml"))
    assert paths
    for path in paths:
        assert read_yaml(path).get("experiment") == name, path
        load_config(str(path), module.FULL)


@pytest.mark.parametrize("override, match", [
    ("epochs=0", "'epochs' must be >= 1, got 0"),
    ("lr=0", "'lr' must be > 0, got 0.0"),
    ("names=[]", None),  # no rule for an unconventional key
    ("seeds=[]", "'seeds' must list at least one seed"),
])
def test_range_rules_apply_by_key_name_and_blame_the_override(tmp_path, override, match):
    path = write(tmp_path, "epochs: 3\n")
    if match is None:
        load(Schema, path, [override])
        return
    with pytest.raises(ConfigError, match=match) as e:
        load(Schema, path, [override])
    assert str(e.value).startswith(f"override {override!r}")


def test_range_rules_check_list_items_and_trainer_settings_in_any_schema(tmp_path):
    from metareweight.config import schema_from_defaults

    S = schema_from_defaults({"noise": [0.0, 0.4], "hypergrad": "unrolled", "meta_interval": 1})
    with pytest.raises(ConfigError, match=r"override 'noise=\[0.2, 1.2\]': config key 'noise' must be in \[0, 1\]"):
        load(S, overrides=["noise=[0.2, 1.2]"])
    with pytest.raises(ConfigError, match=r"c.yaml: config key 'meta_interval' must be >= 1"):
        load(S, write(tmp_path, "meta_interval: 0\n"))
