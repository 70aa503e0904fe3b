"""MetaTrainer(logger="tensorboard") writes event files that TensorBoard reads back: scalars and weight histograms."""

import pytest
import torch
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorBoardLogger, TensorIndexedDataset

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="the TensorBoard logger needs tensorboard: pip install tensorboard")


def _trainer(log_dir, logger, noisy=True, **kw):
    torch.manual_seed(0)
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    flags = torch.arange(48) % 4 == 0
    model = torch.nn.Linear(5, 3)
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       DataLoader(TensorIndexedDataset(x, y), batch_size=16),
                       objective=MetaWeightNet(hidden=4), meta_loader=DataLoader(TensorIndexedDataset(x, y),
                                                                                 batch_size=16),
                       noisy=flags.numpy() if noisy else None, log_dir=log_dir, logger=logger, progress=False, **kw)


def _read(path):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.HISTOGRAMS: 0,
                                                                       event_accumulator.SCALARS: 0})
    return acc.Reload()


def test_scalars_and_weight_histograms_read_back(tmp_path):
    trainer = _trainer(tmp_path, "tensorboard")
    trainer.fit(epochs=2)
    acc = _read(tmp_path)
    tags = acc.Tags()
    assert {"train/train_loss", "train/meta_loss", "epoch/weight_mean", "epoch/weight_auroc"} <= set(tags["scalars"])
    assert {"weights/all", "weights/clean", "weights/noisy"} <= set(tags["histograms"])
    steps = [e.step for e in acc.Scalars("train/meta_loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    epoch_loss = [e.value for e in acc.Scalars("epoch/weight_mean")]
    assert epoch_loss == pytest.approx([h["weight_mean"] for h in trainer.history], rel=1e-6)
    hist = acc.Histograms("weights/all")
    assert [h.step for h in hist] == [3, 6] and hist[-1].histogram_value.num == 48
    assert acc.Histograms("weights/noisy")[-1].histogram_value.num == 12
    assert (tmp_path / "metrics.jsonl").exists()  # JSONL is still written beside it


def test_explicit_logger_without_noise_flags_and_step_interval(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", every=2, histograms=True)
    _trainer(None, logger, noisy=False).fit(epochs=1)
    acc = _read(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("train/train_loss")] == [2]
    assert "weights/clean" not in acc.Tags()["histograms"] and "weights/all" in acc.Tags()["histograms"]
    assert logger.writer is None  # closed at the end of fit


def test_unknown_logger_name_is_refused():
    with pytest.raises(ValueError, match="'tensorboard'"):
        _trainer(None, "tensorbord")
