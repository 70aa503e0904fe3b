"""experiments/classic.py: the data splits it builds, and a seconds-long smoke run on real Fashion-MNIST."""

import json

import numpy as np
import pytest

from experiments import classic
from metareweight.data.text import MissingDataError


def fake_arrays(per_class=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), per_class)
    return rng.integers(0, 255, (len(y), 28, 28), dtype=np.uint8), y, rng.integers(0, 255, (50, 28, 28),
                                                                                   dtype=np.uint8), y[:50]


CFG = dict(classic.FULL, train_per_class=50, meta_per_class=5, test_size=40)


def test_noisy_settings_corrupt_train_labels_only_and_keep_a_balanced_clean_meta_set():
    arrays = fake_arrays()
    for setting in ("sym40", "pair40"):
        t = classic.make_task(setting, 0, CFG, arrays)
        assert len(t.y_train) == 500 and float(t.noisy.float().mean()) == pytest.approx(0.4)
        assert (t.y_train != t.y_train_clean).equal(t.noisy)
        assert np.bincount(t.y_train_clean.numpy(), minlength=10).tolist() == [50] * 10
        assert np.bincount(t.y_meta.numpy(), minlength=10).tolist() == [5] * 10
        assert t.x_test.shape == (40, 1, 28, 28)
        if setting == "pair40":  # pair flips go to the next class
            assert t.y_train[t.noisy].equal((t.y_train_clean[t.noisy] + 1) % 10)


def test_long_tail_has_the_imbalance_factor_and_disjoint_meta_data():
    arrays = fake_arrays(per_class=120)
    cfg = dict(CFG, train_per_class=100)
    t = classic.make_task("lt100", 0, cfg, arrays)
    counts = np.bincount(t.y_train.numpy(), minlength=10)
    assert counts[0] == 100 and counts[-1] == 1 and (np.diff(counts) <= 0).all()
    assert not t.noisy.any()
    train_rows = {r.tobytes() for r in t.x_train.numpy()}
    assert not any(r.tobytes() in train_rows for r in t.x_meta.numpy())


def test_validation_split_is_balanced_disjoint_and_leaves_the_other_splits_unchanged():
    """Settings are chosen on ``val_per_class`` held-out training images, never on the test set."""
    arrays = fake_arrays(per_class=120)
    cfg = dict(CFG, train_per_class=100, meta_per_class=5)
    for setting in ("sym40", "lt100"):
        without = classic.make_task(setting, 3, cfg, arrays)
        t = classic.make_task(setting, 3, dict(cfg, val_per_class=15), arrays)
        assert without.x_val is None
        assert np.bincount(t.y_val.numpy(), minlength=10).tolist() == [15] * 10
        for name in ("x_train", "y_train", "x_meta", "y_meta", "x_test", "y_test"):
            assert getattr(t, name).equal(getattr(without, name)), name
        seen = {r.tobytes() for r in np.concatenate([t.x_train.numpy(), t.x_meta.numpy()])}
        assert not any(r.tobytes() in seen for r in t.x_val.numpy())


def test_unknown_settings_or_methods_are_config_errors():
    with pytest.raises(ValueError, match="'methods'.*'mwnett'"):
        classic.main(["--set", "methods=[mwnett]"])
    with pytest.raises(ValueError, match="'mwnet_meta_optimizer'.*'sdg'"):
        classic.main(["--set", "mwnet_meta_optimizer=sdg"])


def test_baselines_on_the_clean_meta_set_take_as_many_steps_as_plain_training(monkeypatch):
    """``meta_only`` trains on the clean meta set alone (cycled to plain training's steps per epoch, so it is not short
    of updates); ``plain_plus_meta`` trains plain cross-entropy on train + meta set."""
    seen = {}
    train_plain = classic.train_plain

    def spy(model, opt, loader, epochs, **kw):
        from metareweight.data import as_batch
        batches = [as_batch(raw) for raw in loader]
        seen.setdefault("runs", []).append((len(batches) * epochs, sum(len(b.targets) for b in batches),
                                            {int(i) for b in batches for i in b.index}, len(loader.dataset)))
        return train_plain(model, opt, batches, epochs, **kw)

    monkeypatch.setattr(classic, "train_plain", spy)
    cfg = dict(CFG, model="mlp", epochs=1, batch_size=20, lr_milestones=[])
    task = classic.make_task("sym40", 0, cfg, fake_arrays())
    for method in ("plain", "meta_only", "plain_plus_meta"):
        assert 0.0 <= classic.run_method(method, task, cfg, 0)["test_acc"] <= 1.0
    (plain_steps, plain_n, _, n_train), (meta_steps, meta_n, meta_idx, n_meta), (both_steps, _, _, n_both) = \
        seen["runs"]
    assert (n_train, n_meta, n_both) == (500, 50, 550)
    assert plain_steps == meta_steps == 25 and both_steps == 27
    assert meta_idx == set(range(50)) and meta_n == plain_n  # every meta sample, cycled to plain's sample count
    assert {"meta_only", "plain_plus_meta"} <= set(classic.METHODS) and set(classic.LABELS) == set(classic.METHODS)


