"""MetaStep: the per-step API the trainer and custom loops share, the objective context, the collectives strategy,
method capabilities, and the README's custom-loop and Hugging Face examples."""

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import (Batch, BilevelProblem, Collectives, MetaContext, MetaObjective, MetaStep, MetaTrainer,
                          MetaWeightNet, NonFiniteLossError, TensorIndexedDataset, Unrolled, WeightedTerms,
                          symmetric_noise)
from metareweight.core.hypergrad import HypergradMethod
from metareweight.core.problem import HypergradResult
from metareweight.losses import cross_entropy_terms

README = Path(__file__).resolve().parents[1] / "README.md"


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorIndexedDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)


def _params(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("method", ["unrolled", "fast"])
def test_a_custom_loop_of_meta_steps_equals_the_trainer(method):
    ds = _data()
    runs = []
    for custom in (False, True):
        model, opt = _model_and_opt()
        torch.manual_seed(1)
        objective = MetaWeightNet(hidden=6)
        train = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2))
        meta_loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
        if custom:
            meta = MetaStep(model, opt, objective, method)
            meta_batches = iter(meta_loader)
            for i, batch in enumerate(train):  # meta_interval=2: a meta step on every other batch
                out = meta.step(batch, next(meta_batches)) if i % 2 == 0 else meta.plain_step(batch)
                assert len(out.weights) == 1 and out.sample_weights()[0].shape == (16,)
            steps = (meta.global_step, meta.meta_steps)
        else:
            trainer = MetaTrainer(model, opt, train, objective, meta_loader=meta_loader, hypergrad=method,
                                  meta_interval=2, progress=False)
            trainer.fit(epochs=1)
            steps = (trainer.global_step, trainer.meta_steps)
        assert steps == (4, 2)
        runs.append(_params(model, objective))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_manual_learning_rate_change_reaches_the_virtual_step():
    """The hypergradient after a hand-made lr change equals that of a freshly mirrored optimizer (no stale copy)."""
    ds = _data()
    model, opt = _model_and_opt()
    objective = MetaWeightNet(hidden=6)
    meta = MetaStep(model, opt, objective)
    batch, meta_batch = Batch(ds.x[:16], ds.y[:16]), Batch(ds.x[16:32], ds.y[16:32])
    before = Unrolled()(meta.build_problem([batch], meta_batch)).grads
    opt.param_groups[0]["lr"] = 0.05
    after = Unrolled()(meta.build_problem([batch], meta_batch)).grads
    fresh = Unrolled()(BilevelProblem.from_model(model, opt, objective, [batch], meta_batch)).grads
    for a, f in zip(after, fresh):
        torch.testing.assert_close(a, f, rtol=0, atol=0)
    assert any(not torch.allclose(a, b) for a, b in zip(after, before))


class _Counting(Collectives):
    """Two pretend ranks whose reductions are identities, counting the differentiable means."""

    enabled, world_size = True, 2

    def __init__(self):
        self.means = 0

    def _differentiable_mean(self, tensors):
        self.means += 1
        return list(tensors)

    def _all_reduce_mean_(self, tensors):
        pass


def test_objectives_reduce_through_the_collectives_of_their_step_and_suspended_is_local():
    ds = _data()
    model, opt = _model_and_opt()
    objective = MetaWeightNet(hidden=6)
    collectives = _Counting()
    meta = MetaStep(model, opt, objective, collectives=collectives)
    assert objective.collectives is collectives
    problem = meta.build_problem([Batch(ds.x[:16], ds.y[:16])], Batch(ds.x[16:32], ds.y[16:32]))
    assert problem.collectives is collectives
    problem.inner_terms(problem.params, problem.train_batches[0])
    assert collectives.means == 1  # the weight normaliser of the global batch
    with collectives.suspended():
        problem.inner_terms(problem.params, problem.train_batches[0])
        assert collectives.local and collectives.differentiable_mean([torch.ones(1)])[0] is not None
    assert collectives.means == 1 and not collectives.local
    base = Collectives()
    t = torch.tensor([3.0, -1.0])
    assert not base.enabled and base.world_size == 1 and base.rank == 0 and base.is_main
    assert base.agree_min(t) is t and base.all_gather_rows([t]) == ([t], 0) and base.gather_object(5) == [5]


