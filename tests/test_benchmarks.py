"""The benchmarks run (smoke), and the hand-written floor step computes the exact hypergradient it claims to."""

import sys
from pathlib import Path

import pytest
import torch

from metareweight import MetaWeightNet
from metareweight.core import BilevelProblem
from metareweight.core.hypergrad import Unrolled
from metareweight.data import Batch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
pytest.importorskip("sklearn")
import fast_floor  # noqa: E402
import hypergrad as bench  # noqa: E402


def _double(b: Batch) -> Batch:
    return Batch(b.inputs.double(), b.targets, b.index)


@pytest.mark.parametrize("warm_steps", [0, 2])  # without and with momentum buffers
def test_floor_step_hypergradient_equals_unrolled(warm_steps):
    torch.manual_seed(0)
    model = bench.make_model("mlp16").double()
    opt = torch.optim.SGD(model.parameters(), lr=bench.LR, momentum=bench.MOMENTUM, weight_decay=bench.WD)
    train, meta = bench.make_batches("mlp16", count=3)
    train, meta = [_double(b) for b in train], [_double(b) for b in meta]
    for b in train[1:1 + warm_steps]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(b.inputs), b.targets).backward()
        opt.step()
    objective = MetaWeightNet(hidden=8).double()
    problem = BilevelProblem.from_model(model, opt, objective, [train[0]], meta[0])
    expected = Unrolled()(problem).grads
    out = fast_floor.floor_hypergradient(model, opt, objective, train[0], meta[0])
    got = [p.grad for p in objective.meta_parameters()]
    assert abs(out["meta_loss"] - float(Unrolled()(problem).outer_loss)) < 1e-12
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert max(float(e.abs().max()) for e in expected) > 1e-6  # a real hypergradient, not zeros


def test_floor_benchmark_quick_runs(tmp_path):
    out = fast_floor.main(["--quick", "--out", str(tmp_path / "floor.json")])
    assert out["floor_ms"] > 0 and out["fast_ms"] > 0 and (tmp_path / "floor.json").exists()


def test_hypergrad_benchmark_quick_runs(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["--quick", "--no-memory", "--out", str(path)])
    assert path.exists()


@pytest.mark.parametrize("arch", ["resnet", "resnet_bn"])
def test_resnet_runners_take_a_step(arch):
    for method in ("plain", "fast", "fast_k5"):
        bench.make_runner(method, arch)()


@pytest.mark.slow  # builds four 22 M-parameter BERTs
@pytest.mark.parametrize("arch", ["minilm_adamw", "minilm_sgd", "minilm_lora", "minilm_frozen"])
def test_minilm_runners_take_a_step(arch):
    pytest.importorskip("transformers")
    if arch == "minilm_lora":
        pytest.importorskip("peft")
    bench.make_runner("fast", arch)()
