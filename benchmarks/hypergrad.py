"""Step time and added peak memory of one Meta-Weight-Net training step, as multiples of plain training.

Configurations: plain training (forward, mean cross-entropy, backward, optimizer step: the floor); this library's
``MetaStep`` (what each ``MetaTrainer`` step runs, weights recorded) with ``unrolled``, ``fast`` and
``finite_difference`` (one meta step per train step) and ``fast`` / ``unrolled`` with ``meta_interval=5``
(``fast_k5``, ``unrolled_k5``); ``fast_lookahead``: ``fast`` with ``real_step="lookahead"``, a *different real step*
(the exact one-step hypergradient, then the virtual step itself is committed as the real step, as STORM does: the
real step uses the weights before the meta update, and no replayed re-weighted gradient is formed; ``Fast`` then
materialises the whole ``θ'``, so neither the low-rank Gram route nor the sparse table step applies); the peers
higher (``innerloop_ctx``) and TorchOpt (``MetaSGD``) running the same step (virtual SGD step on the weighted loss,
meta-gradient of the clean meta loss into the weight net, Adam on it, then the real re-weighted step). Betty is not
run: it declares ``python_requires <3.11`` and cannot be installed here.

Models: MLP 64→H→H→10 for H = 256/1024/4096 and a small CNN (two 3×3 convs, 32 and 64 channels) on 8×8 digits
(sklearn's bundled copy, 40 % symmetric label noise); train and meta batches of 128; SGD(lr 0.1, momentum 0.9, weight
decay 5e-4); ``torch.set_num_threads(1)``. Architectures users train (random init, random data: step time does not
depend on the values):

- ``resnet`` / ``resnet_bn``: a ResNet-style CNN on 3×32×32 inputs (3×3 stem, two residual blocks at 16 channels, a
  strided block to 32, global average pool, Linear), batch 64, without / with BatchNorm (train mode);
- ``minilm_adamw`` / ``minilm_sgd`` / ``minilm_lora`` / ``minilm_frozen``: a BERT with all-MiniLM-L6-v2's shapes
  (``transformers.BertConfig(hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522)``, eager attention, no
  dropout), 16 sequences × 64 tokens (some padded) for train and meta batches, 2 classes: full fine-tuning with
  AdamW(lr 2e-5, weight decay 0.01; ``adam_preconditioner="fixed"``) and with SGD(lr 0.01, momentum 0.9); LoRA r=8 on
  query/value (peft) with AdamW(lr 1e-3); a frozen encoder (and pooler) with only the classifier trained by AdamW.
  The peers higher and TorchOpt run the SGD models only (MLPs, CNNs and ``minilm_sgd``: their functional optimizers
  mirror SGD's hyper-parameters; the AdamW ones would need a fixed-preconditioner Adam they do not have).

Time: every configuration of a model lives in one process and is timed in interleaved blocks (the order rotates
each repetition); each block's time is divided by the plain block of the same repetition and the median of these
ratios is reported, for process CPU time (primary: with one thread it excludes time the shared machine spends on
other jobs) and for wall time.

Memory: ``tracemalloc`` does not see torch's CPU allocations, so each configuration runs in a fresh subprocess that
builds everything, resets the kernel's RSS high-water mark (``/proc/self/clear_refs``), runs a few steps and reports
``VmHWM`` minus the RSS before the first step ("added peak memory"; includes gradients, optimizer state and what the
allocator keeps).

Allocator: on CPU, glibc's ``malloc`` returns the top of its heap to the kernel when more than its trim threshold (at
most 64 MiB, adjusted dynamically) is free, and serves blocks above its mmap threshold with fresh mappings. A method
whose peak memory exceeds plain training's by more than that (``fast``: the captured activations and output
gradients, then the meta pass's) frees it at the end of every step and faults the pages in again on the next, which
the kernel zeroes: on the ResNet 32×32 about 60,000 minor faults and ~40 % of ``fast``'s step, while plain's steady
allocations fault none. ``--malloc keep`` sets ``M_TRIM_THRESHOLD`` (2 GiB) and ``M_MMAP_THRESHOLD`` (32 MiB) with
``mallopt`` at start-up (the same as ``MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_MMAP_THRESHOLD_=33554432`` in the
environment), so freed memory stays in the process for the next step, as a caching allocator (jemalloc, tcmalloc,
CUDA's) keeps it; ``--malloc default`` leaves glibc's defaults.

The memory pass takes a fresh process per configuration; ``--memory-methods plain fast unrolled`` limits it.

Usage::

    python benchmarks/hypergrad.py --out experiments/results/bench_hypergrad.json
    python benchmarks/hypergrad.py --quick --out /tmp/bench_quick.json     # smoke test, about a minute
    python benchmarks/hypergrad.py --archs resnet --methods plain fast --malloc keep --out /tmp/resnet_keep.json
    python benchmarks/hypergrad.py --adam-gap --out benchmarks/adam_gap.json  # fixed vs differentiable Adam
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metareweight import MetaStep, MetaWeightNet, WeightHistory  # noqa: E402
from metareweight.data import Batch  # noqa: E402

ARCHS = ["mlp256", "mlp1024", "mlp4096", "cnn", "resnet", "resnet_bn", "minilm_adamw", "minilm_sgd", "minilm_lora",
         "minilm_frozen"]
PEERS_RUN_ON = ("mlp", "cnn", "resnet", "minilm_sgd")  # higher / TorchOpt: the SGD models
BERT_BATCH, BERT_TOKENS, CNN_BATCH = 16, 64, 64
DEVICE = torch.device("cpu")  # --device cuda: models, batches and the weight net on the GPU, wall time synchronised
METHODS = ["plain", "unrolled", "fast", "finite_difference", "higher", "torchopt", "fast_k5", "unrolled_k5",
           "fast_lookahead"]
BATCH = 128
MALLOC = "default"  # --malloc
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


class ResNetCNN(nn.Module):
    """A ResNet-style CNN for 3×32×32 inputs: stem, two residual blocks at 16 channels, one strided to 32."""

    def __init__(self, batch_norm: bool, classes: int = 10):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())

        def conv(i, o, stride=1):
            return nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=not batch_norm)

        self.stem = nn.Sequential(conv(3, 16), norm(16), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(conv(16, 16), norm(16), nn.ReLU(), conv(16, 16), norm(16))
                                     for _ in range(2)])
        self.down = nn.Sequential(conv(16, 32, 2), norm(32), nn.ReLU(), conv(32, 32), norm(32))
        self.skip = nn.Conv2d(16, 32, 1, stride=2)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        h = torch.relu(self.skip(h) + self.down(h))
        return self.head(h.mean((2, 3)))


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` called the HF way on ``(B, L, 2)`` inputs (token ids, attention mask)."""

    def __init__(self, mode: str):
        super().__init__()
        import transformers
        cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                      intermediate_size=1536, vocab_size=30522, num_labels=2,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      attn_implementation="eager")
        bert = transformers.BertForSequenceClassification(cfg)
        if mode == "lora":
            import peft
            bert = peft.get_peft_model(bert, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                             target_modules=["query", "value"]))
        elif mode == "frozen":
            for name, p in bert.named_parameters():
                p.requires_grad_(name.startswith("classifier"))
        self.bert = bert

    def forward(self, x):
        return self.bert(input_ids=x[..., 0], attention_mask=x[..., 1]).logits