def test_the_distributed_context_implements_collectives_on_two_processes(tmp_path):
    """all_reduce_mean_, agree_min, all_gather_rows, differentiable_mean and suspended() on a real gloo group."""
    import os
    import subprocess
    import sys

    script = Path(__file__).parent / "scripts" / "collectives_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = torch.load(tmp_path / "collectives.pt", weights_only=False)
    for r, got in enumerate(ranks):
        assert got["enabled"] and got["world_size"] == 2
        assert got["mean"][0].tolist() == [1.5, 2.0] and got["mean"][1].tolist() == [5.0]
        assert got["min"].tolist() == [0.0, 0.0]
        rows, offset = got["rows"]
        assert rows[0].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]] and offset == (0, 1)[r]
        mean, grad = got["diff"]
        assert float(mean) == pytest.approx((4.0 + 9.0) / 2)  # x = 2, 3
        assert float(grad) == pytest.approx(2 * (2.0 + r))  # ∂(x_r²/2)/∂x_r from each of the two ranks' losses
        is_local, local, diff = got["suspended"]
        assert is_local and local.tolist() == [float(r)] and diff.tolist() == [float(r)]
        assert got["after"] is False


class _Bandit(MetaObjective):
    """An objective with its own meta step: one real step through the context for the first batch, the second
    batch consumed by the objective itself (recorded through the context)."""

    uses_hypergradient = False

    def __init__(self):
        super().__init__()
        self.seen = []

    def inner_terms(self, forward, batch):
        losses = cross_entropy_terms(forward(batch.inputs), batch.targets)
        return WeightedTerms(losses, torch.full_like(losses, 1.0 / len(losses)))

    def outer_loss(self, forward, batch):
        return cross_entropy_terms(forward(batch.inputs), batch.targets).mean()

    def meta_step(self, context, batches, meta_batch):
        assert isinstance(context, MetaContext) and not hasattr(context, "global_step")
        self.seen.append(sorted(vars(context)))
        loss = context.real_step(batches[0])
        context.record(batches[1], torch.zeros(batches[1].size))
        return {"train_loss": loss}


def test_step_counting_lives_in_meta_step_when_the_objective_updates_the_model_itself():
    ds = _data()
    model, opt = _model_and_opt()
    objective = _Bandit()
    trainer = MetaTrainer(model, opt, DataLoader(ds, batch_size=16), objective, meta_loader=DataLoader(ds, batch_size=8),
                          unroll_steps=2, progress=False)
    trainer.fit(epochs=2)
    assert trainer.global_step == 8 and trainer.meta_steps == 4 and len(trainer.weights_history) == 128
    assert objective.seen[0] == ["collectives", "functional_optimizer", "meta_optimizer", "model", "optimizer",
                                 "real_step", "record"]
    assert trainer.stepper.meta_optimizer is None and trainer.method is None


def test_method_capabilities_are_declared_and_lookahead_is_required_by_name(monkeypatch):
    assert HypergradMethod().replay(Batch(torch.zeros(1, 2))) is None and not HypergradMethod.returns_lookahead
    assert Unrolled.returns_lookahead
    unrolled = Unrolled.__call__  # a method whose results carry no lookahead (patched: no registered test class)
    monkeypatch.setattr(Unrolled, "returns_lookahead", False)
    monkeypatch.setattr(Unrolled, "__call__", lambda self, problem: HypergradResult(unrolled(self, problem).grads, 0.0))
    ds = _data()
    model, opt = _model_and_opt()
    meta = MetaStep(model, opt, MetaWeightNet(hidden=6), Unrolled(), real_step="lookahead")
    with pytest.raises(ValueError, match="does not return lookahead parameters .*use real_step='recompute'"):
        meta.step(Batch(ds.x[:16], ds.y[:16]), Batch(ds.x[16:32], ds.y[16:32]))
    with pytest.raises(ValueError, match="a step takes 1 to unroll_steps=1 train batches, got 2"):
        meta.step([Batch(ds.x[:16], ds.y[:16])] * 2, Batch(ds.x[16:32], ds.y[16:32]))
    with pytest.raises(ValueError, match="real_step must be one of"):
        MetaStep(model, opt, MetaWeightNet(), real_step="commit")


