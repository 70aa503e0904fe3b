"""The bad-input matrix: every case gives a named error (type and message fragment) or the correct behaviour, and
leaves what a previous run wrote (checkpoints, metrics, weights) byte for byte as it was.

API cases build a tiny trainer whose ``log_dir``/``checkpoint_dir`` hold a finished run; CLI cases call
``metareweight.cli.main`` in-process and expect exit status 2 with one line ``metareweight: error: ...``.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metareweight import MetaTrainer, MetaWeightNet, NonFiniteLossError, TensorIndexedDataset
from metareweight.checkpoint import CheckpointError
from metareweight.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "mwnet_quick.yaml")
N = 24


def _data(n=N, dtype=torch.long):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).to(dtype)


def _loader(x, y, batch_size=8, **kw):
    return DataLoader(TensorIndexedDataset(x, y, **kw), batch_size=batch_size)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run's files, and a snapshot of their bytes."""
    root = tmp_path_factory.mktemp("run")
    _make(root, log_dir=root / "logs", checkpoint_dir=root / "ckpt").fit(epochs=2)
    (root / "afile").write_text("not a directory")
    return root


def _snapshot(root: Path):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make(root, *, model=None, optimizer=None, loader=None, objective=None, **kw):
    torch.manual_seed(0)
    x, y = _data()
    model = model if model is not None else nn.Linear(4, 2)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if isinstance(model, nn.Module) else None
    kw.setdefault("meta_loader", _loader(x, y))
    return MetaTrainer(model, optimizer, loader if loader is not None else _loader(x, y),
                       objective if objective is not None else MetaWeightNet(hidden=4), progress=False, **kw)


class Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x), x


def _frozen():
    m = nn.Linear(4, 2)
    m.requires_grad_(False)
    return m


def _garbage(root, name, data):
    path = root / name
    path.write_bytes(data)
    return path


x_, y_ = _data()
inf_x = x_.clone()
inf_x[5, 2] = math.inf
nan_x = x_.clone()
nan_x[0, 0] = math.nan

