"""Data-parallel meta-training on ``torch.distributed``, launched with ``torchrun`` (gloo on CPU, NCCL on GPU).

Each rank runs the inner step on its shard of the global batch. The model is **not** wrapped in
``DistributedDataParallel``: DDP synchronises gradients with autograd hooks on the leaf parameters, and a virtual
step runs the model through ``functional_call`` on non-leaf tensors, where those hooks never fire. Worse, the
hypergradient needs the *global* virtual step θ' = θ − η·mean_r(g_r), not each rank's own. So the reductions are
explicit, one coalesced collective each:

- **virtual steps**: :class:`SyncedFunctionalOptimizer` averages the step direction across ranks with a
  *differentiable* all-reduce before the update, so θ' is the global step and the backward pass carries the
  other ranks' cotangents back to each rank's meta-parameters;
- **meta step**: the hypergradient is averaged once per meta step (:meth:`DistributedContext.all_reduce_mean_`);
- **real step**: model gradients are averaged once per optimizer step, after accumulation and before clipping;
- **logging**: per-sample weights are all-gathered, so every rank holds the whole weight history; rank 0 writes
  logs and checkpoints.

With equal shard sizes, an R-process run on a global batch equals a 1-process run on the same batch (up to
float summation order) for ``"unrolled"`` (it differentiates through the synchronised step) and for ``"fast"`` (its
direct form averages ``∇_θ' L_out`` across ranks once per meta step; its Gram form gathers every rank's train rows
for the low-rank step, :meth:`DistributedContext.all_gather_rows`, and averages its per-row coefficients). Methods that take
``∇_θ L_out`` themselves (``"finite_difference"``, ``"neumann"``) return the average of the per-rank estimates,
which is close to but not the global one. Objectives whose weights are normalised over the batch use
the collectives :class:`~metareweight.MetaStep` hands them (``self.collectives.differentiable_mean``, or
:func:`global_mean`) for the normaliser (Meta-Weight-Net does). :class:`DistributedContext` is the data-parallel
:class:`~metareweight.core.strategy.Collectives`; the problem of a meta step carries it to the methods. The price
against DDP: the real step's all-reduce does not overlap with the backward pass.

Launch (the script calls ``torch.distributed.init_process_group`` and, on GPUs,
``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))`` before building the trainer)::

    torchrun --standalone --nproc_per_node 8 train.py                              # one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
             --rdzv_endpoint HOST:29500 --rdzv_id RUN train.py                    # on each of 2 machines

Caveats: BatchNorm statistics are per rank (use ``nn.SyncBatchNorm`` for equivalence); objectives that sample meta
batches from the training set (``meta_data="train"``) need an explicit sharded ``meta_loader``; ``checkpoint_dir``
must be on a file system every rank can read.

Example (single process: every helper is the identity):
    >>> import torch
    >>> ctx = resolve("auto")
    >>> ctx.enabled, ctx.rank, ctx.world_size
    (False, 0, 1)
    >>> global_mean(torch.tensor(3.0), ctx)
    tensor(3.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from .core.optim import FunctionalOptimizer
from .core.strategy import Collectives

__all__ = ["DistributedContext", "resolve", "global_mean", "SyncedFunctionalOptimizer", "distributed_sampler",
           "check_loaders_agree", "UnevenShardsError"]


@dataclass(frozen=True)
class DistributedContext(Collectives):
    """The :class:`~metareweight.core.strategy.Collectives` of a ``torch.distributed`` process group
    (``world_size == 1``: no communication at all)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def enabled(self) -> bool:  # type: ignore[override]
        return self.world_size > 1

    def _all_reduce_mean_(self, tensors: List[Tensor]) -> None:
        for bucket in _buckets(tensors):
            flat = _flat([t.detach() for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat /= self.world_size
            for t, v in zip(bucket, _unflat(flat, bucket)):
                t.detach().copy_(v)

    def _all_gather_rows(self, tensors: Sequence[Tensor]) -> "tuple[List[Tensor], int]":
        # a rank's tensors travel side by side as the columns of one (rows, Σ features) block per dtype, padded to
        # the largest rank's rows
        rows = tensors[0].shape[0]
        counts = torch.zeros(self.world_size, dtype=torch.long, device=tensors[0].device)
        counts[self.rank] = rows
        dist.all_reduce(counts, group=self.group)
        counts = counts.tolist()
        most = max(counts)
        gathered = {}
        for bucket in _buckets(tensors):
            widths = [math.prod(t.shape[1:]) for t in bucket]
            block = bucket[0].new_zeros((most, sum(widths)))
            block[:rows] = torch.cat([t.reshape(rows, w) for t, w in zip(bucket, widths)], dim=1)
            parts = [torch.empty_like(block) for _ in range(self.world_size)]
            dist.all_gather(parts, block, group=self.group)
            stacked = torch.cat([part[:n] for part, n in zip(parts, counts)])
            for t, cols in zip(bucket, stacked.split(widths, dim=1)):
                gathered[id(t)] = cols.reshape((-1,) + tuple(t.shape[1:]))
        return [gathered[id(t)] for t in tensors], sum(counts[:self.rank])

    def _differentiable_mean(self, tensors: Sequence[Tensor]) -> List[Tensor]:
        from torch.distributed.nn.functional import all_reduce

        flat = all_reduce(_flat(tensors), op=dist.ReduceOp.SUM, group=self.group if self.group is not None
                          else dist.group.WORLD) / self.world_size
        return _unflat(flat, tensors)

    def _agree_min(self, tensor: Tensor) -> Tensor:
        on = tensor.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        votes = tensor.detach().to(on, copy=True)
        dist.all_reduce(votes, op=dist.ReduceOp.MIN, group=self.group)
        return votes.to(tensor.device)

    def _broadcast_(self, tensors: List[Tensor], src: int) -> None:
        for bucket in _buckets(tensors):
            flat = _flat([t.detach() for t in bucket])
            dist.broadcast(flat, src=src, group=self.group)
            for t, v in zip(bucket, _unflat(flat, bucket)):
                t.detach().copy_(v)

    def _gather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _barrier(self) -> None:
        dist.barrier(group=self.group)


def resolve(distributed: Union[str, bool, DistributedContext] = "auto") -> DistributedContext:
    """``"auto"``: use the default process group if one is initialised with more than one rank; ``True``: require
    one; ``False``: never communicate."""
    if isinstance(distributed, DistributedContext):
        return distributed
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise RuntimeError("distributed=True but no process group is initialised: launch with torchrun and call "
                           "torch.distributed.init_process_group('nccl' on GPU, 'gloo' on CPU) before MetaTrainer")
    if distributed is False or not ready:
        return DistributedContext()
    return DistributedContext(dist.get_rank(), dist.get_world_size(), None)


def global_mean(t: Tensor, collectives: Optional[Collectives] = None) -> Tensor:
    """The mean of ``t`` over the ranks of ``collectives``, differentiable (identity on one process).

    Use it for batch-level quantities of an objective, e.g. a weight normaliser
    ``w / global_mean(w.sum(), self.collectives)``, so that averaging the ranks' step directions gives the
    single-process direction of the global batch.
    """
    return t if collectives is None else collectives.differentiable_mean([t])[0]


# ---- coalescing helpers of DistributedContext's collectives ---------------------------------------------------------
def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def _buckets(tensors: Sequence[Tensor]) -> List[List[Tensor]]:
    """``tensors`` grouped by dtype and device (one collective per group; usually there is one group)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


# ---- the synchronised virtual step -------------------------------------------------------------------------------
class SyncedFunctionalOptimizer(FunctionalOptimizer):
    """A :class:`~metareweight.core.FunctionalOptimizer` whose steps use the cross-rank mean of the gradients.

    The mean is differentiable, so an unrolled hypergradient through :meth:`step` is that of the global batch once
    the ranks' results are averaged. Every rank must call :meth:`step` the same number of times (they do: all ranks
    run the same method on equally many batches).
    """

    def __init__(self, base: FunctionalOptimizer, ctx: DistributedContext):
        super().__init__(base.hypers, base.optimizer, base._names, base.preconditioner)
        self.ctx = ctx

    def _synced(self, grads):
        names = [n for n in self.hypers if grads.get(n) is not None]
        out = dict(grads)
        out.update(zip(names, self.ctx.differentiable_mean([grads[n] for n in names])))
        return out

    def step(self, params, grads, state):
        return super().step(params, self._synced(grads), state)

    def linear_scale(self, params, grads, state):
        return super().linear_scale(params, self._synced(grads), state)


# ---- ranks agree on the work before they start (reliability) -----------------------------------------------------
class UnevenShardsError(RuntimeError):
    """The ranks' loaders would run different numbers of steps (or one yields nothing); raised on every rank."""


def _batches(loader: Any) -> int:
    """``len(loader)``, or -1 when the loader has no length (an iterable dataset: cannot be checked up front)."""
    if loader is None:
        return -1
    try:
        return len(loader)
    except TypeError:
        return -1


def check_loaders_agree(train_loader: Any, meta_loader: Any, ctx: DistributedContext) -> None:
    """Before training: every rank's train loader must yield the same number of batches per epoch, and no rank's
    train or meta loader may be empty. Every rank learns every rank's counts (one small collective), so a mismatch
    raises the same :class:`UnevenShardsError` on all ranks instead of pairing one rank's collectives with
    another's next epoch and failing later inside gloo/NCCL (or hanging). Unequal shards are refused, not joined:
    give each rank the same number of samples (:func:`distributed_sampler` pads or, with ``drop_last=True``,
    drops), and use ``drop_last=True`` on the DataLoader when the shard is not a multiple of its batch size.
    Loaders without a length cannot be checked here."""
    if not ctx.enabled:
        return
    counts = ctx.gather_object((_batches(train_loader), _batches(meta_loader)))
    empty = [(r, kind) for r, c in enumerate(counts) for kind, n in zip(("train", "meta"), c) if n == 0]
    if empty:
        r, kind = empty[0]
        raise UnevenShardsError(f"rank {r}'s {kind} loader yields no batches, so the ranks cannot step together "
                                f"(batches per rank, train/meta: {counts}); give every rank a non-empty shard")
    train = [c[0] for c in counts if c[0] >= 0]
    if len(set(train)) > 1:
        raise UnevenShardsError(f"the ranks' train loaders yield different numbers of batches per epoch "
                                f"({', '.join(f'rank {r}: {c[0]}' for r, c in enumerate(counts))}); every rank "
                                "must run the same number of steps: shard with distributed_sampler (equal shards) "
                                "and, if a shard is not a multiple of the batch size, DataLoader(drop_last=True)")


def distributed_sampler(dataset: Dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                        ctx: Optional[DistributedContext] = None) -> DistributedSampler:
    """A sampler that gives each rank its shard of the same seeded per-epoch permutation.

    With ``DataLoader(ds, batch_size=B // world_size, sampler=distributed_sampler(ds))`` the ranks' batches at
    step ``t`` together are exactly the batch ``t`` of a single process with ``batch_size=B`` and the same sampler
    (``world_size=1``), which is what makes 1-process and R-process runs comparable. ``MetaTrainer`` calls
    ``set_epoch`` for you. Keep ``len(dataset)`` divisible by ``B`` (or ``drop_last=True``) for exact equality:
    ``DistributedSampler`` pads the last shard by repeating samples, and this function warns when it does.

    Example:
        >>> s = distributed_sampler(list(range(10)), seed=3)
        >>> s.set_epoch(1); len(list(s))
        10
    """
    ctx = ctx or resolve("auto")
    n = len(dataset)
    if ctx.world_size > 1 and n % ctx.world_size:
        extra = ctx.world_size - n % ctx.world_size
        warnings.warn(f"distributed_sampler: {n} samples do not split evenly over {ctx.world_size} ranks; "
                      + (f"drop_last=True drops {n % ctx.world_size} sample(s) each epoch" if drop_last else
                         f"{extra} sample(s) are repeated to pad the last shard (they count twice per epoch; pass "
                         "drop_last=True to drop instead)"), RuntimeWarning, stacklevel=2)
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)
