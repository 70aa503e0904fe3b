"""The weight history: compact, bounded in memory, streamed whole to log_dir, noise flags as a column."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset, WeightHistory
from metareweight.analysis import group_stats, load_run
from metareweight.history import read_stream


def _record_steps(h, steps, epoch_len=3, batch=4):
    for step in range(steps):
        h.record(step, step // epoch_len, torch.arange(batch) + 10 * step, torch.full((batch,), 0.5),
                 noisy=torch.arange(batch) % 2 == 0)


@pytest.mark.parametrize("keep,steps_kept", [("all", list(range(10))), ("last_epoch", [9]), (4, [6, 7, 8, 9])])
def test_the_bound_keeps_the_newest_rows(keep, steps_kept):
    h = WeightHistory(keep=keep)
    _record_steps(h, 10)
    a = h.arrays()
    assert sorted(set(a["step"].tolist())) == steps_kept and len(h) == 4 * len(steps_kept)
    assert a["noisy"].dtype == np.bool_ and a["weight"].dtype == np.float32
    assert len({len(v) for v in a.values()}) == 1


def test_bounded_memory_stays_flat_over_many_steps():
    h = WeightHistory(keep=50)
    for step in range(5000):
        h.record(step, 0, torch.arange(8), torch.rand(8))
        if step == 1000:
            capacity = len(h._data["step"])
    assert len(h._data["step"]) == capacity and len(h) == 50 * 8 and h.total == 5000 * 8


def test_rows_out_of_order_and_bad_bounds_are_errors():
    h = WeightHistory()
    h.record(3, 0, None, torch.ones(2))
    with pytest.raises(ValueError, match="step order"):
        h.record(2, 0, None, torch.ones(2))
    for bad in (0, -3, "last", 2.5, True):
        with pytest.raises(ValueError, match="history must be 'all', 'last_epoch' or a number of steps"):
            WeightHistory(keep=bad)


def test_streamed_chunks_hold_the_whole_run_and_resume_truncates(tmp_path):
    h = WeightHistory(keep=2)
    h.stream_to(tmp_path)
    _record_steps(h, 5)
    state = h.state_dict()  # flushes: a checkpoint here
    assert state == {"keep": 2, "streamed": 20}
    _record_steps_after = [(5, 1), (6, 2)]
    for step, epoch in _record_steps_after:
        h.record(step, epoch, torch.arange(4), torch.zeros(4))
    h.flush()  # written after the checkpoint: a resume deletes it
    assert len(read_stream(tmp_path)["step"]) == 28
    again = WeightHistory(keep=2)
    again.stream_to(tmp_path)
    again.load_state_dict(state)
    assert len(read_stream(tmp_path)["step"]) == 20
    assert sorted(set(again.arrays()["step"].tolist())) == [3, 4] and again.total == 20


def _trainer(tmp_path, batches, noisy, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, MetaWeightNet(hidden=4),
                       meta_loader=batches, progress=False, noisy=noisy, log_dir=tmp_path, **kw)


def test_noisy_flags_land_in_weights_npz_and_auroc_works_for_tuple_batches(tmp_path):
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    noisy = np.arange(32) % 4 == 0
    loader = DataLoader(TensorDataset(x, y, torch.arange(32)), batch_size=8)  # (x, y, index) tuples
    trainer = _trainer(tmp_path, loader, noisy)
    history = trainer.fit(epochs=2)
    assert 0.0 <= history[-1]["weight_auroc"] <= 1.0
    run = load_run(tmp_path)
    s = group_stats(run, "noisy")
    assert s.count.tolist() == [[24, 8], [24, 8]]
    np.testing.assert_array_equal(run.history.arrays()["noisy"], noisy[run.history.arrays()["index"]])


def test_weights_npz_is_whole_with_a_small_bound_and_written_when_fit_fails(tmp_path):
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    ds = TensorIndexedDataset(x, y)
    trainer = _trainer(tmp_path, DataLoader(ds, batch_size=8), None, history="last_epoch")
    trainer.fit(epochs=3)
    assert len(trainer.weights_history) == 32
    assert len(np.load(tmp_path / "weights.npz")["step"]) == 3 * 32

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom

    failing = _trainer(tmp_path / "fail", DataLoader(ds, batch_size=8), None)
    failing.evaluate = explode
    failing.eval_loader = [1]
    with pytest.raises(Boom):
        failing.fit(epochs=1)
    assert len(np.load(tmp_path / "fail" / "weights.npz")["step"]) == 32  # what was trained is not lost


def test_noisy_without_sample_indices_is_refused_instead_of_dropping_auroc_silently(tmp_path):
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # (x, y): no index
    trainer = _trainer(tmp_path, loader, np.zeros(16, bool))
    with pytest.raises(ValueError, match="the batches carry none; wrap the dataset with metareweight.with_index"):
        trainer.fit(epochs=1)
