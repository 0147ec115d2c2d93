"""Per-step cost of the sharpness-aware optimizers on small CLIP vision towers (CPU, float32).

    python benchmarks/step_cost.py [--quick] [--batch 32] [--repeats 15]

Models (random init from a small config, no download):
  lora        transformers CLIPVisionModel + peft LoRA (q_proj k_proj v_proj out_proj fc1 fc2, r=8)
              + linear head
  adaptformer the same tower frozen, an AdaptFormer adapter in every block
              (mlp(x) + s * up(relu(down(x))), fixed s=1, bottleneck 32) + linear head
  full        full fine-tuning of the tower + head (LayerNorm, conv and embedding parameters:
              single_backward falls back to the exact 3-backward path)
Optimizers: ERM, SAM, ImbSAM, Focal-SAM (official 3-backward step), Focal-SAM single_backward,
ImbSAM single_backward. Time: median over interleaved repeats (each optimizer drives its own copy
of the model) of the wall time and of the process CPU time (less sensitive to other processes on a
shared machine); GFLOP: matmul FLOPs of one step (torch.utils.flop_counter, forward + backward +
the single-backward hook matmuls; elementwise work is not counted) - load-independent. Memory: peak of the memory allocated during one step on top of what was allocated
before it (torch.profiler memory timeline), i.e. activations, gradients and optimizer buffers.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ft_focal.optim import ERM, SAM, FocalSAM, ImbSAM  # noqa: E402

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]   # CIFAR-10-LT, IF 100
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def tower(hidden=256, layers=4, image=64, patch=8):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), image_size=image, patch_size=patch)
    return CLIPVisionModel(cfg)


class Classifier(nn.Module):
    def __init__(self, vision, hidden, classes=len(COUNTS)):
        super().__init__()
        self.vision, self.head = vision, nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.vision(pixel_values=x).pooler_output)


class AdaptMLP(nn.Module):
    """AdaptFormer (parallel adapter on the MLP input, i.e. after the block's LayerNorm)."""

    def __init__(self, mlp, hidden, bottleneck=32, scale=1.0):
        super().__init__()
        self.mlp, self.scale = mlp, scale
        self.down, self.up = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.mlp(x) + self.scale * self.up(F.relu(self.down(x)))


def build(kind, hidden, layers, image, patch):
    torch.manual_seed(0)
    vision = tower(hidden, layers, image, patch)
    if kind == "lora":
        import peft
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        vision = peft.get_peft_model(vision, cfg)
    elif kind == "adaptformer":
        for p in vision.parameters():
            p.requires_grad_(False)
        for layer in vision.encoder.layers:
            layer.mlp = AdaptMLP(layer.mlp, hidden)
    model = Classifier(vision, hidden)
    model.train()
    return model


OPTIMIZERS = {
    "ERM": lambda ps, m: ERM(ps, torch.optim.SGD, **SGD),
    "SAM": lambda ps, m: SAM(ps, torch.optim.SGD, rho=0.05, **SGD),
    "ImbSAM": lambda ps, m: ImbSAM(ps, torch.optim.SGD, rho=0.05, class_counts=COUNTS, tail_threshold=100,
                                   model=m, **SGD),
    "Focal-SAM": lambda ps, m: FocalSAM(ps, torch.optim.SGD, rho=0.05, gamma=1.5, lam=0.7,
                                        class_counts=COUNTS, model=m, **SGD),
    "Focal-SAM 1-bwd": lambda ps, m: FocalSAM(ps, torch.optim.SGD, rho=0.05, gamma=1.5, lam=0.7,
                                              class_counts=COUNTS, model=m, single_backward=True, **SGD),
    "ImbSAM 1-bwd": lambda ps, m: ImbSAM(ps, torch.optim.SGD, rho=0.05, class_counts=COUNTS,
                                         tail_threshold=100, model=m, single_backward=True, **SGD),
}


def peak_step_memory(fn):
    """Peak bytes allocated during fn() above the level before it, from the exact allocation /
    free timeline of torch.profiler's memory profile (private API: NaN if unavailable)."""
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch.profiler._memory_profiler import Action
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        timeline = prof._memory_profile().timeline
    except Exception as e:   # noqa: BLE001 - a benchmark keeps going without the memory column
        print(f"(memory profile unavailable: {e})")
        return float("nan")
    run = peak = 0
    for _, action, _, size in sorted(timeline, key=lambda e: e[0]):
        run += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, run)
    return peak


def bench(kind, args):
    base = build(kind, args.hidden, args.layers, args.image, args.patch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, len(COUNTS), (args.batch,), generator=g)
    runs = {}
    for name, make in OPTIMIZERS.items():
        m = copy.deepcopy(base)
        ps = [p for p in m.parameters() if p.requires_grad]
        opt = make(ps, m)
        closure = (lambda m=m: F.cross_entropy(m(x), y, reduction="none"))
        runs[name] = (m, opt, closure)
    n_train = sum(p.numel() for p in base.parameters() if p.requires_grad)
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.warmup):
        for name, (m, opt, cl) in runs.items():
            opt.step(cl, targets=y)
    for _ in range(args.repeats):   # interleaved: every optimizer once per round
        for name, (m, opt, cl) in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            opt.step(cl, targets=y)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    rows = []
    for name, (m, opt, cl) in runs.items():
        with FlopCounterMode(display=False) as fc:
            opt.step(cl, targets=y)
        flops = fc.get_total_flops()
        mem = peak_step_memory(lambda: opt.step(cl, targets=y)) if not args.no_memory else float("nan")
        pc = opt.last_pass_counts
        rows.append((name, statistics.median(times[name]), statistics.median(cpu[name]), flops, mem,
                     f"{pc['forward']}F+{pc['backward']}B",
                     opt._sb_disabled or ("" if not opt.single_backward or opt._sb_active else "fallback")))
    return n_train, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch, few repeats (a smoke run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--models", default="lora,adaptformer,full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.warmup = 16, 3, 1
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, CLIP vision tower "
          f"hidden {args.hidden} x {args.layers} layers, image {args.image}, patch {args.patch}; "
          f"median of {args.repeats} interleaved steps")
    for kind in args.models.split(","):
        n_train, rows = bench(kind, args)
        sam = next(r for r in rows if r[0] == "SAM")
        print(f"\n{kind} ({n_train:,} trainable parameters)")
        print(f"| {'optimizer':<16}| passes | GFLOP | x SAM | wall ms | x SAM | CPU ms | x SAM | peak MiB | x SAM "
              "| note")
        print(f"|{'-' * 17}|--------|-------|-------|---------|-------|--------|-------|----------|-------|-----")
        for name, t, c, fl, mem, passes, note in rows:
            print(f"| {name:<16}| {passes:<6} | {fl / 1e9:5.2f} | {fl / sam[3]:5.3f} | {1e3 * t:7.1f} | "
                  f"{t / sam[1]:5.2f} | {1e3 * c:6.0f} | {c / sam[2]:5.2f} | {mem / 2 ** 20:8.1f} | "
                  f"{mem / sam[4]:5.2f} | {note}")


if __name__ == "__main__":
    main()
