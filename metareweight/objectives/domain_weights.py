"""Domain weights with an aggregation-loss upper level (DreamPRM; Cao et al., arXiv 2505.20241).

φ is one raw scalar per domain (initialised 0). The weight of domain ``k`` is

    α_k = softplus(φ_k) / mean_j softplus(φ_j)          (positive, averaging 1 over **all K domains**)

and the lower loss is ``(1/B) Σ_i α_{d_i} ℓ_i`` with any per-sample loss ``ℓ`` (MSE of step scores for a process
reward model, cross-entropy for classification). The normalisation runs over every declared domain, not only the
domains present in the batch: a batch-local mean would make the weights of a batch depend on which domains it
happens to contain, and a batch holding one domain would always see weight 1 (no signal at all).

The upper level is a pluggable *aggregation loss* ``(forward, meta_batch) -> scalar``:

- :class:`StepAggregationLoss` (DreamPRM): the meta batch holds whole solutions, each as its padded step prefixes
  ``(B, S, ...)`` plus a ``step_mask``; the model scores every prefix, the scores are aggregated in logit space,
  ``A = σ(mean_i log(V_i / (1 − V_i)))``, and the loss is ``MSE(A, r)`` against the solution's correctness ``r``.
- :func:`meta_cross_entropy`: plain mean cross-entropy on a meta batch (domain weights for classification).

The meta loss depends on φ only through θ. DreamPRM's hypergradient is Betty's finite-difference "darts"
(ε = 0.01/‖v‖) with 5 lower steps per upper step; :meth:`DomainWeights.trainer_options` returns exactly that for
:class:`~metareweight.MetaTrainer`, and ``hypergrad="unrolled"`` is the exact alternative.

Domain ids travel in each batch under ``domain_key`` (``TensorIndexedDataset(x, y, domain=ids)``). An id outside
``0..K-1`` is an error at once; a declared domain that never appeared during the first epoch is an error at its end.

Example:
    >>> import torch
    >>> from metareweight.data import Batch
    >>> obj = DomainWeights(3, loss="mse")
    >>> model = torch.nn.Linear(4, 1)
    >>> batch = Batch(torch.randn(5, 4), torch.rand(5), extras={"domain": torch.tensor([0, 1, 2, 2, 0])})
    >>> wt = obj.inner_terms(model, batch)
    >>> wt.terms.shape, obj.named_weights()
    (torch.Size([5, 1]), {'0': 1.0, '1': 1.0, '2': 1.0})
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.problem import Forward, WeightedTerms
from ..data.batch import Batch
from ..losses import cross_entropy_terms
from .base import MetaContext, MetaObjective

LossFn = Callable[[Tensor, Tensor], Tensor]
AggregationLoss = Callable[[Forward, Batch], Tensor]


def step_score_mse_terms(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample ``(σ(logit) − p)²`` for a model that outputs one logit per step prefix (``(B,)`` or ``(B, 1)``).

    Example:
        >>> step_score_mse_terms(torch.zeros(2, 1), torch.tensor([0.5, 1.0])).tolist()
        [0.0, 0.25]
    """
    if targets is None:
        raise ValueError("the step-score loss needs targets (Monte-Carlo step labels p in [0, 1])")
    logits = _one_score(logits, targets.shape[0])
    return (torch.sigmoid(logits) - targets.to(logits.dtype)) ** 2


def _one_score(out: Tensor, n: int) -> Tensor:
    if out.dim() == 2 and out.shape[1] == 1:
        out = out.squeeze(1)
    if out.dim() != 1 or out.shape[0] != n:
        raise ValueError(f"expected one score per sample, shape ({n},) or ({n}, 1); the model returned "
                         f"{tuple(out.shape)}")
    return out


LOSSES: Dict[str, LossFn] = {"mse": step_score_mse_terms, "cross_entropy": cross_entropy_terms}


def meta_cross_entropy(forward: Forward, batch: Batch) -> Tensor:
    """Mean cross-entropy of the model on a (clean) meta batch."""
    return cross_entropy_terms(forward(batch.inputs), batch.targets).mean()


