"""Two CPU processes (gloo, DDP) against one process on the concatenated batch."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_reference import RefSGD, axpy, batch, max_diff, mlp, ref_focal, scal, weights  # noqa: E402 (after the sys.path entry it needs)

from ft_focal.optim import CCSAM, ERM, SAM, FocalSAM, ImbSAM  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.optim._numerics import global_norm  # noqa: E402 (after the sys.path entry it needs)

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
COUNTS = [100, 30, 8, 3]
LABELS = (0, 0, 2, 1, 1, 3, 0, 3, 0, 1, 2, 0)   # both halves hold tail samples
FOCAL = dict(rho=0.1, gamma=1.5, lam=0.8, class_counts=COUNTS)

SCENARIOS = {   # name -> (optimizer factory(params, model, no_sync), uses no_sync)
    "focal_sync": lambda ps, m, ns: FocalSAM(ps, torch.optim.SGD, **FOCAL, model=m, no_sync=ns, one_backward=False,
                                             **SGD),
    "focal_sb_sync": lambda ps, m, ns: FocalSAM(ps, torch.optim.SGD, **FOCAL, model=m, no_sync=ns,
                                                one_backward=True, **SGD),
    "sam_ddp": lambda ps, m, ns: SAM(ps, torch.optim.SGD, rho=0.1, model=m, **SGD),
    "imbsam_sb_ddp": lambda ps, m, ns: ImbSAM(ps, torch.optim.SGD, rho=0.1, class_counts=COUNTS, model=m,
                                              one_backward=True, tail_weight=2.0, **SGD),
    "ccsam_sync": lambda ps, m, ns: CCSAM(ps, torch.optim.SGD, class_counts=COUNTS, rho=0.02, model=m,
                                          no_sync=ns, **SGD),
    "focal_local": lambda ps, m, ns: FocalSAM(ps, torch.optim.SGD, **FOCAL, model=m, no_sync=ns,
                                              sync_perturbation=False, one_backward=False, **SGD),
}
USES_NO_SYNC = {"focal_sync", "focal_sb_sync", "ccsam_sync", "focal_local"}
STEPS = 2


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = batch(labels=LABELS)
        n = len(y) // world
        xr, yr = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        res = {}
        for name, make in SCENARIOS.items():
            model = mlp(0)
            ddp = DDP(model)
            ns = ddp.no_sync if name in USES_NO_SYNC else None
            opt = make(ddp.parameters(), ddp, ns)
            for _ in range(STEPS):
                opt.step(lambda ddp=ddp: F.cross_entropy(ddp(xr), yr, reduction="none"), targets=yr)
            res[name] = weights(model)
        # a non-finite loss on rank 1 only: under no_sync the final gradient is averaged after each
        # rank checked its own, so only the all-reduced flag makes rank 0 skip the step too
        model = mlp(0)
        ddp = DDP(model)
        start = weights(model)
        opt = ERM(ddp.parameters(), torch.optim.SGD, model=ddp, no_sync=ddp.no_sync, **SGD)
        bad = xr.clone()
        if rank == 1:
            bad[0, 0] = float("nan")
        opt.step(lambda: F.cross_entropy(ddp(bad), yr, reduction="none"), targets=yr)
        res["one_rank_nonfinite"] = (opt.skipped_steps, max_diff(model, start))
        # sharded global norm: sqrt(all_reduce(sum of local squares))
        res["sharded_norm"] = float(global_norm([torch.full((3,), rank + 1.0, dtype=torch.float64)],
                                                torch.device("cpu"), sharded_world=world))
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "focal_local"])
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_results, name):
    x, y = batch(labels=LABELS)
    model = mlp(0)
    opt = SCENARIOS[name](model.parameters(), model, None)
    for _ in range(STEPS):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), targets=y)
    r0, r1 = two_process_results
    assert max_diff(model, r0[name]) < 1e-10
    assert max(float((r0[name][k] - r1[name][k]).abs().max()) for k in r0[name]) == 0.0


def test_local_perturbation_m_sharpness(two_process_results):
    """sync_perturbation=False: each process perturbs with its own gradient; the update averages."""
    x, y = batch(labels=LABELS)
    model = mlp(0)
    w, sgd = weights(model), RefSGD(**SGD)
    for _ in range(STEPS):
        halves = [ref_focal(model, w, xs, ys, 0.1, 1.5, 0.8, COUNTS) for xs, ys in ((x[:6], y[:6]), (x[6:], y[6:]))]
        w = sgd.step(w, scal(axpy(*halves), 0.5))
    r0, _ = two_process_results
    assert max(float((r0["focal_local"][k] - w[k]).abs().max()) for k in w) < 1e-10
    # and it differs from the synchronised perturbation
    assert max(float((r0["focal_local"][k] - r0["focal_sync"][k]).abs().max()) for k in w) > 1e-8


def test_sharded_norm(two_process_results):
    assert two_process_results[0]["sharded_norm"] == pytest.approx((3 * (1 + 4)) ** 0.5, abs=1e-12)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(two_process_results):
    assert [r["one_rank_nonfinite"] for r in two_process_results] == [(1, 0.0), (1, 0.0)]
