"""MetaWeightNet(meta_class_prior="train") and weight_advice's ranking advice, on tiny data."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset
from metareweight.data import Batch
from metareweight.objectives.mwnet import weight_advice


def _ce(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_the_train_prior_weights_meta_classes_by_training_label_shares():
    torch.manual_seed(0)
    model, obj = nn.Linear(3, 3), MetaWeightNet(hidden=4, meta_class_prior="train")
    obj.inner_terms(model, Batch(torch.randn(4, 3), torch.tensor([0, 0, 0, 1])))  # shares 3/4, 1/4, 0
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 0])
    ce = _ce(model, x, y)
    expected = 0.75 * ce[y == 0].mean() + 0.25 * ce[y == 1].mean()  # class 2 was never a training label
    assert torch.allclose(obj.outer_loss(model, Batch(x, y)), expected)
    assert torch.allclose(MetaWeightNet(hidden=4).outer_loss(model, Batch(x, y)), ce.mean())  # the paper's mean


def test_balanced_training_labels_leave_a_balanced_meta_loss_unchanged_and_gradients_flow():
    torch.manual_seed(0)
    model, obj = nn.Linear(3, 2), MetaWeightNet(hidden=4, meta_class_prior="train")
    obj.inner_terms(model, Batch(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
    x, y = torch.randn(4, 3), torch.tensor([1, 0, 0, 1])
    loss = obj.outer_loss(model, Batch(x, y))
    assert torch.allclose(loss, _ce(model, x, y).mean())
    loss.backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_regression_targets_fall_back_to_the_mean():
    mse = lambda out, t: ((out.squeeze(1) - t) ** 2)  # noqa: E731
    model, obj = nn.Linear(2, 1), MetaWeightNet(hidden=4, meta_class_prior="train", loss_fn=mse)
    x, t = torch.randn(4, 2), torch.randn(4)
    obj.inner_terms(model, Batch(x, t))
    assert obj.train_class_counts.numel() == 0
    assert torch.allclose(obj.outer_loss(model, Batch(x, t)), mse(model(x), t).mean())


def test_a_bad_prior_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="meta_class_prior must be None or 'train'"):
        MetaWeightNet(meta_class_prior="balanced")


def test_the_counts_survive_a_state_dict_and_the_default_state_is_unchanged():
    obj = MetaWeightNet(hidden=4, meta_class_prior="train")
    obj.inner_terms(nn.Linear(2, 3), Batch(torch.randn(3, 2), torch.tensor([0, 2, 2])))
    fresh = MetaWeightNet(hidden=4, meta_class_prior="train")
    fresh.load_state_dict(obj.state_dict())
    assert fresh.train_class_counts.tolist() == [1.0, 0.0, 2.0]
    assert "train_class_counts" not in MetaWeightNet(hidden=4).state_dict()
    older = {k: v for k, v in obj.state_dict().items() if k != "train_class_counts"}
    MetaWeightNet(hidden=4, meta_class_prior="train").load_state_dict(older)  # a checkpoint from before the prior


def test_the_trainer_counts_every_training_label_in_proportion():
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.tensor([0] * 30 + [1] * 10)
    model = nn.Linear(3, 2)
    obj = MetaWeightNet(hidden=4, meta_class_prior="train")
    MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorIndexedDataset(x, y), 8,
                shuffle=True), obj, meta_loader=DataLoader(TensorIndexedDataset(x[:8], y[:8]), 4),
                hypergrad="fast", progress=False, health=False).fit(epochs=2)
    shares = obj.train_class_counts / obj.train_class_counts.sum()
    assert torch.allclose(shares, torch.tensor([0.75, 0.25], dtype=shares.dtype))


def test_weight_advice_blames_the_class_prior_only_on_imbalanced_labels_without_it():
    w, flipped = np.r_[np.full(70, 0.3), np.full(30, 0.6)], np.arange(100) >= 70
    imbalanced = np.r_[np.zeros(80), np.ones(20)]
    assert 'meta_class_prior="train"' in weight_advice(w, flipped, labels=imbalanced)
    for advice in (weight_advice(w, flipped, labels=np.arange(100) % 2),
                   weight_advice(w, flipped, labels=imbalanced, meta_class_prior="train")):
        assert "ranks flipped samples above clean ones" in advice and "lower meta_lr" in advice
    # inverted although the weights hardly spread: the ranking is the problem, not the meta lr being too small
    unspread = weight_advice(np.r_[np.full(70, 0.30), np.full(30, 0.31)], flipped)
    assert "above clean" in unspread and "raising meta_lr would amplify" in unspread


def test_weight_advice_suggests_per_class_normalisation_on_few_balanced_classes_only():
    w, flipped = np.r_[np.full(70, 0.3), np.full(30, 0.6)], np.arange(100) >= 70
    binary = np.arange(100) % 2
    assert 'normalize="class"' in weight_advice(w, flipped, labels=binary)
    assert 'normalize="class"' not in weight_advice(w, flipped, labels=binary, normalize="class")  # already on
    assert 'normalize="class"' not in weight_advice(w, flipped, labels=np.arange(100) % 10)  # many classes
    assert 'normalize="class"' not in weight_advice(w, flipped, labels=np.r_[np.zeros(80), np.ones(20)])  # imbalance
    assert 'normalize="class"' not in weight_advice(w, flipped)  # no labels: nothing to go on


def test_weight_advice_says_when_the_loss_carries_no_information_about_the_flips():
    rng = np.random.default_rng(0)
    w, flipped = rng.uniform(0.1, 0.9, 400), rng.random(400) < 0.3  # spread, but unrelated to the flips
    assert "carries little information" in weight_advice(w, flipped)
    assert weight_advice(w) is None  # without flags nothing to judge the ranking by


def test_unspread_weights_at_chance_say_the_loss_may_carry_no_information():
    rng = np.random.default_rng(1)
    w, flipped = 0.5 + rng.uniform(0, 0.01, 400), rng.random(400) < 0.3
    advice = weight_advice(w, flipped)
    assert "raise meta_lr" in advice and "no information about the flips" in advice
    assert "no information" not in weight_advice(w)  # without flags the ranking is unknown
