"""MetaWeightNet's per-batch normalisation: w / Σw over the global batch, uniform when the weights collapse."""

import torch

from metareweight import Batch, Collectives, MetaWeightNet
from metareweight.objectives.mwnet import COLLAPSED_WEIGHT, normalized


class _OtherRank(Collectives):
    """Two pretend ranks: the other rank's values of each reduced tensor are given; means are exact."""

    enabled, world_size = True, 2

    def __init__(self, *others):
        self.others = others

    def _differentiable_mean(self, tensors):
        return [(t + torch.as_tensor(o, dtype=t.dtype)) / 2 for t, o in zip(tensors, self.others)]


def _collapsed(hidden=4):
    obj = MetaWeightNet(hidden=hidden)
    with torch.no_grad():
        obj.net[2].bias.fill_(-200.0)  # every sigmoid is exactly 0 in float32
    return obj


def test_collapsed_weights_fall_back_to_uniform_with_finite_gradients():
    torch.manual_seed(0)
    obj, model = _collapsed(), torch.nn.Linear(3, 2)
    wt = obj.inner_terms(model, Batch(torch.randn(8, 3), torch.randint(0, 2, (8,))))
    assert float(wt.report.detach().max()) == 0.0  # the raw weights did collapse
    torch.testing.assert_close(wt.weights.detach().reshape(-1), torch.full((8,), 1 / 8))
    (wt.weights * wt.terms).sum().backward()
    grads = [p.grad for p in [*model.parameters(), *obj.meta_parameters()] if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in (p.grad for p in model.parameters()))  # the model still trains


def test_small_weights_above_the_floor_are_still_normalised_exactly():
    w = torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64) * (10 * COLLAPSED_WEIGHT)
    torch.testing.assert_close(normalized(w, Collectives()), w / w.sum())


def test_data_parallel_uses_the_global_sum_and_the_global_batch_size():
    w = torch.tensor([0.2, 0.6])
    # healthy: this rank's weights over the mean of the ranks' sums (0.8 here, 1.2 there)
    torch.testing.assert_close(normalized(w, _OtherRank(1.2, 2.0)), w / 1.0)
    # collapsed on every rank: 1 / the mean batch size (2 here, 6 there), so the ranks' mean loss is the global mean
    torch.testing.assert_close(normalized(torch.zeros(2), _OtherRank(0.0, 6.0)), torch.full((2,), 1 / 4))
    # the decision is the global one: a rank whose own weights collapsed still divides by the global sum
    torch.testing.assert_close(normalized(torch.zeros(2), _OtherRank(3.0, 2.0)), torch.zeros(2))


def test_per_class_normalisation_keeps_each_class_share_and_ranks_within_it():
    from metareweight.objectives.mwnet import normalized_per_class

    w = torch.tensor([0.2, 0.6, 0.1, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 2, 2, 2])  # class 1 absent
    out = normalized_per_class(w, y, Collectives())
    torch.testing.assert_close(out[:2].sum(), torch.tensor(2 / 5, dtype=torch.float64))
    torch.testing.assert_close(out[2:].sum(), torch.tensor(3 / 5, dtype=torch.float64))
    torch.testing.assert_close(out[:2], w[:2].detach() / 0.8 * 2 / 5)
    # a class-level change of the raw weights (all of class 2 doubled) changes nothing
    w2 = w.detach().clone()
    w2[2:] *= 2
    torch.testing.assert_close(normalized_per_class(w2, y, Collectives()), out.detach())
    # so the gradient of any loss has no class-level component: Σ_{i in c} w_i ∂/∂w_i = 0 per class
    (out * torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0], dtype=torch.float64)).sum().backward()
    for c in (0, 2):
        assert abs(float((w.grad * w.detach())[y == c].sum())) < 1e-12


