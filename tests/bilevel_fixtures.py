"""Small float64 bilevel problems shared by the hypergradient tests."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from metareweight import Fast, MetaObjective, WeightedTerms
from metareweight.core import BilevelProblem
from metareweight.data import Batch
from metareweight.losses import cross_entropy_terms
from metareweight.models import model_forward


class DirectTermObjective(MetaObjective):
    """A loss → weight net plus a class-bias meta-parameter; the outer loss optionally re-weights the meta loss
    with the same net (a direct φ term, as the self-taught rescaler has)."""

    def __init__(self, num_classes: int, direct: bool, detach_features: bool = False):
        super().__init__()
        self.detach_features = detach_features
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))
        self.class_bias = nn.Parameter(0.1 * torch.randn(num_classes))
        self.direct = direct

    def _w(self, losses, targets):
        losses = losses.detach() if self.detach_features else losses
        feats = torch.stack([losses, losses ** 2], 1).to(self.class_bias.dtype)
        return torch.sigmoid(self.net(feats).squeeze(1) + self.class_bias[targets])

    def inner_terms(self, forward, batch):
        losses = cross_entropy_terms(forward(batch.inputs), batch.targets)
        w = self._w(losses, batch.targets)
        return WeightedTerms(losses, w / w.shape[0])

    def outer_loss(self, forward, batch):
        losses = cross_entropy_terms(forward(batch.inputs), batch.targets)
        if self.direct:
            return (self._w(losses, batch.targets) * losses).mean()
        return losses.mean()


class PerSampleWeights(MetaObjective):
    """One free weight ``sigmoid(φ[index])`` per training sample (the batch's ``index`` picks it): the hypergradient
    of ``φ_i`` is sample ``i``'s own coefficient ``−c_i σ'(φ_i)``, so a per-sample attribution that is wrong but sums
    right (a lookup shared by every sample read as one per sample) shows, where a weight net of near-equal features
    at random init would average it away. The outer loss is the plain mean cross-entropy."""

    def __init__(self, num_samples: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.phi = nn.Parameter(torch.randn(num_samples, generator=g, dtype=torch.float64))

    def inner_terms(self, forward, batch):
        losses = cross_entropy_terms(forward(batch.inputs), batch.targets)
        w = torch.sigmoid(self.phi[batch.index]).to(losses.dtype)
        return WeightedTerms(losses, w / w.shape[0])

    def outer_loss(self, forward, batch):
        return cross_entropy_terms(forward(batch.inputs), batch.targets).mean()


#: inner optimizers the exactness tests sweep over, by name
OPTS = {
    "sgd": (torch.optim.SGD, {"lr": 0.3}),
    "momentum": (torch.optim.SGD, {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-2}),
    "nesterov": (torch.optim.SGD, {"lr": 0.2, "momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {"lr": 0.05}),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
}


def mlp(d_in=5, hidden=7, classes=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


class SmallCNN(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = nn.functional.avg_pool2d(h, 2)
        return self.fc(h.flatten(1))


def batches(kind: str, n: int, count: int, seed: int, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    if kind in ("embedding", "tied"):
        return [Batch(torch.randint(0, VOCAB, (n, 4), generator=g), torch.randint(0, classes, (n,), generator=g))
                for _ in range(count)]
    shape = {"cnn": (n, 1, 8, 8), "seq": (n, 3, 5), "shared": (n, 3, 5)}.get(kind, (n, 5))
    return [Batch(torch.randn(*shape, generator=g, dtype=torch.float64),
                  torch.randint(0, classes, (n,), generator=g)) for _ in range(count)]


# ---- more architectures for the fast method: each exercises one capture rule or one fallback ----------------
VOCAB = 11


class EmbeddingModel(nn.Module):
    """Embedding (with a padding row) → mean over tokens → Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.fc = nn.Linear(6, classes)

    def forward(self, idx):
        return self.fc(torch.tanh(self.emb(idx)).mean(1))


class TiedModel(EmbeddingModel):
    """The embedding matrix is also the output projection (a use outside the Embedding layer). No padding row here:
    its autograd gradient (zero from the lookup, non-zero from the projection) is not the derivative a finite
    difference of the true objective sees."""

    def __init__(self, classes=3):
        super().__init__(classes)
        self.emb.padding_idx = None

    def forward(self, idx):
        logits = torch.tanh(self.emb(idx)).mean(1) @ self.emb.weight.T
        return self.fc(logits[:, :6])


class SeqModel(nn.Module):
    """A Linear on 3-D inputs (batch, time, features), then a mean over time."""

    def __init__(self, classes=3):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.fc = nn.Linear(7, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.proj(x)).mean(1))


