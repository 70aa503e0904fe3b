"""A generated multi-step reasoning task for process reward models: arithmetic chains with Monte-Carlo step labels.

A *problem* is a start value and ``n`` operations ``±a_j``. A *solution* claims a value after each step; a policy
makes each step wrong with probability ``step_error`` (the claimed value is off by ``δ ∈ ±{1..max_delta}``) and
continues from whatever it claimed. A solution is correct when its final value is the true one.

Each step prefix gets a Monte-Carlo label, as in Math-Shepherd and DreamPRM: ``p_i`` is the fraction of
``completions`` sampled continuations (the same policy, from the claimed prefix) that end on the correct answer.

A prefix is encoded for a small PRM as ``MAX_STEPS`` slots of ``[present, previous value, claimed value, step change,
signed operand, operator sign]`` (values divided by ``SCALE``, changes and operands by ``DSCALE``; empty slots are
zero) followed by ``[i / MAX_STEPS, n / MAX_STEPS]``: the PRM must learn to check ``change = signed operand`` in every
filled slot and how many steps remain.

Training domains of known quality (:data:`PRM_DOMAINS`) differ in how their data were made:

- ``clean``: the target distribution, honest MC labels (quality 1);
- ``easy``: one- or two-step chains solved without error, labels ≈ 1 (correct but uninformative; quality 0.5);
- ``shifted``: a sibling task whose operators mean ``±(a + 1)`` (an off-by-one convention); its MC labels follow
  its own rule, so its correct steps look like the target task's ±1 errors and are labelled right (quality 0.25).
  With ``prm_domains(shifted_habit=h)`` its solver also falls back on the target rule in a fraction ``h`` of its
  steps, and its labels mark those target-correct steps wrong: a conflict on the steps a target verifier checks;
- ``noisy``: target-distribution chains whose step labels were inverted (``1 − p``) with probability
  ``flip`` (quality 0).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> sols = sample_solutions(rng, 4, steps=(3, 5), step_error=0.2)
    >>> feats, labels, sol_id = prefix_examples(rng, sols, completions=8)
    >>> feats.shape[1] == feature_dim(), bool(((labels >= 0) & (labels <= 1)).all())
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

MAX_STEPS = 6
SCALE = 20.0   # for values
DSCALE = 3.0   # for step changes and operands
SLOT = 6  # present, previous, claimed, step change, signed operand, sign


@dataclass
class Solutions:
    """A batch of solved chains (arrays padded to ``MAX_STEPS``).

    Attributes:
        start: ``(n,)`` start values.  length: ``(n,)`` number of steps.
        sign: ``(n, S)`` ±1 operator signs.  operand: ``(n, S)`` operands ``a_j > 0``.
        claimed: ``(n, S)`` the values the solution claims after each step.
        offset: the task's rule is ``previous ± (a + offset)``; 0 is the target task, 1 the ``shifted`` sibling.
    """

    start: np.ndarray
    length: np.ndarray
    sign: np.ndarray
    operand: np.ndarray
    claimed: np.ndarray
    offset: int = 0

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def true_step(self, prev: np.ndarray, j: int, idx: Optional[np.ndarray] = None) -> np.ndarray:
        """The value step ``j`` should give from ``prev`` under this task's rule."""
        sl = slice(None) if idx is None else idx
        return prev + self.sign[sl, j] * (self.operand[sl, j] + self.offset)

    def answer(self) -> np.ndarray:
        """The true final value of each problem under this task's rule."""
        v = self.start.copy()
        for j in range(MAX_STEPS):
            live = j < self.length
            v = np.where(live, self.true_step(v, j), v)
        return v

    def final(self) -> np.ndarray:
        return self.claimed[np.arange(len(self)), self.length - 1]

    def correct(self) -> np.ndarray:
        """Outcome label ``r``: the claimed final value equals the true answer."""
        return self.final() == self.answer()