class StepAggregationLoss:
    """DreamPRM's upper loss: ``MSE(σ(mean_i logit V_i), r)`` over the valid step prefixes of each solution.

    The meta batch's ``inputs`` are ``(B, S, *feature_shape)`` (solution × step prefix, padded to ``S``), its
    ``extras[mask_key]`` a ``(B, S)`` boolean mask of real prefixes and its ``targets`` the outcome ``r ∈ {0, 1}``.
    The model returns one **logit** per prefix, so ``log(V/(1−V))`` is the logit itself (exact and stable);
    with ``output="probability"`` it returns ``V`` and the log-odds are taken with ``V`` clamped to [1e-6, 1 − 1e-6].

    Example:
        >>> import torch
        >>> from metareweight.data import Batch
        >>> model = lambda x: x.sum(-1, keepdim=True)          # a "PRM" whose logit is the feature sum
        >>> x = torch.tensor([[[2.0], [4.0], [9.0]]])          # one solution, 3 prefixes, 1 feature
        >>> b = Batch(x, torch.tensor([1.0]), extras={"step_mask": torch.tensor([[True, True, False]])})
        >>> round(StepAggregationLoss().scores(model, b).item(), 4)   # σ(mean(2, 4)) = σ(3)
        0.9526
    """

    def __init__(self, mask_key: str = "step_mask", output: str = "logit"):
        if output not in ("logit", "probability"):
            raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")
        self.mask_key = mask_key
        self.output = output

    def scores(self, forward: Forward, batch: Batch) -> Tensor:
        """The aggregated score ``A ∈ (0, 1)`` of each solution, shape ``(B,)`` (also used for best-of-N)."""
        x = batch.inputs
        if not torch.is_tensor(x) or x.dim() < 2:
            raise ValueError("StepAggregationLoss needs inputs of shape (solutions, steps, *features)")
        mask = batch.extras.get(self.mask_key)
        if mask is None:
            raise ValueError(f"the meta batch has no {self.mask_key!r} field marking each solution's real step "
                             "prefixes; yield it beside x and y")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{self.mask_key} has shape {tuple(mask.shape)} but inputs start with "
                             f"{tuple(x.shape[:2])}")
        mask = mask.bool()
        if not mask.any(1).all():
            raise ValueError("every solution in the meta batch needs at least one step prefix (a row of "
                             f"{self.mask_key} is all False)")
        b, s = x.shape[:2]
        out = _one_score(forward(x.reshape(b * s, *x.shape[2:])), b * s).reshape(b, s)
        if self.output == "probability":
            v = out.clamp(1e-6, 1 - 1e-6)
            out = torch.log(v) - torch.log1p(-v)
        m = mask.to(out.dtype)
        return torch.sigmoid((out * m).sum(1) / m.sum(1))

    def __call__(self, forward: Forward, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("the meta batch needs each solution's correctness r as targets")
        a = self.scores(forward, batch)
        return F.mse_loss(a, batch.targets.to(a.dtype))


AGGREGATIONS = {"step_mse": StepAggregationLoss, "cross_entropy": lambda: meta_cross_entropy}


class DomainWeights(MetaObjective):
    """One learned weight per training domain (softplus / mean over all ``num_domains``).

    Args:
        num_domains: ``K``, the number of declared domains; ids must lie in ``0..K-1`` and each must appear.
        loss: per-sample lower loss: ``"mse"`` (step scores from logits against MC labels), ``"cross_entropy"``
            or any ``(outputs, targets) -> (batch,)`` callable.
        aggregation: upper loss: ``"step_mse"`` (DreamPRM), ``"cross_entropy"`` or any ``(forward, batch) -> scalar``.
        domain_key: the batch field holding each sample's domain id.
        meta_lr: learning rate of φ (AdamW in DreamPRM's code: 0.01).
        meta_weight_decay: weight decay on φ (1e-3 in DreamPRM's code).
        names: optional domain names used in :meth:`named_weights`.
    """

    def __init__(self, num_domains: int, loss: Union[str, LossFn] = "mse",
                 aggregation: Union[str, AggregationLoss] = "step_mse", domain_key: str = "domain",
                 meta_lr: float = 0.01, meta_weight_decay: float = 1e-3, names: Optional[Sequence[str]] = None):
        super().__init__()
        if not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        if names is not None and len(names) != num_domains:
            raise ValueError(f"{len(names)} domain names given for {num_domains} domains")
        self.loss_fn = _resolve(loss, LOSSES, "loss", lambda f: f)
        self.aggregation = _resolve(aggregation, AGGREGATIONS, "aggregation", lambda f: f())
        self.raw = nn.Parameter(torch.zeros(num_domains))
        self.num_domains = num_domains
        self.domain_key = domain_key
        self.meta_lr = meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.names = list(names) if names is not None else [str(k) for k in range(num_domains)]
        self.register_buffer("seen", torch.zeros(num_domains, dtype=torch.bool), persistent=False)

    # ---- weights ----------------------------------------------------------------------------------------------
    def domain_weights(self) -> Tensor:
        """``α = softplus(φ) / mean(softplus(φ))`` over all domains, shape ``(K,)`` (differentiable in φ)."""
        sp = F.softplus(self.raw)
        return sp / sp.mean()

    def named_weights(self) -> Dict[str, float]:
        """The current weights as ``{domain name: α}``."""
        return {n: float(w) for n, w in zip(self.names, self.domain_weights().detach())}

    def domains_of(self, batch: Batch) -> Tensor:
        """The batch's domain ids, checked: present, integer, one per sample and within ``0..K-1``."""
        d = batch.extras.get(self.domain_key)
        if d is None:
            raise ValueError(f"DomainWeights needs a {self.domain_key!r} id per sample in every training batch; "
                             f"yield it beside x and y (e.g. TensorIndexedDataset(x, y, {self.domain_key}=ids))")
        d = torch.as_tensor(d)
        if d.dtype.is_floating_point or d.dim() != 1 or d.shape[0] != batch.size:
            raise ValueError(f"domain ids must be one integer per sample, got dtype {d.dtype} and shape "
                             f"{tuple(d.shape)} for a batch of {batch.size}")
        lo, hi = int(d.min()), int(d.max())
        if lo < 0 or hi >= self.num_domains:
            bad = hi if hi >= self.num_domains else lo
            raise ValueError(f"domain id {bad} is out of range: DomainWeights was declared with num_domains="
                             f"{self.num_domains} (valid ids 0..{self.num_domains - 1})")
        return d

    # ---- the two levels ---------------------------------------------------------------------------------------
    def inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:
        d = self.domains_of(batch)
        self.seen[d.to(self.seen.device)] = True
        losses = self.loss_fn(forward(batch.inputs), batch.targets)
        alpha = self.domain_weights()[d.to(self.raw.device)].to(losses.dtype)
        return WeightedTerms(losses, alpha / losses.shape[0], report=alpha)

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:
        return self.aggregation(forward, batch)

    def on_epoch_end(self, context: MetaContext, epoch: int) -> Optional[Dict[str, float]]:
        if epoch == 0:
            self.check_all_seen()
        return {f"domain_weight/{n}": w for n, w in self.named_weights().items()}

    def check_all_seen(self) -> None:
        """Raise if a declared domain has not appeared in any training batch so far."""
        missing = [self.names[k] for k in range(self.num_domains) if not bool(self.seen[k])]
        if missing:
            raise ValueError(f"domain(s) {missing} never appeared in the training data, but num_domains="
                             f"{self.num_domains} was declared; their weights would only dilute the mean. Declare "
                             "the number of domains actually present or re-number the domain ids")

    @staticmethod
    def trainer_options(hypergrad: str = "finite_difference", unroll_steps: int = 5,
                        fd_scale: Union[str, float] = "optimizer", fd_carry: bool = False) -> Dict[str, Any]:
        """DreamPRM's schedule as :class:`~metareweight.MetaTrainer` keyword arguments: Betty's darts finite
        difference (ε = 0.01/‖v‖), 5 lower steps per upper step, the lower steps taken with the current α and the
        upper step made at the resulting θ (``real_step="lookahead"``, Betty's alternation).

        ``fd_scale`` is the finite difference's direction scale: ``"optimizer"`` multiplies ``v`` by the lower
        optimizer's step scale, ``1.0`` is Betty's darts exactly (``v`` itself; what DreamPRM ran). ``fd_carry``
        also carries each lower step's gradient through the optimizer's state to the last lower step
        (``FiniteDifference(optimizer_carry=True)``: the 5-step truncation then drops only the loss Hessian).

        Example:
            >>> DomainWeights.trainer_options(fd_scale=1.0)["hypergrad_options"]
            {'alpha': 0.01, 'scale': 1.0}
        """
        opts = {"alpha": 0.01, "scale": fd_scale} if hypergrad == "finite_difference" else None
        if opts is not None and fd_carry:
            opts["optimizer_carry"] = True
        return {"hypergrad": hypergrad, "hypergrad_options": opts, "unroll_steps": unroll_steps,
                "real_step": "lookahead"}


def _resolve(value, table, what, build):
    if callable(value):
        return value
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose one of {sorted(table)} or pass a callable")
    return build(table[value])
