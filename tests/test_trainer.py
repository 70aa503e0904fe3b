"""MetaTrainer: the loop, batches of every shape, history, errors that name the problem, no leaked graphs."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metareweight import (MetaTrainer, MetaWeightNet, NonFiniteLossError, TensorIndexedDataset, read_jsonl)


def _data(n=96, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _trainer(loader=None, meta_loader=None, model=None, **kw):
    x, y = _data()
    ds = TensorIndexedDataset(x, y, noisy=torch.arange(len(x)) % 4 == 0)
    model = model or nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    loader = DataLoader(ds, batch_size=16) if loader is None else loader
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                       objective=MetaWeightNet(hidden=8),
                       meta_loader=DataLoader(ds, batch_size=16) if meta_loader is None else meta_loader,
                       progress=False, **kw)


def test_fit_records_weights_metrics_and_auroc(tmp_path):
    trainer = _trainer(log_dir=tmp_path)
    history = trainer.fit(epochs=2)
    assert trainer.global_step == 12 and trainer.meta_steps == 12
    assert len(trainer.weights_history) == 2 * 96
    assert set(trainer.weights_history.latest()["index"]) == set(range(96))
    assert 0.0 <= history[-1]["weight_auroc"] <= 1.0 and "weight_noisy" in history[-1]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in rows].count("epoch") == 2
    assert (tmp_path / "weights.npz").exists()


def test_meta_interval_and_unroll_steps_count_meta_updates():
    trainer = _trainer(meta_interval=3)
    trainer.fit(epochs=1)
    assert trainer.global_step == 6 and trainer.meta_steps == 2
    trainer = _trainer(unroll_steps=2)
    trainer.fit(epochs=1)
    assert trainer.global_step == 6 and trainer.meta_steps == 3


@pytest.mark.parametrize("hypergrad", ["unrolled", "finite_difference", "neumann"])
@pytest.mark.parametrize("real_step", ["recompute", "lookahead"])
def test_every_method_trains(hypergrad, real_step):
    trainer = _trainer(hypergrad=hypergrad, real_step=real_step)
    before = [p.detach().clone() for p in trainer.objective.meta_parameters()]
    trainer.fit(epochs=1)
    after = trainer.objective.meta_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "meta-parameters did not move"


def test_lookahead_commit_equals_the_unrolled_virtual_step():
    """real_step='lookahead' leaves the model exactly at the virtual parameters of the step."""
    torch.manual_seed(0)
    trainer = _trainer(real_step="lookahead")
    x, y = _data()
    from metareweight.data import Batch
    batch = Batch(x[:16], y[:16], torch.arange(16))
    problem = trainer.build_problem([batch], Batch(x[16:32], y[16:32]))
    from metareweight import Unrolled
    result = Unrolled()(problem)
    trainer.stepper.commit(result, [batch])
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), result.lookahead[0][name])


def test_tuple_and_dict_batches_without_index():
    x, y = _data()
    trainer = _trainer(loader=DataLoader(TensorDataset(x, y), batch_size=32),
                       meta_loader=DataLoader(TensorDataset(x, y), batch_size=32))
    trainer.fit(epochs=1)
    assert len(trainer.weights_history) == 96


def test_memory_stays_flat_over_200_meta_steps():
    """A graph kept alive between steps (the top bug class of peer libraries) would grow RSS by >1 GiB here."""

    def rss_mb():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096 / 2 ** 20

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128 * 4, 64, generator=g), torch.randint(0, 10, (128 * 4,), generator=g)
    ds = TensorIndexedDataset(x, y)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                          DataLoader(ds, batch_size=128), MetaWeightNet(), meta_loader=DataLoader(ds, batch_size=128),
                          progress=False)
    trainer.fit(epochs=5)  # warm-up: allocator pools, optimizer state
    start = rss_mb()
    trainer.fit(epochs=50)  # 200 meta steps
    assert trainer.meta_steps == 220
    growth = rss_mb() - start
    assert growth < 150, f"RSS grew by {growth:.0f} MiB over 200 meta steps"


# ---- errors that name the problem ------------------------------------------------------------------------------
def test_unknown_method_name():
    with pytest.raises(ValueError, match="unknown hypergradient method 'unroled'.*Did you mean 'unrolled'"):
        _trainer(hypergrad="unroled")


def test_meta_loader_that_yields_nothing():
    x, y = _data()
    empty = DataLoader(TensorIndexedDataset(x[:0], y[:0]), batch_size=8)
    trainer = _trainer(meta_loader=empty)
    with pytest.raises(ValueError, match="meta loader yielded no batches"):
        trainer.fit(epochs=1)


def test_empty_train_loader():
    x, y = _data()
    with pytest.raises(ValueError, match="train loader yielded no batches"):
        _trainer(loader=DataLoader(TensorIndexedDataset(x[:0], y[:0]), batch_size=8)).fit(epochs=1)


def test_labels_out_of_range():
    x, y = _data()
    bad = TensorIndexedDataset(x, y + 5)
    with pytest.raises(ValueError, match="labels out of range: found label 7, but the model outputs 3 classes"):
        _trainer(loader=DataLoader(bad, batch_size=16)).fit(epochs=1)


def test_non_finite_loss():
    x, y = _data()
    x[3, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="not finite"):
        _trainer(loader=DataLoader(TensorIndexedDataset(x, y), batch_size=16)).fit(epochs=1)


def test_model_without_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        MetaTrainer(nn.ReLU(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), [], MetaWeightNet(),
                    meta_loader=[])


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_meta_interval_below_one(value):
    with pytest.raises(ValueError, match="meta_interval must be an integer >= 1"):
        _trainer(meta_interval=value)


def test_missing_meta_loader_and_bad_real_step():
    x, y = _data()
    model = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="needs a meta_loader"):
        MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [], MetaWeightNet())
    with pytest.raises(ValueError, match="real_step must be one of"):
        _trainer(real_step="virtual")


def test_batch_shape_errors():
    from metareweight import as_batch
    with pytest.raises(ValueError, match="without labels"):
        as_batch(torch.zeros(3))
    with pytest.raises(ValueError, match="input key"):
        as_batch({"features": torch.zeros(3)})
    with pytest.raises(ValueError, match="got 4 items"):
        as_batch((1, 2, 3, 4))
