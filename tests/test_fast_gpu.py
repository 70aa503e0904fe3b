"""CUDA-only checks of the fast hypergradient (skipped without a GPU; run by ``benchmarks/gpu_check.sh``): bf16 and
fp16 within 2 % of float32 on a token model with LayerNorm/RMSNorm, a fp16 training run, and every tensor of a meta
step (hypergradients, virtual parameters, replayed gradients) on the model's device."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import Fast, MetaTrainer, MetaWeightNet, TensorIndexedDataset, Unrolled
from metareweight.data import as_batch
from metareweight.precision import Precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class TokenMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 64)
        self.norm = nn.LayerNorm(64)
        self.rms = nn.RMSNorm(64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.rms(torch.tanh(self.norm(self.emb(x)))).mean(1))


def _trainer(**kw):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 6, 8, generator=g)
    y = (x[:, 0, 0] > 0).long() + (x[:, 1, 1] > 0.5).long()
    ds = TensorIndexedDataset(x, y)
    model = TokenMixer().cuda()
    objective = MetaWeightNet(hidden=16).cuda()
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), DataLoader(ds, 32),
                       objective, meta_loader=DataLoader(ds, 32), hypergrad="fast", progress=False, **kw)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("gram", ["always", "never"])
def test_low_precision_fast_within_two_percent_of_float32(mode, gram):
    trainer = _trainer()
    batches = [as_batch(b).to("cuda") for b in trainer.train_loader]
    problem = lambda: trainer.build_problem(batches[:1], batches[1])  # noqa: E731
    exact = torch.cat([g.reshape(-1) for g in Fast(gram=gram)(problem()).grads])
    trainer.precision = Precision(mode, torch.device("cuda"))
    low = torch.cat([g.reshape(-1) for g in Fast(gram=gram)(problem()).grads]) / trainer.precision.meta_scale()
    rel = float((low - exact).norm() / exact.norm())
    print(f"{mode} gram={gram}: relative error {rel:.2e}")
    assert 0 < rel < 2e-2, rel


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_low_precision_training_with_fast_on_gpu(mode):
    trainer = _trainer(precision=mode)
    trainer.fit(epochs=1)
    assert trainer.meta_steps == 4
    assert all(torch.isfinite(p).all() and p.is_cuda for p in trainer.model.parameters())


@pytest.mark.parametrize("method", [Fast(lookahead=True), Fast(gram="always"), Unrolled()])
def test_every_tensor_of_a_meta_step_stays_on_the_gpu(method):
    trainer = _trainer()
    batches = [as_batch(b).to("cuda") for b in trainer.train_loader]
    problem = trainer.build_problem(batches[:1], batches[1])
    result = method(problem)
    assert all(g.is_cuda for g in result.grads)
    if result.lookahead is not None:
        assert all(t.is_cuda for t in result.lookahead[0].values())
    if isinstance(method, Fast) and not method.lookahead:
        _, grads = method.replay(batches[0])
        assert grads and all(g.is_cuda for g in grads.values())
