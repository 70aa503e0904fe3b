"""``hypergrad="fast"`` on a model whose samples interact (BatchNorm in train mode): the real step is replayed from
the kept train graph (one backward, no forward) and equals the fresh real step it replaces — parameters, optimizer
state, BatchNorm running statistics and φ after several steps — with SGD+momentum and AdamW (fixed preconditioner),
a meta step every step or every other step. The hypergradient on BatchNorm models is compared with ``unrolled`` and
a float64 central difference in ``tests/test_fast.py`` and ``tests/test_fast_transformers.py``."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bilevel_fixtures import OPTS, make_problem
from metareweight import Fast, MetaTrainer, MetaWeightNet, TensorIndexedDataset
from metareweight.core.hypergrad import fast as fast_module

pytestmark = pytest.mark.usefixtures("one_thread")


class BatchNormCNN(nn.Module):
    """conv → BatchNorm → ReLU → conv → BatchNorm (no affine, cumulative) → mean pool → Linear → BatchNorm1d →
    Linear."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False, momentum=None))
        self.head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def _optimizer(kind, model):
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


def _trainer(opt, meta_interval):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 5, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0, 2, 2] > 0).long() + (x[:, 0, 1, 3] > 0.5).long()
    ds = TensorIndexedDataset(x, y)
    model = BatchNormCNN().double()
    return MetaTrainer(model, _optimizer(opt, model), DataLoader(ds, 16), objective=MetaWeightNet(hidden=8).double(),
                       meta_loader=DataLoader(ds, 16, shuffle=True), hypergrad="fast", adam_preconditioner="fixed",
                       meta_interval=meta_interval, progress=False)