class SharedModel(nn.Module):
    """RNN-style: the same recurrent Linear is called at every time step (weight sharing)."""

    def __init__(self, classes=3):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.rec = nn.Linear(7, 7)
        self.fc = nn.Linear(7, classes)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 7, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.fc(h)


def norm_mlp(norm: nn.Module):
    return nn.Sequential(nn.Linear(5, 7), norm, nn.Tanh(), nn.Linear(7, 3))


class Centered(nn.Module):
    """Subtracts the batch mean: couples samples without being a BatchNorm (caught by the first-call check)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


MODELS = {
    "mlp": mlp, "cnn": SmallCNN, "embedding": EmbeddingModel, "tied": TiedModel, "seq": SeqModel,
    "shared": SharedModel, "layernorm": lambda: norm_mlp(nn.LayerNorm(7)),
    "groupnorm": lambda: norm_mlp(nn.GroupNorm(1, 7)), "rmsnorm": lambda: norm_mlp(nn.RMSNorm(7)),
    "batchnorm": lambda: norm_mlp(nn.BatchNorm1d(7)), "centered": lambda: norm_mlp(Centered()),
}


def make_problem(kind="mlp", opt=(torch.optim.SGD, {"lr": 0.3}), unroll=1, direct=False, seed=0,
                 preconditioner="differentiable", warm_steps=0, detach_features=False):
    """A float64 problem; ``warm_steps`` real optimizer steps first so momentum/Adam state is non-trivial."""
    torch.manual_seed(seed)
    model = MODELS[kind]().double()
    objective = DirectTermObjective(3, direct, detach_features).double()
    opt_cls, kw = opt
    optimizer = opt_cls(model.parameters(), **kw)
    for b in batches(kind, 8, warm_steps, seed + 100):
        optimizer.zero_grad()
        cross_entropy_terms(model(b.inputs), b.targets).mean().backward()
        optimizer.step()
    return BilevelProblem.from_model(model, optimizer, objective, batches(kind, 8, unroll, seed + 1),
                                     batches(kind, 10, 1, seed + 2)[0], preconditioner)


def bilevel_value(problem) -> float:
    """The true bilevel objective F(φ) = L_out(θ_k(φ), φ), by running the inner steps without any graph."""
    trajectory, _ = problem.run_inner_steps(create_graph=False)
    with torch.no_grad():
        return float(problem.outer_loss(trajectory[-1]))


def central_difference(problem, direction, h=1e-5) -> float:
    """d F(φ + t·direction)/dt at t = 0, by a float64 central difference (φ restored afterwards)."""
    phi = problem.meta_params

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(phi, direction):
                p.add_(sign * h * d)
        value = bilevel_value(problem)
        with torch.no_grad():
            for p, d in zip(phi, direction):
                p.sub_(sign * h * d)
        return value

    return (shifted(+1) - shifted(-1)) / (2 * h)


def random_direction(problem, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in problem.meta_params]


def dot(a, b) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def warmed_problem(model, make_batch, opt="momentum", classes=3, objective=None):
    """A float64 problem on ``model`` after two warm-up steps (non-trivial momentum / Adam state): train batch of 8,
    meta batch of 10 from ``make_batch(n, seed)``, ``objective`` (default: the direct-term one), Adam's
    preconditioner fixed. ``model`` is called as the trainer calls it (a dict of inputs as keyword arguments, a
    Hugging Face output's logits)."""
    model = model.double()
    forward = model_forward(model)
    objective = (objective or DirectTermObjective(classes, direct=True)).double()
    cls, kw = OPTS[opt]
    optimizer = cls(model.parameters(), **kw)
    for seed in (100, 101):
        b = make_batch(8, seed)
        optimizer.zero_grad()
        nn.functional.cross_entropy(forward(b.inputs), b.targets).backward()
        optimizer.step()
    return BilevelProblem.from_model(model, optimizer, objective, [make_batch(8, 1)], make_batch(10, 2), "fixed")


def fast_announced(problem, **kw):
    """``Fast(**kw)`` on the problem: its grads, the method (``last_paths``) and what it announced in this call
    (``hypergrad='fast': ...`` warnings; announcements are once per process, so reset ``fast._ANNOUNCED`` first
    where earlier calls may have made the same one)."""
    method = Fast(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = method(problem).grads
    return grads, method, [str(w.message) for w in caught if "hypergrad='fast'" in str(w.message)]


def max_rel_err(a, b) -> float:
    """The largest relative error ``|a_i - b_i| / |b_i|`` over two lists of gradients."""
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))
