"""An LSTM policy over meta-iterations that turns per-source rewards into source weights, trained by REINFORCE.

Meta-RTL (Fu et al., arXiv 2409.19075) states only that source-task weights come from "a policy network built on
LSTMs" trained with REINFORCE. The choices below are inferred (METHODS.md §3.2, §3.5) and can be changed by arguments:

- **Reward scale** [inferred]: rewards are loss differences that shrink as training converges.
  :meth:`LSTMPolicy.scale_rewards` divides the reward vector by a running mean of ``mean_s |R_s|``, so the spread
  between sources stays O(1) and the entropy bonus keeps one meaning over the run. The scale comes from all ``S``
  rewards of an iteration, not only the sampled one, so it does not depend on which source was drawn.
- **State and input** [inferred]: one ``LSTMCell`` step per meta-iteration. Its input at iteration ``t`` is the
  (scaled) reward vector of iteration ``t-1`` concatenated with ``π_{t-1}``; zeros at ``t = 0``. The hidden state
  is carried across iterations but detached (truncated back-propagation of one step): each update differentiates
  only the current cell step, so the cost per iteration is constant.
- **Output**: logits over sources, ``π_t = softmax(logits)``. The head starts at zero, so ``π_0`` is uniform.
- **Action** (``mode``): ``"sample"`` draws one source ``a ~ Categorical(π_t)`` (discrete source sampling, weights
  are the one-hot of ``a``); ``"mixture"`` draws continuous mixture weights ``w = softmax(log π_t + σ·ε)``,
  ``ε ~ N(0, I)`` (a logistic-normal policy around ``π_t``) [inferred]. Both are REINFORCE actions with a
  log-probability. A Dirichlet around ``π_t`` was tried first and dropped: its score ``ψ(Σα) − ψ(α_s) + log w_s``
  explodes as ``α_s → 0`` and sent a 4-armed bandit to a wrong vertex; the Gaussian score ``ε/σ`` stays bounded.
- **REINFORCE** (:class:`Reinforce`): loss ``-(R - b) · log p(action) - β·H(π_t)`` with ``b`` a moving average of
  past rewards (the baseline) and ``H`` the categorical entropy of ``π_t`` (optional bonus, ``entropy_coef``).
  With the bonus, the fixed point of the expected update is ``π ∝ exp(E[R]/β)``: sources keep weights graded by
  their reward instead of all mass going to the single best one. ``normalize=True`` additionally divides the
  advantage by its running magnitude (off by default: it amplifies noise once rewards carry no signal). The
  optimizer is the caller's (Adam on the policy, via ``MetaTrainer``'s meta optimizer).
- **Expected update** (``Reinforce(estimator="expected")``, ``"sample"`` mode only): when the reward of *every*
  action is observed (Meta-RTL measures every source's reward each iteration), the REINFORCE gradient can be
  averaged over the action exactly: ``∇ Σ_s π_s R_s`` (the all-action or "expected" policy gradient, Ciosek &
  Whiteson, AAAI 2018). Same expectation and fixed point as the sampled estimate, without its action-sampling
  variance; a constant baseline cancels, so ``b`` is only tracked for diagnostics. With the sampled estimate a
  source of probability 0.05 is drawn about once in 20 iterations, so the order among the least-weighted sources
  resolves slowly; the expected update moves every source's logit every iteration.

Why not ``metareweight.core.hypergrad``: a hypergradient method maps a :class:`~metareweight.core.BilevelProblem`
(θ, inner terms, outer loss of a virtual step) to ``dL_out/dφ``. REINFORCE needs a sampled action, its
log-probability and a scalar reward, none of which the problem carries; expressing it there would mean dummy inner
and outer functions. It lives here, next to the only policy that uses it, as one small class.

Example: a 3-armed bandit whose middle arm pays most.
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> policy = LSTMPolicy(3, hidden=8)
    >>> learner = Reinforce(torch.optim.Adam(policy.parameters(), lr=0.05))
    >>> for _ in range(200):
    ...     action = policy.act()
    ...     rewards = torch.tensor([0.0, 1.0, 0.2]) + 0.1 * torch.randn(3)
    ...     _ = learner.step(action, float(rewards[action.index]))
    ...     policy.observe(rewards)
    >>> int(policy.act().probs.argmax())
    1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

POLICY_MODES = ("sample", "mixture")


@dataclass
class PolicyAction:
    """One decision of the policy.

    Attributes:
        weights: ``(S,)`` source weights to apply (detached): a one-hot in ``"sample"`` mode, a point of the
            simplex in ``"mixture"`` mode.
        probs: ``(S,)`` the policy's probabilities ``π_t`` (detached; the mean of the action).
        log_prob: log-probability of the action, differentiable in the policy's parameters.
        entropy: categorical entropy of ``π_t``, differentiable.
        index: the sampled source in ``"sample"`` mode, else ``None``.
        log_probs: ``(S,)`` log-probabilities of every source, differentiable (``"sample"`` mode, else ``None``).
    """

    weights: Tensor
    probs: Tensor
    log_prob: Tensor
    entropy: Tensor
    index: Optional[int] = None
    log_probs: Optional[Tensor] = None


class LSTMPolicy(nn.Module):
    """Source weights from an LSTM run over meta-iterations (see the module docs for the inferred choices).

    Args:
        num_sources: number of source tasks ``S`` (>= 2).
        hidden: LSTM hidden size.
        mode: ``"sample"`` (discrete source sampling) or ``"mixture"`` (logistic-normal mixture weights).
        noise: standard deviation ``σ`` of the logit perturbation in ``"mixture"`` mode (smaller: less exploration).
        input_decay: decay of the running ``|reward|`` scale of :meth:`scale_rewards`.
    """

    def __init__(self, num_sources: int, hidden: int = 32, mode: str = "sample", noise: float = 0.5,
                 input_decay: float = 0.9):
        super().__init__()
        if not isinstance(num_sources, int) or num_sources < 2:
            raise ValueError(f"a source-task policy needs at least 2 sources, got {num_sources!r}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if mode not in POLICY_MODES:
            raise ValueError(f"mode must be one of {POLICY_MODES}, got {mode!r}")
        if noise <= 0:
            raise ValueError(f"noise must be positive, got {noise}")
        if not 0.0 <= input_decay < 1.0:
            raise ValueError(f"input_decay must be in [0, 1), got {input_decay}")
        self.num_sources = num_sources
        self.mode = mode
        self.noise = noise
        self.input_decay = input_decay
        self.cell = nn.LSTMCell(2 * num_sources, hidden)
        self.head = nn.Linear(hidden, num_sources)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # the recurrent state is part of state_dict, so a checkpointed run resumes where it stopped
        for name in ("h", "c"):
            self.register_buffer(name, torch.zeros(1, hidden))
        self.register_buffer("x", torch.zeros(1, 2 * num_sources))
        self.register_buffer("probs", torch.full((num_sources,), 1.0 / num_sources))
        self.register_buffer("reward_scale", torch.zeros(()))

    def reset(self) -> None:
        """Forget the recurrent state and the last input (start of a new run)."""
        for name in ("h", "c", "x", "reward_scale"):
            setattr(self, name, torch.zeros_like(getattr(self, name)))
        self.probs = torch.full_like(self.probs, 1.0 / self.num_sources)

    def act(self) -> PolicyAction:
        """Advance the LSTM one iteration and draw an action from ``π_t``."""
        h, c = self.cell(self.x, (self.h, self.c))
        self.h, self.c = h.detach(), c.detach()  # rebind, never write in place: the graph holds the old ones
        log_probs = torch.log_softmax(self.head(h).squeeze(0), 0)
        probs = log_probs.exp()
        self.probs = probs.detach()
        entropy = -(probs * log_probs).sum()
        if self.mode == "sample":
            index = int(torch.multinomial(probs.detach(), 1))
            weights = torch.zeros_like(probs).index_fill_(0, torch.tensor([index], device=probs.device), 1.0)
            return PolicyAction(weights, probs.detach(), log_probs[index], entropy, index, log_probs)
        logits = log_probs  # the same softmax, with a common shift that the perturbation ignores
        z = logits.detach() + self.noise * torch.randn_like(logits)
        log_prob = -0.5 * ((z - logits) ** 2).sum() / self.noise ** 2  # Gaussian log-density up to a constant
        return PolicyAction(torch.softmax(z, 0), probs.detach(), log_prob, entropy)

    @torch.no_grad()
    def scale_rewards(self, rewards: Tensor) -> Tensor:
        """``rewards / s`` with ``s`` a running mean of ``mean_s |R_s|`` (updated here): rewards in loss units
        shrink as training converges; scaled ones keep an O(1) spread between sources."""
        rewards = torch.as_tensor(rewards, dtype=self.x.dtype, device=self.x.device).flatten()
        if rewards.shape[0] != self.num_sources:
            raise ValueError(f"expected {self.num_sources} rewards (one per source), got {rewards.shape[0]}")
        if not torch.isfinite(rewards).all():
            raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
        mag = rewards.abs().mean()
        d = self.input_decay
        self.reward_scale = mag if bool(self.reward_scale == 0) else d * self.reward_scale + (1 - d) * mag
        return rewards / self.reward_scale.clamp_min(1e-12)

    @torch.no_grad()
    def observe(self, rewards: Tensor) -> None:
        """Feed this iteration's per-source rewards ``(S,)`` (best already scaled) as the next LSTM input."""
        rewards = torch.as_tensor(rewards, dtype=self.x.dtype, device=self.x.device).flatten()
        if rewards.shape[0] != self.num_sources:
            raise ValueError(f"expected {self.num_sources} rewards (one per source), got {rewards.shape[0]}")
        self.x = torch.cat([rewards, self.probs]).unsqueeze(0)


