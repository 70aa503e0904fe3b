"""Checkpoints that survive a kill: atomic writes, RNG states, and loader positions that can be re-created mid-epoch.

A run resumed from a checkpoint continues *exactly* as if it had not stopped (on CPU; bit-for-bit on GPU also
needs deterministic kernels). The pieces:

- :func:`atomic_save` writes to a temporary file in the same directory, fsyncs it, then ``os.replace``-s it over the
  target, so a crash mid-write leaves the previous checkpoint intact.
- :func:`rng_state` / :func:`set_rng_state` cover torch (CPU and every CUDA device), numpy and ``random``.
- :class:`Checkpointer` is what ``MetaTrainer.save_checkpoint`` / ``load_checkpoint`` / ``fit(resume=...)`` call:
  it checks a checkpoint against the trainer (parameter names and shapes, optimizer type and parameter groups,
  objective, method, world size) *before* writing anything into the live objects, so a refused resume leaves the
  model and optimizers as they were; it keeps the previous checkpoint beside the newest (``last.pt`` +
  ``prev.pt``) and falls back to it, with a warning naming both files, when the newest cannot be read.
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

import copy
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

CHECKPOINT_NAME = "last.pt"
PREVIOUS_NAME = "prev.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the trainer; the message names the file and the mismatch."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(directory: Union[str, Path], name: str = CHECKPOINT_NAME) -> List[Path]:
    """Delete ``.NAME.<pid>.tmp`` files left by killed writers (whose process is gone); returns them."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.glob(f".{name}.*.tmp"):
        pid = p.name[len(name) + 2:-4]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_save(obj: Any, path: Union[str, Path], keep_previous: bool = False) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file + fsync + ``os.replace``). With
    ``keep_previous`` the file it replaces becomes ``prev.pt`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(PREVIOUS_NAME))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read(path: Path, map_location: Any) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"cannot read the checkpoint {path}: {type(e).__name__}: {str(e)[:200]} (a "
                              "truncated or foreign file)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metareweight checkpoint (expected what MetaTrainer.save_checkpoint "
                              "writes)")
    return state


def load(path: Union[str, Path], map_location: Any = "cpu", fallback: bool = True) -> Dict[str, Any]:
    """Read a checkpoint. If it is missing or unreadable and ``prev.pt`` sits beside it (``fallback``), warn naming
    both files and read that one instead; otherwise raise :class:`CheckpointError` (``FileNotFoundError`` when
    missing) naming the file."""
    return load_with_source(path, map_location, fallback)[0]


def load_with_source(path: Union[str, Path], map_location: Any = "cpu",
                     fallback: bool = True) -> "tuple[Dict[str, Any], Path]":
    """:func:`load`, and the file actually read (``prev.pt`` after a fallback)."""
    path = Path(path)
    previous = path.with_name(PREVIOUS_NAME)
    can_fall_back = fallback and path.name != PREVIOUS_NAME and previous.is_file()
    if not path.is_file() and not can_fall_back:
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        return _read(path, map_location), path
    except CheckpointError as e:
        if not can_fall_back:
            raise
        state = _read(previous, map_location)
        warnings.warn(f"{e}; resuming from the previous checkpoint {previous} instead (the steps after it are "
                      "trained again)", RuntimeWarning, stacklevel=3)
        return state, previous


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


# ---- the trainer's checkpoints ---------------------------------------------------------------------------------
def _shapes(state: Dict[str, Any]) -> Dict[str, tuple]:
    return {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in state.items()}


def _diff_shapes(what: str, mine: Dict[str, tuple], saved: Dict[str, tuple]) -> Optional[str]:
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or unexpected:
        return (f"{what} differs: the checkpoint lacks {missing[:5]} and has unexpected {unexpected[:5]}"
                if missing and unexpected else f"{what} differs: the checkpoint "
                + (f"lacks {missing[:5]}" if missing else f"has unexpected {unexpected[:5]}"))
    wrong = [f"{k}: {saved[k]} in the checkpoint, {mine[k]} here" for k in mine if mine[k] != saved[k]]
    if wrong:
        return f"{what} shapes differ ({'; '.join(wrong[:3])})"
    return None


def _optimizer_layout(optimizer: torch.optim.Optimizer, params_shapes: Sequence[tuple]) -> Dict[str, Any]:
    state = optimizer.state_dict()
    return {"type": type(optimizer).__qualname__,
            "groups": [(len(g["params"]), sorted(k for k in g if k != "params")) for g in state["param_groups"]],
            "shapes": list(params_shapes)}


def _check_optimizer(what: str, optimizer: torch.optim.Optimizer, saved_type: Optional[str],
                     saved: Dict[str, Any]) -> Optional[str]:
    mine_type = type(optimizer).__qualname__
    if saved_type is not None and saved_type != mine_type:
        return (f"the {what} is {mine_type} but the checkpoint's is {saved_type}; build the trainer with the same "
                f"optimizer as the run that wrote it")
    if not isinstance(saved, dict) or "param_groups" not in saved:
        return f"the checkpoint has no {what} state"
    mine = optimizer.state_dict()
    mine_groups = [(len(g["params"]), sorted(k for k in g if k != "params")) for g in mine["param_groups"]]
    saved_groups = [(len(g["params"]), sorted(k for k in g if k != "params")) for g in saved["param_groups"]]
    if [n for n, _ in mine_groups] != [n for n, _ in saved_groups]:
        return (f"the {what}'s parameter groups differ: {[n for n, _ in mine_groups]} parameters per group here, "
                f"{[n for n, _ in saved_groups]} in the checkpoint")
    ignore = {"initial_lr"}  # set by a scheduler
    if any((set(a) ^ set(b)) - ignore for (_, a), (_, b) in zip(mine_groups, saved_groups)):
        return (f"the {what}'s hyper-parameters differ (here {mine_groups[0][1]}, in the checkpoint "
                f"{saved_groups[0][1]}): a different optimizer type")
    shapes = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    for pid, p in zip(ids, params):
        shapes[pid] = tuple(p.shape)
    for pid, st in saved.get("state", {}).items():
        for key, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and pid in shapes and tuple(v.shape) != shapes[pid]:
                return (f"the {what}'s state {key!r} has shape {tuple(v.shape)} in the checkpoint but its "
                        f"parameter has shape {shapes[pid]}")
    return None


class Checkpointer:
    """Saves, checks and restores a :class:`~metareweight.MetaTrainer`'s state (the trainer delegates to it).

    Args:
        trainer: the trainer (read: ``model``, ``optimizer``, ``objective``, ``meta_optimizer``, ``scheduler``,
            ``meta_scheduler``, ``precision``, ``method``, ``dist``, ``weights_history``, ``callbacks``,
            ``meta_stream``, ``train_position``, ``epoch_sums``, ``history``, ``checkpoint_dir``).
        counters: the trainer's integer attributes saved as they are.

    :meth:`save` writes ``checkpoint_dir/last.pt`` and keeps the one it replaces as ``prev.pt``; :meth:`load`
    validates everything before it changes anything and, should loading still fail half-way, puts the model and
    the optimizers back as they were.
    """

    def __init__(self, trainer: Any, counters: Sequence[str]):
        self.trainer = trainer
        self.counters = tuple(counters)
        self.last_saved: Optional[tuple] = None  # (global_step, train loader position active) of the last save
        self.last_step = 0  # the step of the last save (the trainer's counter "_last_checkpoint_step", resumed)

    # ---- writing ----------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        t = self.trainer
        local = {"rng": rng_state(), "train": t.train_position.state_dict(), "meta": t.meta_stream.state_dict()}
        optional = {"meta_optimizer": t.meta_optimizer, "scheduler": t.scheduler, "meta_scheduler": t.meta_scheduler}
        return {
            "format": FORMAT, "world_size": t.dist.world_size,
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "types": {"optimizer": type(t.optimizer).__qualname__, "objective": type(t.objective).__qualname__,
                      "meta_optimizer": None if t.meta_optimizer is None else type(t.meta_optimizer).__qualname__,
                      "method": None if t.method is None else getattr(t.method, "name", type(t.method).__name__)},
            "objective": t.objective.state_dict(), "precision": t.precision.state_dict(),
            **{k: (None if v is None else v.state_dict()) for k, v in optional.items()},
            "grads": {"model": [p.grad for p in t.model.parameters()],
                      "meta": [p.grad for p in t.objective.meta_parameters()]},
            "counters": {k: getattr(t, k) for k in self.counters},
            "epoch_sums": t.epoch_sums, "history": t.history, "weights_history": t.weights_history.state_dict(),
            "callbacks": [(type(cb).__qualname__, cb.state_dict() if hasattr(cb, "state_dict") else None)
                          for cb in t.callbacks],
            "per_rank": t.dist.gather_object(local),
        }

    def save(self, path: Optional[Union[str, Path]] = None) -> Optional[Path]:
        """Write the state atomically (rank 0; every rank must call it). Returns the path on rank 0."""
        t = self.trainer
        if path is None and t.checkpoint_dir is None:
            raise ValueError("save_checkpoint needs a path, or MetaTrainer(checkpoint_dir=...)")
        previous, self.last_step = self.last_step, t.global_step  # saved with the state
        try:
            state = self.state_dict()
            self.last_saved = (t.global_step, t.train_position.active)
            target = Path(path) if path is not None else t.checkpoint_dir / CHECKPOINT_NAME
            if not t.dist.enabled:
                return atomic_save(state, target, keep_previous=path is None)
            failure = None
            if t.dist.is_main:
                try:
                    atomic_save(state, target, keep_previous=path is None)
                except Exception as e:  # noqa: BLE001 - reported to every rank below
                    failure = e
            # every rank returns once the file is complete, or raises if rank 0 could not write it (no hang)
            outcome = t.dist.gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")[0]
            if failure is not None:
                raise failure
            if outcome is not None:
                raise CheckpointError(f"rank 0 could not write the checkpoint {target}: {outcome}")
            return target if t.dist.is_main else None
        except BaseException:
            self.last_step = previous
            raise

    def saved_at_this_step(self) -> bool:
        """Whether the last save was at the current step with the epoch still open (a resume then finishes the
        epoch itself), so the end of the epoch need not write again."""
        t = self.trainer
        return self.last_saved == (t.global_step, True)

    # ---- checking ---------------------------------------------------------------------------------------------
    def mismatch(self, state: Dict[str, Any]) -> Optional[str]:
        """Why ``state`` cannot be restored into the trainer (None if it can); reads, changes nothing."""
        t = self.trainer
        if state.get("world_size") != t.dist.world_size:
            return (f"it was written by {state.get('world_size')} process(es) but this run has "
                    f"{t.dist.world_size}; resume with the same number of processes (loader positions and RNG "
                    "streams are per rank)")
        problem = _diff_shapes("the model's parameters and buffers", _shapes(t.model.state_dict()),
                               _shapes(state["model"]))
        if problem:
            return problem + " (a different architecture)"
        types = state.get("types", {})
        if types.get("objective") not in (None, type(t.objective).__qualname__):
            return (f"the objective is {type(t.objective).__qualname__} but the checkpoint's is "
                    f"{types['objective']}")
        problem = _diff_shapes("the objective's state", _shapes(t.objective.state_dict()),
                               _shapes(state["objective"]))
        if problem:
            return problem
        mine_method = None if t.method is None else getattr(t.method, "name", type(t.method).__name__)
        if "method" in types and types["method"] != mine_method:
            return (f"the hypergradient method is {mine_method!r} but the checkpoint's is {types['method']!r}; "
                    "resume with the same hypergrad")
        for name in ("meta_optimizer", "scheduler", "meta_scheduler"):
            mine = getattr(t, name)
            if (mine is None) != (state.get(name) is None):
                return (f"the checkpoint {'has' if mine is None else 'lacks'} a {name}; build the trainer with the "
                        "same optimizers and schedulers as the run that wrote it")
        problem = _check_optimizer("optimizer", t.optimizer, types.get("optimizer"), state["optimizer"])
        if problem:
            return problem
        if t.meta_optimizer is not None:
            problem = _check_optimizer("meta optimizer", t.meta_optimizer, types.get("meta_optimizer"),
                                       state["meta_optimizer"])
            if problem:
                return problem
        for what, params, grads in (("model", list(t.model.parameters()), state["grads"]["model"]),
                                    ("meta", t.objective.meta_parameters(), state["grads"]["meta"])):
            if len(params) != len(grads) or any(g is not None and tuple(g.shape) != tuple(p.shape)
                                                for p, g in zip(params, grads)):
                return f"the {what} gradients saved do not fit the parameters"
        if len(state.get("per_rank", ())) != t.dist.world_size:
            return "its per-rank states do not match the number of processes"
        return None

    # ---- reading ----------------------------------------------------------------------------------------------
    def load_state_dict(self, state: Dict[str, Any], source: str = "the checkpoint") -> None:
        """Restore ``state``: checked first (:class:`CheckpointError` naming ``source``, nothing changed), then
        loaded; a failure while loading puts the model, objective and optimizers back before it is raised."""
        t = self.trainer
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not a metareweight checkpoint (expected what "
                                  "MetaTrainer.save_checkpoint writes)")
        problem = self.mismatch(state)
        if problem:
            raise CheckpointError(f"cannot resume from {source}: {problem}")
        live = [x for x in (t.model, t.optimizer, t.objective, t.meta_optimizer, t.scheduler, t.meta_scheduler)
                if x is not None]
        backup = [copy.deepcopy(x.state_dict()) for x in live]
        grads = [None if p.grad is None else p.grad.clone()
                 for p in [*t.model.parameters(), *t.objective.meta_parameters()]]
        try:
            self._restore(state)
        except Exception as e:
            for x, b in zip(live, backup):
                x.load_state_dict(b)
            for p, g in zip([*t.model.parameters(), *t.objective.meta_parameters()], grads):
                p.grad = g
            raise CheckpointError(f"cannot resume from {source}: {type(e).__name__}: {e} (the trainer was left "
                                  "as it was)") from e

    def _restore(self, state: Dict[str, Any]) -> None:
        t = self.trainer
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.objective.load_state_dict(state["objective"])
        t.precision.load_state_dict(state["precision"])
        for name in ("meta_optimizer", "scheduler", "meta_scheduler"):
            mine = getattr(t, name)
            if mine is not None:
                mine.load_state_dict(state[name])
        for params, grads in ((list(t.model.parameters()), state["grads"]["model"]),
                              (t.objective.meta_parameters(), state["grads"]["meta"])):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.device)
        for k, v in state["counters"].items():
            setattr(t, k, v)
        t.epoch_sums = state["epoch_sums"]
        t.history = list(state["history"])
        saved_history = state["weights_history"]
        if isinstance(saved_history, (bytes, bytearray)):  # checkpoints written before the history was bounded
            import io
            with np.load(io.BytesIO(saved_history)) as data:
                saved_history = {"keep": t.weights_history.keep, "base": 0,
                                 "arrays": {k: data[k] for k in data.files}}
        if saved_history is not None:
            t.weights_history.load_state_dict(saved_history)
        saved = list(state["callbacks"])  # matched by type, in order: callbacks may be added or removed
        for cb in t.active_callbacks():
            match = next((i for i, (kind, _) in enumerate(saved) if kind == type(cb).__qualname__), None)
            cb_state = None if match is None else saved.pop(match)[1]
            if cb_state is not None:
                cb.load_state_dict(cb_state)
        mine = state["per_rank"][t.dist.rank]
        t.meta_stream.load_state_dict(mine["meta"])  # these two replay their iterators' RNG states ...
        t.train_position.load_state_dict(mine["train"])
        set_rng_state(mine["rng"])  # ... so the current state is restored last
        self.last_saved = None

    def load(self, path: Union[str, Path]) -> None:
        """Read ``path`` (falling back to ``prev.pt`` beside it when unreadable) and restore it."""
        state, source = load_with_source(path, map_location=self.trainer.device)
        self.load_state_dict(state, source=str(source))

    def resume(self, resume: Union[bool, str, Path, None]) -> bool:
        """``fit(resume=...)``: False/None → nothing; True → ``checkpoint_dir/last.pt`` (or ``prev.pt``) if there is
        one, else a fresh start that clears what an earlier, un-checkpointed attempt logged; a path → that file."""
        t = self.trainer
        if resume is False or resume is None:
            return False
        if resume is True:
            if t.checkpoint_dir is None:
                raise ValueError("fit(resume=True) needs MetaTrainer(checkpoint_dir=...), or pass the checkpoint "
                                 "file: fit(resume='run/last.pt')")
            if t.dist.is_main:
                remove_stale_temporaries(t.checkpoint_dir)
            path = t.checkpoint_dir / CHECKPOINT_NAME
            found = path.exists() or path.with_name(PREVIOUS_NAME).exists()
            if not t.dist.gather_object(found)[0]:  # rank 0 decides for all: every rank resumes, or none
                self._fresh_start()
                return False
        elif isinstance(resume, (str, os.PathLike)):
            path = Path(resume)
        else:
            raise TypeError(f"resume must be True, False or a checkpoint path, got {resume!r}")
        self.load(path)
        return True

    def _fresh_start(self) -> None:
        """A relaunch with nothing to resume: logs of the killed attempt are truncated, not appended to."""
        t = self.trainer
        if t.global_step:
            return
        for cb in t.active_callbacks():
            if hasattr(cb, "restart"):
                cb.restart()
