"""Fast exact one-step hypergradient: per-sample inner products from captured activations, no second-order graph.

For one inner step ``θ' = θ'(0) − P Σ_ik w_ik ∇ℓ_ik(θ)`` (``P``: the optimizer's diagonal step scale, learning rate
included; exact for SGD with momentum/nesterov/weight decay and for Adam/AdamW with ``preconditioner="fixed"``)

    dL_out/dφ = ∂L_out/∂φ|θ'  −  Σ_ik c_ik ∂w_ik/∂φ,      c_ik = ∇ℓ_ik(θ)ᵀ P ∇_θ' L_out(θ')

One call runs these phases (:meth:`Fast.__call__`):

1. **capture** — the train forward with hooks on every layer that has a closed-form rule
   (:mod:`metareweight.core.layers`: ``Linear`` over any leading dims, ``Conv1d/2d/3d``, ``Embedding`` incl. lookups
   broadcast over the batch, ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``'s projections; Hugging Face's
   ``Conv1D`` (GPT-2), per-model RMSNorms (Llama, Qwen, Mistral, Gemma, OLMo-2, T5, ...), T5's and MPNet's relative
   position biases, scaled word embeddings (Gemma), BART's learned positions, MobileBERT's ``NoNorm``, Falcon's
   Linear, registered by name without importing ``transformers``; user-registered
   rules: :func:`metareweight.register_layer_rule`), recording ``(a_i, z_i)``;
2. **classify** — each trainable parameter takes the *direct* closed form (all its uses are captured, batched calls),
   or the exact forward-mode *JVP* fallback (no rule, or used outside its layer; announced once); a model whose
   samples interact (BatchNorm with batch statistics, announced; or a coupling found by the first-call check that
   ``Σ r_i ∇ℓ_i`` from the captures equals autograd's for random ``r``) takes the JVP path for every parameter
   (the *coupled* path: ``Σ w_ik ∇ℓ_ik`` by one backward of the train graph, ``c_ik`` by one forward-mode pass in
   which Linear / Conv layers take the train pass's outputs as primals and compute only their tangents, and the
   real step replayed from the kept graph, below). The same check judges one by one, and sends to the JVP path
   where off, the parameters of a layer whose output is changed in place (autograd's gradient is then the changed
   tensor's, not ``δ``) and, on later calls, those taking a closed form for the first time (a lookup shared by
   every sample whose first dimension equals the batch size);
3. **δ** — the output gradients ``δ_ik = ∂ℓ_ik/∂z_i`` of the captured calls, one backward per term ``k``;
4. **virtual step** — ``θ'`` from ``Σ w_ik ∇ℓ_ik`` replayed from the captures. A Linear weight on the *Gram* route
   (``P`` a scalar, i.e. the SGD family, and fewer meta rows than features) stays at ``W'(0)``; its update enters
   the meta forward as the low-rank correction ``−P (a' Aᵀ)(w ⊙ Δ)`` without materialising ``W'``. A lookup
   table (``Embedding``) with more rows than the meta batch reads takes the *sparse* route: ``θ'`` (and ``P``) only
   on the rows the meta forward reads, formed when it reads them, since ``∇_θ' L_out`` and hence ``U`` vanish on
   every other row (on a 30,522-token vocabulary that skips the step's passes over the whole table);
5. **meta forward** — ``L_out(θ')`` and its gradients: ``∇_θ' L_out`` for direct/JVP parameters, the meta output
   gradients ``δ'`` for Gram layers;
6. **c_ik** — direct form ``c_i = ⟨δ_i, op(a_i, U)⟩`` with ``U = P ⊙ ∇_W L_out``; Gram form
   ``c_i = P Σ_j (δ_i·δ'_j)(a_i·a'_j)``; JVP ``∇ℓ_ik · (P ∇L_out)`` for the fallback parameters;
7. **combine** — ``∂L_out/∂φ − ∂(Σ w_ik c_ik)/∂φ``.

``unroll_steps > 1`` is refused (use ``unrolled``), as is Adam with the differentiable preconditioner. In a
data-parallel run (the synchronised optimizer of :mod:`metareweight.distributed`) the virtual step is the global
one: the direct form averages ``∇_θ' L_out`` across ranks, and the Gram form gathers every rank's train rows
``(A, Δ, w)`` for its low-rank correction and sums its per-row coefficients over the ranks' meta rows (every
collective goes through the private functions at the end of this file). The first JVP in a process loads torch's
forward-mode decompositions (a few seconds). ``real_step="lookahead"`` needs ``Fast(lookahead=True)``, which
materialises the virtual parameters. Under mixed precision (bf16/fp16 autocast) the captures and output gradients
are kept in the parameters' dtype, so the contractions run in float32.

After a call, :meth:`Fast.replay` gives the real step's re-weighted gradient for the same batch (weights recomputed
from the stored model outputs with the updated φ), while the parameters are unchanged; ``MetaTrainer`` uses it so a
meta step does not redo the real step's forward (nor, for the closed forms, its backward). Closed-form parameters
come from the captured ``(a_i, δ_i)``. For the JVP parameters (all of them on the *coupled* path: a model whose
samples interact) the call keeps the train graph after the virtual step's backward, and the replay is one backward
of the kept terms with the new weights ``Jᵀ w_new``: on a ResNet with BatchNorm a meta step then costs the train
forward, two backwards of it, the meta forward/backward and the JVP's tangents (about 10 convolution passes against
plain's 3, where the fresh real step and the JVP's recomputed primals cost 12). The running statistics the train
pass updated (BatchNorm; in its own copy of the buffers) are written into the model by the replay, as the real
step's forward would. No graph is kept under ``lookahead`` (that real step commits ``θ'``), autocast (``MetaStep``
replays fp32 only) or an objective that runs the model otherwise than once on the batch's inputs; a replay that does
not come (another batch, parameters or buffers changed since) leaves the graph to the next call. The replay uses the
capture's dropout masks (the fresh real step draws new ones).

On CPU with glibc, keep freed memory in the process (``MALLOC_TRIM_THRESHOLD_=2147483647
MALLOC_MMAP_THRESHOLD_=33554432``, or jemalloc/tcmalloc): this method's peak memory exceeds a plain step's, and glibc
returns the difference to the kernel after every step, so the next step faults it in again (on a ResNet 32×32 about
40 % of its step; ``benchmarks/hypergrad.py --malloc keep``, experiments/RESULTS.md).

Example:
    >>> Fast().exact, Fast(gram="never").gram
    (True, 'never')
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ...data.batch import Batch
from ...losses import ensure_finite
from ..capture import LayerCall, capture_calls, leaf_uses
from ..layers.base import row_positions
from ..optim import FunctionalOptimizer
from ..problem import BilevelProblem, HypergradResult, WeightedTerms, bind, detach_params, detach_state
from .base import HypergradMethod

GRAM_MODES = ("auto", "always", "never")
_ANNOUNCED: Set[str] = set()


def _announce(msg: str) -> None:
    if msg not in _ANNOUNCED:
        _ANNOUNCED.add(msg)
        warnings.warn(msg, stacklevel=3)


def couples_samples(model: nn.Module) -> bool:
    """Whether a layer of ``model`` normalises with batch statistics (BatchNorm in train mode, or untracked)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
               for m in model.modules())