# (id, call(root, logged) -> anything, exception type, message fragment); `logged` = kwargs pointing at the run's
# own log_dir and checkpoint_dir, so the test sees whether a failing call touched them
API_CASES = [
    ("model_not_module", lambda r, L: _make(r, model="linear", optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), **L),
     TypeError, "model must be a torch.nn.Module"),
    ("model_frozen", lambda r, L: _make(r, model=_frozen(), optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), **L),
     ValueError, "no trainable parameters"),
    ("optimizer_not_optimizer", lambda r, L: _make(r, optimizer="sgd", **L), TypeError,
     "optimizer must be a torch.optim.Optimizer"),
    ("objective_not_objective", lambda r, L: _make(r, objective=nn.Linear(1, 1), **L), TypeError,
     "objective must be a MetaObjective"),
    ("meta_interval_0", lambda r, L: _make(r, meta_interval=0, **L), ValueError, "meta_interval must be an integer >= 1"),
    ("meta_interval_float", lambda r, L: _make(r, meta_interval=1.5, **L), ValueError, "meta_interval must be an integer"),
    ("meta_interval_bool", lambda r, L: _make(r, meta_interval=True, **L), ValueError, "got True"),
    ("unroll_steps_0", lambda r, L: _make(r, unroll_steps=0, **L), ValueError, "unroll_steps must be an integer >= 1"),
    ("accumulate_negative", lambda r, L: _make(r, accumulate_steps=-1, **L), ValueError, "accumulate_steps must be"),
    ("meta_accumulate_str", lambda r, L: _make(r, meta_accumulate_steps="2", **L), ValueError,
     "meta_accumulate_steps must be an integer"),
    ("real_step_unknown", lambda r, L: _make(r, real_step="now", **L), ValueError, "real_step must be one of"),
    ("scheduler_interval_unknown", lambda r, L: _make(r, scheduler_interval="batch", **L), ValueError,
     "scheduler_interval must be one of"),
    ("adam_preconditioner_unknown", lambda r, L: _make(r, adam_preconditioner="exact", **L), ValueError,
     "adam_preconditioner must be one of"),
    ("grad_clip_nan", lambda r, L: _make(r, grad_clip=float("nan"), **L), ValueError, "grad_clip must be a finite number > 0"),
    ("grad_clip_negative", lambda r, L: _make(r, grad_clip=-1.0, **L), ValueError, "grad_clip must be a finite"),
    ("grad_clip_inf", lambda r, L: _make(r, grad_clip=math.inf, **L), ValueError, "got inf"),
    ("meta_grad_clip_zero", lambda r, L: _make(r, meta_grad_clip=0, **L), ValueError, "meta_grad_clip must be"),
    ("accumulate_with_lookahead", lambda r, L: _make(r, accumulate_steps=2, real_step="lookahead", **L), ValueError,
     "needs real_step='recompute'"),
    ("checkpoint_every_without_dir", lambda r, L: _make(r, checkpoint_every=2, log_dir=L["log_dir"]), ValueError,
     "needs checkpoint_dir"),
    ("checkpoint_every_zero", lambda r, L: _make(r, checkpoint_every=0, **L), ValueError,
     "checkpoint_every must be an integer >= 1"),
    ("history_zero", lambda r, L: _make(r, history=0, **L), ValueError, "history must be 'all', 'last_epoch'"),
    ("history_unknown", lambda r, L: _make(r, history="some", **L), ValueError, "history must be"),
    ("hypergrad_typo", lambda r, L: _make(r, hypergrad="unroled", **L), ValueError, "Did you mean 'unrolled'"),
    ("hypergrad_number", lambda r, L: _make(r, hypergrad=5, **L), TypeError, "hypergrad must be a method name"),
    ("precision_unknown", lambda r, L: _make(r, precision="fp8", **L), ValueError, "precision must be one of"),
    ("precision_fp16_cpu", lambda r, L: _make(r, precision="fp16", **L), ValueError, "needs a CUDA device"),
    ("bf16_finite_difference", lambda r, L: _make(r, precision="bf16", hypergrad="finite_difference", **L), ValueError,
     "bf16 rounds each gradient"),
    ("noisy_wrong_length", lambda r, L: _make(r, noisy=np.zeros(N + 1, bool), **L), ValueError,
     f"noisy has {N + 1} flags but the training set has {N} samples"),
    ("noisy_2d", lambda r, L: _make(r, noisy=np.zeros((N, 2), bool), **L), ValueError, "1-D"),
    ("noisy_floats", lambda r, L: _make(r, noisy=np.full(N, 0.5), **L), TypeError, "noisy must hold booleans"),
    ("eval_loader_empty", lambda r, L: _make(r, eval_loader=_loader(x_[:0], y_[:0]), **L), ValueError,
     "eval_loader's dataset is empty"),
    ("eval_loader_drop_last", lambda r, L: _make(r, eval_loader=DataLoader(TensorIndexedDataset(x_[:3], y_[:3]),
                                                                          batch_size=8, drop_last=True), **L),
     ValueError, "eval_loader yields no batches"),
    ("log_dir_unwritable", lambda r, L: _make(r, log_dir=r / "afile" / "logs"), PermissionError, "is not writable"),
    ("checkpoint_dir_is_a_file", lambda r, L: _make(r, checkpoint_dir=r / "afile"), ValueError, "is a file"),
    ("distributed_unknown", lambda r, L: _make(r, distributed="yes", **L), ValueError, "distributed must be 'auto'"),
    ("distributed_without_group", lambda r, L: _make(r, distributed=True, **L), RuntimeError,
     "no process group is initialised"),
    ("logger_unknown", lambda r, L: _make(r, logger="neptune", **L), ValueError, "logger must be 'wandb'"),
    ("meta_loader_missing", lambda r, L: _make(r, meta_loader=None, **L), ValueError, "needs a meta_loader"),
    # fit's arguments and resuming
    ("epochs_float", lambda r, L: _make(r, **L).fit(epochs=1.5), ValueError, "epochs must be an integer >= 1, got 1.5"),
    ("epochs_zero", lambda r, L: _make(r, **L).fit(epochs=0), ValueError, "epochs must be an integer >= 1"),
    ("max_steps_zero", lambda r, L: _make(r, **L).fit(max_steps=0), ValueError, "max_steps must be an integer"),
    ("resume_number", lambda r, L: _make(r, **L).fit(resume=5), TypeError, "resume must be True, False or a"),
    ("resume_without_dir", lambda r, L: _make(r, log_dir=L["log_dir"]).fit(resume=True), ValueError,
     "needs MetaTrainer(checkpoint_dir"),
    ("resume_missing_file", lambda r, L: _make(r, **L).fit(resume=r / "nope.pt"), FileNotFoundError, "no checkpoint at"),
    ("resume_garbage_file", lambda r, L: _make(r, **L).fit(resume=_garbage(r, "garbage.pt", b"\x00junk" * 10)),
     CheckpointError, "cannot read the checkpoint"),
    ("resume_truncated_file", lambda r, L: _make(r, **L).fit(
        resume=_garbage(r, "cut.pt", (r / "ckpt" / "last.pt").read_bytes()[:500])), CheckpointError, "cut.pt"),
    ("resume_not_a_checkpoint", lambda r, L: _make(r, **L).fit(resume=_torch_file(r)), CheckpointError,
     "is not a metareweight checkpoint"),
    ("resume_other_architecture", lambda r, L: _make(r, model=nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), **L)
     .fit(resume=True), CheckpointError, "a different architecture"),
    ("resume_sgd_into_adam", lambda r, L: _make(r, model=(m := nn.Linear(4, 2)), optimizer=torch.optim.Adam(
        m.parameters()), **L).fit(resume=True), CheckpointError, "optimizer is Adam but the checkpoint's is SGD"),
    ("resume_other_objective", lambda r, L: _make(r, objective=MetaWeightNet(hidden=7), **L).fit(resume=True),
     CheckpointError, "the objective's state shapes differ"),
    ("resume_other_method", lambda r, L: _make(r, hypergrad="neumann", **L).fit(resume=True), CheckpointError,
     "the hypergradient method is 'neumann'"),
    ("resume_extra_scheduler", lambda r, L: _with_scheduler(r, L).fit(resume=True), CheckpointError,
     "lacks a scheduler"),
    # data met during training
    ("train_loader_empty", lambda r, L: _make(r, loader=_loader(x_[:0], y_[:0]), **L).fit(), ValueError,
     "train loader yielded no batches"),
    ("meta_loader_empty", lambda r, L: _make(r, meta_loader=_loader(x_[:0], y_[:0]), **L).fit(), ValueError,
     "meta loader yielded no batches"),
    ("model_returns_tuple", lambda r, L: _make(r, model=Tuple(), **L).fit(), TypeError,
     "the model returned a tuple, not a logits tensor"),
    ("labels_out_of_range", lambda r, L: _make(r, loader=_loader(x_, y_ + 5), **L).fit(), ValueError,
     "labels out of range"),
    ("labels_float", lambda r, L: _make(r, loader=_loader(x_, y_.float()), **L).fit(), ValueError,
     "class targets must be integers"),
    ("inputs_inf", lambda r, L: _make(r, loader=_loader(inf_x, y_), meta_loader=_loader(x_, y_), **L).fit(),
     NonFiniteLossError, "is not finite (1 of 8 values): [nan]"),  # quotes the bad values, not the first ones
    ("inputs_nan", lambda r, L: _make(r, loader=_loader(nan_x, y_), **L).fit(), NonFiniteLossError, "nan"),
    ("batch_tuple_of_four", lambda r, L: _make(r, loader=DataLoader(TensorDataset(x_, y_, y_, y_), batch_size=8), **L)
     .fit(), ValueError, "a tuple batch must be (inputs, targets) or (inputs, targets, index)"),
    ("batch_bare_tensor", lambda r, L: _make(r, loader=DataLoader(x_, batch_size=8), **L).fit(), ValueError,
     "yields bare tensors without labels"),
    ("noisy_index_beyond_flags", lambda r, L: _make(r, loader=[(x_[:8], y_[:8], torch.arange(30, 38))],
                                                    meta_loader=[(x_[:8], y_[:8])], noisy=np.zeros(N, bool), **L)
     .fit(), ValueError, "noisy= has 24 flags"),
    ("evaluate_empty", lambda r, L: _make(r, **L).evaluate([]), ValueError, "yielded no samples"),
]


