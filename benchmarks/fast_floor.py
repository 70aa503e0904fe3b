"""How fast can an exact one-step Meta-Weight-Net step be? A hand-written lower bound for ``hypergrad="fast"``.

For the benchmark's MLP 64→H→H→10 (SGD with momentum and weight decay, train and meta batches of 128) this file
writes the whole step out by hand with the same arithmetic as ``fast``, and nothing else: no autograd on the model,
no hooks, no trainer, no checks. Per-sample output gradients in closed form (softmax − one-hot), the H×H layer on
the Gram route (meta forward at ``W'(0)`` plus the low-rank correction, coefficients from ``(δ_i·δ'_j)(a_i·a'_j)``),
the two thin layers in direct form, autograd only through the weight net, then the real re-weighted step through
``torch.optim.SGD`` exactly as plain training does. Its products are the ones an exact step cannot avoid: five
B×H×H (train forward, train output-gradient backward, meta forward, meta backward, the real step's weight
gradient) against plain's three, plus the B×B×H Gram terms.

``floor_hypergradient`` returns the weight net's hypergradient, so the test suite checks it against the library's
``unrolled`` (``tests/test_benchmarks.py``); the timing then says what any implementation of the exact step pays
on this machine. Measured interleaved with plain training, as ``benchmarks/hypergrad.py`` does::

    python benchmarks/fast_floor.py --width 1024 --reps 7 --out /tmp/fast_floor.json
    python benchmarks/fast_floor.py --quick                    # smoke test: width 64, two repetitions
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypergrad import (BATCH, LR, MOMENTUM, WD, _weighted_real_step, interleave, make_batches,  # noqa: E402
                       make_model, make_runner)
from metareweight import MetaWeightNet  # noqa: E402


def _zero_grad_step(p: torch.Tensor, buf) -> torch.Tensor:
    """``W'(0)``: where SGD (momentum, weight decay, no dampening) moves ``p`` if the new gradient is zero."""
    out = p * (1 - LR * WD)
    return out if buf is None else out.add_(buf, alpha=-LR * MOMENTUM)


def floor_hypergradient(model: nn.Sequential, opt: torch.optim.SGD, objective: MetaWeightNet, batch, meta
                        ) -> Dict[str, object]:
    """The exact one-step hypergradient of the meta loss in the weight net's parameters (left in their ``.grad``),
    plus what the real step needs: ``{"loss", "deltas", "acts"}``. ``model`` is Linear-ReLU-Linear-ReLU-Linear."""
    l1, l2, l3 = model[0], model[2], model[4]
    x, y, xm, ym = batch.inputs, batch.targets, meta.inputs, meta.targets
    B, m = x.shape[0], xm.shape[0]
    bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in model.parameters()]
    with torch.no_grad():
        z1 = torch.addmm(l1.bias, x, l1.weight.t())
        a1 = z1.relu()
        z2 = torch.addmm(l2.bias, a1, l2.weight.t())
        a2 = z2.relu()
        logp = torch.addmm(l3.bias, a2, l3.weight.t()).log_softmax(1)
        loss = -logp.gather(1, y[:, None]).squeeze(1)
        d3 = logp.exp()
        d3[torch.arange(B), y] -= 1                      # ∂ℓ_i/∂z3_i
        d2 = (d3 @ l3.weight).mul_(z2 > 0)
        d1 = (d2 @ l2.weight).mul_(z1 > 0)               # B×H×H no. 2
    w_raw = objective.weight(loss)
    w = w_raw / w_raw.sum()
    with torch.no_grad():
        wc = w.detach()[:, None]
        e1, e2, e3 = d1 * wc, d2 * wc, d3 * wc
        W0 = [_zero_grad_step(p, b) for p, b in zip(model.parameters(), bufs)]
        W1p = W0[0].addmm_(e1.t(), x, alpha=-LR)
        b1p = W0[1].add_(e1.sum(0), alpha=-LR)
        W2p0, b2p = W0[2], W0[3].add_(e2.sum(0), alpha=-LR)
        W3p = W0[4].addmm_(e3.t(), a2, alpha=-LR)
        b3p = W0[5].add_(e3.sum(0), alpha=-LR)
        # meta forward at θ'
        z1m = torch.addmm(b1p, xm, W1p.t())
        a1m = z1m.relu()
        S2 = a1m @ a1.t()                                # m×B: a'_j·a_i
        z2m = torch.addmm(b2p, a1m, W2p0.t()).addmm_(S2, e2, alpha=-LR)   # B×H×H no. 3 + the low-rank correction
        a2m = z2m.relu()
        logpm = torch.addmm(b3p, a2m, W3p.t()).log_softmax(1)
        meta_loss = -logpm.gather(1, ym[:, None]).mean()
        # meta backward: per-row output gradients of the mean meta loss
        d3m = logpm.exp()
        d3m[torch.arange(m), ym] -= 1
        d3m /= m
        d2m = (d3m @ W3p).mul_(z2m > 0)
        G2 = d2m @ d2.t()                                # m×B: δ'_j·δ_i
        d1m = (d2m @ W2p0).addmm_(G2 * wc.t(), a1, alpha=-LR).mul_(z1m > 0)   # B×H×H no. 4 + correction
        # c_i = ∇ℓ_i(θ)ᵀ P ∇L_out(θ'), P = LR
        c = (G2 * S2).sum(0)
        c += ((x @ (d1m.t() @ xm).t()) * d1).sum(1)
        c += ((a2 @ (d3m.t() @ a2m).t()) * d3).sum(1)
        c += d1 @ d1m.sum(0) + d2 @ d2m.sum(0) + d3 @ d3m.sum(0)
        c *= LR
    for p in objective.meta_parameters():
        p.grad = None
    (-(w * c)).sum().backward()                           # dL_out/dφ = −Σ_i c_i ∂w_i/∂φ
    return {"loss": loss, "deltas": (d1, d2, d3), "acts": (x, a1, a2), "meta_loss": float(meta_loss)}


