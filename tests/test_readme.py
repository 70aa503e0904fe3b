"""The README's Python example runs as written, given the data it names (a small noisy digits split here)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from metareweight import TensorIndexedDataset, symmetric_noise

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_a_python_example():
    assert python_blocks(README.read_text()), "README.md lost its ```python usage example"


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_python_example_runs(index):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, meta = order[:256], order[256:320]
    y_noisy, flipped = symmetric_noise(y[train], 0.4, 10, seed=0)
    namespace = {"x_noisy": x[train], "y_noisy": torch.as_tensor(y_noisy),
                 "clean_meta": TensorIndexedDataset(x[meta], torch.as_tensor(y[meta])), "flipped_flags": flipped}
    code = python_blocks(README.read_text())[index].replace("trainer.fit(epochs=30)", "trainer.fit(epochs=2)")
    torch.manual_seed(0)
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    trainer = namespace["trainer"]
    assert len(trainer.history) == 2 and 0.0 <= trainer.history[-1]["weight_auroc"] <= 1.0
    seen = trainer.weights_history[17]
    assert len(seen) == 2 and all(0.0 <= w <= 1.0 for _, w in seen)  # sample 17, once per epoch