ESTIMATORS = ("sampled", "expected")


class Reinforce:
    """REINFORCE with a moving-average baseline, optional reward normalisation and entropy bonus.

    Args:
        baseline_decay: the baseline is ``b ← d·b + (1-d)·R`` (initialised to the first reward).
        entropy_coef: weight ``β`` of the entropy bonus (0 disables it).
        normalize: divide the advantage by a moving average of its magnitude (off by default).
        estimator: ``"sampled"`` (the REINFORCE estimate from the drawn action) or ``"expected"`` (its exact
            average over the actions, ``∇ Σ_s π_s R_s``; needs every action's reward and a ``"sample"``-mode action).

    ``step(action, reward, optimizer, rewards=None)`` takes one policy-gradient step and returns diagnostics;
    ``rewards`` (every action's reward) is required by the expected estimator.

    Example: the expected update moves every arm each step, so 60 steps find the best of 4 arms.
        >>> _ = torch.manual_seed(0)
        >>> policy = LSTMPolicy(4, hidden=8)
        >>> learner = Reinforce(torch.optim.Adam(policy.parameters(), lr=0.05), estimator="expected")
        >>> for _ in range(60):
        ...     action, rewards = policy.act(), torch.tensor([0.2, 0.5, 1.0, 0.4]) + 0.3 * torch.randn(4)
        ...     _ = learner.step(action, float(rewards[action.index]), rewards=rewards)
        ...     policy.observe(rewards)
        >>> int(policy.act().probs.argmax())
        2
    """

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None, baseline_decay: float = 0.9,
                 entropy_coef: float = 0.0, normalize: bool = False, estimator: str = "sampled"):
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if normalize and estimator == "expected":
            raise ValueError("normalize rescales the sampled action's advantage; the expected estimator has none "
                             "(scale the rewards instead, as LSTMPolicy.scale_rewards does)")
        self.estimator = estimator
        self.optimizer = optimizer
        self.baseline_decay = baseline_decay
        self.entropy_coef = entropy_coef
        self.normalize = normalize
        self.baseline: Optional[float] = None
        self.scale: Optional[float] = None

    def advantage(self, reward: float) -> float:
        """``(R - b)/s`` with the statistics before this reward, then update ``b`` and ``s``."""
        if not isinstance(reward, (int, float)) or reward != reward or abs(reward) == float("inf"):
            raise ValueError(f"the reward must be a finite number, got {reward!r}")
        if self.baseline is None:
            self.baseline = float(reward)
        adv = reward - self.baseline
        d = self.baseline_decay
        self.baseline = d * self.baseline + (1 - d) * reward
        if not self.normalize:
            return adv
        self.scale = abs(adv) if not self.scale else d * self.scale + (1 - d) * abs(adv)
        return adv / self.scale if self.scale > 1e-12 else 0.0

    def loss(self, action: PolicyAction, reward: float, rewards: Optional[Tensor] = None) -> Tensor:
        """The surrogate whose gradient is the policy-gradient estimate (minus the entropy bonus)."""
        if self.estimator == "sampled":
            return -self.advantage(float(reward)) * action.log_prob - self.entropy_coef * action.entropy
        if action.log_probs is None or rewards is None:
            raise ValueError("the expected estimator needs a 'sample'-mode action and every action's reward "
                             "(Reinforce.step(action, reward, rewards=...))")
        rewards = torch.as_tensor(rewards, dtype=action.log_probs.dtype, device=action.log_probs.device).flatten()
        if rewards.shape != action.log_probs.shape:
            raise ValueError(f"expected {action.log_probs.shape[0]} rewards (one per action), got {rewards.shape[0]}")
        self.advantage(float(reward))  # the baseline cancels in Σ_s π_s R_s; tracked for diagnostics only
        return -(action.log_probs.exp() * rewards).sum() - self.entropy_coef * action.entropy

    def step(self, action: PolicyAction, reward: float, optimizer: Optional[torch.optim.Optimizer] = None,
             rewards: Optional[Tensor] = None) -> Dict[str, float]:
        opt = optimizer or self.optimizer
        if opt is None:
            raise ValueError("Reinforce.step needs an optimizer over the policy's parameters "
                             "(pass one here or to Reinforce(...))")
        loss = self.loss(action, reward, rewards)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"policy_loss": float(loss.detach()), "baseline": float(self.baseline),
                "policy_entropy": float(action.entropy.detach())}
