"""Checkpoint and resume: a run SIGKILLed mid-epoch and resumed equals the uninterrupted run bit for bit (CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset
from metareweight import checkpoint as ckpt

WORKER = Path(__file__).parent / "scripts" / "resume_worker.py"


def _launch(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]


def _assert_same(a, b, where="") -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def _uninterrupted(out: Path) -> None:
    """The reference run, in this process (one interpreter start fewer), with the workers' single thread."""
    sys.path.insert(0, str(WORKER.parent))
    import resume_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resume_worker.train(out)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(WORKER.parent))


def test_sigkilled_run_resumes_exactly(tmp_path):
    victim = _launch(tmp_path / "victim", "--block-at", "13")
    _uninterrupted(tmp_path / "full")
    blocked = tmp_path / "victim" / "blocked"
    deadline = time.time() + 240
    while not blocked.exists():
        assert victim.poll() is None, victim.communicate()[0].decode()[-3000:]
        assert time.time() < deadline, "the worker never reached step 13"
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)  # steps 11-13 after the last checkpoint are lost
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    saved = ckpt.load(tmp_path / "victim" / "ckpt" / "last.pt")
    assert saved["counters"]["global_step"] == 10 and saved["counters"]["epoch"] == 1  # mid-epoch 1 (steps 9-16)
    assert saved["counters"]["_last_checkpoint_step"] == 10
    assert saved["counters"]["_accumulated"] == 2 and saved["per_rank"][0]["train"]["consumed"] == 2
    assert not list((tmp_path / "victim" / "ckpt").glob(".*tmp")), "a temporary checkpoint file was left behind"

    _finish(_launch(tmp_path / "victim", "--resume"))
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "victim" / "final.pt", weights_only=False)
    assert a["steps"] == (16, 16)
    _assert_same(a, b)  # parameters, optimizer states, metrics and weight history: bit for bit
    for name in ("metrics.jsonl",):
        assert (tmp_path / "full" / "logs" / name).read_text() == (tmp_path / "victim" / "logs" / name).read_text()


def _small_trainer(tmp_path, **kw):
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    ds = TensorIndexedDataset(x, y)
    model = nn.Linear(4, 2)
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=8),
                       MetaWeightNet(hidden=4), meta_loader=DataLoader(ds, batch_size=8), progress=False,
                       checkpoint_dir=tmp_path, **kw)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=1)
    path = tmp_path / "last.pt"
    before = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_errors_name_the_problem(tmp_path):
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=1)
    with pytest.raises(ValueError, match="lacks a scheduler"):
        other = _small_trainer(tmp_path)
        other.scheduler = torch.optim.lr_scheduler.StepLR(other.optimizer, 1)
        other.load_checkpoint(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="needs MetaTrainer\\(checkpoint_dir"):
        MetaTrainer(trainer.model, trainer.optimizer, trainer.train_loader, MetaWeightNet(hidden=4),
                    meta_loader=trainer.train_loader, progress=False).fit(resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        trainer.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1 and needs checkpoint_dir"):
        _small_trainer(None, checkpoint_every=5)


def test_resume_true_without_a_checkpoint_starts_fresh_and_finished_runs_stay_finished(tmp_path):
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=2, resume=True)
    assert trainer.epoch == 2 and (tmp_path / "last.pt").exists()
    again = _small_trainer(tmp_path)
    again.fit(epochs=2, resume=True)  # relaunching the finished command trains nothing more
    assert again.global_step == trainer.global_step == 8
    for p, q in zip(trainer.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _opt_state(trainer):
    import copy
    return copy.deepcopy(trainer.optimizer.state_dict())


@pytest.mark.parametrize("case", ["architecture", "optimizer_type", "objective_width"])
def test_a_refused_resume_leaves_model_and_optimizer_bit_identical(tmp_path, case):
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=1)
    torch.manual_seed(1)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    ds = TensorIndexedDataset(x, y)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) if case == "architecture" else nn.Linear(4, 2)
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if case == "optimizer_type"
           else torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
    other = MetaTrainer(model, opt, DataLoader(ds, batch_size=8),
                        MetaWeightNet(hidden=6 if case == "objective_width" else 4),
                        meta_loader=DataLoader(ds, batch_size=8), progress=False, checkpoint_dir=tmp_path / "o")
    other.fit(epochs=1)  # optimizer state to lose
    before, opt_before = _params(other), _opt_state(other)
    phi_before = {k: v.clone() for k, v in other.objective.state_dict().items()}
    expected = {"architecture": "a different architecture", "optimizer_type": "optimizer is Adam but the "
                "checkpoint's is SGD", "objective_width": "the objective's state shapes differ"}[case]
    with pytest.raises(ckpt.CheckpointError, match=expected) as e:
        other.load_checkpoint(tmp_path / "last.pt")
    assert str(tmp_path / "last.pt") in str(e.value)
    _assert_same(_params(other), before)
    _assert_same(_opt_state(other), opt_before)
    _assert_same({k: v for k, v in other.objective.state_dict().items()}, phi_before)


