"""RSS growth per step of a long run with the default weight history (issue 20's target: <= 1.5 KiB/step at batch 8).

    python benchmarks/history_memory.py [--steps 3000] [--history all|last_epoch|N] [--log-dir DIR]

A tiny model (Linear 8→3, Meta-Weight-Net hidden 8) on 24,000 random samples, batch 8: 3,000 steps is one epoch, so
a ``"last_epoch"`` bound would keep everything. RSS (``/proc/self/statm``) is read after a 300-step warm-up and at the
end; the growth per step is printed with the history's row count.
"""

import argparse
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset


def rss_kib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--history", default=None)
    ap.add_argument("--log-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.steps * 8
    ds = TensorIndexedDataset(torch.randn(n, 8), torch.randint(0, 3, (n,)), noisy=torch.arange(n) % 3 == 0)
    model = nn.Linear(8, 3)
    kw = {} if args.history is None else {"history": int(args.history) if args.history.isdigit() else args.history}
    log_dir = args.log_dir or tempfile.mkdtemp()
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=8),
                          MetaWeightNet(hidden=8), meta_loader=DataLoader(ds, batch_size=8), progress=False,
                          log_dir=log_dir, **kw)
    warm = 300
    trainer.fit(epochs=1, max_steps=warm)
    start = rss_kib()
    trainer.fit(epochs=1, max_steps=args.steps)  # continues the same epoch
    growth = rss_kib() - start
    out = {"steps": trainer.global_step - warm, "rows_in_memory": len(trainer.weights_history),
           "rss_growth_kib": growth, "kib_per_step": growth / (trainer.global_step - warm)}
    print(out)
    return out


if __name__ == "__main__":
    main()
