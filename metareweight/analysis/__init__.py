"""Analysis of learned weights: load a run, summarise weights by group, ROC against known flags, and plot.

Typical use on a ``log_dir`` written by :class:`~metareweight.MetaTrainer`::

    from metareweight.analysis import load_run, group_stats, weight_roc, plot_group_means
    run = load_run("runs/mwnet")
    stats = group_stats(run, "noisy")            # mean weight of clean vs flipped samples per epoch
    # (the noisy= flags given to the trainer; or load_run("runs/mwnet", noisy=flags) to supply them)
    weight_roc(run, "noisy", positive=0).auc     # how well the last epoch's weights pick out clean samples
    plot_group_means(stats, labels={0: "clean", 1: "flipped"}).savefig("weights.png")

:mod:`.io` reads runs, :mod:`.stats` computes, :mod:`.plots` draws (matplotlib, imported only when plotting).
"""

from .io import Run, as_arrays, load_run
from .plots import (plot_binned, plot_group_means, plot_roc, plot_sample_trajectories, plot_series,
                    plot_weight_histograms, save_figure)
from .stats import (GroupStats, Roc, auroc_over_time, binned_stat, final_weights, group_stats, metric_trajectories,
                    pick_samples, roc_curve, trajectories, triangle_edges, weight_roc)

__all__ = [
    "Run", "load_run", "as_arrays",
    "GroupStats", "Roc", "group_stats", "roc_curve", "weight_roc", "auroc_over_time", "final_weights",
    "trajectories", "pick_samples", "metric_trajectories", "binned_stat", "triangle_edges",
    "plot_group_means", "plot_weight_histograms", "plot_roc", "plot_sample_trajectories", "plot_series",
    "plot_binned", "save_figure",
]
