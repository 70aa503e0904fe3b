"""Meta-Weight-Net reproduces its qualitative claim on noisy digits: better test accuracy than plain training and
lower weights on flipped samples (fixed seed, quick configuration)."""

import json

import pytest

pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn (pip install 'metareweight[experiments]')")

from experiments import mwnet  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mwnet") / "r.json"
    mwnet.main(["--quick", "--seeds", "0", "--out", str(out)])
    return json.loads(out.read_text())


def test_output_schema(result):
    for key in ("acc_plain", "acc_meta", "acc_meta_only", "acc_plain_plus_meta", "mean_w_clean", "mean_w_noisy",
                "weight_auroc"):
        assert isinstance(result[key], float), key


def test_baselines_that_see_the_clean_meta_set(result):
    """Measured on this configuration (seed 0, 20 epochs): meta set alone 0.880, plain on train + meta set 0.916,
    Meta-Weight-Net 0.927, plain 0.869. Adding 100 clean samples to 1,247 noisy ones helps plain training; the
    Meta-Weight-Net margin over that baseline is about one point here (experiments/RESULTS.md)."""
    assert result["acc_plain_plus_meta"] > result["acc_plain"], result
    assert result["acc_meta"] > max(result["acc_meta_only"], result["acc_plain_plus_meta"]), result


def test_histogram_title_names_the_seeds_and_the_noise_rate(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda self, text, **kw: titles.append(text))
    runs = [{"seed": s, "weights": [0.1, 0.5, 0.4], "noisy": [True, False, False], "weight_auroc": a}
            for s, a in ((0, 1.0), (2, 0.9))]
    mwnet.save_histogram(runs, 0.3, tmp_path / "h.png")
    mwnet.save_histogram(runs[:1], 0.4, tmp_path / "h1.png")
    assert "30% flipped labels, seeds 0, 2 pooled" in titles[0] and "0.95 ± 0.07 over seeds" in titles[0]
    assert "40% flipped labels, seed 0" in titles[1] and "1.00" in titles[1]
    assert (tmp_path / "h.png").stat().st_size > 0


def test_meta_weight_net_beats_plain_training(result):
    assert result["acc_meta"] >= result["acc_plain"] + 0.02, result


def test_flipped_samples_get_lower_weight(result):
    assert result["mean_w_noisy"] < 0.5 * result["mean_w_clean"], result
    assert result["weight_auroc"] > 0.9, result
