"""Progress off a terminal: one line per epoch instead of tqdm's redraws (a pipe or a log file stays small).

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> line = EpochLine("epoch 0", total=4, stream=out)
    >>> line.update(4); line.set_postfix({"train_loss": "0.412"}); line.close()
    >>> out.getvalue().startswith("epoch 0: 4/4 steps, train_loss 0.412, ")
    True
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Mapping, Optional

__all__ = ["EpochLine", "is_tty", "progress_bar"]


def is_tty(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for pipes, files and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class EpochLine:
    """The progress bar's stand-in off a terminal: it keeps tqdm's ``update``/``set_postfix``/``close`` calls and
    prints one line when the epoch ends (``epoch 3: 20/20 steps, train_loss 0.412, meta_loss 0.523, 1.3 s``)."""

    def __init__(self, desc: str, total: Optional[int], initial: int = 0, stream: Any = None):
        self.desc, self.total, self.n = desc, total, initial
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: Dict[str, str] = {}
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, postfix: Mapping[str, Any]) -> None:
        self.postfix = {k: str(v) for k, v in postfix.items()}

    def close(self) -> None:
        steps = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        parts = [f"{self.desc}: {steps} steps", *(f"{k} {v}" for k, v in self.postfix.items()),
                 f"{time.perf_counter() - self.start:.1f} s"]
        print(", ".join(parts), file=self.stream, flush=True)


def progress_bar(desc: str, loader: Any, initial: int = 0) -> Any:
    """A tqdm bar over ``loader``'s batches on a terminal; where stderr is not a TTY (a pipe, a log file, CI), an
    :class:`EpochLine`."""
    try:
        total: Optional[int] = len(loader)
    except TypeError:
        total = None
    if not is_tty(sys.stderr):
        return EpochLine(desc, total, initial)
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
