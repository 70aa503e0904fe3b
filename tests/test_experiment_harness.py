"""The one experiment harness (experiments/common.py): its training loop, statistics and config arguments, and the
scripts that use it (run as modules, no path edits, no private copies of the loop or of Spearman)."""

import argparse
import doctest
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import common

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "experiments").glob("*.py") if p.name not in ("__init__.py", "common.py"))


def test_doctests():
    assert doctest.testmod(common).failed == 0


def test_train_plain_default_loss_is_the_sample_weighted_mean_cross_entropy():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0])
    loader = [(x, y, torch.arange(6))]
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    common.train_plain(a, torch.optim.SGD(a.parameters(), lr=0.5), loader, 2, sample_weight=w)
    by_hand = lambda m, batch, epoch: (torch.nn.functional.cross_entropy(m(batch.inputs), batch.targets,  # noqa: E731
                                                                         reduction="none") * w).mean()
    seen = []
    curve = common.train_plain(b, torch.optim.SGD(b.parameters(), lr=0.5), loader, 2, first_epoch=3,
                               loss=lambda m, batch, e: seen.append(e) or by_hand(m, batch, e),
                               evaluate=lambda m: 1.0)
    assert seen == [3, 4] and curve == [1.0, 1.0]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="either loss or sample_weight"):
        common.train_plain(a, torch.optim.SGD(a.parameters(), lr=0.5), loader, 1, sample_weight=w, loss=by_hand)


def test_statistics_over_seeds():
    v = [0.81, 0.84, 0.9]
    assert common.mean_and_sd(v) == pytest.approx((np.mean(v), np.std(v, ddof=1)))
    assert common.mean_and_se(v)[1] == pytest.approx(np.std(v, ddof=1) / np.sqrt(3))
    assert common.sd([0.5]) == 0.0 and common.se([0.5]) == 0.0
    assert common.mean_se([1.0, 2.0, 3.0, 4.0], digits=2) == "2.50 ± 0.65"
    assert common.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # ties: average ranks


def test_config_arguments_quick_then_config_then_set(tmp_path):
    p = argparse.ArgumentParser()
    common.add_config_args(p)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\n")
    defaults, quick = dict(epochs=40, lr=0.1, hidden=256), dict(epochs=20, hidden=32)
    args = p.parse_args(["--quick", "--config", str(cfg_file), "--set", "lr=0.5", "--out", "r.json"])
    assert common.config_from_args(args, defaults, quick) == dict(epochs=7, lr=0.5, hidden=32)
    assert args.out == "r.json"
    assert common.config_from_args(p.parse_args([]), defaults, quick) == defaults
    with pytest.raises(ValueError, match="unknown config key"):
        common.config_from_args(p.parse_args(["--set", "epoch=3"]), defaults)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_scripts_share_the_harness(path):
    """No path edits (scripts run as ``python -m experiments.NAME``), no training loop or Spearman of their own, and
    the shared config arguments for every script with a ``main``."""
    text = path.read_text()
    assert "sys.path" not in text
    assert not re.search(r"def spearman|\b(opt|optimizer)\.step\(\)", text)
    if "def main(" in text:
        assert "add_config_args(" in text and "config_from_args(" in text


def test_a_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "experiments.mwnet", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={"PATH": "", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--set" in out.stdout and "--out" in out.stdout
