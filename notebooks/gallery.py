"""Set-up shared by the analysis notebooks: the repository on ``sys.path``, one CPU thread, and the gallery folder.

Figures saved with :func:`save` go to ``docs/img/gallery_<name>.png``, or to ``$METAREWEIGHT_GALLERY_DIR`` when set
(the notebook tests set it to a temporary folder so a test run leaves the committed images alone).
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

try:  # a cell whose value is a Figure shows it inline
    get_ipython().run_line_magic("matplotlib", "inline")  # type: ignore[name-defined]  # noqa: F821
except NameError:  # plain Python: no display needed
    pass

from metareweight.analysis import save_figure  # noqa: E402

GALLERY = Path(os.environ.get("METAREWEIGHT_GALLERY_DIR", ROOT / "docs" / "img"))


def save(fig, name: str):
    """Save ``fig`` as ``gallery_<name>.png`` in the gallery folder and return it (so the cell displays it)."""
    save_figure(fig, GALLERY / f"gallery_{name}.png")
    return fig
