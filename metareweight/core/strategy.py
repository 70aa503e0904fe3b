"""The strategy a meta step runs under: how its reductions cross processes (:class:`Collectives`).

The bilevel core never imports :mod:`metareweight.distributed` and reads no module globals: whatever must be
reduced across data-parallel ranks (the step direction, ``∇_θ' L_out``, a weight normaliser, a gathered low-rank
factor, a vote on which route a layer takes) goes through the :class:`Collectives` object the problem carries
(:attr:`BilevelProblem.collectives <metareweight.core.BilevelProblem>`). This base class is the single-process
strategy: every operation is the identity, at no cost. :class:`metareweight.distributed.DistributedContext`
implements the same operations on ``torch.distributed``.

The same object is handed to the objective (``MetaObjective.collectives``, set by
:class:`~metareweight.MetaStep`), so a forward pass run *inside* a hypergradient method and the method itself see
one strategy: a pass that must stay local (a forward-mode JVP, where a differentiable all-reduce has no tangent
rule) runs under :meth:`Collectives.suspended`, and the objective's reductions are then local too.

Precision is not bundled here: it only changes how the objective's two functions are called (autocast around the
model, the outer loss scaled for fp16), so :class:`~metareweight.MetaStep` applies it when it builds the problem and
no method needs to know about it; collectives, by contrast, are needed by the methods themselves.

Example:
    >>> import torch
    >>> c = Collectives()
    >>> c.enabled, c.world_size, c.rank
    (False, 1, 0)
    >>> t = torch.tensor([1.0, 2.0])
    >>> c.all_reduce_mean_([t, None]); c.differentiable_mean([t])[0] is t, c.agree_min(t).tolist()
    (True, [1.0, 2.0])
    >>> rows, offset = c.all_gather_rows([t]); offset
    0
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from torch import Tensor

__all__ = ["Collectives"]


class Collectives:
    """Cross-process reductions of one meta step; this base class is one process (every operation is local).

    Attributes:
        enabled: whether operations communicate (``world_size > 1``).
        world_size: number of processes.
        rank: this process's index.

    Subclasses implement the ``_``-prefixed hooks; the public methods skip them when not enabled or inside
    :meth:`suspended`.
    """

    enabled: bool = False
    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the process that writes logs and checkpoints)."""
        return self.rank == 0

    @property
    def local(self) -> bool:
        """True when operations do not communicate (one process, or inside :meth:`suspended`)."""
        return not self.enabled or self.__dict__.get("_suspended", 0) > 0

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Make every reduction through this object local inside the block (e.g. a forward-mode pass)."""
        self.__dict__["_suspended"] = self.__dict__.get("_suspended", 0) + 1
        try:
            yield
        finally:
            self.__dict__["_suspended"] -= 1

    # ---- the operations -------------------------------------------------------------------------------------------
    def all_reduce_mean_(self, tensors: Sequence[Optional[Tensor]]) -> None:
        """Average ``tensors`` across ranks in place (``None`` entries skipped); not differentiable."""
        present = [t for t in tensors if t is not None]
        if present and not self.local:
            self._all_reduce_mean_(present)

    def all_gather_rows(self, tensors: Sequence[Tensor]) -> Tuple[List[Tensor], int]:
        """Every rank's ``tensors`` (each ``(rows, ...)``; row counts may differ across ranks) stacked along dim 0
        in rank order, and the row offset of this rank's block; not differentiable."""
        if self.local:
            return list(tensors), 0
        return self._all_gather_rows(tensors)

    def differentiable_mean(self, tensors: Sequence[Tensor]) -> List[Tensor]:
        """The cross-rank mean of ``tensors``, differentiable (its backward averages the cotangents' sum)."""
        if self.local:
            return list(tensors)
        return self._differentiable_mean(tensors)

    def agree_min(self, tensor: Tensor) -> Tensor:
        """The element-wise minimum of ``tensor`` over the ranks (a vote every rank must take part in)."""
        if self.local:
            return tensor
        return self._agree_min(tensor)

    def broadcast_(self, tensors: Sequence[Optional[Tensor]], src: int = 0) -> None:
        """Copy rank ``src``'s values of ``tensors`` to every rank in place (``None`` entries skipped)."""
        present = [t for t in tensors if t is not None]
        if present and not self.local:
            self._broadcast_(present, src)

    def gather_object(self, obj: Any) -> List[Any]:
        """Every rank's picklable ``obj`` in rank order (``[obj]`` on one process)."""
        return [obj] if self.local else self._gather_object(obj)

    def barrier(self) -> None:
        """Wait for every rank."""
        if not self.local:
            self._barrier()

    # ---- hooks of a communicating subclass ------------------------------------------------------------------------
    def _all_reduce_mean_(self, tensors: List[Tensor]) -> None:  # pragma: no cover - single process never calls
        raise NotImplementedError

    def _all_gather_rows(self, tensors: Sequence[Tensor]) -> Tuple[List[Tensor], int]:  # pragma: no cover
        raise NotImplementedError

    def _differentiable_mean(self, tensors: Sequence[Tensor]) -> List[Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _agree_min(self, tensor: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _broadcast_(self, tensors: List[Tensor], src: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _gather_object(self, obj: Any) -> List[Any]:  # pragma: no cover
        raise NotImplementedError

    def _barrier(self) -> None:  # pragma: no cover
        raise NotImplementedError
