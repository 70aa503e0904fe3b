"""Meta-training for tests/test_distributed.py, the same code for one process and for ``torchrun``.

    torchrun --standalone --nproc_per_node 2 ddp_worker.py OUT     # rank 0 writes OUT/result.pt

Each rank loads ``GLOBAL_BATCH // world_size`` samples per step through ``distributed_sampler``, so the ranks'
batches together are the single process's batch.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset
from metareweight.distributed import distributed_sampler, resolve

GLOBAL_BATCH, META_BATCH, N = 16, 8, 64

# every configuration compared between 1 and 2 processes (tests/test_distributed.py parametrizes over these)
CASES = {
    "unrolled": {},
    "lookahead": {"real_step": "lookahead"},
    "accumulate": {"accumulate_steps": 2, "meta_accumulate_steps": 2},
    "fast": {"hypergrad": "fast"},
    "fast_gram": {"hypergrad": "fast", "hypergrad_options": {"gram": "always"}},
    "fast_lookahead": {"hypergrad": "fast", "hypergrad_options": {"gram": "always", "lookahead": True},
                       "real_step": "lookahead"},
    "fast_jvp": {"hypergrad": "fast", "hypergrad_options": {"closed_forms": False}},
}


def run(hypergrad: str = "unrolled", **options) -> dict:
    """Train and return everything worth comparing (on every rank)."""
    torch.manual_seed(0)
    ctx = resolve("auto")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train, meta = TensorIndexedDataset(x, y), TensorIndexedDataset(x[:32] + 0.1, y[:32])
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    objective = MetaWeightNet(hidden=6).double()
    if ctx.rank == 1:  # replicas start apart: the trainer must broadcast rank 0's state, as DDP does
        with torch.no_grad():
            for p in [*model.parameters(), *objective.parameters()]:
                p.add_(1.0)
    trainer = MetaTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
        DataLoader(train, batch_size=GLOBAL_BATCH // ctx.world_size, sampler=distributed_sampler(train, seed=3)),
        objective, meta_optimizer=torch.optim.Adam(objective.parameters(), lr=0.05),
        meta_loader=DataLoader(meta, batch_size=META_BATCH // ctx.world_size, sampler=distributed_sampler(meta, seed=4)),
        hypergrad=hypergrad, grad_clip=0.5, progress=False,
        eval_loader=DataLoader(meta, batch_size=5, sampler=distributed_sampler(meta, shuffle=False)), **options)
    history = trainer.fit(epochs=2)
    latest = trainer.weights_history.latest()
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "objective": {k: v.detach().clone() for k, v in objective.state_dict().items()},
            "weights": torch.as_tensor(latest["weight"]), "index": torch.as_tensor(latest["index"]),
            "history": history, "world_size": ctx.world_size}


def rank_rows(rank: int):
    """Rank ``rank``'s rows for the ``all_gather_rows`` check: unequal row counts (rank 1 has none), three shapes,
    two dtypes, the float64 ones interleaved with the float32 one."""
    n = (3, 0)[rank]
    base = torch.arange(n * 12, dtype=torch.float64).reshape(n, 3, 4) + 100 * rank
    return [base, base[:, 0, :1].float().reshape(n), base.sum((1, 2)).reshape(n, 1) * -1]


def gather_rows_case() -> dict:
    ctx = resolve("auto")
    got, offset = ctx.all_gather_rows(rank_rows(ctx.rank))
    return {"gathered": got, "offset": offset}


def uneven_cases() -> dict:
    """Loaders that would make the ranks step apart: unequal train shards, an empty meta shard on rank 1, and a
    61-sample set on 2 ranks (padded). Returns each case's error (type, message) or warning on this rank."""
    import warnings

    from metareweight.distributed import UnevenShardsError
    ctx = resolve("auto")
    x = torch.randn(40, 5, dtype=torch.float64)
    ds = TensorIndexedDataset(x, (x[:, 0] > 0).long())
    out = {}
    for case in ("unequal_train", "empty_meta"):
        n_train = (24, 16)[ctx.rank] if case == "unequal_train" else 16
        n_meta = (8, 0)[ctx.rank] if case == "empty_meta" else 8
        model = nn.Linear(5, 2).double()
        trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(TensorIndexedDataset(x[:n_train], ds.y[:n_train]), batch_size=8),
                              MetaWeightNet(hidden=4).double(), progress=False,
                              meta_loader=DataLoader(TensorIndexedDataset(x[:n_meta], ds.y[:n_meta]),
                                                     batch_size=4))
        try:
            trainer.fit(epochs=1)
            out[case] = None
        except UnevenShardsError as e:
            out[case] = (type(e).__name__, str(e))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed_sampler(list(range(61)))
    out["padding_warning"] = [str(w.message) for w in caught]
    return out


def resume_with_log_dir(out: Path) -> dict:
    """A 2-epoch run with log_dir and checkpoints, interrupted after epoch 1 and resumed, against the same run
    uninterrupted: rank 0 alone writes the weight stream; every rank reads its window back on resume."""
    ctx = resolve("auto")
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ds = TensorIndexedDataset(x, (x[:, 0] > 0).long())

    def make(root):
        torch.manual_seed(0)
        model = nn.Linear(5, 2).double()
        return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           DataLoader(ds, batch_size=4, sampler=distributed_sampler(ds, seed=1)),
                           MetaWeightNet(hidden=4).double(), progress=False, history="last_epoch",
                           meta_loader=DataLoader(ds, batch_size=4, sampler=distributed_sampler(ds, seed=2)),
                           log_dir=root / "logs", checkpoint_dir=root / "ckpt")

    make(out / "full").fit(epochs=2)
    full = make(out / "full2")
    full.fit(epochs=2)
    make(out / "part").fit(epochs=1)
    resumed = make(out / "part")
    resumed.fit(epochs=2, resume=True)
    same = all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))
    a, b = full.weights_history.arrays(), resumed.weights_history.arrays()
    same_history = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    npz = None
    if ctx.is_main:
        import numpy as np
        with np.load(out / "full" / "logs" / "weights.npz") as f:
            npz = len(f["step"])
    return {"same_parameters": same, "same_history": bool(same_history), "rows": len(resumed.weights_history),
            "npz_rows": npz}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    results = {name: run(**kw) for name, kw in CASES.items()}
    results["all_gather_rows"] = gather_rows_case()
    results["uneven"] = resolve("auto").gather_object(uneven_cases())  # every rank's outcome
    results["resume_with_log_dir"] = resolve("auto").gather_object(resume_with_log_dir(out))
    if dist.get_rank() == 0:
        torch.save(results, out / "result.pt")
    # all ranks leave together: a rank tearing down gloo while its peer is still in flight aborts the peer
    dist.barrier()
    dist.destroy_process_group()
    # Under heavy CPU load torch 2.13's gloo threads occasionally abort the interpreter during finalisation
    # ("terminate called without an active exception", no Python frame), after all work is done and saved; leave
    # without running C++ static destructors so that a teardown race is not reported as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
