"""The analysis notebooks execute headlessly (nbclient, a kernel on this interpreter) and make the gallery's figures.

Each notebook writes ``gallery_<notebook>_*.png``; here they go to a temporary folder (``METAREWEIGHT_GALLERY_DIR``)
and must match, by name, the images committed in ``docs/img`` and listed in ``docs/GALLERY.md``.
Regenerate the committed images by running a notebook without that variable set.
"""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IMG = ROOT / "docs" / "img"
MAX_PNG_BYTES = 150 * 1024
KERNEL = "metareweight-tests"


@pytest.fixture
def kernel_on_this_python(tmp_path, monkeypatch):
    """A kernel spec that runs ipykernel on the interpreter running the tests (the venv's), found first on
    ``JUPYTER_PATH`` whatever kernels the user has installed."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "metareweight tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def committed_images(prefix: str = "gallery_"):
    return sorted(p.name for p in IMG.glob(f"{prefix}*.png"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_makes_its_gallery_figures(path, tmp_path, monkeypatch, kernel_on_this_python):
    figures = tmp_path / "figures"
    monkeypatch.setenv("METAREWEIGHT_GALLERY_DIR", str(figures))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name=kernel_on_this_python,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()  # raises CellExecutionError naming the failing cell
    except nbclient.exceptions.CellExecutionError as err:
        if "MissingDataError" in str(err):  # an optional data package is absent (see `make data`)
            pytest.skip(str(err).strip().splitlines()[-1])
        raise
    produced = sorted(p.name for p in figures.glob("gallery_*.png"))
    assert produced, f"{path.name} saved no gallery figure"
    assert produced == committed_images(f"gallery_{path.stem}_"), \
        "the notebook's figures differ from those committed in docs/img; re-run it to regenerate them"
    for name in produced:
        assert (figures / name).stat().st_size < MAX_PNG_BYTES, f"{name} is too large for the gallery"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear outputs before committing"


def test_gallery_lists_exactly_the_committed_images():
    assert NOTEBOOKS, "no notebooks found"
    listed = re.findall(r"!\[[^\]]*\]\(docs/img/(gallery_[^)]+\.png)\)", (ROOT / "docs" / "GALLERY.md").read_text())
    assert sorted(listed) == committed_images()
    stems = {p.stem for p in NOTEBOOKS}
    for name in committed_images():
        assert any(name.startswith(f"gallery_{s}_") for s in stems), f"{name} comes from no notebook"
        assert (IMG / name).stat().st_size < MAX_PNG_BYTES, f"{name} is too large for the gallery"
