"""The sensitivity study runs (quick config), records its baselines and diagnostics, and the weight-net advice
fires on the failure modes it names."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the study's datasets ship with scikit-learn")

from experiments import sensitivity  # noqa: E402
from metareweight.objectives.mwnet import weight_advice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sensitivity") / "r.json"
    sensitivity.main(["--config", str(ROOT / "configs" / "sensitivity_quick.yaml"), "--out", str(out)])
    return json.loads(out.read_text())


def test_every_phase_and_setting_has_rows_with_baselines(result):
    rows = result["rows"]
    assert {r["phase"] for r in rows} == {"grid", "size", "confirm"}
    assert {(r["lr"], r["meta_lr"]) for r in rows if r["phase"] == "confirm"} == {(0.01, 1e-3), (0.1, 1e-4)}
    assert {r["dataset"] for r in rows if r["phase"] == "confirm"} == {"wine", "iris"}  # design + held-out
    for r in rows:
        for key in ("acc_plain", "acc_meta_only", "acc_train_plus_meta", "acc_mwnet", "weight_auroc"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["gain"] == pytest.approx(r["acc_mwnet"] - r["acc_plain"])
        assert r["meta_steps"] == r["epochs"] * -(-r["n_train"] // 64)
    rule = [r for r in rows if r["setting"].startswith("rule")]
    assert rule and all(r["meta_lr"] == pytest.approx(0.3 / r["meta_steps"]) for r in rule)
    assert [r["meta_per_class"] for r in rows if r["phase"] == "size"] == [3]


def test_summary_means_match_rows(result):
    s = next(s for s in result["summary"] if s["phase"] == "confirm" and s["dataset"] == "iris" and s["lr"] == 0.01)
    rows = [r for r in result["rows"] if r["phase"] == "confirm" and r["dataset"] == "iris" and r["lr"] == 0.01]
    assert s["acc_mwnet"] == pytest.approx(np.mean([r["acc_mwnet"] for r in rows]))


def test_an_absent_dataset_is_skipped_with_its_reason(monkeypatch, tmp_path):
    from metareweight.data import MissingDataError

    def missing():
        raise MissingDataError("the data package 'x' is not installed: pip install x")

    monkeypatch.setitem(sensitivity.LOADERS, "wine", missing)
    out = tmp_path / "r.json"
    sensitivity.main(["--quick", "--set", "phases=[grid]", "--out", str(out)])
    assert json.loads(out.read_text())["skipped"] == {"wine": "MissingDataError: the data package 'x' is not "
                                                               "installed: pip install x"}


def test_weight_advice_names_each_failure():
    healthy = np.r_[np.full(70, 0.45), np.full(30, 0.01)] + np.linspace(0, 0.02, 100)
    flags = np.r_[np.zeros(70, bool), np.ones(30, bool)]
    assert weight_advice(healthy, flags) is None
    unspread = np.full(100, 0.5) + np.linspace(0.01, 0, 100)  # the flipped (last 30) samples slightly lowest
    assert "not separating" in weight_advice(unspread, flags)
    # an inverted ranking is named even when the weights barely spread: raising meta_lr would amplify it
    assert "ranks flipped samples above clean" in weight_advice(unspread[::-1], flags)
    assert "raise meta_lr" in weight_advice(np.full(100, 0.5) + np.linspace(0, 0.01, 100))
    inverted = weight_advice(healthy, ~flags, meta_lr=1e-2)  # the flipped samples hold the high weights
    assert "ranks flipped samples above clean" in inverted and "(now 0.01)" in inverted
    collapsed = weight_advice(np.linspace(0.001, 0.04, 100))
    assert "saturating" in collapsed and "lower meta_lr" in collapsed
    with pytest.raises(ValueError, match="3 flags for 100 weights"):
        weight_advice(healthy, flags[:3])


def test_a_confirm_setting_may_name_the_meta_class_prior(tmp_path):
    out = tmp_path / "r.json"
    sensitivity.main(["--quick", "--set", "phases=[confirm]", "confirm_settings=[[0.01,1.0e-3,train]]", "--out",
                      str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["setting"] for r in rows} == {"fixed 0.001 prior=train"} and len(rows) == 2
    assert all(0.0 <= r["auroc_within"] <= 1.0 for r in rows)


def test_within_class_auroc_ignores_class_shifts():
    labels = np.r_[np.zeros(4, int), np.ones(4, int)]
    noisy = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    w = np.array([0.5, 0.6, 0.1, 0.2, 0.9, 0.95, 0.7, 0.8])  # class 1 is up-weighted as a whole
    assert sensitivity.within_class_auroc(w, noisy, labels) == 1.0