def test_fit_writes_the_weights_logged_so_far_when_a_step_raises(tmp_path):
    ds = _data()
    ds.x[32:48] = float("nan")  # the third batch: its loss is not finite
    model, opt = _model_and_opt()
    trainer = MetaTrainer(model, opt, DataLoader(ds, batch_size=16), MetaWeightNet(hidden=6),
                          meta_loader=DataLoader(_data(), batch_size=16), log_dir=tmp_path, progress=False)
    with pytest.raises(NonFiniteLossError):
        trainer.fit(epochs=1)
    saved = np.load(tmp_path / "weights.npz")
    assert sorted(saved["step"].tolist()) == [0] * 16 + [1] * 16 and np.isfinite(saved["weight"]).all()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_core_reaches_no_distributed_module_and_objectives_no_trainer():
    """``core`` gets its collectives from the problem; objectives get a context."""
    import ast

    root = Path(__file__).resolve().parents[1] / "metareweight"
    for path in sorted((root / "core").rglob("*.py")):
        modules = {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom)}
        assert not any(m.endswith("distributed") and not m.startswith("torch") for m in modules), path
    trainer_state = re.compile(r"trainer\.(_\w+|global_step|meta_steps|epoch|weights_history|functional_optimizer|"
                               r"meta_optimizer|model)\b")
    for path in sorted((root / "objectives").glob("*.py")):
        assert not trainer_state.search(path.read_text()), path


# ---- the README's loops ---------------------------------------------------------------------------------------------
def _py_blocks():
    text = README.read_text()
    section = text[text.index("## Your own loop: `MetaStep`"):]
    return re.findall(r"```py\n(.*?)```", section[:section.index("\n## ", 5)], flags=re.S)


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    order = np.random.default_rng(0).permutation(len(y))
    train, meta = order[:256], order[256:320]
    y_noisy, _ = symmetric_noise(y[train], 0.4, 10, seed=0)
    return {"x_noisy": x[train], "y_noisy": torch.as_tensor(y_noisy),
            "clean_meta": TensorIndexedDataset(x[meta], torch.as_tensor(y[meta]))}


def test_readme_custom_loop_runs():
    namespace = _digits()
    torch.manual_seed(0)
    exec(compile(_py_blocks()[0], "README.md custom loop", "exec"), namespace)
    meta = namespace["meta"]
    assert meta.global_step == 3 * 4 and meta.meta_steps == 3 * 2
    assert namespace["weights"].shape == (64,) and np.isfinite(namespace["out"].metrics["train_loss"])


class _Logits(nn.Module):
    """input_ids → logits of a Hugging Face classifier (tensors in, a tensor out)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids):
        return self.hf_model(input_ids=input_ids).logits


def test_readme_hugging_face_trainer_runs_one_meta_step_and_one_optimizer_step_per_training_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    namespace = {}
    exec(compile(_py_blocks()[1], "README.md HF trainer", "exec"), namespace)
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, num_labels=2)
    config._attn_implementation = "eager"  # CPU sdpa has no double-backward
    bert = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, 100, (48, 12), generator=g), torch.randint(0, 2, (48,), generator=g)
    train = [{"input_ids": ids[i], "labels": labels[i]} for i in range(32)]
    meta_batches = itertools.cycle([Batch(ids[32:], labels[32:])])
    optimizer = torch.optim.AdamW(bert.parameters(), lr=1e-3)
    objective = MetaWeightNet(hidden=8)
    phi0 = _params(objective)
    meta = MetaStep(_Logits(bert), optimizer, objective, "unrolled")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          lr_scheduler_type="constant", max_grad_norm=1.0, disable_tqdm=True)
    trainer = namespace["MetaReweightTrainer"](model=bert, args=args, train_dataset=train,
                                               optimizers=(optimizer, None), meta_step=meta, meta_batches=meta_batches)
    trainer.train()
    assert meta.global_step == 3 and meta.meta_steps == 3
    assert any(not torch.equal(a, b) for a, b in zip(phi0, _params(objective))), "φ did not move"
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {3}, f"AdamW stepped {steps} times per parameter; the Trainer must not step a second time"
