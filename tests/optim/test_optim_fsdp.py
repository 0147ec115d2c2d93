"""The whole SAM family under FSDP2 (fully_shard, 2 gloo processes, float64, no mixed precision)
against one process on the concatenated batch: the update must agree to rtol 1e-10.

Every trainable parameter of the sharded model is asserted to be a DTensor (a DDP fallback cannot
pass). The model is the toolkit's tiny open_clip ViT (2 blocks), sharded per block and at the root,
with full tuning and with LoRA.
"""
import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.models import build_classifier, tiny_model_config
from ft_focal.optim import CCSAM, ERM, SAM, SSESAM, FocalSAM, ImbSAM
from ft_focal.training.sharding import assert_sharded, full_state_dict, mixed_precision_policy, shard_model

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 2
COUNTS = [100, 30, 8, 3]                 # tail (n < 20): classes 2 and 3
LABELS = (0, 2, 1, 3, 0, 1, 3, 2)         # both halves hold head and tail samples
ONE_SIDED = (0, 2, 1, 3, 0, 1, 0, 1)      # the second rank has no tail sample
FSDP_LORA_TARGETS = ["c_fc", "c_proj"]    # peft's LoRA on nn.MultiheadAttention is refused under FSDP2
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)

# the exact paths on both sides (the one-backward path is tested apart: FSDP2 switches it off)
METHODS = {
    "erm": lambda ps, m: ERM(ps, torch.optim.SGD, model=m, **SGD),
    "sam": lambda ps, m: SAM(ps, torch.optim.SGD, rho=0.05, model=m, **SGD),
    "asam": lambda ps, m: SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, model=m, **SGD),
    "focal_sam": lambda ps, m: FocalSAM(ps, torch.optim.SGD, rho=0.05, gamma=1.5, lam=0.8,
                                        class_counts=COUNTS, model=m, one_backward=False, **SGD),
    "imbsam": lambda ps, m: ImbSAM(ps, torch.optim.SGD, rho=0.05, class_counts=COUNTS, tail_weight=2.0,
                                   model=m, one_backward=False, **SGD),
    "sse_sam": lambda ps, m: SSESAM(ps, torch.optim.SGD, rho_head=0.05, rho_tail=0.1, class_counts=COUNTS,
                                    tail_threshold=20, model=m, one_backward=False, **SGD),
    "ccsam": lambda ps, m: CCSAM(ps, torch.optim.SGD, class_counts=COUNTS, rho=0.05, model=m, **SGD),
}
# name -> (method, tuning, labels, micro-batches per rank)
SCENARIOS = {f"{m}/{t}": (m, t, LABELS, 1) for t in ("full", "lora") for m in METHODS}
SCENARIOS["imbsam/full/tail-on-one-rank"] = ("imbsam", "full", ONE_SIDED, 1)
SCENARIOS["focal_sam/full/accumulate-2"] = ("focal_sam", "full", LABELS, 2)
SCENARIOS["sse_sam/lora/accumulate-2"] = ("sse_sam", "lora", LABELS, 2)


def tiny_model(tuning: str, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_model_config("open_clip"), "head_init": "random"})
    model = build_classifier(cfg, TuningConfig(method=tuning, lora_targets=FSDP_LORA_TARGETS), len(COUNTS))
    return model.to(dtype)