def _errors(rng, shape, step_error: float, max_delta: int) -> np.ndarray:
    wrong = rng.random(shape) < step_error
    delta = rng.integers(1, max_delta + 1, size=shape) * rng.choice([-1, 1], size=shape)
    return np.where(wrong, delta, 0)


def sample_problems(rng: np.random.Generator, n: int, steps=(3, MAX_STEPS), max_operand: int = 9,
                    max_start: int = 20, offset: int = 0) -> Solutions:
    """Problems without solutions yet (``claimed`` is zeros)."""
    if not 1 <= steps[0] <= steps[1] <= MAX_STEPS:
        raise ValueError(f"steps must satisfy 1 <= lo <= hi <= {MAX_STEPS}, got {steps}")
    length = rng.integers(steps[0], steps[1] + 1, size=n)
    sign = rng.choice([-1, 1], size=(n, MAX_STEPS))
    operand = rng.integers(1, max_operand + 1, size=(n, MAX_STEPS))
    start = rng.integers(0, max_start + 1, size=n)
    return Solutions(start, length, sign, operand, np.zeros((n, MAX_STEPS), np.int64), offset)


def solve(rng: np.random.Generator, problems: Solutions, step_error: float, max_delta: int = 3,
          habit: float = 0.0) -> Solutions:
    """One sampled solution per problem from a policy that errs with ``step_error`` per step. With ``habit`` > 0
    the policy also falls back, with that probability per step, on the *target* task's rule ``previous ± a``
    (a solver used to the target convention working on a sibling task; no effect when ``offset`` is 0)."""
    err = _errors(rng, (len(problems), MAX_STEPS), step_error, max_delta)
    habitual = rng.random((len(problems), MAX_STEPS)) < habit if habit else np.zeros(err.shape, bool)
    claimed = np.zeros_like(problems.claimed)
    v = problems.start.copy()
    for j in range(MAX_STEPS):
        live = j < problems.length
        target_rule = v + problems.sign[:, j] * problems.operand[:, j]
        v = np.where(live, np.where(habitual[:, j], target_rule, problems.true_step(v, j) + err[:, j]), v)
        claimed[:, j] = np.where(live, v, 0)
    return Solutions(problems.start, problems.length, problems.sign, problems.operand, claimed, problems.offset)


def sample_solutions(rng: np.random.Generator, n: int, steps=(3, MAX_STEPS), step_error: float = 0.12,
                     max_operand: int = 9, offset: int = 0, max_delta: int = 3, habit: float = 0.0) -> Solutions:
    """``n`` fresh problems, each with one sampled solution (``habit``: see :func:`solve`)."""
    return solve(rng, sample_problems(rng, n, steps, max_operand, offset=offset), step_error, max_delta, habit)


def repeat(problems: Solutions, k: int) -> Solutions:
    """Each problem ``k`` times in a row (for best-of-N candidates)."""
    r = lambda a: np.repeat(a, k, axis=0)  # noqa: E731
    return Solutions(r(problems.start), r(problems.length), r(problems.sign), r(problems.operand),
                     r(problems.claimed), problems.offset)


def mc_labels(rng: np.random.Generator, sols: Solutions, completions: int, step_error: float,
              max_delta: int = 3) -> np.ndarray:
    """``(n, S)`` Monte-Carlo step labels: the fraction of ``completions`` rollouts from each claimed prefix that
    end on the true answer (``nan`` for padded steps)."""
    n = len(sols)
    answer = sols.answer()
    out = np.full((n, MAX_STEPS), np.nan)
    rows = np.repeat(np.arange(n), completions)
    for i in range(MAX_STEPS):  # prefix = steps 0..i
        v = sols.claimed[rows, i].copy()
        for j in range(i + 1, MAX_STEPS):
            live = j < sols.length[rows]
            step = sols.true_step(v, j, rows) + _errors(rng, rows.shape, step_error, max_delta)
            v = np.where(live, step, v)
        ok = (v == answer[rows]).reshape(n, completions).mean(1)
        out[:, i] = np.where(i < sols.length, ok, np.nan)
    return out


