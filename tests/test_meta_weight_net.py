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