def _torch_file(root):
    path = root / "weights_only.pt"
    torch.save({"model": nn.Linear(4, 2).state_dict()}, path)
    return path


def _with_scheduler(root, logged):
    trainer = _make(root, **logged)
    trainer.scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, 1)
    return trainer


@pytest.mark.parametrize("case,call,error,fragment", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(finished_run, case, call, error, fragment):
    before = _snapshot(finished_run)
    logged = {"log_dir": finished_run / "logs", "checkpoint_dir": finished_run / "ckpt"}
    with pytest.raises(error) as e:
        call(finished_run, logged)
    assert fragment in str(e.value), str(e.value)
    assert "\n" not in str(e.value).strip()
    after = _snapshot(finished_run)
    for path, data in before.items():
        assert after.get(path) == data, f"{case} changed {path}"


# correct behaviour instead of an error
def test_numpy_integers_are_accepted_and_int32_labels_train(tmp_path):
    trainer = _make(tmp_path, meta_interval=np.int64(1), unroll_steps=np.int32(1), loader=_loader(x_, y_.int()),
                    meta_loader=_loader(x_, y_.int()), checkpoint_every=np.int64(2), checkpoint_dir=tmp_path)
    history = trainer.fit(epochs=np.int64(2))
    assert trainer.global_step == 6 and math.isfinite(history[-1]["train_loss"])
    assert trainer.meta_interval == 1 and type(trainer.meta_interval) is int


def test_a_refused_resume_changes_no_parameter(finished_run):
    trainer = _make(finished_run, optimizer=None, model=nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),
                    checkpoint_dir=finished_run / "ckpt")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=str(finished_run / "ckpt" / "last.pt")):
        trainer.fit(resume=True)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


