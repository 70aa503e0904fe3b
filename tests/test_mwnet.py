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
    for key in ("acc_plain", "acc_meta", "mean_w_clean", "mean_w_noisy", "weight_auroc"):
        assert isinstance(result[key], float), key


def test_meta_weight_net_beats_plain_training(result):
    assert result["acc_meta"] >= result["acc_plain"] + 0.02, result


def test_flipped_samples_get_lower_weight(result):
    assert result["mean_w_noisy"] < 0.5 * result["mean_w_clean"], result
    assert result["weight_auroc"] > 0.9, result
