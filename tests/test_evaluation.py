"""``evaluate`` (the trainer's eval_* metrics) and ``WeightRecorder`` (the trainer's weight history) on their own."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from metareweight import (Batch, MetaStep, MetaWeightNet, TensorIndexedDataset, WeightRecorder, as_batch,
                          evaluate)


def _data(labels_dtype=torch.int64, n=24):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g).to(labels_dtype)


def _loader(labels_dtype=torch.int64):
    return DataLoader(TensorIndexedDataset(*_data(labels_dtype)), batch_size=8)


def test_int32_labels_reach_a_custom_loss_as_int64():
    model = torch.nn.Linear(5, 3)

    def strict_ce(out, y):  # F.cross_entropy refuses int32 targets
        return F.cross_entropy(out, y, reduction="none")

    got = evaluate(model, _loader(torch.int32), loss_fn=strict_ce)
    x, y = _data()
    with torch.no_grad():
        out = model(x)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)
    assert got["accuracy"] == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert evaluate(model, _loader(torch.int32)) == pytest.approx(got)  # the default loss agrees


def test_evaluate_leaves_the_training_flag_and_refuses_unlabelled_data():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.5))
    model.train()
    evaluate(model, _loader())
    assert model.training
    with pytest.raises(ValueError, match="carry no targets"):
        evaluate(model, [{"inputs": torch.randn(4, 5)}])


def test_the_recorder_fed_by_a_meta_step_records_every_weight_it_used():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    meta = MetaStep(model, torch.optim.SGD(model.parameters(), lr=0.1), MetaWeightNet(hidden=4))
    recorder = WeightRecorder(noisy=[i % 4 == 0 for i in range(24)], clock=lambda: (meta.global_step, 0))
    meta.record = recorder.record
    batches = [as_batch(b) for b in _loader()]
    used = [meta.step([b], Batch(b.inputs, b.targets)).sample_weights() for b in batches]
    rows = recorder.history.arrays()
    assert rows["index"].tolist() == torch.cat([i for i, _ in used]).tolist()
    assert rows["weight"].tolist() == pytest.approx(torch.cat([w for _, w in used]).tolist())
    assert rows["step"].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert rows["noisy"].tolist() == [int(i % 4 == 0) for i in rows["index"]]
    summary = recorder.summary(epoch=0)
    assert set(summary) == {"weight_mean", "weight_std", "weight_clean", "weight_noisy", "weight_auroc"}
    assert 0.0 <= summary["weight_auroc"] <= 1.0