def test_quick_smoke_run_on_fashion_mnist(tmp_path):
    try:
        from metareweight.data.datasets import load_fashion_mnist
        load_fashion_mnist()
    except MissingDataError as e:
        pytest.skip(str(e))
    out = tmp_path / "classic.json"
    result = classic.main(["--quick", "--out", str(out), "--set", "train_per_class=20", "test_size=100", "epochs=1",
                           "meta_per_class=2", "batch_size=16", "storm_passes=2", "val_per_class=5"])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    assert set(result["summary"]) == set(classic.SETTINGS)
    assert result["failures"] == []
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in result["per_seed"])  # held-out validation accuracy recorded
    for setting, methods in result["summary"].items():
        assert set(methods) == set(classic.METHODS), setting
        assert all(0.0 <= m["mean"] <= 1.0 for m in methods.values())
    again = classic.main(["--from-json", str(out), str(out), "--plot", str(tmp_path / "classic.png")])  # no training
    assert (tmp_path / "classic.png").stat().st_size > 10_000
    assert {s: {m: v["n"] for m, v in ms.items()} for s, ms in again["summary"].items()} == \
        {s: {m: 2 for m in ms} for s, ms in result["summary"].items()}  # merged: every run counted twice
    rerun = dict(result, per_seed=[dict(r, test_acc=0.5) for r in result["per_seed"]])
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    replaced = classic.main(["--from-json", str(out), str(tmp_path / "rerun.json"), "--replace"])
    assert {s: {m: (v["n"], v["mean"]) for m, v in ms.items()} for s, ms in replaced["summary"].items()} == \
        {s: {m: (1, 0.5) for m in ms} for s, ms in result["summary"].items()}  # the re-run replaces, not adds


def test_cnn_meta_weight_net_trains_the_same_with_the_fast_and_unrolled_hypergradients(monkeypatch):
    """The table's CNN runs Meta-Weight-Net with ``hypergrad: fast``: exact for one SGD step, so the same parameters."""
    import torch

    models = []
    make = classic.make_model
    monkeypatch.setattr(classic, "make_model", lambda kind: models.append(make(kind)) or models[-1])
    methods = []
    trainer = classic.MetaTrainer
    monkeypatch.setattr(classic, "MetaTrainer", lambda *a, **k: methods.append(k["hypergrad"]) or trainer(*a, **k))
    cfg = dict(CFG, model="cnn", epochs=2, batch_size=50, lr_milestones=[1])
    task = classic.make_task("sym40", 0, cfg, fake_arrays())
    runs = [classic.run_method("mwnet", task, dict(cfg, hypergrad=h), 0) for h in ("unrolled", "fast")]
    assert runs[0]["weight_auroc"] == pytest.approx(runs[1]["weight_auroc"], abs=1e-6)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, torch.nn.Conv2d) for m in models[0])
    assert methods == ["unrolled", "unrolled", "fast", "fast"]  # one trainer per learning-rate phase


def test_long_schedule_lt100_config_is_the_main_config_with_four_times_the_epochs_and_the_decay_moved_with_them():
    from pathlib import Path

    from experiments.common import load_config

    root = Path(__file__).resolve().parents[1]
    base = load_config(str(root / "configs" / "classic.yaml"), classic.FULL)
    long = load_config(str(root / "configs" / "classic_lt_long.yaml"), classic.FULL)
    assert long["settings"] == ["lt100"] and long["seeds"] == list(range(10))
    assert "self_taught" not in long["methods"] and {"plain", "mwnet"} <= set(long["methods"])
    assert long["epochs"] == 4 * base["epochs"] and long["lr_milestones"] == [4 * m for m in base["lr_milestones"]]
    assert classic.lr_phases(long) == [(0, 40, 0.05), (40, 60, pytest.approx(0.005))]
    changed = {k for k in base if base[k] != long[k]}
    assert changed == {"settings", "methods", "seeds", "epochs", "lr_milestones"}  # nothing else differs


