"""Everything about a :class:`~metareweight.MetaTrainer`'s arguments that can be checked before training starts.

The trainer's constructor calls :func:`validate_trainer_args` once, so a wrong ``noisy=`` length, an empty loader,
an unwritable ``log_dir`` or a non-integer count fails at once with a message naming the argument and the fix,
instead of after an epoch (or deep inside numpy). ``fit`` calls :func:`validate_fit_args`.

Example:
    >>> as_count("meta_interval", np.int64(2))
    2
    >>> as_count("epochs", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: epochs must be an integer >= 1, got 1.5
    >>> positive_or_none("grad_clip", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: grad_clip must be a finite number > 0 (or None), got nan
"""

from __future__ import annotations

import math
import numbers
import os
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["as_count", "positive_or_none", "check_writable", "validate_trainer_args", "validate_fit_args",
           "REFUSED_PRECISION"]

# (precision, hypergradient method) pairs refused, with the reason
REFUSED_PRECISION = {
    ("bf16", "finite_difference"): (
        "finite_difference divides the difference of two gradients at θ±εv by 2ε, and bf16 rounds each gradient "
        "to ~3 significant digits, an error as large as the difference itself (measured 1.5-60 % off fp32 "
        "depending on the seed); use hypergrad='unrolled' or 'neumann' with bf16, or precision='fp32'"),
    ("fp16", "fast"): (
        "fast under fp16 autocast has not been verified on a GPU yet (benchmarks/gpu_check.sh runs that check); "
        "use hypergrad='unrolled' with fp16, or precision='bf16' / 'fp32' with fast"),
}


def as_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum`` (numpy integers accepted; bools and non-integral floats refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_or_none(name: str, value: Any) -> Optional[float]:
    """``None``, or a finite positive real as a float."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (or None), got {value!r}")
    return float(value)


def check_writable(name: str, directory: Any) -> Path:
    """Create ``directory`` if needed and prove it writable by writing and removing a probe file."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(directory).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{name}={str(path)!r} is not writable ({e.strerror or e}); give a directory this "
                              "process can write to") from None
    return path


def _length(obj: Any) -> Optional[int]:
    try:
        return len(obj)
    except Exception:  # noqa: BLE001 - iterable datasets and generators have no length
        return None


def _check_loader(name: str, loader: Any) -> None:
    if loader is None:
        return
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be an iterable of batches such as a DataLoader, got {type(loader).__name__}")
    dataset = getattr(loader, "dataset", None)
    size = _length(dataset) if dataset is not None else None
    if size == 0:
        raise ValueError(f"{name}'s dataset is empty; give it at least one sample")
    if _length(loader) == 0:
        raise ValueError(f"{name} yields no batches (dataset of {size} samples; with drop_last=True a dataset "
                         "smaller than batch_size yields none); lower batch_size or set drop_last=False")


def _noisy(noisy: Any, train_loader: Any) -> None:
    if noisy is None:
        return
    try:
        flags = np.asarray(noisy.detach().cpu() if torch.is_tensor(noisy) else noisy)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"noisy must be a sequence of booleans, one per training sample, got {type(noisy).__name__}"
                        f" ({e})") from None
    if flags.ndim != 1:
        raise ValueError(f"noisy must be one flag per training sample (1-D), got shape {flags.shape}")
    if flags.dtype != np.bool_ and not (np.issubdtype(flags.dtype, np.integer)
                                        and np.isin(flags, (0, 1)).all()):
        raise TypeError(f"noisy must hold booleans (or 0/1), got dtype {flags.dtype}")
    size = _length(getattr(train_loader, "dataset", None))
    if size is not None and len(flags) != size:
        raise ValueError(f"noisy has {len(flags)} flags but the training set has {size} samples; give one flag per "
                         "sample, in dataset-index order")


REAL_STEPS = ("recompute", "lookahead")
STEP_ARGS = ("unroll_steps", "accumulate_steps", "meta_accumulate_steps", "grad_clip", "meta_grad_clip", "real_step",
             "adam_preconditioner")


