"""metareweight.analysis on synthetic weight histories whose statistics are known in closed form."""

import numpy as np
import pytest
import torch

from metareweight import JsonlLogger, WeightHistory, auroc
from metareweight.analysis import (auroc_over_time, binned_stat, final_weights, group_stats, load_run,
                                   metric_trajectories, pick_samples, plot_binned, plot_group_means, plot_roc,
                                   plot_sample_trajectories, plot_series, plot_weight_histograms, roc_curve,
                                   save_figure, trajectories, triangle_edges, weight_roc)

N, EPOCHS, BATCH = 40, 3, 10
NOISY = np.arange(N) % 4 == 0          # every 4th sample flipped
DOMAIN = np.arange(N) % 3


def weight_of(i, epoch):
    """Clean samples rise from 1 by 0.5 per epoch, flipped ones sit at 1/(epoch+1); a tiny per-sample offset."""
    base = 1.0 / (epoch + 1) if NOISY[i] else 1.0 + 0.5 * epoch
    return base + 1e-3 * i


@pytest.fixture(scope="module")
def history():
    """EPOCHS epochs of BATCH-sized steps over a fixed permutation, with noisy/domain/target columns."""
    h = WeightHistory()
    step = 0
    rng = np.random.default_rng(0)
    for epoch in range(EPOCHS):
        order = rng.permutation(N)
        for start in range(0, N, BATCH):
            idx = order[start:start + BATCH]
            w = torch.tensor([weight_of(i, epoch) for i in idx])
            h.record(step, epoch, torch.as_tensor(idx), w, noisy=torch.as_tensor(NOISY[idx]),
                     domain=torch.as_tensor(DOMAIN[idx]), target=torch.as_tensor(idx % 2))
            step += 1
    return h


def expected(mask, epoch):
    return np.array([weight_of(i, epoch) for i in np.flatnonzero(mask)])


def test_group_stats_matches_direct_computation(history):
    s = group_stats(history, "noisy")
    assert s.periods.tolist() == list(range(EPOCHS)) and s.groups.tolist() == [False, True]
    for e in range(EPOCHS):
        for j, mask in enumerate((~NOISY, NOISY)):
            want = expected(mask, e)
            assert s.count[e, j] == mask.sum()
            assert s.mean[e, j] == pytest.approx(want.mean(), abs=1e-6)
            assert s.std[e, j] == pytest.approx(want.std(), abs=1e-6)
    assert s.of(True)["mean"][-1] == pytest.approx(expected(NOISY, EPOCHS - 1).mean(), abs=1e-6)


def test_group_stats_by_external_array_and_per_step(history):
    by_array = group_stats(history, DOMAIN)          # an array indexed by sample index
    by_column = group_stats(history, "domain")
    np.testing.assert_allclose(by_array.mean, by_column.mean)
    per_step = group_stats(history, "noisy", per="step")
    assert per_step.periods.tolist() == list(range(EPOCHS * N // BATCH))
    assert per_step.count.sum() == EPOCHS * N
    frame = by_column.to_frame()
    assert len(frame) == EPOCHS * 3 and set(frame.columns) == {"epoch", "group", "mean", "std", "count"}


def test_group_stats_marks_empty_cells_nan():
    h = WeightHistory()
    h.record(0, 0, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), domain=torch.tensor([0, 1]))
    h.record(1, 1, torch.tensor([0]), torch.tensor([3.0]), domain=torch.tensor([0]))
    s = group_stats(h, "domain")
    assert s.mean[0].tolist() == [1.0, 2.0] and s.mean[1, 0] == 3.0 and np.isnan(s.mean[1, 1])
    assert s.count.tolist() == [[1, 1], [1, 0]]


def test_bad_arguments_name_the_problem(history):
    with pytest.raises(KeyError, match="no column 'source'"):
        group_stats(history, "source")
    with pytest.raises(ValueError, match="per must be one of"):
        group_stats(history, "noisy", per="batch")
    with pytest.raises(ValueError, match="cannot be indexed"):
        group_stats(history, np.zeros(5))
    with pytest.raises(ValueError, match="no weights recorded in epoch 7"):
        weight_roc(history, "noisy", epoch=7)
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="missing \\['weight'\\]"):
        group_stats({"step": [0], "epoch": [0], "index": [0]}, "index")
    with pytest.raises(TypeError, match="WeightHistory"):
        group_stats([1, 2], "noisy")