def test_a_failure_while_loading_rolls_back(tmp_path, monkeypatch):
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=1)
    other = _small_trainer(tmp_path / "o")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.model.parameters():
            p.normal_()
    before = _params(other)

    def boom(state):
        raise RuntimeError("injected")

    monkeypatch.setattr(other.precision, "load_state_dict", boom)  # after the model and optimizer were loaded
    with pytest.raises(ckpt.CheckpointError, match="injected.*left as it was"):
        other.load_checkpoint(tmp_path / "last.pt")
    _assert_same(_params(other), before)


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]
    prev = ckpt.load(tmp_path / "prev.pt")
    assert prev["counters"]["global_step"] == 4
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])  # truncated by a crash
    again = _small_trainer(tmp_path)
    with pytest.warns(RuntimeWarning, match="cannot read the checkpoint .*last.pt.*previous checkpoint .*prev.pt"):
        again.fit(epochs=2, resume=True)
    assert again.global_step == 8
    for p, q in zip(trainer.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)  # the second epoch was trained again, identically
    (tmp_path / "last.pt").write_bytes(b"garbage")
    (tmp_path / "prev.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="cannot read the checkpoint .*last.pt"):
        _small_trainer(tmp_path).load_checkpoint(tmp_path / "last.pt")


def test_stale_temporary_files_are_removed(tmp_path):
    dead = tmp_path / ".last.pt.999999999.tmp"  # no such process
    dead.write_bytes(b"half a checkpoint")
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=1)
    assert not dead.exists() and not list(tmp_path.glob(".*tmp"))


def test_one_write_per_step_and_a_resume_into_the_epoch_end_is_exact(tmp_path, monkeypatch):
    writes = []
    real = ckpt.atomic_save
    monkeypatch.setattr(ckpt, "atomic_save", lambda obj, path, **kw: writes.append(obj["counters"]["global_step"])
                        or real(obj, path, **kw))
    full = _small_trainer(tmp_path / "full", checkpoint_every=2, log_dir=tmp_path / "full_logs")
    full.fit(epochs=2)
    assert writes == [2, 4, 6, 8]  # the epoch ends at steps 4 and 8 do not write a second time
    part = _small_trainer(tmp_path / "part", checkpoint_every=2, log_dir=tmp_path / "part_logs")
    part.fit(epochs=1)
    resumed = _small_trainer(tmp_path / "part", checkpoint_every=2, log_dir=tmp_path / "part_logs")
    resumed.fit(epochs=2, resume=True)  # from step 4, saved before epoch 0's end: the end is replayed
    _assert_same(_params(resumed), _params(full))
    _assert_same(resumed.history, full.history)
    assert (tmp_path / "full_logs" / "metrics.jsonl").read_text() == \
        (tmp_path / "part_logs" / "metrics.jsonl").read_text()
    a, b = np.load(tmp_path / "full_logs" / "weights.npz"), np.load(tmp_path / "part_logs" / "weights.npz")
    _assert_same(dict(a), dict(b))


def test_resume_before_the_first_checkpoint_does_not_duplicate_metrics(tmp_path):
    logs = tmp_path / "logs"
    first = _small_trainer(tmp_path / "ckpt", log_dir=logs)
    first.fit(epochs=1, max_steps=2)  # killed, say, before any checkpoint: no last.pt
    (tmp_path / "ckpt" / "last.pt").unlink()
    (logs / "weights.npz").unlink()
    again = _small_trainer(tmp_path / "ckpt", log_dir=logs)
    again.fit(epochs=1, resume=True)
    reference = _small_trainer(tmp_path / "ref", log_dir=tmp_path / "ref_logs")
    reference.fit(epochs=1)
    assert (logs / "metrics.jsonl").read_text() == (tmp_path / "ref_logs" / "metrics.jsonl").read_text()
    a, b = np.load(logs / "weights.npz"), np.load(tmp_path / "ref_logs" / "weights.npz")
    _assert_same(dict(a), dict(b))


def test_checkpoint_size_does_not_grow_with_the_run(tmp_path):
    trainer = _small_trainer(tmp_path, log_dir=tmp_path / "logs")
    trainer.fit(epochs=1)
    size1 = (tmp_path / "last.pt").stat().st_size
    trainer.fit(epochs=6)
    growth = (tmp_path / "last.pt").stat().st_size - size1
    assert growth < 6 * 150, growth  # one metrics row per epoch; the 6 * 32 weight rows live in log_dir/weights/
    assert len(np.load(tmp_path / "logs" / "weights.npz")["step"]) == 7 * 32


def test_a_kill_between_the_renames_resumes_from_the_previous_checkpoint(tmp_path):
    """atomic_save moves last.pt to prev.pt, then the new file to last.pt: killed in between, only prev.pt and the
    dead writer's temporary file remain."""
    trainer = _small_trainer(tmp_path)
    trainer.fit(epochs=2)
    (tmp_path / "last.pt").unlink()  # the step-8 save was killed after moving step 4's last.pt to prev.pt
    (tmp_path / ".last.pt.999999999.tmp").write_bytes(b"complete or not, never trusted")
    again = _small_trainer(tmp_path)
    with pytest.warns(RuntimeWarning, match="no checkpoint at .*last.pt.*previous checkpoint .*prev.pt"):
        again.fit(epochs=2, resume=True)
    assert again.global_step == 8 and not list(tmp_path.glob(".*tmp"))
    for p, q in zip(trainer.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)  # the second epoch trained again from step 4, identically
