"""The task builders of the knowledge-distillation experiments (``experiments/trilateral_kd.py``): each returns a
:class:`KDTask`, a student's training data with cached (possibly corrupted) teacher logits, a clean meta split, a test
split and the student builder. All offline:

- :func:`image_task`: Fashion-MNIST; a small CNN teacher trained on its own split, corrupted on the student's
  training samples (:func:`corrupt_teacher`), optional input outliers and flipped labels (:func:`flip_labels`);
- :func:`attack_task`: Spambase (or river Phishing), an MLP teacher on its own split;
- :func:`ctr_task`: MovieLens-100K click (rating ≥ 4), temporal split, an embedding+MLP teacher
  (:class:`FieldEmbeddingNet`).

Their config keys are documented with ``DEFAULTS`` in ``experiments/trilateral_kd.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.common import accuracy, mlp, seed_everything, train_plain
from metareweight import TensorIndexedDataset, auroc

__all__ = ["KDTask", "BUILDERS", "image_task", "attack_task", "ctr_task", "predict", "fit_teacher", "make_train_set",
           "corrupt_teacher", "roll_logits", "flip_labels", "SmallCNN", "FieldEmbeddingNet"]


@dataclass
class KDTask:
    """A student's data with cached teacher logits, a clean meta split, a test split and the student builder."""

    train: TensorIndexedDataset  # x, y, teacher_logits, teacher_wrong, outlier
    x_meta: torch.Tensor
    y_meta: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    make_student: Callable[[], nn.Module]
    metric_name: str
    teacher_metric: float

    def metric(self, model: nn.Module) -> float:
        if self.metric_name == "accuracy":
            return accuracy(model, self.x_test, self.y_test)
        return auroc(predict(model, self.x_test).softmax(1)[:, 1].numpy(), self.y_test.numpy() == 1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def fit_teacher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Dict, seed: int) -> nn.Module:
    loader = DataLoader(TensorIndexedDataset(x, y), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    train_plain(model, torch.optim.Adam(model.parameters(), lr=cfg["teacher_lr"]), loader, cfg["teacher_epochs"])
    return model.eval()


def make_train_set(x, y, teacher_logits, outlier=None, y_true=None) -> TensorIndexedDataset:
    """The student's training set: given labels ``y`` (possibly flipped from ``y_true``), cached teacher logits and
    the diagnostic flags ``teacher_wrong`` (teacher argmax ≠ the true label), ``outlier`` and ``label_flipped``."""
    y_true = y if y_true is None else y_true
    wrong = teacher_logits.argmax(1) != y_true
    outlier = torch.zeros(len(y), dtype=torch.bool) if outlier is None else outlier
    return TensorIndexedDataset(x, y, teacher_logits=teacher_logits, teacher_wrong=wrong, outlier=outlier,
                                label_flipped=y != y_true)


# ---- tasks ------------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 28, 28)))


def image_task(cfg: Dict, seed: int) -> KDTask:
    from metareweight.data.datasets import load_fashion_mnist

    xtr, ytr, xte, yte = load_fashion_mnist()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(xtr))
    n_t, n_s, n_m = cfg["n_teacher"], cfg["n_train"], cfg["n_meta"]
    parts = np.split(idx[:n_t + n_s + n_m], [n_t, n_t + n_s])
    test = rng.permutation(len(xte))[:cfg["n_test"]]
    norm = lambda a: torch.as_tensor((a.reshape(len(a), -1) / 255.0 - 0.286) / 0.353, dtype=torch.float32)  # noqa
    label = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    (x_t, x_s, x_m), (y_t, y_s, y_m) = [norm(xtr[p]) for p in parts], [label(ytr[p]) for p in parts]
    seed_everything(seed)
    teacher = fit_teacher(SmallCNN(10), x_t, y_t, cfg, seed)

    g = torch.Generator().manual_seed(seed + 1)
    n_out = int(round(cfg["outlier_frac"] * n_s))
    order = torch.randperm(n_s, generator=g)
    outlier = torch.zeros(n_s, dtype=torch.bool)
    outlier[order[:n_out]] = True
    x_s = x_s.clone()
    x_s[outlier] += cfg["outlier_std"] * torch.randn(n_out, x_s.shape[1], generator=g)
    logits = corrupt_teacher(predict(teacher, x_s), y_s, order[n_out:], cfg, g)
    y_given = flip_labels(y_s, cfg["label_noise"], torch.Generator().manual_seed(seed + 2))  # same flips for any
    # corruption setting
    return KDTask(make_train_set(x_s, y_given, logits, outlier, y_true=y_s), x_m, y_m, norm(xte[test]),
                  label(yte[test]), 10, partial(mlp, 784, cfg["student_hidden"], 10, depth=1), "accuracy",
                  accuracy(teacher, norm(xte[test]), label(yte[test])))


