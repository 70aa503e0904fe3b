"""Progress off a terminal: one line per epoch on stderr, not a redrawn bar (so a piped log stays small)."""

import io

import torch
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset
from metareweight.progress import EpochLine as _EpochLine


def test_one_line_per_epoch_when_stderr_is_a_pipe(capsys):
    torch.manual_seed(0)
    ds = TensorIndexedDataset(torch.randn(80, 5), torch.randint(0, 3, (80,)))
    model = torch.nn.Linear(5, 3)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=8),
                          objective=MetaWeightNet(hidden=4), meta_loader=DataLoader(ds, batch_size=8), progress=True)
    trainer.fit(epochs=3)
    err = capsys.readouterr().err  # pytest's capture is not a TTY
    lines = err.strip().splitlines()
    assert len(lines) == 3 and "\r" not in err, err
    assert lines[0].startswith("epoch 0: 10/10 steps, train_loss ") and "meta_loss" in lines[0], lines[0]
    assert lines[2].startswith("epoch 2: ") and lines[2].endswith(" s")


def test_epoch_line_keeps_tqdm_calls_and_unknown_totals():
    out = io.StringIO()
    line = _EpochLine("epoch 4", None, initial=2, stream=out)
    line.update(3)
    line.set_postfix({"train_loss": "0.100"})
    assert out.getvalue() == ""
    line.close()
    assert out.getvalue().startswith("epoch 4: 5 steps, train_loss 0.100, ")