def _col(w: Tensor, like: Tensor) -> Tensor:
    """Per-sample coefficients ``(B,)`` shaped to broadcast against a ``(B, ...)`` tensor."""
    return w.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _weighted_deltas(coef: Tensor, deltas: Sequence[Tensor]) -> Tensor:
    """``Σ_k coef[:, k] ⊙ δ_k``: a call's output gradients re-weighted per sample and summed over the terms."""
    out = _col(coef[:, 0], deltas[0]) * deltas[0]
    for k in range(1, len(deltas)):
        out.addcmul_(_col(coef[:, k], deltas[k]), deltas[k])
    return out


class _NoReplay(Exception):
    pass


class _Recorder:
    """A bound forward that remembers its single call (the model outputs the replay hands back)."""

    def __init__(self, forward):
        self.forward = forward
        self.calls: List[Tuple[object, Tensor]] = []

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        self.calls.append((args[0] if args and not kwargs else None, out))
        return out


@dataclass
class _Capture:
    """What the real step needs to form ``Σ w_ik ∇ℓ_ik`` with new weights, and when it is still valid."""

    batch: Batch
    inputs: object
    output: Tensor
    versions: List[Tuple[Tensor, int]]
    inner: object
    calls: List[LayerCall]
    deltas: List[List[Tensor]]  # per call, per term k
    names: List[str]
    # the JVP parameters' part: the train terms with their graph kept, by one backward with the new weights
    graph: Optional[Tuple[Tensor, List[str], List[Tensor]]] = None  # (terms, names, leaves)
    buffers: List[Tuple[Tensor, Tensor]] = field(default_factory=list)  # (model buffer, value after the train pass)


@dataclass
class _TrainPass:
    """Phase 1: the train forward at θ with its captured layer calls."""

    theta: Dict[str, Tensor]
    trainable: List[str]
    calls: List[LayerCall]
    terms: Tensor
    weights: Tensor
    uses: Dict[str, int]  # autograd edges from the terms into each trainable parameter
    recorder: _Recorder
    buffers: Dict[str, Tensor]
    rng: Tuple[Tensor, Optional[List[Tensor]]]


@dataclass
class _Plan:
    """Phase 2: the route of every used trainable parameter."""

    used: List[str]
    closed: Set[str]  # direct (or Gram) closed form
    fallback: List[str]  # forward-mode JVP
    coupled: bool
    gram: Set[str] = field(default_factory=set)
    lowrank: Set[str] = field(default_factory=set)  # Gram weights whose W' is not materialised
    sparse: Set[str] = field(default_factory=set)  # lookup tables stepped on the meta batch's rows only
    unsure: Set[str] = field(default_factory=set)  # closed, with a call changed in place or regrouped by a guess

    def route(self, name: str) -> str:
        return "gram" if name in self.gram else "direct" if name in self.closed else "jvp"


@dataclass
class _Step:
    """Phase 4: the virtual step."""

    new_theta: Dict[str, Tensor]
    new_state: dict
    scale: Dict[str, Tensor]
    grams: Dict[str, "_GramLayer"]
    tables: Dict[str, "_SparseRows"] = field(default_factory=dict)


@dataclass
class _MetaPass:
    """Phase 5: the meta loss at θ' and its gradients."""

    outer: Tensor
    gram_calls: List[Tuple[LayerCall, Optional[Tensor]]]  # Gram layers' meta calls and their output gradients
    v: Dict[str, Optional[Tensor]]  # ∇_θ' L_out of the other parameters
    direct: List[Tensor]  # ∂L_out/∂φ at fixed θ'


