"""Checkpoints that survive a kill: atomic writes, RNG states, and loader positions that can be re-created mid-epoch.

A run resumed from a checkpoint continues *exactly* as if it had not stopped (on CPU; bit-for-bit on GPU also
needs deterministic kernels). The pieces:

- :func:`atomic_save` writes to a temporary file in the same directory, fsyncs it, then ``os.replace``-s it over the
  target, so a crash mid-write leaves the previous checkpoint intact.
- :func:`rng_state` / :func:`set_rng_state` cover torch (CPU and every CUDA device), numpy and ``random``.
- :class:`LoaderPosition` iterates a loader and remembers the RNG state at the moment its iterator was created plus
  how many batches were taken. Re-creating the iterator under that RNG state reproduces the same permutation
  (``shuffle=True`` draws its seed from the global RNG then; ``DistributedSampler`` uses ``seed + epoch``), and the
  consumed batches are skipped by fetching them (data loading only, no model compute).

Checkpoints hold Python objects (RNG tuples, numpy arrays), so they load with ``weights_only=False``: only resume
from checkpoints you wrote.

Example:
    >>> import torch
    >>> pos = LoaderPosition([10, 11, 12])
    >>> pos.start(); next(pos), next(pos)
    (10, 11)
    >>> saved = pos.state_dict()
    >>> again = LoaderPosition([10, 11, 12]); again.load_state_dict(saved); next(again)
    12
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch

CHECKPOINT_NAME = "last.pt"


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> Dict[str, Any]:
    """The state of every global random generator (torch CPU, CUDA devices, numpy, ``random``)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class LoaderPosition:
    """An iterator over ``loader`` whose position can be saved and re-created after a restart.

    Args:
        loader: any re-iterable (a ``DataLoader``, a list, ...). If its sampler has ``set_epoch``, it is called with
            the ``epoch`` given to :meth:`start` before each new iterator.
    """

    def __init__(self, loader: Iterable):
        self.loader = loader
        self._it = None
        self._rng: Optional[Dict[str, Any]] = None
        self.epoch: Optional[int] = None
        self.consumed = 0

    @property
    def active(self) -> bool:
        return self._it is not None

    def _new_iterator(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if self.epoch is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._it = iter(self.loader)

    def start(self, epoch: Optional[int] = None) -> None:
        """A fresh iterator (for ``epoch``), remembering the RNG state it was created under."""
        self.epoch = epoch
        self._rng = rng_state()
        self.consumed = 0
        self._new_iterator()

    def stop(self) -> None:
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            raise StopIteration
        try:
            item = next(self._it)
        except StopIteration:
            self._it = None
            raise
        self.consumed += 1
        return item

    def state_dict(self) -> Dict[str, Any]:
        return {"active": self.active, "rng": self._rng, "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Re-create the saved position. This sets the global RNG to the iterator's creation state: restore the
        current RNG state (:func:`set_rng_state`) afterwards."""
        self._it, self.epoch, self._rng, self.consumed = None, state["epoch"], state["rng"], 0
        if not state["active"]:
            self.consumed = state["consumed"]
            return
        set_rng_state(state["rng"])
        self._new_iterator()
        for _ in range(state["consumed"]):
            try:
                next(self)
            except StopIteration:
                raise ValueError(f"cannot resume: the loader now yields fewer than {state['consumed']} batches per "
                                 "pass; resume with the same data, batch size and sampler") from None