def test_a_dict_of_history_arrays_is_a_source(history):
    arrays = dict(history.arrays())
    np.testing.assert_array_equal(group_stats(arrays, "noisy").mean, group_stats(history, "noisy").mean)
    assert weight_roc(arrays, "noisy", positive=0).auc == 1.0


def test_roc_curve_known_points_and_area():
    # scores 0.9 (pos), 0.6 (neg), 0.4 (pos), 0.1 (neg): the curve steps up, right, up, right
    r = roc_curve([0.9, 0.4, 0.6, 0.1], [True, True, False, False])
    assert r.tpr.tolist() == [0, 0.5, 0.5, 1, 1] and r.fpr.tolist() == [0, 0, 0.5, 0.5, 1]
    assert r.auc == pytest.approx(0.75)
    # all scores tied: one diagonal segment and area one half
    tied = roc_curve([1, 1, 1, 1], [True, False, True, False])
    assert tied.fpr.tolist() == [0, 1] and tied.tpr.tolist() == [0, 1] and tied.auc == 0.5


def test_roc_area_equals_auroc_on_random_scores():
    rng = np.random.default_rng(1)
    s, y = rng.integers(0, 20, 300).astype(float), rng.random(300) < 0.3   # many ties
    r = roc_curve(s, y)
    assert np.trapezoid(r.tpr, r.fpr) == pytest.approx(auroc(s, y), abs=1e-12)
    assert np.all(np.diff(r.fpr) >= 0) and np.all(np.diff(r.tpr) >= 0)


def test_weight_roc_and_auroc_over_time(history):
    # in epoch 0 flipped samples weigh 1 + 1e-3 i, clean ones 1 + 1e-3 i too: only the offset separates them
    last = weight_roc(history, "noisy", positive=0)
    assert last.auc == 1.0                      # from epoch 1 on, every clean weight exceeds every flipped one
    assert weight_roc(history, "noisy", positive=1).auc == 0.0
    periods, aucs = auroc_over_time(history, "noisy", positive=0)
    first = auroc([weight_of(i, 0) for i in range(N)], ~NOISY)
    assert periods.tolist() == [0, 1, 2] and aucs.tolist() == [pytest.approx(first), 1.0, 1.0]


def test_final_weights_takes_each_samples_last_row():
    h = WeightHistory()
    h.record(0, 0, torch.tensor([2, 0]), torch.tensor([0.1, 0.2]))
    h.record(1, 0, torch.tensor([0, 1]), torch.tensor([0.3, 0.4]))
    h.record(2, 1, torch.tensor([1]), torch.tensor([0.5]))
    f = final_weights(h, epoch=0)
    assert f["index"].tolist() == [0, 1, 2] and f["weight"].tolist() == pytest.approx([0.3, 0.4, 0.1])
    assert final_weights(h)["weight"].tolist() == [0.5]


def test_trajectories_and_pick_samples(history):
    traj = trajectories(history, [0, 5])
    steps, w = traj[0]
    assert len(steps) == EPOCHS and np.all(np.diff(steps) > 0)
    np.testing.assert_allclose(w, [weight_of(0, e) for e in range(EPOCHS)], rtol=1e-6)
    picked = pick_samples(history, "noisy", per_group=4, seed=3)
    assert set(picked) == {False, True}
    assert all(NOISY[i] for i in picked[True]) and not any(NOISY[i] for i in picked[False])
    assert all(len(v) == 4 for v in picked.values())
    assert picked == pick_samples(history, "noisy", per_group=4, seed=3)
    with pytest.raises(KeyError, match="sample 999"):
        trajectories(history, [999])


