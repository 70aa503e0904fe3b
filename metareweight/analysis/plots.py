"""Matplotlib figures of learned weights. Each function returns a new ``matplotlib.figure.Figure``.

Figures are built without ``pyplot`` (no global state, no GUI backend), so they work headless; in a notebook the
returned figure displays as the cell's value. ``labels`` maps a group value to its legend name, e.g.
``{0: "clean", 1: "flipped"}``.

Example:
    >>> import torch
    >>> from metareweight import WeightHistory
    >>> from metareweight.analysis import group_stats
    >>> h = WeightHistory()
    >>> h.record(0, 0, torch.arange(4), torch.tensor([1., 1., 0.5, 0.4]), noisy=torch.tensor([0, 0, 1, 1]))
    >>> fig = plot_group_means(group_stats(h, "noisy"), labels={0: "clean", 1: "flipped"})
    >>> [line.get_label() for line in fig.axes[0].lines]
    ['clean', 'flipped']
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from .io import as_arrays
from .stats import GroupStats, Roc, Source, _column, final_weights, trajectories

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SPREADS = ("std", "sem", None)


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _name(labels: Optional[Mapping], group) -> str:
    key = group.item() if hasattr(group, "item") else group
    return str(labels.get(key, key)) if labels else str(key)


def _spread(std: np.ndarray, count: np.ndarray, kind: Optional[str]) -> Optional[np.ndarray]:
    """The half-width of a band or error bar: ``"std"``, ``"sem"`` (std / √count) or ``None`` (none drawn)."""
    if kind not in SPREADS:
        raise ValueError(f"band/errors must be one of {SPREADS}, got {kind!r}")
    if kind is None:
        return None
    return std if kind == "std" else std / np.sqrt(np.maximum(count, 1))


def plot_group_means(stats: GroupStats, labels: Optional[Mapping] = None, title: str = "",
                     ylabel: str = "mean weight", band: Optional[str] = "std") -> "Figure":  # noqa: F821
    """Mean weight per group over epochs (or steps), with a band of ±1 ``band`` (``"std"``, ``"sem"`` or None)."""
    fig, (ax,) = _figure()
    for j, g in enumerate(stats.groups):
        m = stats.mean[:, j]
        ax.plot(stats.periods, m, marker="o" if len(stats.periods) <= 30 else None, ms=3, label=_name(labels, g))
        half = _spread(stats.std[:, j], stats.count[:, j], band)
        if half is not None:
            ax.fill_between(stats.periods, m - half, m + half, alpha=0.15)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(stats.per)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_weight_histograms(source: Source, by, epochs: Optional[Sequence[int]] = None,
                           labels: Optional[Mapping] = None, bins: int = 30, title: str = "") -> "Figure":  # noqa: F821
    """Histograms of each sample's last weight per group, one panel per epoch (default: first, middle, last)."""
    a = as_arrays(source)
    if epochs is None:
        all_epochs = np.unique(a["epoch"])
        epochs = sorted({int(all_epochs[0]), int(all_epochs[len(all_epochs) // 2]), int(all_epochs[-1])})
    fig, axes = _figure(len(epochs), width=3.4, height=2.8)
    for ax, e in zip(axes, epochs):
        w = final_weights(source, e)
        g = _column(w, by)
        edges = np.linspace(w["weight"].min(), w["weight"].max() + 1e-12, bins + 1)
        for value in np.unique(g):
            ax.hist(w["weight"][g == value], bins=edges, alpha=0.55, label=_name(labels, value))
        ax.set_title(f"epoch {e}", fontsize=9)
        ax.set_xlabel("weight")
    axes[0].set_ylabel("samples")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_roc(curves: Mapping[str, Roc], title: str = "") -> "Figure":  # noqa: F821
    """ROC curves, the legend giving each one's AUROC; the diagonal marks chance."""
    fig, (ax,) = _figure(width=3.6, height=3.4)
    for name, roc in curves.items():
        ax.plot(roc.fpr, roc.tpr, label=f"{name} (AUROC {roc.auc:.2f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_sample_trajectories(source: Source, picked: Mapping[object, Sequence[int]],
                             labels: Optional[Mapping] = None, title: str = "") -> "Figure":  # noqa: F821
    """Weight over steps of chosen samples, one colour per group (``picked`` as from ``pick_samples``)."""
    fig, (ax,) = _figure()
    for c, (group, indices) in enumerate(picked.items()):
        for k, (steps, w) in enumerate(trajectories(source, indices).values()):
            ax.plot(steps, w, color=f"C{c}", lw=1, alpha=0.8, label=_name(labels, group) if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_series(x, series: Mapping[str, np.ndarray], xlabel: str = "step", ylabel: str = "",
                title: str = "", hline: Optional[float] = None) -> "Figure":  # noqa: F821
    """Several named series over a shared x (domain weights, policy probabilities, ...); ``hline`` marks a level."""
    fig, (ax,) = _figure()
    for name, y in series.items():
        ax.plot(x, y, label=str(name))
    if hline is not None:
        ax.axhline(hline, color="0.6", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_binned(binned: Mapping[str, Dict[str, np.ndarray]], xlabel: str, ylabel: str = "mean weight",
                title: str = "", errors: Optional[str] = "sem") -> "Figure":  # noqa: F821
    """Binned means (from ``binned_stat``) of one or more named groups, error bars ±1 ``errors`` (sem, std, None)."""
    fig, (ax,) = _figure()
    for name, b in binned.items():
        ax.errorbar(b["center"], b["mean"], yerr=_spread(b["std"], b["count"], errors), marker="o", ms=3,
                    capsize=2, label=str(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(binned) > 1:
        ax.legend(fontsize=8)
    return fig


def save_figure(fig, path: Union[str, Path], dpi: int = 80) -> Path:
    """Write ``fig`` as a PNG (parents created) at a modest dpi, for small gallery images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