def test_lt100_validation_config_uses_design_seeds_and_a_validation_split_and_nothing_else_differs():
    """lt100 settings are chosen on seeds 100-105 and a held-out validation split, apart from the reported seeds."""
    from pathlib import Path

    from experiments.common import load_config

    root = Path(__file__).resolve().parents[1]
    base = load_config(str(root / "configs" / "classic.yaml"), classic.FULL)
    val = load_config(str(root / "configs" / "classic_lt_val.yaml"), classic.FULL)
    assert val["settings"] == ["lt100"] and val["methods"] == ["plain", "mwnet"] and val["val_per_class"] > 0
    assert not set(val["seeds"]) & set(range(10))  # reported seeds are 0-9
    assert base["val_per_class"] == 0
    assert {k for k in base if base[k] != val[k]} == {"settings", "methods", "seeds", "val_per_class"}


def test_cnn_meta_weight_net_run_is_bitwise_the_same_under_any_python_hash_seed():
    """The fast hypergradient summed its per-layer terms in a set's order, which follows PYTHONHASHSEED: each process
    rounded differently and the table's Meta-Weight-Net accuracies moved by up to 2 points between identical runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (
        "import hashlib, sys\n"
        "import numpy as np\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from experiments import classic\n"
        "rng = np.random.default_rng(0)\n"
        "y = np.repeat(np.arange(10), 60)\n"
        "arrays = rng.integers(0, 255, (600, 28, 28), dtype=np.uint8), y, rng.integers(0, 255, (50, 28, 28), "
        "dtype=np.uint8), y[:50]\n"
        "cfg = dict(classic.FULL, train_per_class=50, meta_per_class=5, test_size=40, epochs=2, batch_size=50, "
        "lr_milestones=[1])\n"
        "models, make = [], classic.make_model\n"
        "classic.make_model = lambda kind: models.append(make(kind)) or models[-1]\n"
        "classic.run_method('mwnet', classic.make_task('sym40', 0, cfg, arrays), cfg, 0)\n"
        "print(hashlib.sha1(b''.join(p.detach().numpy().tobytes() for p in models[0].parameters())).hexdigest())\n")
    digests = set()
    for hash_seed in ("0", "1"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                             check=True)
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="measured (RESULTS.md, classic): on lt100 Meta-Weight-Net - plain = +0.1 +- 1.1 points "
                   "over seeds 0-9 (6/10 ahead), a tie: loss-based weights give the tail classes at most ~1.2x the "
                   "head's weight, and a larger meta lr concentrates each update on a few high-loss samples")
def test_meta_weight_net_beats_plain_on_the_long_tail_by_more_than_one_standard_error():
    """Must-show of issue 7 on lt100, with a real margin: the paired mean gain over the ten reported seeds exceeds its
    standard error (sd / sqrt(10)). ~3 minutes."""
    try:
        from metareweight.data.datasets import load_fashion_mnist
        load_fashion_mnist()
    except MissingDataError as e:
        pytest.skip(str(e))
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[1] / "configs" / "classic.yaml")
    result = classic.main(["--config", config, "--set", "methods=[plain,mwnet]", "settings=[lt100]",
                           "seeds=[0,1,2,3,4,5,6,7,8,9]"])
    acc = {(r["method"], r["seed"]): r["test_acc"] for r in result["per_seed"]}
    gains = np.array([acc[("mwnet", s)] - acc[("plain", s)] for s in range(10)])
    assert gains.mean() > gains.std(ddof=1) / np.sqrt(len(gains)), gains


@pytest.mark.slow
def test_meta_weight_net_beats_plain_with_the_mlp_on_every_setting_on_unseen_seeds():
    """Must-show of issue 7 with the MLP table's model, on seeds 40-44 that no reported run used (written before
    they were run): in every setting the paired mean gain exceeds two standard errors. ~5 minutes."""
    try:
        from metareweight.data.datasets import load_fashion_mnist
        load_fashion_mnist()
    except MissingDataError as e:
        pytest.skip(str(e))
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[1] / "configs" / "classic_mlp.yaml")
    seeds = [40, 41, 42, 43, 44]
    result = classic.main(["--config", config, "--set", "methods=[plain,mwnet]", f"seeds={seeds}".replace(" ", "")])
    acc = {(r["setting"], r["method"], r["seed"]): r["test_acc"] for r in result["per_seed"]}
    for setting in ("sym40", "pair40", "lt100"):
        gains = np.array([acc[(setting, "mwnet", s)] - acc[(setting, "plain", s)] for s in seeds])
        assert gains.mean() > 2 * gains.std(ddof=1) / np.sqrt(len(gains)), (setting, gains)
