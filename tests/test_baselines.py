"""The simple baselines of metareweight.baselines against their definitions."""

import math

import pytest
import torch
from torch.nn import functional as F

from metareweight import baselines as B


def test_class_weights_are_inverse_frequency_with_unit_sample_mean():
    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    w = B.class_weights(labels, 4)
    counts = torch.tensor([80.0, 15.0, 5.0])
    assert torch.allclose(w[:3] * counts, torch.full((3,), float(w[0] * 80)))  # w_c · n_c equal across classes
    assert float(w[labels].mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(w[3]) == 0.0  # absent class
    assert torch.allclose(B.class_weights(labels, 3, power=0.0), torch.ones(3))
    sqrt = B.class_weights(labels, 3, power=0.5)
    assert float(sqrt[2] / sqrt[0]) == pytest.approx(4.0, rel=1e-5)  # sqrt(80 / 5)


@pytest.mark.parametrize("bad, match", [(torch.tensor([0.0, 1.0]), "integer"), (torch.tensor([0, 3]), "0..2")])
def test_class_counts_rejects_bad_labels(bad, match):
    with pytest.raises(ValueError, match=match):
        B.class_counts(bad, 3)


def test_balanced_sampler_draws_classes_equally_and_keeps_epoch_length():
    labels = torch.tensor([0] * 950 + [1] * 45 + [2] * 5)
    sampler = B.balanced_sampler(labels, 3, generator=torch.Generator().manual_seed(0))
    drawn = labels[torch.tensor(list(sampler))]
    assert len(drawn) == 1000
    freq = torch.bincount(drawn, minlength=3).float() / 1000
    assert torch.all((freq - 1 / 3).abs() < 0.05), freq  # plain sampling would give 0.95 / 0.045 / 0.005


def test_focal_loss_matches_definition_and_reduces_to_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(B.focal_loss(logits, y, gamma=0.0), ce, atol=1e-6)
    p = torch.exp(-ce)
    assert torch.allclose(B.focal_loss(logits, y, gamma=2.0), (1 - p) ** 2 * ce, atol=1e-6)
    alpha = torch.arange(1.0, 6.0)
    assert torch.allclose(B.focal_loss(logits, y, gamma=0.0, alpha=alpha), alpha[y] * ce, atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        B.focal_loss(logits, y, gamma=-1.0)


def test_focal_loss_down_weights_easy_samples_more_than_hard_ones():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # easy (p=0.98) and hard (p=0.5) sample of class 0
    y = torch.tensor([0, 0])
    ratio = B.focal_loss(logits, y, gamma=2.0) / F.cross_entropy(logits, y, reduction="none")
    assert float(ratio[0]) < 0.001 and float(ratio[1]) == pytest.approx(0.25)


def test_logit_adjustment_is_cross_entropy_under_a_uniform_prior_and_favours_rare_classes():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    uniform = torch.full((4,), 0.25)
    assert torch.allclose(B.logit_adjusted_loss(logits, y, uniform), F.cross_entropy(logits, y, reduction="none"),
                          atol=1e-6)
    prior = torch.tensor([0.7, 0.2, 0.09, 0.01])
    z = torch.zeros(1, 4, requires_grad=True)
    B.logit_adjusted_loss(z, torch.tensor([3]), prior).sum().backward()
    # the minimiser must give the rare class a margin: its gradient pushes its logit up harder than plain CE does
    assert float(-z.grad[0, 3]) > 0.75 + 0.2
    for bad in (torch.tensor([0.5, 0.6, 0.0, 0.0]), torch.tensor([0.5, 0.5])):
        with pytest.raises(ValueError, match="class_prior"):
            B.logit_adjusted_loss(logits, y, bad)


def test_small_loss_mask_keeps_the_smallest_losses():
    losses = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.2, 9.0, 1.0, 0.3, 4.0, 0.4])
    mask = B.small_loss_mask(losses, 0.6)
    assert int(mask.sum()) == 6
    assert float(losses[mask].max()) < float(losses[~mask].min())
    assert int(B.small_loss_mask(losses, 0.01).sum()) == 1 and bool(B.small_loss_mask(losses, 1.0).all())
    with pytest.raises(ValueError, match="keep_ratio"):
        B.small_loss_mask(losses, 0.0)


def test_keep_ratio_schedule_ramps_to_one_minus_forget_rate():
    assert B.keep_ratio_schedule(0, 0.4, 5) == 1.0
    assert B.keep_ratio_schedule(5, 0.4, 5) == pytest.approx(0.6)
    assert B.keep_ratio_schedule(50, 0.4, 5) == pytest.approx(0.6)
    assert B.keep_ratio_schedule(0, 0.4, 0) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="forget_rate"):
        B.keep_ratio_schedule(1, 1.0)
    assert math.isclose(B.keep_ratio_schedule(2, 0.2, 4), 0.9)
