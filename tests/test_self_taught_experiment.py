"""experiments/self_taught.py: its configs load, a tiny run writes the documented JSON rows, and (slow) the paper's
qualitative claims on the quick configuration."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.common import load_config  # noqa: E402
from experiments import self_taught  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["self_taught.yaml", "self_taught_quick.yaml", "self_taught_authors.yaml"])
def test_configs_load(name):
    cfg = load_config(str(ROOT / "configs" / name), self_taught.FULL)
    assert set(cfg["methods"]) <= set(self_taught.METHODS) and cfg["experiment"] == "self_taught"


def test_bad_method_name_is_an_error():
    with pytest.raises(ValueError, match="unknown method/dataset"):
        self_taught.main(["--quick", "--set", "methods=[storm,storrm]", "--seeds", "0"])


def test_tiny_run_writes_the_documented_rows(tmp_path):
    pytest.importorskip("sklearn")
    try:
        self_taught.load_data("rotten_tomatoes", 128, 64, 100, 3000)
    except Exception as e:  # the offline data package is an optional extra
        pytest.skip(f"Rotten Tomatoes data unavailable: {e}")
    out = tmp_path / "rows.json"
    self_taught.main(["--quick", "--seeds", "0", "--out", str(out), "--set", "datasets=[rotten_tomatoes]",
                      "noise=[0.3]", "methods=[no_rescaling,storm,no_meta_learning]", "rt_n_train=128", "n_val=64",
                      "n_test=100", "rt_epochs=1", "--plots", str(tmp_path / "plots")])
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")), "no weight histogram / ROC PNG written"
    row = rows[0]
    for key in ("dataset", "noise", "acc_no_rescaling", "acc_storm", "weight_auroc", "acc_no_meta_learning"):
        assert key in row
    assert row["noise"] == 0.3 and 0.0 <= row["weight_auroc"] <= 1.0
    for key in ("loss_auroc_storm", "oracle_auroc_storm"):  # the separation ceiling, recorded by default
        assert 0.0 <= row[key] <= 1.0 and 0.0 <= row["per_seed"][0]["storm"][key.removesuffix("_storm")] <= 1.0


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    """The quick configuration's rows (30% and 40% noise, both datasets, 2 seeds) and its clean-data rows."""
    quick = str(ROOT / "configs" / "self_taught_quick.yaml")
    noisy = self_taught.main(["--config", quick, "--out", str(tmp_path_factory.mktemp("st") / "q.json")])
    clean = self_taught.main(["--config", quick, "--set", "noise=[0.0]", "methods=[no_rescaling,storm]"])
    return noisy, clean


# (dataset, noise) where a claim was measured not to hold on the quick configuration (the xfail tests below)
MISSES = {"accuracy": {("womens", 0.3)}, "auroc": {("rotten_tomatoes", 0.4)}}


def noisy_row(rows, dataset, noise):
    return next(r for r in rows if r["dataset"] == dataset and r["noise"] == noise)


@pytest.mark.slow
def test_quick_configuration_shows_the_papers_claims(quick_rows):
    """The issue's "must show" list on the quick configuration, except where MISSES says it was measured not to hold
    (xfail tests below). Measured (experiments/RESULTS.md): gains 2.0-3.7 points, AUROC 0.707-0.740, gap growth
    0.13-0.36, gap without meta loss rescaling -0.025-0.015 against 0.15-0.35 with it."""
    noisy, _ = quick_rows
    for r in noisy:
        key, where = (r["dataset"], r["noise"]), f"{r['dataset']} at {r['noise']:.0%}"
        if key not in MISSES["accuracy"]:
            assert r["acc_storm"] > r["acc_no_rescaling"] + 0.01, f"STORM does not beat no rescaling on {where}"
        if key not in MISSES["auroc"]:
            assert r["weight_auroc"] >= 0.7, f"weight AUROC {r['weight_auroc']:.3f} < 0.7 on {where}"
        assert r["gap_storm"] > r["gap_first_storm"] + 0.1, f"clean-vs-flipped weight gap does not grow on {where}"
        narrower = f"dropping meta loss rescaling does not narrow the gap on {where}"
        assert r["gap_no_meta_loss_rescaling"] < r["gap_storm"] - 0.1, narrower


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured not to hold (experiments/RESULTS.md, STORM): Women's reviews at "
                   "30% noise, quick configuration 68.6 vs 69.2 (full configuration +1.1 in the mean, one seed -1.1)")