def test_metric_trajectories_collects_prefixed_keys():
    rows = [{"event": "step", "step": s, "domain_weight/2": 1 + s, "domain_weight/10": 2.0, "loss": 0.1}
            for s in range(3)] + [{"event": "step", "step": 3, "domain_weight/2": 5.0},
                                  {"event": "epoch", "epoch": 0, "domain_weight/2": 9.0}]
    x, series = metric_trajectories(rows, "domain_weight/")
    assert x.tolist() == [0, 1, 2, 3] and list(series) == ["2", "10"]        # numeric order, not string order
    assert series["2"].tolist() == [1, 2, 3, 5]
    assert series["10"][:3].tolist() == [2, 2, 2] and np.isnan(series["10"][3])
    x, series = metric_trajectories(rows, "domain_weight/", event="epoch", x="epoch")
    assert x.tolist() == [0] and list(series) == ["2"] and series["2"].tolist() == [9.0]
    with pytest.raises(KeyError, match="policy"):
        metric_trajectories(rows, "policy/")


def test_binned_stat_known_means():
    x = np.arange(100.0)
    b = binned_stat(x, 2 * x, bins=4)
    assert b["count"].tolist() == [25, 25, 25, 25]
    np.testing.assert_allclose(b["mean"], [2 * 12, 2 * 37, 2 * 62, 2 * 87.0])
    np.testing.assert_allclose(b["center"], [12, 37, 62, 87.0])
    uniform = binned_stat([0, 0, 0, 10], [1, 1, 1, 5], bins=2, quantiles=False)
    assert uniform["count"].tolist() == [3, 1] and uniform["mean"].tolist() == [1, 5]
    assert binned_stat([3, 3], [1, 2])["mean"].tolist() == [1.5]          # a constant x: one bin


def test_triangle_edges_on_known_triangle():
    s = np.array([[0.5, 0.5], [1.0, 0.0]])
    t = np.array([[1.0, 0.0], [1.0, 0.0]])
    e = triangle_edges([0, 1], teacher=t, student=s)
    np.testing.assert_allclose(e["S-G"], [np.sqrt(0.5), np.sqrt(2)])
    np.testing.assert_allclose(e["T-G"], [0, np.sqrt(2)])
    np.testing.assert_allclose(e["S-T"], [np.sqrt(0.5), 0])
    assert list(triangle_edges([0, 1], teacher=t)) == ["T-G"]
    with pytest.raises(ValueError, match="differ in shape"):
        triangle_edges([0, 1], teacher=t, student=s[:, :1])
    with pytest.raises(ValueError, match="2 labels"):
        triangle_edges([0, 1], teacher=t[:1])


def test_load_run_reads_trainer_files(tmp_path, history):
    history.save(tmp_path / "weights.npz")
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    for e in range(EPOCHS):
        log.on_epoch_end(None, {"epoch": e, "weight_auroc": 0.5 + 0.2 * e, "meta_loss": float("nan")})
    run = load_run(tmp_path)
    assert len(run.events("epoch")) == EPOCHS
    x, y = run.series("weight_auroc")
    assert x.tolist() == [0, 1, 2] and y.tolist() == pytest.approx([0.5, 0.7, 0.9])
    assert np.isnan(run.series("meta_loss")[1]).all()                      # NaN was logged as null
    np.testing.assert_allclose(group_stats(run, "noisy").mean, group_stats(history, "noisy").mean)
    with pytest.raises(KeyError, match="logged metrics"):
        run.series("accuracy")
    with pytest.raises(FileNotFoundError, match="log_dir"):
        load_run(tmp_path / "missing")


def test_load_run_from_a_real_trainer(tmp_path):
    from torch.utils.data import DataLoader

    from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset

    torch.manual_seed(0)
    noisy = torch.arange(32) % 4 == 0
    ds = TensorIndexedDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)), noisy=noisy)
    model = torch.nn.Linear(4, 3)
    MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=8),
                objective=MetaWeightNet(hidden=4), meta_loader=DataLoader(ds, batch_size=8), progress=False,
                log_dir=tmp_path).fit(epochs=2)
    run = load_run(tmp_path)
    s = group_stats(run, "noisy")
    assert s.count.tolist() == [[24, 8], [24, 8]]
    epoch_means = run.series("weight_clean")[1]
    np.testing.assert_allclose(s.of(False)["mean"], epoch_means, rtol=1e-5)


