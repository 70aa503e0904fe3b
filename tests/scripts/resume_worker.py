"""A tiny meta-training run for tests/test_resume.py.

    python resume_worker.py OUT [--resume] [--block-at STEP]

Everything that could break an exact resume is switched on: shuffled train and meta loaders of different lengths,
a collate function drawing from numpy and ``random``, dropout, momentum, an Adam meta optimizer, step-wise
schedulers, gradient accumulation of both optimizers (checkpoints fall mid-window) and JSONL logs. With
``--block-at`` the run stops making progress after that step (and writes ``OUT/blocked``) so the test can SIGKILL it.
"""

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from metareweight import Callback, MetaTrainer, MetaWeightNet, TensorIndexedDataset


class Block(Callback):
    def __init__(self, out: Path, step):
        self.out, self.step = out, step

    def on_step_end(self, trainer, metrics):
        if self.step is not None and trainer.global_step == self.step:
            (self.out / "blocked").write_text(str(trainer.global_step))
            time.sleep(600)


def jitter_collate(items):
    batch = default_collate(items)
    noise = np.random.normal(0, 0.01, size=tuple(batch["x"].shape)) * random.random()
    batch["x"] = batch["x"] + torch.as_tensor(noise, dtype=batch["x"].dtype)
    return batch


def train(out: Path, resume: bool = False, block_at=None) -> None:
    """The whole run, writing ``out/final.pt`` (the test also calls it in-process for the uninterrupted run)."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ds = TensorIndexedDataset(x, y)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    objective = MetaWeightNet(hidden=8)
    meta_opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
    trainer = MetaTrainer(
        model, opt, DataLoader(ds, batch_size=8, shuffle=True, collate_fn=jitter_collate), objective,
        meta_loader=DataLoader(ds, batch_size=7, shuffle=True), meta_optimizer=meta_opt,
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.8),
        meta_scheduler=torch.optim.lr_scheduler.ExponentialLR(meta_opt, 0.9), scheduler_interval="step",
        accumulate_steps=3, meta_accumulate_steps=2, log_dir=out / "logs", checkpoint_dir=out / "ckpt",
        checkpoint_every=5, callbacks=[Block(out, block_at)], progress=False)
    trainer.fit(epochs=2, resume=resume)
    torch.save({"model": model.state_dict(), "objective": objective.state_dict(), "optimizer": opt.state_dict(),
                "meta_optimizer": meta_opt.state_dict(), "history": trainer.history,
                "weights": trainer.weights_history.arrays(), "steps": (trainer.global_step, trainer.meta_steps)},
               out / "final.pt")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--block-at", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train(args.out, args.resume, args.block_at)
