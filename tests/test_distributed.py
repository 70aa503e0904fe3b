"""Data parallel: a real 2-process ``torchrun`` (gloo, CPU) gives the parameters of a 1-process run on the same
global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from metareweight.distributed import DistributedContext, distributed_sampler, resolve

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import ddp_worker  # noqa: E402


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(SCRIPTS / "ddp_worker.py"), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return torch.load(out / "result.pt", weights_only=False)


@pytest.mark.parametrize("case,options", list(ddp_worker.CASES.items()), ids=list(ddp_worker.CASES))
def test_two_processes_match_one_process(two_process_results, case, options):
    torch.set_num_threads(1)
    try:
        single = ddp_worker.run(**options)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    multi = two_process_results[case]
    assert single["world_size"] == 1 and multi["world_size"] == 2
    worst = 0.0
    for part in ("model", "objective"):  # float64: only the summation order differs
        for k in single[part]:
            torch.testing.assert_close(multi[part][k], single[part][k], rtol=0, atol=1e-12, msg=f"{case} {part}.{k}")
            worst = max(worst, float((multi[part][k] - single[part][k]).abs().max()))
    print(f"{case}: largest parameter difference, 2 processes vs 1: {worst:.1e}")
    order = torch.argsort(multi["index"])
    assert torch.equal(multi["index"][order], single["index"])  # every rank recorded the whole global batch
    torch.testing.assert_close(multi["weights"][order], single["weights"], rtol=0, atol=1e-6)
    for a, b in zip(single["history"], multi["history"]):
        for key in ("train_loss", "meta_loss", "eval_loss", "eval_accuracy"):  # eval: a sharded loader, summed
            assert abs(a[key] - b[key]) < 1e-10, (case, key, a[key], b[key])


def test_all_gather_rows_stacks_every_ranks_rows_in_rank_order(two_process_results):
    """One collective per dtype: shapes, dtypes and order survive, and a rank without rows contributes none."""
    got = two_process_results["all_gather_rows"]
    expected = [torch.cat(parts) for parts in zip(*(ddp_worker.rank_rows(r) for r in range(2)))]
    assert got["offset"] == 0  # rank 0's view
    for g, e in zip(got["gathered"], expected):
        assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e)


def test_single_process_helpers_are_identities():
    ctx = resolve("auto")
    assert not ctx.enabled and ctx.is_main and ctx.gather_object(5) == [5]
    assert resolve(False) == DistributedContext()
    with pytest.raises(RuntimeError, match="no process group is initialised: launch with torchrun"):
        resolve(True)
    with pytest.raises(ValueError, match="distributed must be 'auto', True or False"):
        resolve("yes")
    sampler = distributed_sampler(list(range(8)), seed=1)
    sampler.set_epoch(2)
    assert sorted(sampler) == list(range(8))
    assert not dist.is_initialized()


def test_ranks_that_would_step_apart_get_the_same_named_error(two_process_results):
    """Unequal train shards and an empty meta shard on one rank: every rank raises the same UnevenShardsError
    before any collective of training (no gloo 'Connection closed by peer', no hang)."""
    per_rank = two_process_results["uneven"]
    assert len(per_rank) == 2
    for case, fragment in (("unequal_train", "rank 0: 3, rank 1: 2"), ("empty_meta", "rank 1's meta loader yields "
                                                                                      "no batches")):
        outcomes = [r[case] for r in per_rank]
        assert outcomes[0] == outcomes[1] and outcomes[0][0] == "UnevenShardsError", outcomes
        assert fragment in outcomes[0][1], outcomes[0][1]
    for r in per_rank:
        assert len(r["padding_warning"]) == 1 and "61 samples do not split evenly over 2 ranks" in \
            r["padding_warning"][0] and "1 sample(s) are repeated" in r["padding_warning"][0]


def test_a_resumed_two_process_run_with_log_dir_equals_the_uninterrupted_one(two_process_results):
    """Rank 0 writes the weight stream, rank 1 only reads it back on resume; both end where the uninterrupted run
    ends, and the stream holds each global row once."""
    for rank, r in enumerate(two_process_results["resume_with_log_dir"]):
        assert r["same_parameters"] and r["same_history"] and r["rows"] == 32, (rank, r)
    assert two_process_results["resume_with_log_dir"][0]["npz_rows"] == 2 * 32  # 2 epochs, each global row once