def feature_dim() -> int:
    return MAX_STEPS * SLOT + 2


def prefix_features(sols: Solutions) -> np.ndarray:
    """``(n, S, feature_dim)`` encodings of every step prefix of every solution (zeros beyond a solution's length)."""
    n = len(sols)
    prev = np.concatenate([sols.start[:, None], sols.claimed[:, :-1]], 1)
    slots = np.stack([np.ones((n, MAX_STEPS)), prev / SCALE, sols.claimed / SCALE, (sols.claimed - prev) / DSCALE,
                      sols.sign * sols.operand / DSCALE, sols.sign.astype(float)], -1)  # (n, S_step, SLOT)
    steps = np.arange(MAX_STEPS)
    out = np.zeros((n, MAX_STEPS, feature_dim()), np.float32)
    for i in range(MAX_STEPS):                                                       # prefix i holds steps 0..i
        filled = (steps <= i)[None, :, None] & (steps[None, :] < sols.length[:, None])[:, :, None]
        out[:, i, :MAX_STEPS * SLOT] = (slots * filled).reshape(n, -1)
        out[:, i, -2] = (i + 1) / MAX_STEPS
        out[:, i, -1] = sols.length / MAX_STEPS
    return out


def step_mask(sols: Solutions) -> np.ndarray:
    """``(n, S)`` True where prefix ``i`` exists (``i < length``)."""
    return np.arange(MAX_STEPS)[None, :] < sols.length[:, None]


def prefix_examples(rng: np.random.Generator, sols: Solutions, completions: int = 16, completion_error: float = 0.03
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened PRM training examples: ``(features (m, D), MC labels (m,), solution id (m,))``; the labels come
    from ``completions`` rollouts of a completer that errs with ``completion_error`` per step."""
    feats, labels, mask = prefix_features(sols), mc_labels(rng, sols, completions, completion_error), step_mask(sols)
    sol_id = np.repeat(np.arange(len(sols))[:, None], MAX_STEPS, 1)
    return feats[mask], labels[mask].astype(np.float32), sol_id[mask]


def prm_domains(shifted_habit: float = 0.0) -> Dict[str, Tuple[float, dict]]:
    """The training domains ``{name: (quality, generator settings)}``; ``shifted_habit`` is the probability per
    step that the ``shifted`` domain's solver writes the target rule's value (which its own labels mark wrong)."""
    shifted = dict(offset=1, habit=shifted_habit) if shifted_habit else dict(offset=1)
    return {
        "clean_a": (1.0, dict()),
        "clean_b": (1.0, dict()),
        "easy": (0.5, dict(steps=(1, 2), step_error=0.0)),
        "shifted": (0.25, shifted),
        "noisy": (0.0, dict(flip=0.6)),
    }


PRM_DOMAINS: Dict[str, Tuple[float, dict]] = prm_domains()


def domain_examples(rng: np.random.Generator, name: str, n_solutions: int, completions: int = 16,
                    step_error: float = 0.12, completion_error: float = 0.03,
                    domains: Dict[str, Tuple[float, dict]] = PRM_DOMAINS) -> Tuple[np.ndarray, np.ndarray]:
    """PRM training prefixes ``(features, labels)`` of one domain of :data:`PRM_DOMAINS`: solutions from a policy
    erring with ``step_error`` per step, labels from rollouts erring with ``completion_error``."""
    if name not in domains:
        raise ValueError(f"unknown PRM domain {name!r}; choose one of {sorted(domains)}")
    spec = dict(domains[name][1])
    flip = spec.pop("flip", 0.0)
    err = spec.pop("step_error", step_error)
    sols = sample_solutions(rng, n_solutions, step_error=err, **spec)
    feats, labels, _ = prefix_examples(rng, sols, completions, completion_error)
    if flip:
        inv = rng.random(labels.shape[0]) < flip
        labels = np.where(inv, 1.0 - labels, labels).astype(np.float32)
    return feats, labels
