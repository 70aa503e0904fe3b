"""A/B of ``fast``'s coupled path (BatchNorm in train mode) in one process: step time as a multiple of plain's.

Variants, each a ``MetaStep`` on its own copy of ``hypergrad.py``'s ResNet with BatchNorm (same batches):

- ``fast``: as the code stands (the real step replayed from the kept train graph, the JVP's Linear/Conv primals taken
  from the train pass);
- ``fast_no_primals``: ``Fast(reuse_primals=False)``, the JVP recomputes every primal;
- ``fast_session8``: neither (the fresh real step and a full JVP, what session 8 measured at 4.12×).

Interleaved repetitions in rotating order after 2 warm-up steps each; medians of per-repetition ratios to plain
(process CPU time), so that the machine's load moves every variant alike. Every variant's model lives in this one
process (as in ``hypergrad.py``), which raises the allocator's page faults above a one-model process: compare the
variants with each other, not with ``hypergrad.py``'s ratios. ``--malloc keep`` keeps freed memory in the process.

    python benchmarks/fast_coupled_ab.py --reps 9 --out /tmp/ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import hypergrad as hb  # noqa: E402

VARIANTS = ("plain", "fast", "fast_no_primals", "fast_session8")


def runner(variant: str, arch: str):
    run = hb.make_runner("plain" if variant == "plain" else "fast", arch)
    if variant in ("fast_no_primals", "fast_session8"):
        stepper = next(c.cell_contents for c in run.__closure__ if type(c.cell_contents).__name__ == "MetaStep")
        stepper.method.reuse_primals = False
        if variant == "fast_session8":
            stepper.method._replays_graph = lambda *args, **kwargs: False  # no graph kept: the fresh real step
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet_bn")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed block")
    ap.add_argument("--malloc", choices=["default", "keep"], default="default")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.malloc == "keep" and not hb.keep_freed_memory():
        raise SystemExit("--malloc keep needs glibc")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)  # the BatchNorm announcement

    def measure(run):
        start = time.process_time()
        for _ in range(args.steps):
            run()
        return (time.process_time() - start) / args.steps

    rec = hb.interleave({v: runner(v, args.arch) for v in VARIANTS}, args.reps, 2, measure)
    out = {"command": " ".join(sys.argv), "arch": args.arch, "malloc": args.malloc,
           "plain_ms": 1e3 * statistics.median(rec["plain"]),
           "ratio_cpu": {v: statistics.median(a / b for a, b in zip(rec[v], rec["plain"])) for v in VARIANTS}}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
