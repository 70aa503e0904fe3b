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