@dataclass
class Fast(HypergradMethod):
    """Exact one-step hypergradient from per-layer captures (see the module docs).

    Args:
        closed_forms: use the per-layer closed forms (False: the JVP path for every parameter; slower, for checks).
        gram: ``"auto"`` picks the Gram/low-rank form per Linear layer when cheaper (SGD family only);
            ``"always"``/``"never"`` force it on or off.
        lookahead: also return the materialised virtual parameters (needed by ``real_step="lookahead"``).
        sparse: ``"auto"`` forms the virtual step of a lookup table (a ``row_lookup`` rule: ``Embedding``) only on
            the rows the meta forward reads when the table has more rows than the meta batch looks up;
            ``"always"``/``"never"`` force it on or off. Exact either way; not with ``lookahead`` (which needs the
            whole ``θ'``) or in a data-parallel run.
        verify: on the first call for a model, check the per-sample attribution against autograd with random
            weights; a mismatch (a layer couples samples) switches that model to the JVP path, with a warning.
            A parameter a later call takes the closed form for the first time is checked then (a lookup shared by
            every sample looks per-sample when the sequence length equals the batch size); a mismatch keeps that
            parameter on the JVP path, with a warning.
        reuse_primals: in the forward-mode pass, Linear / Conv layers take the train pass's outputs as their
            primal and compute only their tangent (False: the whole pass recomputed; for checks).
    """

    closed_forms: bool = True
    gram: str = "auto"
    lookahead: bool = False
    verify: bool = True
    sparse: str = "auto"
    reuse_primals: bool = True
    name = "fast"
    exact = True

    def __post_init__(self):
        if self.gram not in GRAM_MODES:
            raise ValueError(f"gram must be one of {GRAM_MODES}, got {self.gram!r}")
        if self.sparse not in GRAM_MODES:
            raise ValueError(f"sparse must be one of {GRAM_MODES}, got {self.sparse!r}")
        self._capture: Optional[_Capture] = None
        self.last_paths: Dict[str, str] = {}  # parameter -> "gram" | "direct" | "jvp" in the last call
        self.last_sparse: Set[str] = set()  # direct parameters whose virtual step ran on the meta batch's rows only
        self._verified = weakref.WeakKeyDictionary()  # model -> the parameters whose attribution was checked
        self._shared = weakref.WeakKeyDictionary()  # model -> parameters found not per sample on a later check
        self._coupled = weakref.WeakSet()

    @property
    def returns_lookahead(self) -> bool:
        """Whether results carry the virtual parameters (``real_step="lookahead"`` can commit them)."""
        return self.lookahead

    # ---- entry point ----------------------------------------------------------------------------------------
    def __call__(self, problem: BilevelProblem) -> HypergradResult:
        if len(problem.train_batches) != 1:
            raise ValueError(f"hypergrad='fast' is exact for one inner step, got unroll_steps="
                             f"{len(problem.train_batches)}; use unroll_steps=1 or hypergrad='unrolled'")
        opt = problem.optimizer
        if not isinstance(opt, FunctionalOptimizer):
            raise ValueError(f"hypergrad='fast' needs a FunctionalOptimizer, got {type(opt).__name__}")
        if not opt.steps_linearly:
            raise ValueError("hypergrad='fast' needs Adam's preconditioner held fixed: use "
                             "MetaTrainer(adam_preconditioner='fixed') or FunctionalOptimizer(preconditioner='fixed')")
        self._capture = None
        ctx = _collectives(problem)
        train = self._capture_train(problem)
        plan = self._classify(problem, train)
        check = self._coupling_probe(problem, train, plan)
        deltas, tcalls = self._output_grads(train, plan, keep_graph=check is not None or bool(plan.fallback))
        if check is not None:
            plan, tcalls, deltas = self._checked_plan(problem.model, train, plan, check, tcalls, deltas, ctx)
        keep_graph = self._replays_graph(problem, train, plan)
        g_fallback = self._fallback_grads(train, plan, keep_graph)
        self._choose_gram(problem, train, plan, tcalls, ctx)
        self._choose_sparse(problem, train, plan, tcalls, ctx)
        step = self._virtual_step(problem, train, plan, tcalls, deltas, g_fallback, ctx)
        meta = self._meta_pass(problem, train, plan, step, ctx)
        c = self._coefficients(problem, train, plan, tcalls, deltas, step, meta)
        grads = self._combine(problem, train.weights, c, meta.direct)

        self.last_paths = {n: plan.route(n) for n in plan.used}
        self.last_sparse = set(plan.sparse)
        self._keep_for_replay(problem, train, plan, tcalls, deltas, keep_graph)
        lookahead = (detach_params(step.new_theta), detach_state(step.new_state)) if self.lookahead else None
        return HypergradResult(grads, float(meta.outer.detach()), lookahead)

    def replay(self, batch: Batch) -> Optional[Tuple[WeightedTerms, Dict[str, Tensor]]]:
        """The real step's ``(terms with current weights, Σ_ik w_ik ∇ℓ_ik by parameter name)`` for the batch of the
        last call, or None when it cannot be reused (another batch, parameters or buffers changed since, the
        objective runs the model otherwise than once on the batch's inputs). Closed-form parameters from the
        captures; JVP parameters (every parameter of a model whose samples interact) by one backward of the train
        terms, whose graph the call kept. Buffers the train pass updated (BatchNorm running statistics) are written
        into the model, as the real step's forward would. One use per call."""
        cap, self._capture = self._capture, None
        if cap is None or batch is not cap.batch or any(t._version != v for t, v in cap.versions):
            return None
        used = []

        def forward(*args, **kwargs):
            if used or kwargs or not args or args[0] is not cap.inputs:
                raise _NoReplay
            used.append(True)
            return cap.output

        try:
            with torch.no_grad():
                wt = cap.inner(forward, batch)
        except _NoReplay:
            return None
        w = wt.weights.detach()
        grads: Dict[str, Tensor] = {}
        with torch.no_grad():
            for call, deltas in zip(cap.calls, cap.deltas):
                d = _weighted_deltas(w, deltas)
                for n, g in ((call.weight, call.weight_grad), (call.bias, call.bias_grad)):
                    if n in cap.names:
                        grads[n] = grads[n] + g(d) if n in grads else g(d)
            for target, value in cap.buffers:
                target.copy_(value)
        if cap.graph is not None:
            terms, names, leaves = cap.graph
            for n, g in zip(names, torch.autograd.grad(terms, leaves, w.to(terms.dtype), allow_unused=True)):
                if g is not None:
                    grads[n] = g
        return wt, grads

    # ---- 1. capture ----------------------------------------------------------------------------------------
    def _capture_train(self, problem: BilevelProblem) -> _TrainPass:
        model, batch = problem.model, problem.train_batches[0]
        theta = problem.leaf_params()
        trainable = problem.trainable(theta)
        ids = {id(theta[n]): n for n in trainable}
        rng = _rng_state(theta)
        buffers = {k: v.clone() for k, v in problem.buffers.items()}
        recorder = _Recorder(bind(model, theta, buffers))
        with capture_calls(model, lambda m, c: None, ids, batch_size=batch.size) as calls:
            wt = problem.inner(recorder, batch)
        ensure_finite(wt.terms.detach(), "the inner loss terms")
        return _TrainPass(theta, trainable, calls, wt.terms, wt.weights, leaf_uses([wt.terms], ids), recorder,
                          buffers, rng)

    # ---- 2. classify ---------------------------------------------------------------------------------------
    def _classify(self, problem: BilevelProblem, train: _TrainPass) -> _Plan:
        model = problem.model
        B = train.terms.shape[0]
        used = [n for n in train.trainable if train.uses[n]]
        batch_norm = couples_samples(model)
        coupled = batch_norm or model in self._coupled
        if batch_norm and self.closed_forms:
            _announce(f"hypergrad='fast': {type(model).__name__} normalises with batch statistics (BatchNorm in "
                      "train mode), so its samples interact; every parameter's part of the hypergradient comes from "
                      "a forward-mode JVP (exact, slower). Put BatchNorm in eval mode or use GroupNorm/LayerNorm "
                      "for the per-sample closed forms")
        closed: Set[str] = set()
        unsure: Set[str] = set()
        if self.closed_forms and not coupled:
            by_param = _calls_by_param(train.calls)
            closed = {n for n in used if len(by_param.get(n, ())) == train.uses[n]
                      and all(c.batched() and c.samples == B for c in by_param[n])}
            closed -= self._shared.get(model, set())
            # an output changed in place (h = emb(ids); h *= scale) may leave autograd's gradient with respect to
            # it other than the layer's δ, and rows grouped by sample may not be sample-major: checked by the
            # attribution check, else not trusted
            unsure = {n for n in closed if not all(c.intact() and not c.regrouped for c in by_param[n])}
            if not self.verify:
                closed -= unsure
        fallback = [n for n in used if n not in closed]
        if fallback and self.closed_forms and not coupled:
            _announce(f"hypergrad='fast': no closed form for {fallback} (layer type, or used outside its layer); "
                      "their part of the hypergradient comes from a forward-mode JVP (exact, slower); "
                      "metareweight.register_layer_rule adds a rule for a layer type")
        return _Plan(used, closed, fallback, coupled, unsure=unsure & closed)

    def _coupling_probe(self, problem, train: _TrainPass, plan: _Plan):
        """``(r, names, Σ_i r_i ∇ℓ_i by autograd)`` to check the attribution of the closed-form parameters not
        checked yet for the model: all of them on its first call; later, those a call takes the closed form for
        for the first time (a layer whose first dimension is not the batch's, a lookup of ``(query, key)`` offsets
        shared by every sample or a sequence-first activation, passes for per-sample when a batch's padded length
        equals its size)."""
        checked = self._verified.get(problem.model)
        names = sorted(plan.closed if checked is None else plan.closed - checked)
        if not (names and self.verify):
            return None
        terms = train.terms
        gen = torch.Generator(device=terms.device).manual_seed(0)  # leaves the global RNG (data order) alone
        r = torch.randn(terms.shape, generator=gen, dtype=terms.dtype, device=terms.device)
        return r, names, torch.autograd.grad(terms, [train.theta[n] for n in names], r, retain_graph=True)

    def _checked_plan(self, model, train, plan, check, tcalls, deltas, ctx):
        """The plan, captured calls and output gradients after the attribution check. On a model's first call a
        mismatch means its samples interact (the JVP path for every parameter, announced), except for parameters
        whose layer's output was changed in place: those, and on later calls every newly checked parameter, take
        the JVP path alone where their attribution is off, for this and every later call (announced)."""
        first = model not in self._verified
        r, names, _ = check
        errs, tol = self._attribution_errors(train, check, tcalls, deltas)
        self._verified[model] = self._verified.get(model, set()) | set(names)
        alone = [n for n in names if n in plan.unsure or not first]  # judged one by one
        if first:
            err = _agree_max(max([e for n, e in zip(names, errs) if n not in alone], default=0.0), ctx)
            if err > tol:  # every rank takes the same path
                self._coupled.add(model)
                _announce(f"hypergrad='fast': samples of {type(model).__name__} interact (per-sample attribution "
                          f"off by {err:.1e}); using the exact JVP path for this model")
                return _Plan(plan.used, set(), list(plan.used), True), [], []
        bad = set(alone) - _agreed({n for n, e in zip(names, errs) if n in alone and e <= tol}, alone, ctx, r.device)
        if not bad:
            return plan, tcalls, deltas
        self._shared[model] = self._shared.get(model, set()) | bad
        _announce(f"hypergrad='fast': the captured per-sample gradients of {sorted(bad)} in {type(model).__name__} "
                  "miss autograd's (a layer whose first dimension is not the batch's but of its size, or whose output "
                  "is changed in place); their part of the hypergradient comes from a forward-mode JVP (exact, "
                  "slower) from now on")
        closed = plan.closed - bad
        keep = [i for i, c in enumerate(tcalls) if c.weight in closed or c.bias in closed]
        return (_Plan(plan.used, closed, plan.fallback + sorted(bad), False, unsure=plan.unsure - bad),
                [tcalls[i] for i in keep], [deltas[i] for i in keep])

    @staticmethod
    def _attribution_errors(train, check, tcalls, deltas) -> Tuple[List[float], float]:
        """Per checked parameter, how far ``Σ_i r_i ∇ℓ_i`` from the captures is from autograd's, and the
        tolerance."""
        r, names, true = check
        with torch.no_grad():
            ours = [_param_grad(n, r, tcalls, deltas, {}) for n in names]
            total = torch.sqrt(sum(t.double().norm() ** 2 for t in true))
            # relative to the larger norm, floored by 1e-4 of the whole gradient: a parameter whose gradient is zero
            # for every sample (an attention key bias) is not coupling, but samples that cancel (a batch mean) are
            errs = [float((a - b).norm() / torch.stack([a.norm(), b.norm(), 1e-4 * total.to(a.dtype)]).max()
                          .clamp_min(1e-30)) for a, b in zip(ours, true)]
        # under autocast autograd's own weight gradients are rounded to bf16/fp16 (ours accumulate in float32)
        low = any(c.output.dtype in (torch.bfloat16, torch.float16) for c in train.calls)
        return errs, 5e-2 if low else 1e-3

    # ---- 3. δ ----------------------------------------------------------------------------------------------
    def _output_grads(self, train: _TrainPass, plan: _Plan, keep_graph: bool
                      ) -> Tuple[List[List[Tensor]], List[LayerCall]]:
        """``δ_ik`` for every captured call of a closed-form parameter (in the parameters' dtype), and the calls
        detached (activations in the parameters' dtype too, so mixed precision contracts in float32)."""
        tcalls = [c for c in train.calls if c.weight in plan.closed or c.bias in plan.closed]
        K = train.terms.shape[1]
        deltas: List[List[Tensor]] = [[] for _ in tcalls]
        for k in range(K):
            if not tcalls:
                break
            gs = torch.autograd.grad(train.terms[:, k].sum(), [c.output for c in tcalls],
                                     retain_graph=keep_graph or k < K - 1, allow_unused=True)
            for i, (c, g) in enumerate(zip(tcalls, gs)):
                dtype = _param_dtype(c, train.theta)
                deltas[i].append(torch.zeros_like(c.output, dtype=dtype) if g is None else g.detach().to(dtype))
        return deltas, [_detached(c, train.theta) for c in tcalls]

    def _fallback_grads(self, train: _TrainPass, plan: _Plan, keep_graph: bool) -> Dict[str, Optional[Tensor]]:
        """``Σ_ik w_ik ∇ℓ_ik`` of the JVP parameters by one backward; ``keep_graph``: keep the train graph for
        :meth:`replay` (the real step then needs only the backward, not the forward)."""
        if not plan.fallback:
            return {}
        gs = torch.autograd.grad(train.terms, [train.theta[n] for n in plan.fallback],
                                 grad_outputs=train.weights.detach(), retain_graph=keep_graph, allow_unused=True)
        return dict(zip(plan.fallback, gs))

    def _replays_graph(self, problem, train: _TrainPass, plan: _Plan) -> bool:
        """Whether to keep the train graph for :meth:`replay`: JVP parameters, a replayable objective (one model
        call, on the batch's inputs), no lookahead (that real step commits θ') and no autocast (``MetaStep`` replays
        in fp32 only)."""
        if not plan.fallback or self.lookahead or not _single_call(train, problem.train_batches[0]):
            return False
        out = train.recorder.calls[0][1]
        return not out.is_floating_point() or out.dtype == train.theta[plan.fallback[0]].dtype

    def _choose_gram(self, problem, train: _TrainPass, plan: _Plan, tcalls: List[LayerCall], ctx) -> None:
        """Which closed weights take the Gram / low-rank route: scalar ``P`` (the SGD family), a Gram rule, and
        fewer meta rows × (in + out) than in × out."""
        opt = problem.optimizer
        if self.gram == "never" or not all(h.kind == "sgd" for h in opt.hypers.values()):
            return
        B = train.terms.shape[0]
        by_param = _calls_by_param(tcalls)
        gram = set()
        for n in plan.closed:
            cs = by_param[n]
            if not all(c.rule.gram and c.weight == n for c in cs) or train.theta[n].dim() != 2:
                continue
            out_f, in_f = train.theta[n].shape
            rows_per_sample = sum(c.input.numel() // c.input.shape[-1] for c in cs) / B
            m_rows = problem.meta_batch.size * rows_per_sample
            if self.gram == "always" or m_rows * (in_f + out_f) < in_f * out_f:
                gram.add(n)
        plan.gram = _agreed(gram, sorted(plan.closed), ctx, train.terms.device)
        plan.lowrank = set() if self.lookahead else set(plan.gram)

    def _choose_sparse(self, problem, train: _TrainPass, plan: _Plan, tcalls: List[LayerCall], ctx) -> None:
        """Which direct weights are stepped on the meta batch's rows only: every call a ``row_lookup`` rule without
        bias, and (``"auto"``) more rows than the meta batch is expected to look up. Not with lookahead (it commits
        the whole ``θ'``), not data-parallel, and only where this method forms the step itself."""
        opt = problem.optimizer
        if self.sparse == "never" or self.lookahead or ctx is not None or type(opt).step is not FunctionalOptimizer.step:
            return
        B = train.terms.shape[0]
        by_param = _calls_by_param(tcalls)
        for n in sorted(plan.closed - plan.gram):
            cs = by_param.get(n, [])
            if not cs or not all(c.rule.row_lookup and c.weight == n and c.bias is None for c in cs):
                continue
            lookups = problem.meta_batch.size * sum(c.input.numel() for c in cs) / B
            if self.sparse == "always" or lookups < train.theta[n].shape[0]:
                plan.sparse.add(n)

    # ---- 4. virtual step -----------------------------------------------------------------------------------
    def _virtual_step(self, problem, train: _TrainPass, plan: _Plan, tcalls, deltas, g_fallback, ctx) -> _Step:
        opt, state = problem.optimizer, problem.opt_state
        w = train.weights.detach()
        with torch.no_grad():
            theta_d = detach_params(train.theta)
            g_step: Dict[str, Optional[Tensor]] = {}
            memo: Dict[int, Tensor] = {}
            for n in plan.used:
                if n in g_fallback:
                    g_step[n] = g_fallback[n]
                elif n in plan.lowrank:
                    g_step[n] = None  # W'(0) below; the update itself enters as a low-rank correction
                elif n in plan.sparse:
                    continue  # stepped on the rows the meta forward reads, when it reads them (_SparseRows)
                else:
                    g_step[n] = _param_grad(n, w, tcalls, deltas, memo)
            # in-place steps unless the optimizer's step is its own (data-parallel); their state after the step
            # only where it is committed (lookahead)
            own = ctx is not None or type(opt).step is not FunctionalOptimizer.step
            after: Dict[str, dict] = {}
            out = after if self.lookahead else None
            fused = {} if own else {n: _fixed_adam_step(opt.hypers[n], theta_d[n], g, state.get(n, {}), out, n)
                                    for n, g in g_step.items() if g is not None
                                    and opt.hypers[n].kind == "adam" and opt.preconditioner == "fixed"}
            rest = {n: g for n, g in g_step.items() if n not in fused}
            scale = opt.linear_scale(theta_d, {n: theta_d[n] if g is None else g for n, g in rest.items()}, state)
            sgd = {} if own else {n: _sgd_step(opt.hypers[n], theta_d[n], g, state.get(n, {}), out, n)
                                  for n, g in rest.items() if g is not None and opt.hypers[n].kind == "sgd"}
            new_theta, new_state = opt.step(theta_d, {n: g for n, g in rest.items() if n not in sgd}, state)
            for n, (new, p) in fused.items():
                new_theta[n], scale[n] = new, p
            new_theta.update(sgd)
            for n, st in after.items():
                new_state[n] = {**new_state.get(n, {}), **st}
            for n in plan.lowrank:
                new_theta[n] = _zero_gradient_step(opt.hypers[n], theta_d[n], state.get(n, {}))
            grams = {n: _GramLayer.build(n, tcalls, deltas, w, scale[n], ctx) for n in sorted(plan.gram)}
            tables = {n: _SparseRows(n, theta_d[n], opt, state.get(n, {}), tcalls, deltas, w) for n in plan.sparse}
        return _Step(new_theta, new_state, scale, grams, tables)

    # ---- 5. meta forward -----------------------------------------------------------------------------------
    def _meta_pass(self, problem, train: _TrainPass, plan: _Plan, step: _Step, ctx) -> _MetaPass:
        """The meta loss at θ' and its gradients. A Gram weight the meta forward also uses outside its layer
        (its captured calls do not cover it) is demoted to the direct form and the pass runs once more with its
        ``W'`` materialised: planned, not retried on an exception."""
        while True:
            theta_p = {k: v.detach().requires_grad_(k in train.trainable) for k, v in step.new_theta.items()}
            meta_ids = {id(theta_p[n]): n for n in train.trainable}

            def low_rank(module, call):
                if call.weight in plan.lowrank:
                    return step.grams[call.weight].correct(call)
                return step.tables[call.weight].lookup(call) if call.weight in plan.sparse else None

            for table in step.tables.values():
                table.reads.clear()
            with capture_calls(problem.model, low_rank, meta_ids, only=plan.gram | plan.sparse) as mcalls:
                outer = problem.outer_loss(theta_p)
            muses = leaf_uses([outer], meta_ids)
            mcalls = [c for c in mcalls if c.weight in plan.gram]
            partial = {n for n in plan.gram if muses[n] != sum(c.weight == n for c in mcalls)}
            partial = plan.gram - _agreed(plan.gram - partial, sorted(plan.gram), ctx, outer.device)
            # a table whose θ' the meta forward also reads outside its lookups (its placeholder θ is in the graph)
            outside = {n for n in plan.sparse if muses[n]}
            if not partial and not outside:
                break
            for n in partial:
                if n in plan.lowrank:
                    step.new_theta[n] = step.grams[n].materialise(step.new_theta[n])
            for n in outside:
                step.new_theta[n], step.scale[n] = step.tables.pop(n).materialise()
            plan.gram -= partial
            plan.lowrank -= partial
            plan.sparse -= outside
        vnames = [n for n in train.trainable if muses[n] and n not in plan.gram]
        reads = [leaf for n in sorted(plan.sparse) for _, leaf, _ in step.tables[n].reads]
        targets = [c.output for c in mcalls] + [theta_p[n] for n in vnames] + reads + list(problem.meta_params)
        got = list(torch.autograd.grad(outer, targets, allow_unused=True)) if targets else []
        v = dict(zip(vnames, got[len(mcalls):len(mcalls) + len(vnames)]))
        if ctx is not None:  # ∇_θ' of the global meta loss, the mean of the ranks' (θ' is already the global step)
            _all_reduce_mean_(list(v.values()), ctx)
        at = len(mcalls) + len(vnames)
        for n in sorted(plan.sparse):
            table = step.tables[n]
            table.grads = got[at:at + len(table.reads)]
            at += len(table.reads)
        direct = [torch.zeros_like(p) if g is None else g for p, g in zip(problem.meta_params, got[at:])]
        return _MetaPass(outer, list(zip(mcalls, got[:len(mcalls)])), v, direct)

    # ---- 6. c_ik -------------------------------------------------------------------------------------------
    def _coefficients(self, problem, train: _TrainPass, plan: _Plan, tcalls, deltas, step: _Step,
                      meta: _MetaPass) -> Tensor:
        terms = train.terms.detach()
        B = terms.shape[0]
        with torch.no_grad():
            c = torch.zeros_like(terms)
            for n in sorted(plan.gram):  # sorted: a set's order follows PYTHONHASHSEED, and the sum's rounding too
                c += step.grams[n].coefficients([(cl, d) for cl, d in meta.gram_calls if cl.weight == n], B)
            for n in sorted(plan.sparse):
                rows, U = step.tables[n].meta_direction()
                if rows is None:
                    continue
                for i, cl in enumerate(tcalls):
                    if cl.weight == n:
                        out = cl.rule.op_on_rows(cl.module, cl.input, rows, U)
                        for k, dk in enumerate(deltas[i]):
                            c[:, k] += cl.per_sample_dot(dk, out)
            for n in sorted(plan.closed - plan.gram - plan.sparse):
                if meta.v.get(n) is None:
                    continue
                U = step.scale[n] * meta.v[n]
                for i, cl in enumerate(tcalls):
                    if cl.weight == n:
                        out = cl.op(U)
                        for k, dk in enumerate(deltas[i]):
                            c[:, k] += cl.per_sample_dot(dk, out)
                    if cl.bias == n:
                        for k, dk in enumerate(deltas[i]):
                            c[:, k] += cl.bias_dot(dk, U)
        tangents = {n: step.scale[n] * meta.v[n] for n in plan.fallback if meta.v.get(n) is not None}
        if tangents:
            c = c + _jvp_terms(problem, detach_params(train.theta), tangents, problem.train_batches[0], train.rng,
                               train.calls if self.reuse_primals else ()).to(c.dtype)
        return c

    # ---- 7. combine ----------------------------------------------------------------------------------------
    @staticmethod
    def _combine(problem, weights: Tensor, c: Tensor, direct: List[Tensor]) -> List[Tensor]:
        """``dL_out/dφ = ∂L_out/∂φ − ∂(Σ_ik w_ik c_ik)/∂φ`` (``c`` already carries the step's sign and scale)."""
        mixed = problem.meta_grads((weights * c).sum())
        return [d - m for d, m in zip(direct, mixed)]

    def _keep_for_replay(self, problem, train: _TrainPass, plan: _Plan, tcalls, deltas, kept_graph: bool) -> None:
        """What :meth:`replay` needs; ``kept_graph``: whether ``_fallback_grads`` kept the train graph (without it,
        JVP parameters cannot be replayed)."""
        batch = problem.train_batches[0]
        graph = None
        if plan.fallback:
            if not kept_graph:
                return
            graph = (train.terms, list(plan.fallback), [train.theta[n] for n in plan.fallback])
        if not _single_call(train, batch):
            return
        buffers = [(problem.buffers[k], v) for k, v in train.buffers.items() if not torch.equal(v, problem.buffers[k])]
        self._capture = _Capture(batch, batch.inputs, train.recorder.calls[0][1].detach(),
                                 [(t, t._version) for t in [*problem.params.values(), *problem.buffers.values()]],
                                 problem.inner, tcalls, deltas, sorted(plan.closed), graph, buffers)


def _single_call(train: _TrainPass, batch: Batch) -> bool:
    """Whether the objective ran the model once, on the batch's inputs (what :meth:`Fast.replay` can hand back)."""
    calls = train.recorder.calls
    return len(calls) == 1 and calls[0][0] is batch.inputs


def _calls_by_param(calls: Sequence[LayerCall]) -> Dict[str, List[LayerCall]]:
    by_param: Dict[str, List[LayerCall]] = {}
    for c in calls:
        for n in {c.weight, c.bias} - {None}:
            by_param.setdefault(n, []).append(c)
    return by_param


def _param_dtype(call: LayerCall, theta) -> torch.dtype:
    name = call.weight or call.bias
    return theta[name].dtype if name is not None else call.output.dtype


def _detached(call: LayerCall, theta) -> LayerCall:
    """The call detached, a floating activation in the parameters' dtype (bf16 autocast leaves it in bf16)."""
    out = call.detach()
    if out.input.is_floating_point():
        out.input = out.input.to(_param_dtype(call, theta))
    return out


def _param_grad(n: str, coef: Tensor, tcalls: Sequence[LayerCall], deltas, memo: Dict[int, Tensor]
                ) -> Optional[Tensor]:
    """``Σ_ik coef_ik ∇_n ℓ_ik`` from the captures; ``memo``: call index → ``Σ_k coef_k ⊙ δ_k`` (shared by a layer's
    weight and bias)."""
    out = None
    for i, c in enumerate(tcalls):
        for name, fn in ((c.weight, c.weight_grad), (c.bias, c.bias_grad)):
            if name == n:
                if i not in memo:
                    memo[i] = _weighted_deltas(coef, deltas[i])
                g = fn(memo[i])
                out = g if out is None else out + g
    return out


class _GramLayer:
    """A Linear weight on the Gram route: the train rows ``A`` (inputs) and ``Δ_k`` (output gradients per term),
    their per-row weights ``w_k`` and the step scale ``p``. The meta forward runs at ``W'(0)`` and :meth:`correct`
    adds ``−p Σ_k ((a' Aᵀ) ⊙ w_k) Δ_k``; :meth:`coefficients` then needs ``S = a' Aᵀ`` and ``G_k = δ' Δ_kᵀ``, which
    the correction's forward and backward compute anyway, so they are kept rather than recomputed."""

    def __init__(self, A: Tensor, deltas: List[Tensor], row_weights: List[Tensor], p: Tensor,
                 spans: List[Tuple[int, int]], ctx=None):
        self.ctx, self.rows, self.offset, ranks = ctx, A.shape[0], 0, 1
        if ctx is not None:  # data-parallel: the global step holds every rank's rows, averaged over the ranks
            K = len(deltas)
            gathered, self.offset = _all_gather_rows([A, *deltas, *row_weights], ctx)
            A, deltas, row_weights = gathered[0], gathered[1:1 + K], gathered[1 + K:]
            ranks = ctx.world_size
        self.A, self.deltas, self.p, self.spans = A, deltas, p, spans
        self.step_weights = [wk * (-p / ranks) for wk in row_weights]  # the correction's and its backward's factor
        self.products: Dict[int, Dict[str, object]] = {}  # id(meta call output) -> {"S": .., "G": [..]}

    @classmethod
    def build(cls, name: str, tcalls: List[LayerCall], deltas: List[List[Tensor]], w: Tensor, p, ctx=None
              ) -> "_GramLayer":
        idx = [i for i, c in enumerate(tcalls) if c.weight == name]
        rows = [tcalls[i].rows(tcalls[i].input) for i in idx]
        spans, start = [], 0
        for r in rows:
            spans.append((start, start + r.shape[0]))
            start += r.shape[0]
        K, B = w.shape[1], w.shape[0]
        d = [_cat([tcalls[i].rows(deltas[i][k]) for i in idx]) for k in range(K)]
        rw = [_cat([w[:, k].to(r.dtype).repeat_interleave(r.shape[0] // B) for r in rows]) for k in range(K)]
        return cls(_cat(rows), d, rw, p, spans, ctx)

    def materialise(self, base: Tensor) -> Tensor:
        """``W' = W'(0) − p Σ_k Δ_kᵀ (w_k ⊙ A)`` (a Gram weight the meta forward uses outside its layer)."""
        out = base.clone()
        for sk, dk in zip(self.step_weights, self.deltas):
            out.addmm_(dk.T, sk.unsqueeze(1) * self.A)
        return out

    def correct(self, call: LayerCall) -> Tensor:
        entry: Dict[str, object] = {}
        out = _LowRankUpdate.apply(call.output, call.rows(call.input), self, entry)
        self.products[id(out)] = entry
        return out

    def coefficients(self, mcalls: List[Tuple[LayerCall, Optional[Tensor]]], B: int) -> Tensor:
        """``(B, K)``: this weight's part of ``c_ik = p Σ_j (δ_ik·δ'_j)(a_i·a'_j)`` over every meta call ``j``."""
        K = len(self.deltas)
        per_row = torch.zeros(self.A.shape[0], K, dtype=self.A.dtype, device=self.A.device)
        for call, d in mcalls:
            if d is None:
                continue
            entry = self.products.get(id(call.output), {})
            S = entry.get("S")
            if S is None:
                S = call.rows(call.input.detach()).to(self.A.dtype) @ self.A.T
            G = entry.get("G") or [call.rows(d).to(self.A.dtype) @ dk.T for dk in self.deltas]
            for k in range(K):
                per_row[:, k] += (G[k] * S).sum(0)
        if self.ctx is not None:  # every rank's meta rows for every rank's train rows; keep this rank's block
            _all_reduce_mean_([per_row], self.ctx)
            per_row = per_row[self.offset:self.offset + self.rows]
        out = torch.stack([per_row[a:b].reshape(B, -1, K).sum(1) for a, b in self.spans]).sum(0)
        return self.p * out


class _SparseRows:
    """A lookup table's virtual step on the rows the meta forward reads. The meta forward runs with ``θ`` itself as
    the table (a placeholder it must not read outside the captured lookups); :meth:`lookup` replaces each lookup's
    output by one from ``θ'`` on the rows it reads, a leaf whose gradient is ``∇_θ' L_out`` on those rows (zero on
    every other row, so ``U = P ⊙ ∇_θ' L_out`` is too). The step is elementwise, so ``θ'`` and ``P`` of a row need only
    that row of ``θ``, of the optimizer state and of ``Σ_ik w_ik ∇ℓ_ik`` (gathered from the train lookups)."""

    def __init__(self, name: str, theta: Tensor, opt: FunctionalOptimizer, state, tcalls, deltas, w: Tensor):
        self.name, self.theta, self.opt, self.state, self.w = name, theta, opt, state, w
        self.calls = [(c, deltas[i]) for i, c in enumerate(tcalls) if c.weight == name]
        self.reads: List[Tuple[Tensor, Tensor, Tensor]] = []  # per meta lookup: (rows, θ' on them as a leaf, P)
        self.grads: List[Optional[Tensor]] = []  # ∇ of the meta loss with respect to each leaf

    def _step(self, rows: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """``(θ', P)`` on ``rows`` (sorted, unique; None: every row)."""
        theta = self.theta if rows is None else self.theta[rows]
        g = torch.zeros_like(theta)
        for call, deltas in self.calls:
            ids = call.rule.rows_read(call.module, call.input)
            d = call.rule.mask(call.module, call.input, _weighted_deltas(self.w, deltas)).reshape(ids.numel(), -1)
            if rows is None:
                g.index_add_(0, ids, d.to(g.dtype))
                continue
            pos, hit = row_positions(rows, ids)
            g.index_add_(0, pos[hit], d[hit].to(g.dtype))
        shape = self.theta.shape
        st = {k: (v if rows is None or not torch.is_tensor(v) or v.shape != shape else v[rows])
              for k, v in self.state.items()}
        h = self.opt.hypers[self.name]
        if h.kind == "adam":
            return _fixed_adam_step(h, theta, g, st)
        return _sgd_step(h, theta, g, st), self.opt.linear_scale({self.name: theta}, {self.name: g},
                                                                 {self.name: st})[self.name]

    def lookup(self, call: LayerCall) -> Tensor:
        rows = torch.unique(call.rule.rows_read(call.module, call.input))
        with torch.no_grad():
            new, p = self._step(rows)
        leaf = new.requires_grad_()
        self.reads.append((rows, leaf, p))
        return call.rule.op_on_rows(call.module, call.input, rows, leaf)

    def materialise(self) -> Tuple[Tensor, Tensor]:
        """``(θ', P)`` on every row (the meta forward reads the table outside its lookups)."""
        return self._step(None)

    def meta_direction(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``(rows, U on them)``: ``U = P ⊙ ∇_θ' L_out`` on the rows the meta forward read (None if it read none)."""
        parts = [(rows, p * g) for (rows, _, p), g in zip(self.reads, self.grads) if g is not None]
        if not parts:
            return None, None
        if len(parts) == 1:
            return parts[0]
        rows, inv = torch.unique(torch.cat([r for r, _ in parts]), return_inverse=True)
        U = torch.zeros(rows.numel(), *parts[0][1].shape[1:], dtype=parts[0][1].dtype, device=rows.device)
        return rows, U.index_add_(0, inv, torch.cat([u for _, u in parts]))


class _LowRankUpdate(torch.autograd.Function):
    """``z − p Σ_k ((a' Aᵀ) ⊙ w_k) Δ_k`` for a meta call ``(a', z)`` at ``W'(0)``; stores ``S = a' Aᵀ`` and, in the
    backward, ``G_k = g Δ_kᵀ`` (``g`` is ``∂L_out/∂z``, the meta output gradient the coefficients need)."""

    @staticmethod
    def forward(ctx, out, am, layer, entry):
        S = am.to(layer.A.dtype) @ layer.A.T  # mixed precision: the correction in the parameters' dtype
        z = out.reshape(-1, out.shape[-1]).to(layer.A.dtype)
        for sk, dk in zip(layer.step_weights, layer.deltas):  # one fused product per term, −p·w_k folded into S
            z = torch.addmm(z, S * sk, dk)
        entry["S"] = S
        ctx.layer, ctx.entry, ctx.am_dtype = layer, entry, am.dtype
        return z.reshape(out.shape).to(out.dtype)

    @staticmethod
    def backward(ctx, g):
        layer = ctx.layer
        gr = g.reshape(-1, g.shape[-1]).to(layer.A.dtype)
        G = [gr @ dk.T for dk in layer.deltas]
        ctx.entry["G"] = G
        grad_am = None
        if ctx.needs_input_grad[1]:
            coef = G[0] * layer.step_weights[0]
            for Gk, sk in zip(G[1:], layer.step_weights[1:]):
                coef.addcmul_(Gk, sk)
            grad_am = (coef @ layer.A).to(ctx.am_dtype)
        return g, grad_am, None, None


def _cat(parts: List[Tensor]) -> Tensor:
    """``torch.cat`` without the copy when there is a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _fixed_adam_step(h, p: Tensor, g: Tensor, st, after: Optional[dict] = None, name: str = ""
                     ) -> Tuple[Tensor, Tensor]:
    """``(θ', P)`` of one Adam/AdamW step with the preconditioner held fixed, in a few in-place passes (the
    functional optimizer's ``step`` + ``linear_scale`` allocate a tensor per operation, which on a 30k-token embedding
    cost more than the matrix products): ``P = (lr/bc1)(1−β1)/denom`` and
    ``θ' = θ·(1 − lr·wd) − P ⊙ (β1/(1−β1)·m + g)`` (decoupled decay; L2 decay is added to ``g``). Equal to
    ``FunctionalOptimizer.step`` and ``linear_scale`` (the Adam tests of ``tests/test_fast.py`` compare them).
    ``after``: where to put the state after the step, as ``after[name]`` (what lookahead commits)."""
    t = float(st.get("step", 0.0)) + 1
    bc1, bc2 = 1 - h.beta1 ** t, 1 - h.beta2 ** t
    if h.weight_decay and not h.decoupled:
        g = g + h.weight_decay * p
    P = torch.mul(g, g).mul_(1 - h.beta2)
    if "exp_avg_sq" in st:
        P.add_(st["exp_avg_sq"], alpha=h.beta2)
    if after is not None:
        m = torch.mul(g, 1 - h.beta1)
        if "exp_avg" in st:
            m.add_(st["exp_avg"], alpha=h.beta1)
        after[name] = {"step": st.get("step", torch.tensor(0.0)) + 1, "exp_avg": m, "exp_avg_sq": P.clone()}
    if h.amsgrad and "max_exp_avg_sq" in st:
        torch.maximum(P, st["max_exp_avg_sq"], out=P)
    if after is not None and h.amsgrad:
        after[name]["max_exp_avg_sq"] = P.clone()
    P.sqrt_().div_(bc2 ** 0.5).add_(h.eps).reciprocal_().mul_(h.lr / bc1 * (1 - h.beta1))
    new = p * (1 - h.lr * h.weight_decay) if h.weight_decay and h.decoupled else p.clone()
    if "exp_avg" in st:
        new.addcmul_(st["exp_avg"], P, value=-h.beta1 / (1 - h.beta1))
    return new.addcmul_(g, P, value=-1.0), P


def _sgd_step(h, p: Tensor, g: Tensor, st, after: Optional[dict] = None, name: str = "") -> Tensor:
    """``θ'`` of one SGD step (momentum, dampening, nesterov, L2 weight decay) with two or three allocations instead
    of the functional optimizer's five; equal to ``FunctionalOptimizer.step`` (``tests/test_fast.py`` compares the
    hypergradients with ``unrolled`` and a central difference for each variant). ``after``: where to put the state
    after the step, as ``after[name]``."""
    if after is not None:
        after[name] = {}
    if h.weight_decay:
        g = torch.add(g, p, alpha=h.weight_decay)
    if h.momentum:
        buf = st.get("momentum_buffer")
        d = g if buf is None else torch.mul(buf, h.momentum).add_(g, alpha=1 - h.dampening)
        if after is not None:
            after[name]["momentum_buffer"] = d
        g = torch.add(g, d, alpha=h.momentum) if h.nesterov else d
    return torch.add(p, g, alpha=-h.lr)


def _zero_gradient_step(h, p: Tensor, st) -> Tensor:
    """``θ'(0)``, the SGD-family step with a zero loss gradient, as ``A·θ + B·buffer`` in one pass over memory.
    ``A`` and ``B`` come from the optimizer's own update rule applied to scalars (it is linear in θ and the buffer)."""
    buf = st.get("momentum_buffer")
    A, B = _zero_gradient_coefficients(h, buf is not None)
    if B == 0.0:
        return p if A == 1.0 else p * A
    return torch.add(p, buf, alpha=B / A).mul_(A) if A != 0.0 else buf * B


@functools.lru_cache(maxsize=256)
def _zero_gradient_coefficients(h, has_buffer: bool) -> Tuple[float, float]:
    """``(A, B)`` with ``θ'(0) = A·θ + B·buffer``, from the optimizer's update rule applied to scalars."""
    def probe(theta, b):
        one = torch.tensor(1.0, dtype=torch.float64)
        st = {"momentum_buffer": b * one} if has_buffer else {}
        return float(FunctionalOptimizer._sgd(theta * one, 0 * one, st, h))

    return probe(1.0, 0.0), (probe(0.0, 1.0) if has_buffer else 0.0)


def _rng_state(params) -> Tuple[Tensor, Optional[List[Tensor]]]:
    cuda = any(t.is_cuda for t in params.values()) and torch.cuda.is_available()
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)


def _padding_has_no_derivative(module, args, output):
    """Forward mode sees the padding row's lookup; autograd's convention (hence the step) gives it no gradient."""
    primal, tangent = fwAD.unpack_dual(output)
    if tangent is None:
        return None
    keep = (args[0] != module.padding_idx).unsqueeze(-1).to(tangent.dtype)
    return fwAD.make_dual(primal, tangent * keep)


class ForwardModeError(NotImplementedError):
    """``hypergrad='fast'`` needs a forward-mode derivative of an operation that has none (a fused kernel, a custom
    ``autograd.Function`` without ``jvp``) on the route of parameters without a closed form; the message names the
    parameters and what to use instead."""


def _jvp_terms(problem: BilevelProblem, theta, tangents, batch: Batch, rng, known: Sequence[LayerCall] = ()
               ) -> Tensor:
    """``Σ_p ∇_p ℓ_ik · t_p`` for every term, by one forward-mode pass, replaying the capture's random numbers
    (dropout masks) so that it differentiates the same function. ``known``: the train pass's calls, whose outputs
    the Linear / Conv layers reuse instead of recomputing them (:class:`_KnownPrimals`). An operation without a
    forward-mode derivative: :class:`ForwardModeError`."""
    try:
        return _forward_mode_terms(problem, theta, tangents, batch, rng, known)
    except (NotImplementedError, RuntimeError) as error:
        if "forward ad" not in str(error).lower() and "forward mode ad" not in str(error).lower():
            raise
        names = sorted(tangents)
        raise ForwardModeError(
            f"hypergrad='fast' takes a forward-mode derivative (a JVP) for the {len(names)} parameters without a "
            f"closed form (e.g. {names[:3]}), and {type(problem.model).__name__}'s forward runs an operation "
            f"without one: {str(error).splitlines()[0]} Use hypergrad='unrolled' (the same exact hypergradient, by "
            "a double backward), or keep those parameters frozen (requires_grad=False, e.g. LoRA on the other "
            "layers)") from None


def _forward_mode_terms(problem: BilevelProblem, theta, tangents, batch: Batch, rng, known: Sequence[LayerCall]
                        ) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cpu, cuda = rng
    # the math attention kernel: the fused ones (flash, CPU and GPU) have no forward-mode derivative
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda is not None else []), \
            torch.no_grad(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH), _KnownPrimals(known):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        params = {k: (fwAD.make_dual(v, tangents[k]) if k in tangents else v) for k, v in theta.items()}
        hooks = [m.register_forward_hook(_padding_has_no_derivative) for m in problem.model.modules()
                 if isinstance(m, nn.Embedding) and m.padding_idx is not None]
        try:  # only the terms' tangents are read: keep the weights' cross-rank reductions out of forward mode
            with problem.collectives.suspended():
                terms = problem.inner(problem.forward(params), batch).terms
        finally:
            for h in hooks:
                h.remove()
        tangent = fwAD.unpack_dual(terms).tangent
    return torch.zeros_like(terms) if tangent is None else tangent


_BILINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # z = op(a, W) + b, linear in a and in W


class _KnownPrimals:
    """While open, each Linear / Conv layer of the train pass's calls computes, in the JVP, only its tangent
    ``ż = op(ȧ, W) + op(a, Ẇ) + ḃ`` and takes the train pass's output as its primal, instead of the primal product
    too (a third of the JVP's convolutions). A call is reused only if its input equals the recorded one (the same
    layer, θ, batch and random numbers give the same output), its output was not modified in place since, and no
    autocast is active; otherwise the layer runs as usual."""

    def __init__(self, calls: Sequence[LayerCall]):
        self.queues: Dict[nn.Module, List[LayerCall]] = {}
        for c in calls:
            if type(c.module) in _BILINEAR:
                self.queues.setdefault(c.module, []).append(c)

    def __enter__(self):
        self.own = {m: m.__dict__.get("forward") for m in self.queues}  # a forward set on the instance (hooks)
        for m, queue in self.queues.items():
            m.forward = functools.partial(_tangent_only_forward, m, m.forward, queue[::-1])
        return self

    def __exit__(self, *exc):
        for m, own in self.own.items():
            if own is None:
                del m.forward
            else:
                m.forward = own


def _tangent_only_forward(module: nn.Module, original, pending: List[LayerCall], *args, **kwargs):
    call = pending.pop() if pending else None
    if call is None or len(args) != 1 or kwargs or torch.is_autocast_enabled(args[0].device.type):
        return original(*args, **kwargs)
    a, da = fwAD.unpack_dual(args[0])
    z = call.output
    if z._version != 0 or a.shape != call.input.shape or a.dtype != z.dtype or not torch.equal(a, call.input):
        return original(*args, **kwargs)
    rule = call.rule
    w, dw = fwAD.unpack_dual(module.weight)
    parts = [] if da is None else [rule.op(module, da, w)]
    if dw is not None:
        parts.append(rule.op(module, a, dw))
    db = None if module.bias is None else fwAD.unpack_dual(module.bias).tangent
    if not parts and db is None:
        return z.detach()
    dz = functools.reduce(torch.add, parts) if parts else torch.zeros_like(z)
    if db is not None:
        dz = dz + rule.bias_view(module, db, z)
    return fwAD.make_dual(z.detach(), dz)


# ---- data-parallel collectives: every distributed call of the fast method goes through these -----------------------
def _collectives(problem: BilevelProblem):
    """The problem's :class:`~metareweight.core.strategy.Collectives` when it spans more than one process, else None.

    There each rank holds a shard of the train and meta batches; the virtual step is the global one (the optimizer
    averages the step direction), ``∇_θ' L_out`` is averaged here, and the trainer averages the per-rank results,
    which together give the hypergradient of the global batch: ``c_ik`` for a rank's own samples needs only the
    global ``∇_θ' L_out``, and the ``1/R`` of the averaged step is the trainer's average."""
    return problem.collectives if problem.collectives.enabled else None


def _all_reduce_mean_(tensors: Sequence[Optional[Tensor]], ctx) -> None:
    ctx.all_reduce_mean_(tensors)


def _all_gather_rows(tensors: Sequence[Tensor], ctx) -> Tuple[List[Tensor], int]:
    return ctx.all_gather_rows(tensors)


def _agree_min(tensor: Tensor, ctx) -> Tensor:
    """The element-wise minimum over the ranks."""
    return tensor if ctx is None else ctx.agree_min(tensor)


def _agree_max(value: float, ctx) -> float:
    """The largest ``value`` over the ranks."""
    if ctx is None:
        return value
    return -float(_agree_min(torch.tensor([-value], dtype=torch.float64), ctx)[0])


def _agreed(chosen: Set[str], candidates: List[str], ctx, device: torch.device) -> Set[str]:
    """The names every rank chose (data-parallel: shard sizes may differ, and the Gram route's collectives need the
    same layers on every rank)."""
    if ctx is None or not candidates:
        return set(chosen)
    votes = _agree_min(torch.tensor([float(n in chosen) for n in candidates], device=device), ctx)
    return {n for n, v in zip(candidates, votes.tolist()) if v > 0}