def roll_logits(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each row's logits rolled by ``shift`` classes (the argmax moves by ``shift``, the confidence is kept)."""
    k = logits.shape[1]
    cols = (torch.arange(k).unsqueeze(0) - shift.unsqueeze(1)) % k
    return torch.gather(logits, 1, cols)


def corrupt_teacher(logits: torch.Tensor, y_true: torch.Tensor, inliers: torch.Tensor, cfg: Dict,
                    g: torch.Generator) -> torch.Tensor:
    """The corrupted teacher on the student's inlier samples (``corrupt_mode``):

    - ``"random"``: ``corrupt_frac`` of the inliers, each rolled by a random shift of 1-9 classes;
    - ``"class"``: every inlier whose true class is one of ``corrupt_classes`` classes drawn per seed, rolled by one
      shift per corrupted class (a teacher that is systematically wrong on those classes).
    """
    logits = logits.clone()
    k = logits.shape[1]
    if cfg["corrupt_mode"] == "random":
        corrupt = inliers[:int(round(cfg["corrupt_frac"] * len(inliers)))]
        logits[corrupt] = roll_logits(logits[corrupt], torch.randint(1, k, (len(corrupt),), generator=g))
    elif cfg["corrupt_mode"] == "class":
        classes = torch.randperm(k, generator=g)[:cfg["corrupt_classes"]]
        class_shift = torch.zeros(k, dtype=torch.long)
        class_shift[classes] = torch.randint(1, k, (len(classes),), generator=g)
        corrupt = inliers[torch.isin(y_true[inliers], classes)]
        logits[corrupt] = roll_logits(logits[corrupt], class_shift[y_true[corrupt]])
    else:
        raise ValueError(f"corrupt_mode must be 'random' or 'class', got {cfg['corrupt_mode']!r}")
    return logits


def flip_labels(y: torch.Tensor, rate: float, g: torch.Generator, k: int = 10) -> torch.Tensor:
    """Symmetric label noise: ``rate`` of the labels (drawn without replacement) moved to a uniformly random other
    class. ``rate = 0`` returns ``y`` and draws nothing (older configs stay reproducible)."""
    if rate <= 0:
        return y
    flip = torch.randperm(len(y), generator=g)[:int(round(rate * len(y)))]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, k, (len(flip),), generator=g)) % k
    return noisy


def attack_task(cfg: Dict, seed: int) -> KDTask:
    from metareweight.data.tabular import load_phishing, load_spambase

    loaders = {"spambase": load_spambase, "phishing": load_phishing}
    if cfg["dataset"] not in loaders:
        raise ValueError(f"dataset must be one of {sorted(loaders)}, got {cfg['dataset']!r}")
    x, y = loaders[cfg["dataset"]]()
    x = np.log1p(np.maximum(x, 0)) if cfg["dataset"] == "spambase" else x
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n_test, n_meta = int(cfg["test_fraction"] * len(y)), int(cfg["meta_fraction"] * len(y))
    test, meta, rest = idx[:n_test], idx[n_test:n_test + n_meta], idx[n_test + n_meta:]
    teach, stud = rest[:len(rest) // 2], rest[len(rest) // 2:]
    mu, sd = x[rest].mean(0), x[rest].std(0) + 1e-6
    t = lambda i: torch.as_tensor((x[i] - mu) / sd, dtype=torch.float32)  # noqa: E731
    lab = lambda i: torch.as_tensor(y[i], dtype=torch.long)  # noqa: E731
    seed_everything(seed)
    d = x.shape[1]
    teacher = fit_teacher(mlp(d, cfg["teacher_hidden"], 2, depth=2), t(teach), lab(teach), cfg, seed)
    x_s = t(stud)
    return KDTask(make_train_set(x_s, lab(stud), predict(teacher, x_s)), t(meta), lab(meta), t(test), lab(test), 2,
                  partial(mlp, d, cfg["student_hidden"], 2, depth=1), "accuracy", accuracy(teacher, t(test), lab(test)))


class FieldEmbeddingNet(nn.Module):
    """Click model on ``[field codes | genre flags]`` rows: per-field embeddings (+ genres) → MLP or linear → 2 logits."""

    def __init__(self, cardinalities: List[int], n_genres: int, dim: int, hidden: int = 0):
        super().__init__()
        self.n_fields = len(cardinalities)
        self.embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        width = dim * len(cardinalities) + n_genres
        self.head = (nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 2)) if hidden
                     else nn.Linear(width, 2))

    def forward(self, x):
        codes = x[:, :self.n_fields].long()
        emb = [e(codes[:, i]) for i, e in enumerate(self.embeddings)]
        return self.head(torch.cat(emb + [x[:, self.n_fields:]], 1))


def ctr_task(cfg: Dict, seed: int) -> KDTask:
    from metareweight.data.tabular import load_movielens_click

    data = load_movielens_click()
    order = np.argsort(data.timestamp, kind="stable")
    if cfg["n_rows"]:
        order = order[-cfg["n_rows"]:]  # the most recent rows
    x = np.concatenate([data.fields.astype(np.float32), data.genres], 1)[order]
    y = data.click[order]
    n = len(y)
    n_test, n_meta = int(cfg["test_fraction"] * n), int(cfg["meta_fraction"] * n)
    train_end = n - n_test - n_meta
    rng = np.random.default_rng(seed)
    period = rng.permutation(train_end)
    teach, stud = period[:train_end // 2], period[train_end // 2:]
    meta, test = np.arange(train_end, train_end + n_meta), np.arange(train_end + n_meta, n)
    t = lambda i: torch.as_tensor(x[i])  # noqa: E731
    lab = lambda i: torch.as_tensor(y[i], dtype=torch.long)  # noqa: E731
    seed_everything(seed)
    g = data.genres.shape[1]
    teacher = FieldEmbeddingNet(data.cardinalities, g, cfg["teacher_dim"], cfg["teacher_hidden"])
    fit_teacher(teacher, t(teach), lab(teach), cfg, seed)
    x_s = t(stud)
    task = KDTask(make_train_set(x_s, lab(stud), predict(teacher, x_s)), t(meta), lab(meta), t(test), lab(test), 2,
                  partial(FieldEmbeddingNet, data.cardinalities, g, cfg["student_dim"]), "auc", 0.0)
    task.teacher_metric = task.metric(teacher)
    return task


BUILDERS = {"image": image_task, "attack": attack_task, "ctr": ctr_task}