def _fit(opt, meta_interval, replay):
    trainer = _trainer(opt, meta_interval)
    replayed = []
    if replay:
        method_replay = trainer.method.replay
        trainer.method.replay = lambda batch: replayed.append(method_replay(batch)) or replayed[-1]
    else:
        trainer.method.replay = lambda batch: None
    forwards = []
    trainer.model.register_forward_hook(lambda *a: forwards.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the BatchNorm announcement (asserted in tests/test_fast.py)
        trainer.fit(epochs=2)  # 8 steps
    state = [t for group in trainer.optimizer.state.values() for t in group.values() if torch.is_tensor(t)]
    return trainer, replayed, len(forwards), [
        *[p.detach() for p in trainer.model.parameters()], *state,
        *[b.detach() for b in trainer.model.buffers()],  # BatchNorm running statistics and step counts
        *[p.detach() for p in trainer.objective.meta_parameters()]]


@pytest.mark.parametrize("meta_interval", [1, 2])
@pytest.mark.parametrize("opt", ["momentum", "adamw"])
def test_replayed_real_step_equals_the_fresh_one(opt, meta_interval):
    fresh, _, fresh_forwards, expected = _fit(opt, meta_interval, replay=False)
    trainer, replayed, forwards, got = _fit(opt, meta_interval, replay=True)
    meta_steps = 8 // meta_interval
    assert trainer.meta_steps == fresh.meta_steps == meta_steps and trainer.global_step == 8
    # every meta step's real step came from the kept graph: the model ran once less per meta step
    assert sum(r is not None for r in replayed) == meta_steps  # plain steps between have nothing to replay
    assert forwards == fresh_forwards - meta_steps
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the running statistics moved (a replay that skipped their update would not have been caught otherwise)
    assert int(trainer.model.body[1].num_batches_tracked) == 8
    assert not torch.equal(trainer.model.body[1].running_mean, torch.zeros(4))


def test_replay_gives_the_gradient_and_running_statistics_of_the_real_step():
    """On the problem itself: what replay returns and writes equals a fresh forward + backward with new weights."""
    problem = make_problem("batchnorm", OPTS["momentum"], warm_steps=2, preconditioner="fixed")
    model, batch = problem.model, problem.train_batches[0]
    before = {k: v.clone() for k, v in model.named_buffers()}
    method = Fast()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        method(problem)
    assert set(method.last_paths.values()) == {"jvp"}
    for k, v in model.named_buffers():  # the call itself leaves the model's running statistics alone
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        for p in problem.meta_params:  # as if φ took its meta step
            p.mul_(1.1)
    expected_buffers = {k: v.clone() for k, v in before.items()}
    model_copy = {k: v.clone() for k, v in model.named_parameters()}
    fresh = problem.inner(fast_module.bind(model, model_copy, expected_buffers), batch)
    true = torch.autograd.grad((fresh.weights.detach() * fresh.terms).sum(), list(model_copy.values()))

    wt, grads = method.replay(batch)
    torch.testing.assert_close(wt.weights, fresh.weights, rtol=1e-12, atol=1e-14)
    for (name, _), t in zip(model.named_parameters(), true):
        torch.testing.assert_close(grads[name], t, rtol=1e-10, atol=1e-13)
    changed = 0
    for k, v in model.named_buffers():  # written as the real step's forward would
        torch.testing.assert_close(v, expected_buffers[k], rtol=0, atol=0)
        changed += not torch.equal(v, before[k])
    assert changed >= 2  # running mean and variance (and the step count)
    assert method.replay(batch) is None  # one use per call


def test_no_graph_kept_where_the_real_step_cannot_replay():
    problem = make_problem("batchnorm", OPTS["momentum"], warm_steps=2, preconditioner="fixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lookahead = Fast(lookahead=True)
        lookahead(problem)
        assert lookahead._capture is None  # real_step="lookahead" commits θ': the train graph is not kept
        method = Fast()
        method(problem)
    assert method.replay(make_problem("batchnorm", OPTS["momentum"]).train_batches[0]) is None  # another batch


class InPlaceAfterConv(nn.Module):
    """A conv whose output a ReLU overwrites in place (its recorded output is no longer the primal), then BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.norm(torch.relu_(self.conv(x))).mean((2, 3)))


def _image_problem(model, opt="momentum"):
    from bilevel_fixtures import DirectTermObjective
    from metareweight import Batch, BilevelProblem

    g = torch.Generator().manual_seed(3)

    def batch(n):
        return Batch(torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))

    model = model.double()
    optimizer = _optimizer(opt, model)
    return BilevelProblem.from_model(model, optimizer, DirectTermObjective(3, False).double(), [batch(8)], batch(10),
                                     "fixed")


def _count_primal_reuse(monkeypatch):
    """``{"reused": n, "recomputed": m}``: how many Linear / Conv calls of the forward-mode pass took the train
    pass's output as their primal, and how many ran their forward again."""
    counts = {"reused": 0, "recomputed": 0}
    tangent_only = fast_module._tangent_only_forward

    def counting(module, original, pending, *args, **kwargs):
        ran = []
        out = tangent_only(module, lambda *a, **k: ran.append(1) or original(*a, **k), pending, *args, **kwargs)
        counts["recomputed" if ran else "reused"] += 1
        return out

    monkeypatch.setattr(fast_module, "_tangent_only_forward", counting)
    return counts


@pytest.mark.parametrize("model,reused", [(BatchNormCNN, 4), (InPlaceAfterConv, 1)])
@pytest.mark.parametrize("opt", ["momentum", "adamw"])
def test_jvp_reuses_the_train_outputs_of_linear_and_conv_layers(model, reused, opt, monkeypatch):
    """The forward-mode pass takes the train pass's Linear / Conv outputs as primals and computes only their tangents
    (a conv output overwritten in place is recomputed instead); the hypergradient is unchanged."""
    from metareweight import Unrolled

    torch.manual_seed(0)
    problem = _image_problem(model(), opt)
    counts = _count_primal_reuse(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        grads = Fast()(problem).grads
        assert counts["reused"] == reused and counts["recomputed"] == (1 if model is InPlaceAfterConv else 0)
        plain = Fast(reuse_primals=False)(problem).grads
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    for a, b in zip(grads, Unrolled()(problem).grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_under_autocast_no_graph_is_kept_and_the_jvp_recomputes_its_primals(monkeypatch):
    """bf16 autocast: ``MetaStep`` replays fp32 only, so the train graph is not kept; the captured outputs are bf16
    products, so the forward-mode pass recomputes its primals (under autocast) instead of reusing them."""
    from metareweight import Batch, MetaStep

    torch.manual_seed(0)
    model = BatchNormCNN()
    g = torch.Generator().manual_seed(2)

    def batch(n):
        return Batch(torch.randn(n, 1, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n))

    counts = _count_primal_reuse(monkeypatch)
    step = MetaStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), MetaWeightNet(hidden=8), "fast",
                    adam_preconditioner="fixed", precision="bf16")
    before = model.body[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = step.step(batch(8), batch(8))
    assert step.method._capture is None  # nothing kept for a replay that will not come
    assert counts == {"reused": 0, "recomputed": 4}
    assert torch.isfinite(torch.tensor(out.metrics["meta_loss"]))
    assert int(model.body[1].num_batches_tracked) == 1 and not torch.equal(model.body[1].running_mean, before)