def test_plots_return_figures_with_expected_content(tmp_path, history):
    labels = {0: "clean", 1: "flipped"}
    fig = plot_group_means(group_stats(history, "noisy"), labels=labels)
    assert [l.get_label() for l in fig.axes[0].lines] == ["clean", "flipped"]
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), group_stats(history, "noisy").mean[:, 1])
    assert len(fig.axes[0].collections) == 2                                  # the ±1 std bands
    assert not plot_group_means(group_stats(history, "noisy"), band=None).axes[0].collections
    with pytest.raises(ValueError, match="band/errors must be one of"):
        plot_group_means(group_stats(history, "noisy"), band="iqr")
    fig = plot_weight_histograms(history, "noisy", labels=labels)
    assert [ax.get_title() for ax in fig.axes] == ["epoch 0", "epoch 1", "epoch 2"]
    assert sum(p.get_height() for p in fig.axes[0].patches) == N
    fig = plot_roc({"last epoch": weight_roc(history, "noisy", positive=0)})
    assert "AUROC 1.00" in fig.axes[0].get_legend().get_texts()[0].get_text()
    fig = plot_sample_trajectories(history, pick_samples(history, "noisy", per_group=2), labels=labels)
    assert len(fig.axes[0].lines) == 4
    fig = plot_series(np.arange(3), {"a": np.ones(3), "b": np.zeros(3)}, hline=1.0)
    assert len(fig.axes[0].lines) == 3
    b = binned_stat(np.arange(10.0), np.arange(10.0), bins=2)                 # two bins of 5: std √2 each
    fig = plot_binned({"all": b}, xlabel="x")                                  # error bars: ±std/√count
    segments = fig.axes[0].containers[0].lines[2][0].get_segments()
    np.testing.assert_allclose([seg[1][1] - seg[0][1] for seg in segments], 2 * np.sqrt(2) / np.sqrt(5))
    path = save_figure(fig, tmp_path / "sub" / "binned.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_noise_flags_reach_the_analysis(tmp_path):
    """`MetaTrainer(noisy=flags, log_dir=d)` then `group_stats(load_run(d), "noisy")`: the trainer's own flags are
    a column of weights.npz (or, passed to load_run, one is built from them); a missing column names the fix."""
    from torch.utils.data import DataLoader

    from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset

    torch.manual_seed(0)
    flags = (torch.arange(40) % 5 == 0).numpy()
    ds = TensorIndexedDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))  # no noisy field in the batches
    model = torch.nn.Linear(4, 3)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=8),
                          objective=MetaWeightNet(hidden=4), meta_loader=DataLoader(ds, batch_size=8),
                          noisy=flags, progress=False, log_dir=tmp_path)
    trainer.fit(epochs=2)
    explicit = group_stats(load_run(tmp_path, noisy=flags), "noisy")
    assert explicit.groups.tolist() == [False, True] and explicit.count.tolist() == [[32, 8], [32, 8]]
    np.testing.assert_allclose(explicit.of(False)["mean"], [h["weight_clean"] for h in trainer.history], rtol=1e-5)
    assert weight_roc(load_run(tmp_path, noisy=flags), "noisy", positive=0).auc == pytest.approx(
        trainer.history[-1]["weight_auroc"])
    run = load_run(tmp_path)
    if "noisy" in run.history.arrays():  # the trainer writes its flags as a column
        np.testing.assert_allclose(group_stats(run, "noisy").mean, explicit.mean)
    else:
        with pytest.raises(KeyError, match=r"columns: \[.*'weight'\].*load_run\(log_dir, noisy=flags\)"):
            group_stats(run, "noisy")
    with pytest.raises(ValueError, match="one entry per dataset sample"):
        group_stats(load_run(tmp_path, noisy=flags[:10]), "noisy")
