"""The Collectives interface on a real 2-process gloo group (tests/test_step.py):

    torchrun --standalone --nproc_per_node 2 collectives_worker.py OUT     # rank 0 writes OUT/collectives.pt
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from metareweight.distributed import resolve


def main(out: Path) -> None:
    ctx = resolve(True)
    r = ctx.rank
    result = {"enabled": ctx.enabled, "world_size": ctx.world_size}
    a, b = torch.tensor([1.0 + r, 2.0]), torch.tensor([10.0 * r], dtype=torch.float64)
    ctx.all_reduce_mean_([a, None, b])
    result["mean"] = (a, b)
    result["min"] = ctx.agree_min(torch.tensor([1.0, 0.0]) if r == 0 else torch.tensor([0.0, 1.0]))
    result["rows"] = ctx.all_gather_rows([torch.full((r + 1, 2), float(r))])
    x = torch.tensor([2.0 + r], requires_grad=True)
    (mean,) = ctx.differentiable_mean([x * x])
    mean.backward()  # the backward all-reduces the cotangents: both ranks' losses reach x_r
    result["diff"] = (mean.detach(), x.grad)
    with ctx.suspended():
        local = torch.tensor([float(r)])
        ctx.all_reduce_mean_([local])
        result["suspended"] = (ctx.local, local, ctx.differentiable_mean([local])[0])
    result["after"] = ctx.local
    gathered = ctx.gather_object(result)
    if r == 0:
        torch.save(gathered, out / "collectives.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    main(Path(sys.argv[1]))