def test_per_class_normalisation_collapsed_class_uniform_and_data_parallel_global():
    from metareweight.objectives.mwnet import normalized_per_class

    y = torch.tensor([0, 1, 1])
    out = normalized_per_class(torch.tensor([0.0, 0.5, 1.5]), y, Collectives())
    torch.testing.assert_close(out, torch.tensor([1 / 3, 2 / 3 * 0.25, 2 / 3 * 0.75]))

    class Other(_OtherRank):
        def _agree_min(self, tensor):
            return torch.minimum(tensor, torch.as_tensor(-3))  # the other rank has seen class 2

    # the other rank's (class sums, counts, batch size): (1, 0, 2), (1, 0, 1), 2 -> global sums 1.5, 0.5, 1; counts
    # 1, 1, 0.5 (means); sizes 3 and 2
    got = normalized_per_class(torch.tensor([2.0, 0.5, 0.5]), y, Other([1.0, 0.0, 2.0], [1.0, 0.0, 1.0], 2.0))
    torch.testing.assert_close(got, torch.tensor([2.0 * (1.0 / 2.5) / 1.5, 0.5 * (1.0 / 2.5) / 0.5,
                                                  0.5 * (1.0 / 2.5) / 0.5]))


def test_per_class_normalisation_refuses_targets_that_are_not_classes():
    import pytest

    from metareweight.losses import mse_terms

    obj = MetaWeightNet(hidden=4, normalize="class", loss_fn=mse_terms)  # regression: no classes to normalise in
    with pytest.raises(ValueError, match=r"normalize='class'\) needs one integer class label"):
        obj.inner_terms(torch.nn.Linear(3, 1), Batch(torch.randn(4, 3), torch.randn(4, 1)))
    with pytest.raises(ValueError, match="normalize must be True, False or 'class'"):
        MetaWeightNet(normalize="batch")


def test_per_class_normalised_hypergradient_is_exact_with_fast_and_unrolled():
    torch.manual_seed(0)
    _assert_fast_unrolled_and_central_difference_agree(MetaWeightNet(hidden=4, normalize="class").double())


def _assert_fast_unrolled_and_central_difference_agree(objective):
    """On a float64 MLP with momentum SGD: ``fast`` equals ``unrolled``, and ``unrolled`` a central difference."""
    import pytest

    from bilevel_fixtures import MODELS, batches, central_difference, dot, random_direction
    from metareweight import BilevelProblem, Fast, Unrolled

    model = MODELS["mlp"]().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    problem = BilevelProblem.from_model(model, opt, objective, batches("mlp", 8, 1, 1), batches("mlp", 10, 1, 2)[0])
    fast, unrolled = Fast()(problem).grads, Unrolled()(problem).grads
    for a, b in zip(fast, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    d = random_direction(problem, 1)
    assert dot(unrolled, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-10)


def test_class_aware_net_weighs_by_label_and_its_hypergradient_is_exact():
    torch.manual_seed(0)
    objective = MetaWeightNet(hidden=4, classes=3).double()
    assert objective.net[0].in_features == 4  # the loss and a one-hot label
    losses = torch.full((3,), 0.7, dtype=torch.float64)
    w = objective.weight(losses, torch.tensor([0, 1, 2])).detach()
    assert len({round(float(v), 12) for v in w}) == 3  # the same loss, three labels: three weights
    _assert_fast_unrolled_and_central_difference_agree(objective)


def test_class_aware_net_refuses_labels_it_cannot_encode():
    import pytest

    objective = MetaWeightNet(hidden=4, classes=2)
    with pytest.raises(ValueError, match=r"MetaWeightNet\(classes=2\) .* needs one integer label in \[0, 2\)"):
        objective.weight(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"needs one integer label"):
        objective.weight(torch.rand(3))  # a loss-only call
    with pytest.raises(ValueError, match=r"needs one integer label"):
        objective.weight(torch.rand(3), torch.rand(3))  # float targets (a regression)
    for bad in (1, 2.0, True):
        with pytest.raises(ValueError, match="classes must be None or the number of classes"):
            MetaWeightNet(classes=bad)