def test_storm_beats_no_rescaling_on_womens_at_30(quick_rows):
    row = noisy_row(quick_rows[0], "womens", 0.3)
    assert row["acc_storm"] > row["acc_no_rescaling"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured not to hold (experiments/RESULTS.md, STORM): on Rotten Tomatoes "
                   "TF-IDF at 40% noise the weight AUROC stays at 0.63-0.67, at the ceiling the trained model "
                   "allows: its own loss ranking separates at 0.67 and an oracle fitted with the true flip flags "
                   "on the rescaler's features at 0.69 (full configuration)")
def test_weight_auroc_reaches_07_on_rotten_tomatoes_at_40(quick_rows):
    assert noisy_row(quick_rows[0], "rotten_tomatoes", 0.4)["weight_auroc"] >= 0.7


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured not to hold (experiments/RESULTS.md, STORM): on clean data STORM "
                   "costs 1.1 / 2.6 points (quick) and 1.4 / 1.9 points (full) on Rotten Tomatoes / Women's reviews")
def test_storm_costs_at_most_one_point_on_clean_data(quick_rows):
    for r in quick_rows[1]:
        assert r["acc_storm"] >= r["acc_no_rescaling"] - 0.01, f"STORM costs > 1 point on clean {r['dataset']}"


@pytest.mark.slow
def test_whole_batch_batchnorm_fixes_storm_on_the_imbalanced_womens_reviews():
    """Women's departments are imbalanced, so symmetric noise leaves some label classes mostly flipped; the original
    code's whole-batch BatchNorm can down-weight such a class, per-class BatchNorm cannot (experiments/RESULTS.md).
    Measured on this configuration: clean −0.5 points, 30 % 74.6 and 40 % 72.1 (no rescaling 69.2 / 63.2,
    per-class STORM 68.6 / 65.2)."""
    quick = str(ROOT / "configs" / "self_taught_quick.yaml")
    rows = self_taught.main(["--config", quick, "--set", "datasets=[womens]", "noise=[0.0,0.3,0.4]",
                             "methods=[no_rescaling,storm,storm_batch_bn]"])
    for r in rows:
        batch, plain, per_class = r["acc_storm_batch_bn"], r["acc_no_rescaling"], r["acc_storm"]
        if r["noise"] == 0.0:
            assert batch >= plain - 0.01, f"whole-batch BatchNorm costs {plain - batch:.3f} on clean data"
        else:
            assert batch > plain + 0.02 and batch > per_class + 0.02, (r["noise"], batch, plain, per_class)


def test_original_preset_and_restarted_adam_baseline_rows(tmp_path):
    """storm_original and the plain baseline with the original code's restarted Adam run and record per-epoch
    test accuracy (the best-epoch numbers); the restarted baseline differs from the persistent one."""
    pytest.importorskip("sklearn")
    try:
        self_taught.load_data("rotten_tomatoes", 256, 64, 100, 3000)
    except Exception as e:  # the offline data package is an optional extra
        pytest.skip(f"Rotten Tomatoes data unavailable: {e}")
    rows = self_taught.main(["--quick", "--seeds", "0", "--set", "datasets=[rotten_tomatoes]", "noise=[0.3]",
                             "methods=[no_rescaling,no_rescaling_restart,storm_original]", "rt_n_train=256",
                             "n_val=64", "n_test=100", "rt_epochs=2", "ceiling=false"])
    row, seed = rows[0], rows[0]["per_seed"][0]
    for m in ("no_rescaling", "no_rescaling_restart", "storm_original"):
        assert len(seed[m]["acc_epochs"]) == 2 and seed[m]["acc"] == seed[m]["acc_epochs"][-1]
        assert row[f"acc_best_{m}"] == max(seed[m]["acc_epochs"])
    assert 0.0 <= row["auroc_storm_original"] <= 1.0
    assert seed["no_rescaling"]["acc_epochs"] != seed["no_rescaling_restart"]["acc_epochs"]
