"""Per-rank memory of the SAM family under DDP and FSDP2: measured at N = 2 on the CPU, projected for
CLIP ViT-B/16, L/14, H/14 and bigG/14 at N = 1, 2, 4, 8 with full tuning and LoRA.

    python benchmarks/memory_fsdp.py                 # ~1-2 min: measure (2 gloo processes) + project
    python benchmarks/memory_fsdp.py --project-only  # the projection table only (seconds)

Measured (Focal-SAM, SGD with momentum, float32, one step, batch 8 per rank; an open_clip ViT of
width 256, 4 blocks, 64 px images, patch 8, 1000 classes): bytes of what each rank HOLDS, read
from the tensors themselves - parameters, gradients and base-optimizer state from each tensor's
local shard under FSDP2 (``DTensor.to_local()``) and from the whole tensor under DDP; the
SAM-family buffers are the backup of the perturbed weights (``st.backup``) and the split gradient
held across the perturbed pass (Focal-SAM's g1), recorded inside the optimizer's step;
activations are the bytes autograd saves in one forward (saved-tensor hooks, parameters
excluded), with and without ``train.activation_checkpointing``.

Projected: parameters counted on the meta device (bigG does not fit this machine's memory), the
measured per-parameter copies (fp32 weights, gradient, momentum, SAM backup, split gradient:
5 copies of the trainable part) divided by N under FSDP2, plus the gathered blocks FSDP2 holds at
once (two: the current and the prefetched one, bf16 weights + fp32 gradients); activations per
sample in bf16 with fused (SDPA) attention: 34 s h bytes per block (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", eq. 1 without the attention-score term),
and 2 s h per block + one block's 34 s h under activation checkpointing. A GPU "fits" a batch when
the total stays under 90 % of its memory (CUDA context, allocator fragmentation).
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from pathlib import Path

import torch

GIB = 1024 ** 3
GPUS_GB = (24, 40, 80, 141)
MODELS = ("ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14")
NUM_CLASSES = 1000
LORA_RANK = 8
BATCH = 8
RESULTS = Path(__file__).parent / "results"
MEASURE_CFG = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 4,
                                               "head_width": 64, "mlp_ratio": 4.0}}


# --------------------------------------------------------------------------- measured at N = 2
def _model(tuning: str):
    from ft_focal.config import ModelConfig, TuningConfig
    from ft_focal.models import build_classifier

    torch.manual_seed(0)
    cfg = ModelConfig(family="open_clip", name="bench", pretrained=None, config=MEASURE_CFG, head_init="random")
    return build_classifier(cfg, TuningConfig(method=tuning, lora_targets=["c_fc", "c_proj"]), NUM_CLASSES)


def _local_bytes(t) -> int:
    if t is None:
        return 0
    t = t.to_local() if type(t).__name__ == "DTensor" else t
    return t.numel() * t.element_size()


def _instrument(record: dict):
    """Record the SAM backup and the held split gradient inside the optimizer's step."""
    from ft_focal.optim import _numerics, _step

    restore, split = _numerics.restore_, _step.Passes.split

    def restore_(params, backup):
        record["backup"] = max(record.get("backup", 0), sum(_local_bytes(b) for b in backup.values()))
        return restore(params, backup)

    def _split_pass(self, *args, **kwargs):
        out = split(self, *args, **kwargs)
        record["split"] = sum(_local_bytes(g) for g in out[0])
        return out

    _numerics.restore_ = _step.nm.restore_ = restore_
    _step.Passes.split = _split_pass


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ft_focal.optim import FocalSAM
    from ft_focal.training.sharding import assert_sharded, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = {}
    try:
        for tuning in ("full", "lora"):
            for mode in ("ddp", "fsdp2"):
                model = _model(tuning)
                if mode == "fsdp2":
                    wrapped = shard_model(model)
                    assert_sharded(model)
                    no_sync = None
                else:
                    wrapped = DDP(model)
                    no_sync = wrapped.no_sync
                record = {}
                _instrument(record)
                params = [p for p in model.parameters() if p.requires_grad]
                opt = FocalSAM(params, torch.optim.SGD, lr=0.01, momentum=0.9, class_counts=[10] * NUM_CLASSES,
                               model=wrapped, no_sync=no_sync, one_backward=False)
                g = torch.Generator().manual_seed(rank)
                x = torch.randn(BATCH, 3, 64, 64, generator=g)
                y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
                opt.step(lambda wrapped=wrapped, x=x, y=y: F.cross_entropy(wrapped(x), y, reduction="none"), targets=y)
                state = [t for s in opt.base_optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
                rows[(tuning, mode)] = {
                    "params": sum(_local_bytes(p) for p in model.parameters()),
                    "trainable": sum(_local_bytes(p) for p in params),
                    "grads": sum(_local_bytes(p.grad) for p in params),
                    "optimizer": sum(_local_bytes(t) for t in state),
                    "backup": record.get("backup", 0), "split": record.get("split", 0)}
        torch.save(rows, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def activation_bytes(checkpointing: bool) -> int:
    """Bytes autograd saves in one forward of the measured model at BATCH (parameters excluded)."""
    from ft_focal.training.sharding import checkpoint_blocks

    model = _model("full")
    if checkpointing:
        checkpoint_blocks(model)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(BATCH, 3, 64, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def measure() -> tuple[dict, dict]:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        rows = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    acts = {"off": activation_bytes(False), "on": activation_bytes(True)}
    return rows[0], acts


# --------------------------------------------------------------------------- projection
def count_params(name: str) -> dict:
    """Vision-tower parameters of an open_clip model on the meta device, the largest block's,
    LoRA r=8 on attn / c_fc / c_proj (the recipes' targets) and the cosine head."""
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    blocks = list(visual.transformer.resblocks)
    lora = 0
    for block in blocks:
        d = block.attn.embed_dim
        lora += LORA_RANK * (d + 3 * d) + LORA_RANK * (2 * d)   # in_proj, out_proj
        lora += sum(LORA_RANK * (m.in_features + m.out_features) for m in (block.mlp.c_fc, block.mlp.c_proj))
    head = NUM_CLASSES * visual.output_dim
    vc = cfg["vision_cfg"]
    return {"total": sum(p.numel() for p in visual.parameters()) + head, "head": head, "lora": lora + head,
            "block": max(sum(p.numel() for p in b.parameters()) for b in blocks), "layers": len(blocks),
            "width": vc["width"], "tokens": (vc["image_size"] // vc["patch_size"]) ** 2 + 1}


def per_rank_static(p: dict, tuning: str, n: int, fsdp: bool) -> float:
    """Bytes per rank without activations (fp32 weights and the five copies of the trainable part)."""
    trainable = p["total"] if tuning == "full" else p["lora"]
    frozen = p["total"] - trainable
    copies = 4 * (trainable * 5 + frozen)     # weights + grad + momentum + SAM backup + split gradient
    if not fsdp:
        return copies
    return copies / n + 2 * p["block"] * (2 + 4)   # two gathered blocks: bf16 weights, fp32 gradients


def per_sample_activations(p: dict, checkpointing: bool) -> float:
    sh = p["tokens"] * p["width"]
    return (2 * sh * p["layers"] + 34 * sh) if checkpointing else 34 * sh * p["layers"]


def max_batch(static: float, act: float, gb: int) -> int:
    free = 0.9 * gb * 1e9 - static
    return max(int(free // act), 0)


def projection() -> list[str]:
    lines = ["| model | params | tuning | N | DDP GiB/rank | FSDP2 GiB/rank | " +
             " | ".join(f"{g} GB: DDP / FSDP2 / FSDP2+AC" for g in GPUS_GB) + " |",
             "|" + "---|" * (6 + len(GPUS_GB))]
    for name in MODELS:
        p = count_params(name)
        for tuning in ("full", "lora"):
            for n in (1, 2, 4, 8):
                ddp, fsdp = per_rank_static(p, tuning, n, False), per_rank_static(p, tuning, n, True)
                a0, a1 = per_sample_activations(p, False), per_sample_activations(p, True)
                fits = [f"{max_batch(ddp, a0, g)} / {max_batch(fsdp, a0, g)} / {max_batch(fsdp, a1, g)}"
                        for g in GPUS_GB]
                lines.append(f"| {name} | {p['total'] / 1e6:.0f}M | {tuning} | {n} | {ddp / GIB:.1f} | "
                             f"{fsdp / GIB:.1f} | " + " | ".join(fits) + " |")
    return lines


def measured_table(rows: dict, acts: dict) -> list[str]:
    keys = ("params", "grads", "optimizer", "backup", "split")
    lines = ["| tuning | mode | " + " | ".join(f"{k} KiB" for k in keys) + " | total KiB |", "|---|---|" +
             "---|" * (len(keys) + 1)]
    for (tuning, mode), r in rows.items():
        lines.append(f"| {tuning} | {mode} | " + " | ".join(f"{r[k] / 1024:.0f}" for k in keys) +
                     f" | {sum(r[k] for k in keys) / 1024:.0f} |")
    lines.append("")
    lines.append(f"Activations saved by one forward at batch {BATCH} per rank (fp32, same under DDP and FSDP2): "
                 f"{acts['off'] / 1024:.0f} KiB without, {acts['on'] / 1024:.0f} KiB with activation checkpointing.")
    vc = MEASURE_CFG["vision_cfg"]
    sh = ((vc["image_size"] // vc["patch_size"]) ** 2 + 1) * vc["width"]
    per = acts["off"] / (BATCH * vc["layers"] * sh) / 2   # fp32 here: / 2 for the bf16 constant
    lines.append(f"Calibration of the projection's 34 s h bytes per block and sample (bf16): measured {per:.1f} s h "
                 "(fp32 bytes / 2, unfused attention included).")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project-only", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / f"memory_fsdp_{datetime.date.today()}.md"))
    args = ap.parse_args(argv)
    text = ["# Per-rank memory under DDP and FSDP2 (benchmarks/memory_fsdp.py)", ""]
    if not args.project_only:
        rows, acts = measure()
        text += ["## Measured, N = 2 processes on the CPU (Focal-SAM, SGD momentum, rank 0)", ""]
        text += measured_table(rows, acts) + [""]
    text += ["## Projected per rank (fp32 master weights, bf16 activations, Focal-SAM + SGD momentum)", "",
             "Largest batch PER GPU that fits in 90 % of the card (0 = the model does not fit at all).", ""]
    text += projection()
    body = "\n".join(text) + "\n"
    print(body)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