def global_batch(labels, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(len(labels), 3, 32, 32, generator=g).to(dtype), torch.tensor(labels)


def run_steps(opt, model, x, y, micro: int) -> None:
    xs, ys = x.chunk(micro), y.chunk(micro)
    closures = [(lambda a=a, b=b: F.cross_entropy(model(a), b, reduction="none")) for a, b in zip(xs, ys, strict=True)]
    for _ in range(STEPS):
        opt.step(closures=closures, targets=list(ys))


def trainable(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in full_state_dict(model).items() if k in names}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _sharded_run(rank, method, tuning, labels, micro, dtype=torch.float64, mp_policy=None,
                 one_backward=False):
    model = shard_model(tiny_model(tuning, dtype), mp_policy=mp_policy)
    n_dtensor = assert_sharded(model)
    x, y = global_batch(labels, dtype)
    half = len(y) // WORLD
    xr, yr = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    if one_backward:
        opt = FocalSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=1.5, lam=0.8, class_counts=COUNTS,
                       model=model, one_backward=True, **SGD)
    else:
        opt = METHODS[method](model.parameters(), model)
    if method == "sse_sam":
        opt.set_epoch(0, 10)
    run_steps(opt, model, xr, yr, micro)
    grads_sharded = all(p.grad is None or type(p.grad).__name__ == "DTensor" for p in model.parameters())
    return {"weights": trainable(model), "dtensors": n_dtensor, "passes": dict(opt.last_pass_counts),
            "grads_sharded": grads_sharded}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {name: _sharded_run(rank, *spec) for name, spec in SCENARIOS.items()}
        lines = _Lines()
        logging.getLogger("ft_focal.optim").addHandler(lines)
        res["one_backward"] = _sharded_run(rank, "focal_sam", "lora", LABELS, 1, one_backward=True)
        res["one_backward"]["log"] = list(lines.lines)
        res["bf16"] = _sharded_run(rank, "focal_sam", "full", LABELS, 1, dtype=torch.float32,
                                   mp_policy=mixed_precision_policy("bf16"))
        res["fp32"] = _sharded_run(rank, "focal_sam", "full", LABELS, 1, dtype=torch.float32)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def single_process(method, tuning, labels, dtype=torch.float64):
    model = tiny_model(tuning, dtype)
    opt = METHODS[method](model.parameters(), model)
    if method == "sse_sam":
        opt.set_epoch(0, 10)
    x, y = global_batch(labels, dtype)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run_steps(opt, model, x, y, 1)
    return w0, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, opt


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-30) for k in b)


def update_error(w0, sharded, ref) -> float:
    """||u_sharded - u_ref|| / ||u_ref|| with u = w_after - w_before over all trainable tensors."""
    num = sum(float(((sharded[k] - w0[k]).double() - (ref[k] - w0[k]).double()).pow(2).sum()) for k in ref)
    den = sum(float((ref[k] - w0[k]).double().pow(2).sum()) for k in ref)
    return (num / den) ** 0.5


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fsdp2_update_equals_one_process_on_the_global_batch(sharded, name):
    method, tuning, labels, _ = SCENARIOS[name]
    w0, ref, opt = single_process(method, tuning, labels)
    r0, r1 = sharded[0][name], sharded[1][name]
    assert r0["dtensors"] == r1["dtensors"] == len(ref)          # every trainable parameter a DTensor
    assert r0["grads_sharded"] and r1["grads_sharded"]
    assert rel_diff(ref, w0) > 1e-6                               # the steps moved the weights
    assert rel_diff(r0["weights"], ref) < 1e-10
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in ref)
    if name.endswith("accumulate-2"):   # every pass loops over both micro-batches: same pass count
        assert r0["passes"] == opt.last_pass_counts


def test_one_backward_under_fsdp2_says_once_why_it_is_off_and_runs_the_exact_path(sharded):
    r0 = sharded[0]["one_backward"]
    assert r0["dtensors"] > 0
    said = [line for line in r0["log"] if "one_backward switched off" in line]
    assert len(said) == 1 and "FSDP2" in said[0]
    assert r0["passes"] == {"forward": 2, "backward": 3}          # the exact 2F + 3B path
    _, ref, _ = single_process("focal_sam", "lora", LABELS)
    assert rel_diff(r0["weights"], ref) < 1e-10


# bf16 parameters with fp32 reduction against the fp32 run: the update (w_after - w_before over two
# steps) agrees to this relative L2 error (bf16 has an 8-bit mantissa: ~4e-3 per rounding)
BF16_UPDATE_RTOL = 0.05


def test_bf16_mixed_precision_runs_and_its_update_stays_close_to_fp32(sharded):
    w0, ref32, _ = single_process("focal_sam", "full", LABELS, dtype=torch.float32)
    fp32, bf16 = sharded[0]["fp32"]["weights"], sharded[0]["bf16"]["weights"]
    assert sharded[0]["bf16"]["dtensors"] > 0
    assert all(v.dtype == torch.float32 for v in bf16.values())   # sharded master weights stay fp32
    assert update_error(w0, fp32, ref32) < 1e-5
    err = update_error(w0, bf16, ref32)
    assert 0 < err < BF16_UPDATE_RTOL
