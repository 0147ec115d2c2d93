"""Step cost and peak memory of Focal-SAM under DDP and FSDP2, side by side in one run.

    python benchmarks/fsdp_step.py                      # every GPU of the machine (nccl), CLIP ViT-B/16
    python benchmarks/fsdp_step.py --processes 1        # one GPU: FSDP2 shards nothing (overhead only)
    python benchmarks/fsdp_step.py --smoke              # the same code path on the CPU (gloo, 2 processes,
                                                        # a tiny ViT): what tests/test_benchmarks.py runs

Per mode (DDP, FSDP2 with one ``fully_shard`` per transformer block and the root, as ``train.fsdp``
applies it) and tuning (full, LoRA on the MLP: FSDP2 cannot shard peft's LoRA on
``nn.MultiheadAttention``): Focal-SAM on the exact path (FSDP2 turns the one-backward path off, so DDP
runs the exact path too), SGD with momentum, fp32 weights, bf16 autocast on the GPU, random-init
weights, ``--batch`` images per process. Time: the median over ``--rounds`` steps after 2 warm-up
steps (GPU: ``torch.cuda.synchronize`` around each step); memory: ``torch.cuda.max_memory_allocated``
of rank 0 over those steps (CPU: not measured). With one process FSDP2 holds every shard itself,
so the row measures FSDP2's overhead, not its saving: the table says so.

On a GPU machine with a 10-minute limit per command, run it as its own command after
``benchmarks/gpu_check.sh`` (whose parts use most of those 10 minutes):
``timeout 200 python benchmarks/fsdp_step.py --out $OUT/fsdp_step_gpu.md`` (about 2 minutes).
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUM_CLASSES = 1000
TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                        "head_width": 32, "mlp_ratio": 4.0}}


def _model(smoke: bool, tuning: str) -> torch.nn.Module:
    import open_clip

    from ft_focal.config import ModelConfig, TuningConfig
    from ft_focal.models import build_classifier

    torch.manual_seed(0)
    config = TINY if smoke else open_clip.get_model_config("ViT-B-16")
    cfg = ModelConfig(family="open_clip", name="bench", pretrained=None, config=config, head_init="random")
    return build_classifier(cfg, TuningConfig(method=tuning, lora_targets=["c_fc", "c_proj"]), NUM_CLASSES)


def _time_steps(opt, closure, y, rounds: int, cuda: bool) -> list:
    times = []
    for i in range(rounds + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step(closure, targets=y)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:   # warm-up: allocator, NCCL communicators, FSDP2's lazy init
            times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ft_focal.optim import FocalSAM
    from ft_focal.training.sharding import assert_sharded, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    rows = []
    try:
        for tuning in args.tunings.split(","):
            for mode in ("ddp", "fsdp2"):
                model = _model(args.smoke, tuning).to(device)
                if mode == "fsdp2":
                    wrapped, no_sync = shard_model(model), None
                    assert_sharded(model)   # a DDP fallback must not pass for FSDP2
                else:
                    wrapped = DDP(model, device_ids=[rank] if cuda else None)
                    no_sync = wrapped.no_sync
                params = [p for p in model.parameters() if p.requires_grad]
                opt = FocalSAM(params, torch.optim.SGD, lr=1e-3, momentum=0.9, class_counts=[10] * NUM_CLASSES,
                               model=wrapped, no_sync=no_sync, one_backward=False)
                size = TINY["vision_cfg"]["image_size"] if args.smoke else 224
                g = torch.Generator().manual_seed(rank)
                x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
                y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)

                def closure(wrapped=wrapped, x=x, y=y):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        logits = wrapped(x)
                    return F.cross_entropy(logits.float(), y, reduction="none")

                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                times = _time_steps(opt, closure, y, args.rounds, cuda)
                peak = torch.cuda.max_memory_allocated() if cuda else None
                rows.append({"tuning": tuning, "mode": mode, "ms": 1000 * statistics.median(times), "peak": peak,
                             "passes": opt.describe_last_passes()})
                del opt, wrapped, model
        torch.save(rows, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure(args: argparse.Namespace) -> list:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.processes, port, args, out), nprocs=args.processes, join=True)
        return torch.load(os.path.join(out, "rank0.pt"), weights_only=True)


def table(rows: list, args: argparse.Namespace) -> str:
    device = "CPU (gloo), tiny ViT" if args.smoke else f"{torch.cuda.get_device_name(0)} (nccl), CLIP ViT-B/16"
    lines = [f"# Focal-SAM step, DDP vs FSDP2: {args.processes} process(es) on {device}, batch {args.batch} "
             f"per process, median of {args.rounds} steps, {datetime.date.today().isoformat()}", ""]
    if args.processes == 1:
        lines += ["One process: FSDP2 holds every shard itself, so this measures its overhead, not its saving.", ""]
    lines += ["| tuning | mode | step ms | vs DDP | peak MiB (rank 0) | passes |", "|---|---|---|---|---|---|"]
    ddp = {r["tuning"]: r for r in rows if r["mode"] == "ddp"}
    for r in rows:
        base = ddp[r["tuning"]]
        peak = "-" if r["peak"] is None else f"{r['peak'] / 2 ** 20:.0f}"
        lines.append(f"| {r['tuning']} | {r['mode']} | {r['ms']:.1f} | {r['ms'] / base['ms']:.2f}x | {peak} | "
                     f"{r['passes'].split(' (')[0]} |")
    return "\n".join(lines) + "\n"


def main(argv: list | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 processes, a tiny ViT (the test's run)")
    ap.add_argument("--processes", type=int, default=None, help="default: every GPU (2 with --smoke)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tunings", default="full,lora")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("fsdp_step.py: no CUDA device; use --smoke for the CPU code path")
    if args.processes is None:
        args.processes = 2 if args.smoke else torch.cuda.device_count()
    text = table(measure(args), args)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