def make_optimizer(arch: str, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if arch == "minilm_sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if arch.startswith("minilm"):
        return torch.optim.AdamW(params, lr=1e-3 if arch == "minilm_lora" else 2e-5, weight_decay=0.01)
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def make_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch.startswith("minilm"):
        return BertClassifier(arch.split("_")[1])
    if arch.startswith("resnet"):
        return ResNetCNN(batch_norm=arch == "resnet_bn")
    if arch == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 10))
    h = int(arch[3:])
    return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))


def make_batches(arch: str, count: int = 8):
    """Train batches (40 % symmetric noise) and clean meta batches from sklearn's digits; random images / tokens for
    the ResNet and the BERT."""
    g = torch.Generator().manual_seed(0)
    if arch.startswith("minilm"):
        def draw_tokens():
            mask = torch.ones(BERT_BATCH, BERT_TOKENS, dtype=torch.long)
            for i, n in enumerate(torch.randint(BERT_TOKENS // 2, BERT_TOKENS + 1, (BERT_BATCH,), generator=g)):
                mask[i, int(n):] = 0
            ids = torch.randint(1000, 30522, (BERT_BATCH, BERT_TOKENS), generator=g) * mask
            return Batch(torch.stack([ids, mask], -1), torch.randint(0, 2, (BERT_BATCH,), generator=g),
                         torch.arange(BERT_BATCH))
        return [draw_tokens() for _ in range(count)], [draw_tokens() for _ in range(count)]
    if arch.startswith("resnet"):
        def draw_images():
            return Batch(torch.randn(CNN_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (CNN_BATCH,), generator=g),
                         torch.arange(CNN_BATCH))
        return [draw_images() for _ in range(count)], [draw_images() for _ in range(count)]
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    if arch == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    noisy = y.clone()
    flip = torch.rand(len(y), generator=g) < 0.4
    noisy[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)

    def draw(labels):
        idx = torch.randint(0, len(y), (BATCH,), generator=g)
        return Batch(x[idx], labels[idx], idx)

    return [draw(noisy) for _ in range(count)], [draw(y) for _ in range(count)]


def _weighted_real_step(model, opt, objective, batch):
    opt.zero_grad(set_to_none=True)
    losses = F.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
    with torch.no_grad():
        w = objective.weight(losses)
    ((w / w.sum()) * losses).sum().backward()
    opt.step()


def make_runner(method: str, arch: str) -> Callable[[], None]:
    """A closure that performs one training step of ``method`` on its own copy of the model."""
    model = make_model(arch).to(DEVICE)
    opt = make_optimizer(arch, model)
    train, meta = ([b.to(DEVICE) for b in bs] for bs in make_batches(arch))
    train_it, meta_it = itertools.cycle(train), itertools.cycle(meta)
    objective = MetaWeightNet(hidden=100).to(DEVICE)
    phi = objective.meta_parameters()

    if method == "plain":
        def step():
            b = next(train_it)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(b.inputs), b.targets).backward()
            opt.step()
        return step

    if method in ("unrolled", "fast", "finite_difference", "fast_k5", "unrolled_k5", "fast_lookahead"):
        name, _, k = method.partition("_k")
        name, real = ("fast", "lookahead") if name == "fast_lookahead" else (name, "recompute")  # commits θ'
        history, steps, interval = WeightHistory(), itertools.count(), int(k or 1)
        stepper = MetaStep(model, opt, objective, name, adam_preconditioner="fixed", real_step=real,
                           record=lambda b, w: history.record(stepper.global_step, 0, b.index, w))

        def step():  # what MetaTrainer does per step: a meta step every `interval` steps, the weights recorded
            b = next(train_it)
            if next(steps) % interval == 0:
                stepper.step([b], next(meta_it))
            else:
                stepper.plain_step([b])
        return step

    meta_opt = objective.make_meta_optimizer()

    def meta_update(grads):
        meta_opt.zero_grad(set_to_none=True)
        for p, g in zip(phi, grads):
            p.grad = g
        meta_opt.step()

    if method == "higher":
        import higher

        def step():
            b, mb = next(train_it), next(meta_it)
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                losses = F.cross_entropy(fmodel(b.inputs), b.targets, reduction="none")
                w = objective.weight(losses.detach())
                diffopt.step(((w / w.sum()) * losses).sum())
                meta_update(torch.autograd.grad(F.cross_entropy(fmodel(mb.inputs), mb.targets), phi))
            _weighted_real_step(model, opt, objective, b)
        return step

    if method == "torchopt":
        import torchopt
        group = opt.param_groups[0]  # the same SGD hyper-parameters as the real optimizer's
        virtual = torchopt.MetaSGD(model, lr=group["lr"], momentum=group["momentum"],
                                   weight_decay=group["weight_decay"])

        def step():
            b, mb = next(train_it), next(meta_it)
            net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(virtual)
            losses = F.cross_entropy(model(b.inputs), b.targets, reduction="none")
            w = objective.weight(losses.detach())
            virtual.step(((w / w.sum()) * losses).sum())
            meta_update(torch.autograd.grad(F.cross_entropy(model(mb.inputs), mb.targets), phi))
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(virtual, opt_state)
            _weighted_real_step(model, opt, objective, b)
        return step

    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def methods_for(arch: str, methods: List[str]) -> List[str]:
    """The peers (higher, TorchOpt) run the same SGD step as the library: only on the SGD models (the MLPs, the
    CNNs and the BERT fine-tuned with SGD)."""
    return [m for m in methods if m not in ("higher", "torchopt") or arch.startswith(PEERS_RUN_ON)]


def available(methods: List[str]) -> Dict[str, str]:
    """Methods whose peer library is missing, with the reason."""
    missing = {}
    for m, mod in (("higher", "higher"), ("torchopt", "torchopt")):
        if m in methods:
            try:
                __import__(mod)
            except ImportError as e:
                missing[m] = f"not installed ({e}); pip install -c constraints.txt {mod}"
    return missing


def interleave(runners: Dict[str, Callable[[], None]], reps: int, warmup: int,
               measure: Callable[[Callable[[], None]], object]) -> Dict[str, List[object]]:
    """``measure(run)`` of every runner, ``reps`` times in interleaved blocks whose order rotates each repetition,
    after ``warmup`` untimed steps each. Returns the per-repetition results by name."""
    names = list(runners)
    for run in runners.values():
        for _ in range(warmup):
            run()
    rec: Dict[str, List[object]] = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            rec[n].append(measure(runners[n]))
    return rec


def interleaved(arch: str, methods: List[str], reps: int, warmup: int,
                measure: Callable[[Callable[[], None]], tuple]) -> Dict[str, List[tuple]]:
    """:func:`interleave` over every method's runner for ``arch``."""
    return interleave({m: make_runner(m, arch) for m in methods}, reps, warmup, measure)


def time_arch(arch: str, methods: List[str], reps: int, steps: int, warmup: int) -> Dict[str, Dict[str, float]]:
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def measure(run):
        sync()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        return (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps

    rec = interleaved(arch, methods, reps, warmup, measure)
    out = {}
    for m in methods:
        pairs = list(zip(rec[m], rec["plain"]))
        out[m] = {
            "ratio_cpu": statistics.median(a[0] / b[0] for a, b in pairs),
            "ratio_wall": statistics.median(a[1] / b[1] for a, b in pairs),
            "ms_cpu": 1e3 * statistics.median(a[0] for a, _ in pairs),
            "ms_wall": 1e3 * statistics.median(a[1] for a, _ in pairs),
        }
    return out


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward",
              "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}


def breakdown_arch(arch: str, methods: List[str], reps: int, steps: int) -> Dict[str, Dict[str, float]]:
    """Self CPU time per step in matrix products (``MATMUL_OPS``) and in everything else, from torch.profiler, as
    medians over interleaved repetitions of the ratio to plain. Where a method's time goes: the matmul ratio is the
    floor its arithmetic sets, the rest is elementwise work and per-op overhead (inflated by the profiler's own
    per-op cost, so it overstates the share of methods that run many small ops)."""
    from torch.profiler import ProfilerActivity, profile

    def measure(run):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                run()
        events = prof.key_averages()
        mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        return mm, sum(e.self_cpu_time_total for e in events) - mm

    rec = interleaved(arch, methods, reps, 3, measure)
    out = {}
    for m in methods:
        pairs = list(zip(rec[m], rec["plain"]))
        out[m] = {"matmul_ratio": statistics.median(a[0] / b[0] for a, b in pairs),
                  "other_ratio": statistics.median(a[1] / b[1] for a, b in pairs),
                  "matmul_share": statistics.median(a[0] / (a[0] + a[1]) for a, _ in pairs),
                  "matmul_ms": statistics.median(a[0] for a, _ in pairs) / 1e3 / steps,
                  "other_ms": statistics.median(a[1] for a, _ in pairs) / 1e3 / steps}
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Stop glibc's ``malloc`` from returning freed memory to the kernel between steps (module docs: "Allocator").
    Returns False where the C library has no ``mallopt`` (not glibc), leaving the allocator as it is."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)) and bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(arch: str, method: str, steps: int) -> None:
    torch.set_num_threads(1)
    run = make_runner(method, arch)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        run()
    print(json.dumps({"added_mib": (_rss_kib("VmHWM") - before) / 1024}))


def memory_arch(arch: str, methods: List[str], steps: int) -> Dict[str, Dict[str, float]]:
    out = {}
    for m in methods:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", arch, m, "--steps", str(steps),
                               "--malloc", MALLOC],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory run {arch}/{m} failed:\n{proc.stderr[-2000:]}")
        out[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    for m in methods:
        out[m]["ratio"] = out[m]["added_mib"] / out["plain"]["added_mib"]
    return out


def adam_gap(warm_steps=(0, 10, 100), arch: str = "mlp") -> Dict[str, Dict[str, float]]:
    """How far the fixed-preconditioner Adam hypergradient (what ``fast`` computes exactly) is from the one that
    also differentiates Adam's second-moment estimate, after ``warm_steps`` real Adam steps: cosine and relative
    difference of the two (both by ``unrolled``, float32), on a Tanh MLP 64→256→256→10."""
    from metareweight.core import BilevelProblem
    from metareweight.core.hypergrad import Unrolled
    out = {}
    for warm in warm_steps:
        # an exactly zero gradient entry (a ReLU unit dead on the batch, a digits pixel that is always 0) makes the
        # derivative of Adam's sqrt(v) undefined: the differentiable mode then returns NaN. Tanh units and a little
        # input jitter keep the comparison defined everywhere.
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train, meta = make_batches(arch, count=max(warm, 1) + 1)
        g = torch.Generator().manual_seed(1)
        train, meta = [[Batch(b.inputs + 0.01 * torch.randn(b.inputs.shape, generator=g), b.targets, b.index)
                        for b in bs] for bs in (train, meta)]
        for b in train[:warm]:
            opt.zero_grad()
            F.cross_entropy(model(b.inputs), b.targets).backward()
            opt.step()
        objective = MetaWeightNet(hidden=100)
        grads = {}
        for mode in ("fixed", "differentiable"):
            problem = BilevelProblem.from_model(model, opt, objective, [train[-1]], meta[0], mode)
            grads[mode] = torch.cat([g.flatten() for g in Unrolled()(problem).grads])
        a, b = grads["fixed"], grads["differentiable"]
        out[f"after_{warm}_adam_steps"] = {"cosine": float(a @ b / (a.norm() * b.norm())),
                                           "relative_difference": float((a - b).norm() / b.norm())}
    return out


def targets(result) -> Dict[str, object]:
    t, mem = result["time"], result["memory"]
    out = {}
    wide = [a for a in ("mlp1024", "mlp4096") if a in t and "fast" in t[a]]
    if wide:
        out["fast <= 2.0x plain at width >= 1024"] = {a: round(t[a]["fast"]["ratio_cpu"], 2) for a in wide}
    wide5 = [a for a in wide if "fast_k5" in t[a]]
    if wide5:
        out["fast meta_interval=5 <= 1.3x plain"] = {a: round(t[a]["fast_k5"]["ratio_cpu"], 2) for a in wide5}
    goals = {"minilm_adamw": 2.5, "minilm_sgd": 2.5, "minilm_lora": 1.8, "minilm_frozen": 1.5, "resnet": 2.5,
             "resnet_bn": 3.0}
    for arch, goal in goals.items():
        if arch in t and "fast" in t[arch]:
            out[f"fast <= {goal}x plain on {arch}"] = round(t[arch]["fast"]["ratio_cpu"], 2)
    if "mlp4096" in mem and "fast" in mem["mlp4096"]:
        out["fast added peak memory <= 1.5x plain's at width 4096"] = round(mem["mlp4096"]["fast"]["ratio"], 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=False, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="smoke test: one small model, one repetition")
    ap.add_argument("--archs", nargs="*", default=None, choices=ARCHS)
    ap.add_argument("--methods", nargs="*", default=None, choices=METHODS)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-methods", nargs="*", default=None, choices=METHODS,
                    help="the methods of the memory pass (default: every timed method; plain is always included)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU read the wall-time ratios; the memory "
                                                     "measurement is CPU RSS and is skipped there)")
    ap.add_argument("--adam-gap", action="store_true", help="only measure fixed vs differentiable Adam hypergradients")
    ap.add_argument("--breakdown", action="store_true",
                    help="only split each method's step into matrix products and the rest (torch.profiler)")
    ap.add_argument("--malloc", choices=("default", "keep"), default="default",
                    help="keep: glibc keeps freed memory for the next step instead of returning it to the kernel "
                         "(see the module docs, 'Allocator')")
    ap.add_argument("--memory-child", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global MALLOC
    MALLOC = args.malloc
    if args.malloc == "keep" and not keep_freed_memory():
        ap.error("--malloc keep needs glibc's mallopt (not found in this C library)")
    if args.memory_child:
        return memory_child(*args.memory_child, args.steps)
    if args.out is None:
        ap.error("--out is required")
    if args.adam_gap:
        torch.set_num_threads(1)
        args.out.write_text(json.dumps({"adam_fixed_vs_differentiable": adam_gap()}, indent=2))
        return print(args.out.read_text())

    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        args.no_memory = True
    torch.set_num_threads(1)
    archs = args.archs or (["mlp256"] if args.quick else ARCHS)
    methods = args.methods or METHODS
    if "plain" not in methods:
        methods = ["plain"] + methods
    skipped = available(methods)
    methods = [m for m in methods if m not in skipped]
    reps = args.reps or (1 if args.quick else 5)
    if args.breakdown:
        out = {arch: breakdown_arch(arch, methods, reps, steps=5) for arch in archs}
        args.out.write_text(json.dumps({"breakdown": out, "command": " ".join(sys.argv)}, indent=2))
        for arch, rows in out.items():
            for m, r in rows.items():
                print(f"{arch:8s} {m:18s} matmul x{r['matmul_ratio']:.2f} ({r['matmul_ms']:.1f} ms)  "
                      f"rest x{r['other_ratio']:.2f} ({r['other_ms']:.1f} ms)  matmul share {r['matmul_share']:.0%}")
        return None
    result = {"settings": {"batch": BATCH, "meta_batch": BATCH, "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM}, "
                           f"weight_decay={WD})", "cnn32_batch": CNN_BATCH,
                           "bert_batch": f"{BERT_BATCH} x {BERT_TOKENS} tokens", "weight_net": "MetaWeightNet(hidden=100)", "threads": 1, "malloc": MALLOC,
                           "reps": reps, "device": (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"),
                           "command": " ".join([os.path.basename(sys.executable)] + sys.argv)},
              "env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                      "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              "not_run": {"betty": "python_requires <3.11 (this is Python %s): cannot be installed"
                                   % platform.python_version(), **skipped},
              "time": {}, "memory": {}}
    for arch in archs:
        wide = arch in ("mlp4096",) or arch.startswith(("minilm", "resnet"))
        steps = 5 if (wide or args.quick) else 10  # a multiple of 5 so meta_interval=5 averages whole cycles
        warmup = 2 if args.quick or arch.startswith("minilm") else 5
        print(f"[time] {arch} ...", flush=True)
        arch_methods = methods_for(arch, methods)
        result["time"][arch] = time_arch(arch, arch_methods, reps, steps, warmup=warmup)
        if not args.no_memory:
            print(f"[memory] {arch} ...", flush=True)
            mem_methods = ["plain", "fast"] if args.quick else ["plain"] + (args.memory_methods or arch_methods)
            result["memory"][arch] = memory_arch(arch, [m for m in arch_methods if m in mem_methods], steps=5)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result["targets"] = targets(result)
        args.out.write_text(json.dumps(result, indent=2))
    for arch, rows in result["time"].items():
        for m, r in rows.items():
            mem = result["memory"].get(arch, {}).get(m, {})
            print(f"{arch:13s} {m:18s} time x{r['ratio_cpu']:.2f} (wall x{r['ratio_wall']:.2f}, {r['ms_cpu']:.1f} ms)"
                  + (f"  added peak {mem['added_mib']:.0f} MiB (x{mem['ratio']:.2f})" if mem else ""))
    print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