def validate_step_args(model: Any, objective: Any, *, unroll_steps: Any = 1, accumulate_steps: Any = 1,
                       meta_accumulate_steps: Any = 1, grad_clip: Any = None, meta_grad_clip: Any = None,
                       real_step: Any = "recompute", adam_preconditioner: Any = "differentiable",
                       method: Any = "unrolled", precision: Any = "fp32") -> Dict[str, Any]:
    """Check the arguments of :class:`~metareweight.MetaStep` (shared by ``MetaTrainer``) and return the normalised
    counts and clip norms. Raises ``TypeError``/``ValueError`` naming the argument."""
    from .core.hypergrad import HypergradMethod
    from .core.optim import PRECONDITIONER_MODES
    from .objectives.base import MetaObjective

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters; there is nothing to train")
    if not isinstance(objective, MetaObjective):
        raise TypeError(f"objective must be a MetaObjective (e.g. MetaWeightNet()), got {type(objective).__name__}")
    out = {k: as_count(k, v) for k, v in (("unroll_steps", unroll_steps), ("accumulate_steps", accumulate_steps),
                                          ("meta_accumulate_steps", meta_accumulate_steps))}
    out.update({k: positive_or_none(k, v) for k, v in (("grad_clip", grad_clip), ("meta_grad_clip", meta_grad_clip))})
    for name, value, choices in (("real_step", real_step, REAL_STEPS),
                                 ("adam_preconditioner", adam_preconditioner, PRECONDITIONER_MODES)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if out["accumulate_steps"] > 1 and real_step == "lookahead":
        raise ValueError("accumulate_steps > 1 needs real_step='recompute': with 'lookahead' the virtual step "
                         "is committed as the real step, so there is no gradient to accumulate")
    if not isinstance(method, (str, HypergradMethod)):
        raise TypeError(f"hypergrad must be a method name or a HypergradMethod, got {type(method).__name__}")
    name = method if isinstance(method, str) else getattr(method, "name", "")
    mode = getattr(precision, "mode", precision)
    reason = REFUSED_PRECISION.get((mode, name))
    if reason and objective.uses_hypergradient:
        raise ValueError(f"precision={mode!r} with hypergrad={name!r} is refused: {reason}")
    return out


def validate_trainer_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """Check the constructor's arguments (``locals()`` of ``MetaTrainer.__init__``) and return the normalised
    numeric ones (numpy integers as ints). Raises ``TypeError``/``ValueError``/``PermissionError`` naming the
    argument; warns where a setting runs but is known to mislead."""
    from .history import check_keep
    from .objectives.base import META_DATA_SOURCES

    optimizer, objective = args["optimizer"], args["objective"]
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over the model's parameters (e.g. "
                        f"torch.optim.SGD(model.parameters(), lr=0.1)), got {type(optimizer).__name__}")
    out = validate_step_args(args["model"], objective, method=args["hypergrad"], precision=args["precision"],
                             **{k: args[k] for k in STEP_ARGS})
    if objective.meta_data not in META_DATA_SOURCES:
        raise ValueError(f"{type(objective).__name__}.meta_data must be one of {META_DATA_SOURCES}")
    out["meta_interval"] = as_count("meta_interval", args["meta_interval"])
    if args["scheduler_interval"] not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be one of {('epoch', 'step')}, got {args['scheduler_interval']!r}")
    every = args["checkpoint_every"]
    if every is not None and (args["checkpoint_dir"] is None or isinstance(every, bool)
                              or not isinstance(every, numbers.Integral) or every < 1):
        raise ValueError(f"checkpoint_every must be an integer >= 1 and needs checkpoint_dir, got "
                         f"checkpoint_every={every!r}, checkpoint_dir={args['checkpoint_dir']!r}")
    out["checkpoint_every"] = None if every is None else int(every)
    check_keep(args["history"])
    # an empty train or meta loader fails at the first step of fit (before any work), on every rank when
    # distributed (distributed.check_loaders_agree); an empty eval loader would fail only after an epoch
    _check_loader("eval_loader", args["eval_loader"])
    _noisy(args["noisy"], args["train_loader"])
    for name in ("log_dir", "checkpoint_dir"):
        if args[name] is not None:
            check_writable(name, args[name])
    return out


def validate_fit_args(epochs: Any, max_steps: Any, resume: Any):
    """``fit``'s arguments: ``epochs`` an integer >= 1, ``max_steps`` None or an integer >= 1."""
    epochs = as_count("epochs", epochs)
    max_steps = None if max_steps is None else as_count("max_steps", max_steps)
    if not isinstance(resume, (bool, str, os.PathLike)) and resume is not None:
        raise TypeError(f"resume must be True, False or a checkpoint path, got {resume!r}")
    return epochs, max_steps