# ---- the command line ----------------------------------------------------------------------------------------
def _config(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


CLI_CASES = [
    ("noise_above_1", lambda t: ["run", QUICK, "noise=1.5"], "override 'noise=1.5': config key 'noise' must be in [0, 1]"),
    ("meta_lr_negative", lambda t: ["run", QUICK, "meta_lr=-1"], "'meta_lr' must be > 0"),
    ("epochs_zero", lambda t: ["run", QUICK, "epochs=0"], "override 'epochs=0': config key 'epochs' must be >= 1"),
    ("batch_size_zero", lambda t: ["run", QUICK, "batch_size=0"], "'batch_size' must be >= 1"),
    ("hidden_zero", lambda t: ["run", QUICK, "hidden=0"], "'hidden' must be >= 1"),
    ("seeds_empty", lambda t: ["run", QUICK, "seeds=[]"], "'seeds' must list at least one seed"),
    ("seeds_negative", lambda t: ["run", QUICK, "seeds=[-1]"], "'seeds' must hold integers >= 0"),
    ("lr_zero", lambda t: ["run", QUICK, "lr=0"], "'lr' must be > 0"),
    ("momentum_one", lambda t: ["run", QUICK, "momentum=1"], "'momentum' must be in [0, 1)"),
    ("epochs_float", lambda t: ["run", QUICK, "epochs=1.5"], "'epochs' must be int, got float"),
    ("epochs_text", lambda t: ["run", QUICK, "epochs=ten"], "'epochs' must be int, got str"),
    ("typo_key", lambda t: ["run", QUICK, "epoch=1"], "did you mean 'epochs'"),
    ("hypergrad_typo_blames_override", lambda t: ["run", QUICK, "hypergrad=unroled"],
     "override 'hypergrad=unroled': config key 'hypergrad' must be one of"),
    ("malformed_override", lambda t: ["run", QUICK, "epochs"], "must look like key=value"),
    ("binary_config", lambda t: ["run", _config(t, "mwnet_bin.yaml", b"\x00\xff\xfe\x01" * 8)], "not a text file"),
    ("config_not_mapping", lambda t: ["run", _config(t, "mwnet_list.yaml", b"- 1\n- 2\n")], "must be a mapping"),
    ("config_invalid_yaml", lambda t: ["run", _config(t, "mwnet_bad.yaml", b"epochs: [1\n")], "not valid YAML"),
    ("config_missing", lambda t: ["run", str(t / "absent.yaml")], "does not exist"),
    ("config_bad_value_in_file", lambda t: ["run", _config(t, "mwnet_zero.yaml", b"experiment: mwnet\nhidden: 0\n")],
     "mwnet_zero.yaml: config key 'hidden' must be >= 1"),
    ("unknown_experiment", lambda t: ["run", "mwnett"], "unknown experiment 'mwnett'"),
    ("overrides_without_config", lambda t: ["run", "mwnet", "epochs=1"], "overrides need a config file"),
    ("unknown_dataset", lambda t: ["run", str(ROOT / "configs" / "self_taught_quick.yaml"), "datasets=[nosuch]"],
     "ValueError: unknown method/dataset ['nosuch']"),
]


@pytest.mark.parametrize("case,argv,fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(tmp_path, capsys, case, argv, fragment):
    configs = _snapshot(ROOT / "configs")
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metareweight: error: "), err
    assert fragment in lines[0] and "Traceback" not in err, err
    assert _snapshot(ROOT / "configs") == configs
