"""TGeo-KD (learned per-sample KD fusion ratio, bilevel) vs CE, fixed-α KD and WLS-KD on three tasks.

    python experiments/trilateral_kd.py --task image --quick --out r.json
    python experiments/trilateral_kd.py --config configs/trilateral_kd_image.yaml --workers 3 --out results/trilateral_kd_image.json
    python experiments/trilateral_kd.py --task ctr --set seeds=[0,1] epochs=3
    python experiments/trilateral_kd.py --config configs/trilateral_kd_image.yaml --signal 1 5 15 --out signal.json

Tasks (all offline):
- ``image``: Fashion-MNIST subsample; a small CNN teacher trained on its own split, a one-hidden-layer MLP student.
  The cached teacher logits are corrupted on the student's (non-outlier) training samples (:func:`corrupt_teacher`):
  ``corrupt_mode="random"`` rolls them to a random wrong class on ``corrupt_frac`` of the samples;
  ``corrupt_mode="class"`` rolls them, one shift per class, on every sample of ``corrupt_classes`` classes drawn
  per seed (a teacher systematically wrong on a subset of classes). ``outlier_frac`` of the inputs get additive
  Gaussian noise of std ``outlier_std`` (the teacher sees the noisy input and is often wrong on it).
  ``label_noise`` flips that fraction of the student's training labels to a random other class (symmetric noise;
  the meta and test splits stay clean), so "teacher wrong, label right" and "label wrong, teacher right" coexist.
- ``attack``: Spambase (or river Phishing, ``dataset=phishing``); MLP teacher on its own split, tiny MLP student.
- ``ctr``: MovieLens-100K click (rating ≥ 4), temporal split; embedding+MLP teacher on one half of the training
  period, a tiny embedding student on the other half; metric AUC.

Methods: ``ce`` (α = 0), fixed-α KD over ``kd_alphas`` (``kd_fixed_best`` = the α with the best mean test metric
over seeds, an oracle choice that favours the baseline), ``wls`` (WLS-KD), ``tgeo`` (the bilevel ratio network,
``metareweight.TrilateralKD``) and its ablations ``tgeo_no_tbar`` / ``tgeo_no_st``. All share the student, optimiser,
epochs and the KD terms. T̄ is computed once over the student's training split from the cached (possibly corrupted)
teacher logits. α statistics are computed after training on the training split: ``alpha_teacher_wrong`` /
``alpha_teacher_right`` over non-outlier samples whose (given) teacher prediction is wrong / right, ``alpha_outlier``
over the noisy inputs, ``alpha_label_flipped`` over non-outlier samples with a flipped label and a right teacher
(``teacher_right`` then excludes them); "wrong" is about the true label; means over seeds. ``agree_alphas`` (empty
by default) adds a diagnostic reference, ``kd_agree_best``: KD with α where the teacher's argmax agrees with the
label and 0 elsewhere (best grid value by mean test metric), i.e. the per-sample α an oracle for "teacher wrong"
would set; ``oracle_alphas`` adds ``kd_oracle_best``, the two-flag oracle (:func:`oracle_alpha`: 0 where the teacher
is wrong, 1 where the label is flipped and the teacher right, the grid value elsewhere). ``run_tgeo=false`` runs
only the fixed rules (the room check before any learned run).

Knobs of the learned ratio (defaults as in the first version): ``init_alpha``, ``meta_lr``, ``meta_batch_size``
(0: the training batch size), ``hypergrad``, ``unroll_steps``; ``lr_schedule`` (``constant`` or ``cosine``, per
epoch) applies to every method's student.

``--signal E1 E2 ...`` skips the methods and reports, for a student trained E epochs with WLS-KD, the one-step meta
signal on each sample's α (:func:`per_sample_signal`) by group: does the bilevel gradient tell the ratio network to
lower α where the teacher is wrong?
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (accuracy, save_png, load_config, mean_sd, mlp, seed_everything, table, train_plain,  # noqa: E402
                                write_json)
from metareweight import MetaTrainer, TensorIndexedDataset, TrilateralKD, auroc, teacher_class_means  # noqa: E402
from metareweight.data import Batch, as_batch  # noqa: E402
from metareweight.objectives.kd_baselines import KDLoss, fusion_weights, kd_terms  # noqa: E402

TASKS = ("image", "attack", "ctr")
_COMMON = dict(epochs=12, batch_size=100, lr=0.05, lr_schedule="constant", momentum=0.9, weight_decay=5e-4,
               temperature=2.0, kd_alphas=[0.25, 0.5, 0.75, 0.9], agree_alphas=[], oracle_alphas=[], run_tgeo=True,
               ratio_hidden=64, init_alpha=0.5,
               meta_lr=3e-3, meta_weight_decay=0.0, meta_batch_size=0, hypergrad="unrolled", unroll_steps=1,
               ablations=["no_tbar", "no_st"], teacher_epochs=5, teacher_lr=1e-3)
DEFAULTS: Dict[str, Dict] = {
    "image": dict(_COMMON, task="image", n_teacher=6000, n_train=2000, n_meta=500, n_test=5000, student_hidden=32,
                  corrupt_mode="random", corrupt_frac=0.3, corrupt_classes=3, label_noise=0.0, outlier_frac=0.15,
                  outlier_std=2.0, teacher_epochs=3, epochs=20, batch_size=50,
                  temperature=1.0, meta_lr=1e-2, kd_alphas=[0.25, 0.5, 0.75]),
    "attack": dict(_COMMON, task="attack", dataset="spambase", test_fraction=0.25, meta_fraction=0.08,
                   student_hidden=4, teacher_hidden=256, epochs=30, batch_size=50, teacher_epochs=40),
    "ctr": dict(_COMMON, task="ctr", n_rows=0, meta_fraction=0.05, test_fraction=0.2, student_dim=2, teacher_dim=16,
                teacher_hidden=64, epochs=4, batch_size=256, lr=0.1, teacher_epochs=3, kd_alphas=[0.25, 0.5, 0.75]),
}
QUICK: Dict[str, Dict] = {
    "image": dict(n_teacher=3000, n_train=1500, n_meta=200, n_test=2000, epochs=8),
    "attack": dict(epochs=15, teacher_epochs=20),
    "ctr": dict(n_rows=30000, epochs=2, teacher_epochs=2),
}


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


# ---- methods ----------------------------------------------------------------------------------------------------
def _student(task: KDTask, cfg: Dict, seed: int):
    """A fresh student, its SGD optimizer and its per-epoch learning-rate schedule (``lr_schedule``)."""
    seed_everything(seed)
    model = task.make_student()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["lr_schedule"] not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg['lr_schedule']!r}")
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"]) if cfg["lr_schedule"] == "cosine"
             else None)
    return model, opt, sched


def _loader(ds, cfg: Dict, seed: int, batch_size: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size or cfg["batch_size"], shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


BatchLoss = Callable[[torch.Tensor, Batch], torch.Tensor]  # (student logits, batch) -> scalar loss


def rule_loss(rule: str, temperature: float, alpha: Optional[float] = None) -> BatchLoss:
    """A fixed-rule KD loss (:class:`KDLoss`) on a batch with cached teacher logits."""
    kd = KDLoss(rule, alpha, temperature)
    return lambda logits, b: kd(logits, b.extras["teacher_logits"], b.targets)


def oracle_alpha(batch: Batch, alpha: float) -> torch.Tensor:
    """The two-flag oracle ratio: 0 where the teacher is wrong (about the true label), 1 where the label was flipped
    and the teacher is right, ``alpha`` elsewhere. It reads the ground-truth flags no method sees."""
    wrong, flipped = batch.extras["teacher_wrong"], batch.extras["label_flipped"]
    const = torch.full(wrong.shape, float(alpha))
    return torch.where(wrong, torch.zeros_like(const), torch.where(flipped, torch.ones_like(const), const))


def oracle_loss(temperature: float, alpha: float) -> BatchLoss:
    """The KD loss with :func:`oracle_alpha` (a reference for how much room a per-sample ratio has)."""
    def loss(logits: torch.Tensor, b: Batch) -> torch.Tensor:
        terms = kd_terms(logits, b.extras["teacher_logits"], b.targets, temperature)
        return (fusion_weights(oracle_alpha(b, alpha).to(terms.dtype)) * terms).sum()
    return loss


def reference_losses(cfg: Dict) -> Dict[str, Callable[[float], BatchLoss]]:
    """The grid rules: name -> (α -> loss), with their grids in ``cfg[f"{name}_alphas"]`` (``kd_alphas`` for fixed)."""
    t = cfg["temperature"]
    return {"fixed": lambda a: rule_loss("fixed", t, a), "agree": lambda a: rule_loss("agree", t, a),
            "oracle": lambda a: oracle_loss(t, a)}


GRIDS = {"fixed": "kd_alphas", "agree": "agree_alphas", "oracle": "oracle_alphas"}


def train_fixed_rule(task: KDTask, cfg: Dict, seed: int, loss_fn: BatchLoss) -> float:
    """Train a fresh student with a fixed-rule KD loss; returns the test metric."""
    return task.metric(fit_student(task, cfg, seed, loss_fn, cfg["epochs"]))


def fit_student(task: KDTask, cfg: Dict, seed: int, loss_fn: BatchLoss, epochs: int) -> nn.Module:
    """A fresh student trained ``epochs`` epochs with a fixed-rule KD loss (the shared optimiser and schedule)."""
    model, opt, sched = _student(task, cfg, seed)
    loader = _loader(task.train, cfg, seed)  # one generator: a new order each epoch, as in MetaTrainer
    for _ in range(epochs):
        for raw in loader:
            b = as_batch(raw)
            loss = loss_fn(model(b.inputs), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
    return model


def per_sample_signal(model: nn.Module, task: KDTask, temperature: float) -> np.ndarray:
    """``g_i = ∇L_meta(θ) · (∇KD_i(θ) − ∇CE_i(θ))`` for every training sample, with L_meta the CE on the meta split.

    For a plain SGD lookahead step of size η on the mean loss over B samples, ``dL_meta(θ')/dα_i = −η·g_i/B`` to first
    order: ``g_i > 0`` says "raise α_i".
    """
    params = [p for p in model.parameters() if p.requires_grad]
    g_meta = torch.autograd.grad(F.cross_entropy(model(task.x_meta), task.y_meta), params)
    tr = task.train
    terms = kd_terms(model(tr.x), tr.extras["teacher_logits"], tr.y, temperature)
    signal = np.empty(len(tr.y))
    for i in range(len(tr.y)):
        grads = torch.autograd.grad(terms[i, 0] - terms[i, 1], params, retain_graph=True)
        signal[i] = float(sum((a * b).sum() for a, b in zip(g_meta, grads)))
    return signal


def alpha_signal(task: KDTask, cfg: Dict, seed: int, epochs: int) -> Dict[str, Dict[str, float]]:
    """:func:`per_sample_signal` by group (teacher right / wrong among non-outliers, outliers) for a student trained
    ``epochs`` epochs with WLS-KD: the mean, its standard error and the fraction of samples with ``g > 0``."""
    signal = per_sample_signal(fit_student(task, cfg, seed, rule_loss("wls", cfg["temperature"]), epochs),
                               task, cfg["temperature"])
    groups = sample_groups(task.train)
    return {name: {"mean": float(signal[m].mean()), "se": float(signal[m].std(ddof=1) / np.sqrt(m.sum())),
                   "frac_positive": float((signal[m] > 0).mean())} for name, m in groups.items() if m.sum() > 1}


def train_tgeo(task: KDTask, cfg: Dict, seed: int, features: str = "full") -> Dict:
    """Train a fresh student with the bilevel ratio network; returns the metric, final α and the α history."""
    model, opt, sched = _student(task, cfg, seed)
    tr = task.train
    objective = TrilateralKD(task.num_classes, class_means=teacher_class_means(tr.extras["teacher_logits"], tr.y,
                                                                               task.num_classes),
                             features=features, hidden=cfg["ratio_hidden"], temperature=cfg["temperature"],
                             init_alpha=cfg["init_alpha"],
                             meta_lr=cfg["meta_lr"], meta_weight_decay=cfg["meta_weight_decay"])
    meta = TensorIndexedDataset(task.x_meta, task.y_meta)
    trainer = MetaTrainer(model, opt, _loader(tr, cfg, seed), objective=objective,
                          meta_loader=_loader(meta, cfg, seed + 1, cfg["meta_batch_size"]), hypergrad=cfg["hypergrad"],
                          unroll_steps=cfg["unroll_steps"], scheduler=sched, progress=False)
    trainer.fit(epochs=cfg["epochs"])
    with torch.no_grad():
        alpha = objective.ratio(predict(model, tr.x), tr.extras["teacher_logits"], tr.y).numpy()
    return {"metric": task.metric(model), "alpha": alpha, "history": trainer.weights_history.arrays()}


def sample_groups(train: TensorIndexedDataset) -> Dict[str, np.ndarray]:
    """Masks of the diagnostic groups: ``outlier``; among inliers ``teacher_wrong`` (about the true label),
    ``label_flipped`` (teacher right) and ``teacher_right`` (teacher right, label clean)."""
    out_flag = train.extras["outlier"].numpy()
    wrong = train.extras["teacher_wrong"].numpy() & ~out_flag
    flipped = train.extras["label_flipped"].numpy() & ~out_flag & ~wrong
    return {"teacher_right": ~out_flag & ~wrong & ~flipped, "teacher_wrong": wrong, "label_flipped": flipped,
            "outlier": out_flag}


def alpha_stats(alpha: np.ndarray, train: TensorIndexedDataset) -> Dict[str, float]:
    """Mean α per :func:`sample_groups` group (``alpha_<group>``; the teacher-wrong mean is NaN if empty, other
    empty groups are left out)."""
    groups = sample_groups(train)
    stats = {"alpha_teacher_wrong": float(alpha[groups["teacher_wrong"]].mean()) if groups["teacher_wrong"].any()
             else float("nan"), "alpha_teacher_right": float(alpha[groups["teacher_right"]].mean())}
    for name in ("outlier", "label_flipped"):
        if groups[name].any():
            stats[f"alpha_{name}"] = float(alpha[groups[name]].mean())
    return stats


def run_seed(task_name: str, cfg: Dict, seed: int) -> Dict:
    task = BUILDERS[task_name](cfg, seed)
    res: Dict = {"seed": seed, "teacher": task.teacher_metric,
                 "ce": train_fixed_rule(task, cfg, seed, rule_loss("ce", cfg["temperature"])),
                 "wls": train_fixed_rule(task, cfg, seed, rule_loss("wls", cfg["temperature"]))}
    for rule, make_loss in reference_losses(cfg).items():
        res[f"kd_{rule}"] = {str(a): train_fixed_rule(task, cfg, seed, make_loss(a)) for a in cfg[GRIDS[rule]]}
    if not cfg["run_tgeo"]:
        return res
    full = train_tgeo(task, cfg, seed)
    res["tgeo"] = full["metric"]
    res.update(alpha_stats(full["alpha"], task.train))
    for name in cfg["ablations"]:
        res[f"tgeo_{name}"] = train_tgeo(task, cfg, seed, name)["metric"]
    hist = full["history"]
    res["_plot"] = {"alpha": full["alpha"], "groups": sample_groups(task.train),
                    "epoch": hist["epoch"], "weight": hist["weight"], "index": hist["index"]}
    return res


def summarise(task_name: str, cfg: Dict, per_seed: List[Dict]) -> Dict:
    def ms(values):
        v = np.asarray(values, float)
        return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0

    out: Dict = {"task": task_name, "metric_name": "auc" if task_name == "ctr" else "accuracy",
                 "seeds": [r["seed"] for r in per_seed], "se": {}}
    learned = ["tgeo"] + [f"tgeo_{a}" for a in cfg["ablations"]] if cfg["run_tgeo"] else []
    keys = ["teacher", "ce", "kd_fixed_best", "wls"] + learned
    for rule, grid in GRIDS.items():
        if not cfg[grid]:
            continue
        best = max(cfg[grid], key=lambda a: np.mean([r[f"kd_{rule}"][str(a)] for r in per_seed]))
        for r in per_seed:  # the grid value with the best mean test metric: an oracle choice
            r[f"kd_{rule}_best"] = r[f"kd_{rule}"][str(best)]
        out[f"kd_{rule}_best_alpha"] = best
        out[f"kd_{rule}"] = {str(a): ms([r[f"kd_{rule}"][str(a)] for r in per_seed])[0] for a in cfg[grid]}
        keys += [f"kd_{rule}_best"] if rule != "fixed" else []
    for k in keys:
        out[k], out["se"][k] = ms([r[k] for r in per_seed])
    pairs = [(m, k) for m in learned[:1] for k in ("ce", "kd_fixed_best", "wls", "kd_oracle_best", *learned[1:])]
    pairs += [("kd_oracle_best", k) for k in ("kd_fixed_best", "wls")]
    out["paired"] = {f"{m}-{k}": ms([r[m] - r[k] for r in per_seed]) for m, k in pairs if k in per_seed[0]
                     and m in per_seed[0]}
    out["ablations"] = {a: out[f"tgeo_{a}"] for a in cfg["ablations"]} if cfg["run_tgeo"] else {}
    for k in ("alpha_teacher_wrong", "alpha_teacher_right", "alpha_outlier", "alpha_label_flipped"):
        if k in per_seed[0]:
            out[k], out["se"][k] = ms([r[k] for r in per_seed])
    out["per_seed"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in per_seed]
    return out


def save_alpha_plot(task_name: str, per_seed: List[Dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("teacher_right", "tab:blue"), ("teacher_wrong", "tab:red"), ("outlier", "tab:orange"),
              ("label_flipped", "tab:green")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    p = per_seed[0]["_plot"]
    masks = {k: m[p["index"]] for k, m in p["groups"].items()}
    epochs = np.unique(p["epoch"])
    for name, color in groups:
        m = masks[name]
        if m.any():
            ax1.plot(epochs + 1, [p["weight"][m & (p["epoch"] == e)].mean() for e in epochs], color=color,
                     label=name.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean α used in training")
    ax1.set_title(f"seed {per_seed[0]['seed']}: α during training")
    ax1.legend()
    alpha = np.concatenate([r["_plot"]["alpha"] for r in per_seed])
    final = {name: np.concatenate([r["_plot"]["groups"][name] for r in per_seed]) for name, _ in groups}
    bins = np.linspace(0, 1, 41)
    for name, color in groups:
        if final[name].any():
            ax2.hist(alpha[final[name]], bins=bins, alpha=0.55, color=color, density=True,
                     label=f"{name.replace('_', ' ')} ({final[name].sum()})")
    ax2.set_xlabel("final α (weight on the teacher term)")
    ax2.set_ylabel("density")
    ax2.set_title(f"TGeo-KD on the {task_name} task, all seeds")
    ax2.legend()
    save_png(fig, path, dpi=100)


def report_signal(task_name: str, cfg: Dict, seeds: List[int], epochs: List[int], out: Optional[str]) -> Dict:
    """:func:`alpha_signal` after each of ``epochs`` epochs, per seed; prints and returns group means over seeds."""
    per_seed = []
    for seed in seeds:
        task = BUILDERS[task_name](cfg, seed)
        per_seed.append({str(e): alpha_signal(task, cfg, seed, e) for e in epochs})
    summary = {str(e): {g: {k: float(np.mean([r[str(e)][g][k] for r in per_seed])) for k in ("mean", "frac_positive")}
                        for g in per_seed[0][str(e)]} for e in epochs}
    for e, groups in summary.items():
        print(f"after {e} epochs: " + "; ".join(f"{g} g {v['mean']:+.3f} ({v['frac_positive']:.2f} > 0)"
                                                 for g, v in groups.items()))
    result = {"task": task_name, "seeds": seeds, "alpha_signal": summary, "per_seed": per_seed, "config": cfg}
    write_json(out, result)
    return result


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, help="which task (or `task:` in the config)")
    p.add_argument("--config", help="YAML config (flat keys; see configs/trilateral_kd_*.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--quick", action="store_true", help="small sizes and few epochs (smoke tests)")
    p.add_argument("--out", help="write results JSON here")
    p.add_argument("--plot", help="write the α plot PNG here")
    p.add_argument("--workers", type=int, default=1, help="run seeds in this many processes")
    p.add_argument("--signal", type=int, nargs="+", metavar="EPOCHS",
                   help="instead of training the methods, report the one-step meta signal on α by sample group "
                        "after these many epochs of WLS-KD (alpha_signal)")
    args = p.parse_args(argv)
    task_name = args.task
    if task_name is None and args.config:
        import yaml
        task_name = (yaml.safe_load(Path(args.config).read_text()) or {}).get("task")
    if task_name not in TASKS:
        p.error(f"give --task one of {TASKS} (or a config with `task:`)")
    defaults = dict(DEFAULTS[task_name], **(QUICK[task_name] if args.quick else {}))
    cfg = load_config(args.config, defaults, args.set)
    if cfg["task"] != task_name:
        raise ValueError(f"--task {task_name} disagrees with the config's task {cfg['task']!r}")
    seeds = list(cfg.get("seeds") or [0])
    torch.set_num_threads(1)
    if args.signal:
        return report_signal(task_name, cfg, seeds, args.signal, args.out)
    per_seed: List[Dict] = []
    if args.workers > 1:  # one process per seed (each single-threaded)
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            runs = pool.map(run_seed, [task_name] * len(seeds), [cfg] * len(seeds), seeds)
    else:
        runs = (run_seed(task_name, cfg, s) for s in seeds)
    for s, res in zip(seeds, runs):  # the JSON is rewritten after every seed, so a long run leaves partial results
        per_seed.append(res)
        row = {k: v for k, v in res.items() if isinstance(v, float)}
        print(f"seed {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
        result = summarise(task_name, cfg, per_seed)
        write_json(args.out, {**result, "config": cfg})
    ms = lambda k: mean_sd([r[k] for r in per_seed])  # noqa: E731
    rows = [("teacher", ms("teacher")), ("CE only", ms("ce")),
            (f"KD, best fixed α = {result['kd_fixed_best_alpha']}", ms("kd_fixed_best")), ("WLS-KD", ms("wls"))]
    if cfg["agree_alphas"]:
        rows.append((f"KD where the teacher agrees, best α = {result['kd_agree_best_alpha']}", ms("kd_agree_best")))
    if cfg["oracle_alphas"]:
        rows.append((f"two-flag oracle α, best α = {result['kd_oracle_best_alpha']}", ms("kd_oracle_best")))
    if cfg["run_tgeo"]:
        rows += [("TGeo-KD (bilevel)", ms("tgeo"))] + [(f"TGeo-KD, {a}", ms(f"tgeo_{a}")) for a in cfg["ablations"]]
    print(f"\n{task_name}: test {result['metric_name']} (mean ± sd over seeds {seeds})")
    print(table(rows, ["method", result["metric_name"]]))
    print("α: " + ", ".join(f"{k} {result[k]:.3f}" for k in ("alpha_teacher_right", "alpha_teacher_wrong",
                                                              "alpha_outlier", "alpha_label_flipped") if k in result))
    print("paired: " + ", ".join(f"{k} {m:+.4f} ± {se:.4f}" for k, (m, se) in result["paired"].items()))
    if args.plot and cfg["run_tgeo"]:
        save_alpha_plot(task_name, per_seed, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