def make_floor_runner(width: int, meta_interval: int = 1):
    """One floor step per call: hypergradient, meta Adam step, then the real re-weighted SGD step; with
    ``meta_interval=k`` only every k-th step is a meta step, the others are plain re-weighted steps (autograd)."""
    arch = f"mlp{width}"
    model = make_model(arch)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    train, meta = make_batches(arch)
    objective = MetaWeightNet(hidden=100)
    meta_opt = objective.make_meta_optimizer()
    it = itertools.count()

    def step():
        k = next(it)
        if k % meta_interval:
            _weighted_real_step(model, opt, objective, train[k % len(train)])
            return
        out = floor_hypergradient(model, opt, objective, train[k % len(train)], meta[k % len(meta)])
        meta_opt.step()
        with torch.no_grad():
            w = objective.weight(out["loss"])
            w = (w / w.sum())[:, None]
            for layer, d, a in zip((model[0], model[2], model[4]), out["deltas"], out["acts"]):
                e = d * w
                layer.weight.grad = e.t() @ a                # no. 5 for the H×H layer
                layer.bias.grad = e.sum(0)
        opt.step()
    return step


def measure(width: int, reps: int, steps: int, warmup: int = 3) -> Dict[str, float]:
    """Per-step wall time of plain, the floor and the library's ``fast`` (each also with ``meta_interval=5``),
    interleaved in blocks of ``steps`` (a multiple of 5 keeps the meta steps' share exact); ratios to plain."""
    torch.set_num_threads(1)
    runners = {"plain": make_runner("plain", f"mlp{width}"), "floor": make_floor_runner(width),
               "fast": make_runner("fast", f"mlp{width}"), "floor_k5": make_floor_runner(width, meta_interval=5),
               "fast_k5": make_runner("fast_k5", f"mlp{width}")}
    names = list(runners)

    def seconds_per_step(run):
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        return (time.perf_counter() - t0) / steps

    rec = interleave(runners, reps, warmup, seconds_per_step)
    out = {f"{n}_ms": 1e3 * statistics.median(rec[n]) for n in names}
    for n in names[1:]:
        out[f"{n}_ratio"] = statistics.median(a / b for a, b in zip(rec[n], rec["plain"]))
    return out


def main(argv=None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="width 64, two repetitions of five steps")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.reps, args.steps = 64, 2, 5
    result = {"width": args.width, "batch": BATCH, **measure(args.width, args.reps, args.steps),
              "command": "python benchmarks/fast_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"H={args.width}: plain {result['plain_ms']:.1f} ms; hand-written exact step {result['floor_ms']:.1f} ms "
          f"({result['floor_ratio']:.2f}x); library fast {result['fast_ms']:.1f} ms ({result['fast_ratio']:.2f}x); "
          f"meta_interval=5: hand-written {result['floor_k5_ratio']:.2f}x, library {result['fast_k5_ratio']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
