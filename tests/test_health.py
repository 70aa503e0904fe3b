"""Health warnings: degenerate training is reported once, with advice; healthy training is not."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset
from metareweight.health import HealthMonitor, HealthWarning


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, HealthWarning)]


@pytest.mark.parametrize("weights,meta_steps,fragment", [
    (np.full(64, 1e-6), 10, "weights collapsed"),
    (np.r_[np.full(40, 1e-4), np.full(24, 0.9999)], 10, "weights saturated"),
    (np.full(64, 0.5), 500, "do not spread after 500 meta steps"),
    (np.full(64, 1.0), 500, "weights saturated at 1"),  # uniform because saturated: not "raise the meta lr"
])
def test_weight_problems_are_warned_once_with_advice(weights, meta_steps, fragment):
    monitor = HealthMonitor()
    messages = _caught(lambda: [monitor.check_weights(weights, meta_steps) for _ in range(3)])
    assert len(messages) == 1 and fragment in messages[0]
    assert "meta learning rate" in messages[0]


def test_healthy_weights_and_early_uniform_weights_are_not_warned():
    monitor = HealthMonitor()
    rng = np.random.default_rng(0)
    assert _caught(lambda: monitor.check_weights(rng.uniform(0.2, 0.8, 64), 1000)) == []
    assert _caught(lambda: monitor.check_weights(np.full(64, 0.5), 10)) == []  # too early to judge
    assert _caught(lambda: monitor.check_weights(np.linspace(-1, 1, 64), 10)) == []  # signed: not weights


def test_fixed_weight_baselines_are_never_unspread():
    from metareweight import SelfTaughtRescaler, SourceTaskWeighting
    from metareweight.health import _learns_weights

    assert _caught(lambda: HealthMonitor().check_weights(np.full(64, 0.2), 500, learned=False)) == []
    assert not _learns_weights(type("T", (), {"objective": SourceTaskWeighting(3, mode="uniform")})())
    assert _learns_weights(type("T", (), {"objective": SourceTaskWeighting(3, mode="sample")})())
    assert not _learns_weights(type("T", (), {"objective": SelfTaughtRescaler(2, meta_learning=False)})())
    assert _learns_weights(type("T", (), {"objective": MetaWeightNet()})())


def test_chance_loss_is_warned_after_enough_epochs():
    monitor = HealthMonitor(chance_after_epochs=3)
    assert _caught(lambda: monitor.check_loss(math.log(10) + 0.001, 10, 2)) == []
    messages = _caught(lambda: monitor.check_loss(math.log(10) + 0.001, 10, 3))
    assert len(messages) == 1 and "stuck at chance loss" in messages[0] and "ln 10" in messages[0]
    assert _caught(lambda: monitor.check_loss(0.3, 10, 5)) == []
    assert _caught(lambda: HealthMonitor().check_loss(0.6809, 2, 5)) == []  # 40 % flipped binary labels: near, not at


def _trainer(batch_size, **kw):
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    ds = TensorIndexedDataset(x, (x[:, 0] > 0).long())
    model = nn.Linear(4, 2)
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=batch_size),
                       MetaWeightNet(hidden=4), meta_loader=DataLoader(ds, batch_size=8), progress=False, **kw)


def test_a_batch_of_one_is_warned_by_the_trainer_and_health_false_is_quiet():
    messages = _caught(lambda: _trainer(1).fit(epochs=1, max_steps=2))
    assert any("hypergradient is exactly 0" in m for m in messages)
    assert _caught(lambda: _trainer(1, health=False).fit(epochs=1, max_steps=2)) == []


def test_a_healthy_run_is_not_warned_and_the_state_survives_a_checkpoint(tmp_path):
    trainer = _trainer(8, checkpoint_dir=tmp_path)
    assert _caught(lambda: trainer.fit(epochs=3)) == []
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, HealthMonitor))
    monitor.warned.add("chance")
    trainer.save_checkpoint()
    again = _trainer(8, checkpoint_dir=tmp_path)
    again.load_checkpoint(tmp_path / "last.pt")
    assert next(cb for cb in again.callbacks if isinstance(cb, HealthMonitor)).warned == {"chance"}


def _fake_trainer(weights, noisy, targets, objective):
    from types import SimpleNamespace
    n = len(weights)
    rows = {"step": np.arange(n), "epoch": np.zeros(n, np.int32), "weight": np.asarray(weights, np.float32),
            "noisy": np.asarray(noisy, np.int8), "target": np.asarray(targets)}
    return SimpleNamespace(objective=objective, weights_history=SimpleNamespace(tail=lambda k: rows),
                           epoch=5, meta_steps=1000, global_step=1000)


def test_an_inverted_ranking_on_imbalanced_labels_is_warned_with_the_class_prior_fix():
    flipped = np.arange(100) >= 70
    w = np.where(flipped, 0.6, 0.3)
    imbalanced = np.r_[np.zeros(80, int), np.ones(20, int)]
    trainer = _fake_trainer(w, flipped, imbalanced, MetaWeightNet(hidden=4))
    monitor = HealthMonitor()
    messages = _caught(lambda: [monitor.on_fit_end(trainer) for _ in range(2)])
    assert len(messages) == 1 and 'meta_class_prior="train"' in messages[0] and "AUROC 0.00" in messages[0]
    # with the prior already on, the advice is about the learning rates
    trainer = _fake_trainer(w, flipped, imbalanced, MetaWeightNet(hidden=4, meta_class_prior="train"))
    messages = _caught(lambda: HealthMonitor().on_fit_end(trainer))
    assert len(messages) == 1 and "lower meta_lr" in messages[0]


def test_weights_that_ignore_the_flips_are_warned_and_early_or_good_rankings_are_not():
    rng = np.random.default_rng(0)
    flipped = rng.random(400) < 0.3
    unrelated = _fake_trainer(rng.uniform(0.1, 0.9, 400), flipped, np.arange(400) % 2, MetaWeightNet(hidden=4))
    messages = _caught(lambda: HealthMonitor().on_fit_end(unrelated))
    assert len(messages) == 1 and "carries little information" in messages[0]
    unrelated.epoch = 4  # a fit shorter than ranking_after_epochs: too early to judge
    assert _caught(lambda: HealthMonitor().on_fit_end(unrelated)) == []
    good = _fake_trainer(np.where(flipped, 0.05, 0.6) + rng.uniform(0, 0.1, 400), flipped, np.arange(400) % 2,
                         MetaWeightNet(hidden=4))
    assert _caught(lambda: HealthMonitor().on_fit_end(good)) == []
    unflagged = _fake_trainer(rng.uniform(0.1, 0.9, 400), np.full(400, -1), np.arange(400) % 2,
                              MetaWeightNet(hidden=4))
    assert _caught(lambda: HealthMonitor().on_fit_end(unflagged)) == []


def test_one_epoch_end_near_chance_is_not_a_stuck_model():
    """The demo's case: under reweighting the unweighted loss on noisy labels wanders past ln C (3.18, 2.31, 3.22)."""
    monitor = HealthMonitor(chance_after_epochs=3)
    losses = [3.177, math.log(10) + 0.009, 3.223, 3.472]
    assert _caught(lambda: [monitor.check_loss(v, 10, e) for e, v in enumerate(losses, start=35)]) == []
    stuck = _caught(lambda: [monitor.check_loss(math.log(10) + 0.002, 10, e) for e in (40, 41)])
    assert len(stuck) == 1 and "stuck at chance loss" in stuck[0]


def test_a_train_loss_at_chance_with_a_small_meta_loss_is_not_a_stuck_model():
    """make demo: Meta-Weight-Net on 40 % flipped digits keeps its unweighted train loss near ln 10 for many epochs
    (it refuses the flips) while its clean meta loss is small."""
    monitor = HealthMonitor(chance_after_epochs=3)
    near = math.log(10) + 0.005
    assert _caught(lambda: [monitor.check_loss(near, 10, e, meta_loss=0.2) for e in range(3, 10)]) == []
    stuck = _caught(lambda: [monitor.check_loss(near, 10, e, meta_loss=2.29) for e in (10, 11)])
    assert len(stuck) == 1
