"""Per-step cost of the sharpness-aware optimizers on the toolkit's own CLIP models (CPU).

    python benchmarks/step_cost.py                      # ~15 min: four models, 20 rounds each
    python benchmarks/step_cost.py --quick              # ~1 min smoke run
    python benchmarks/step_cost.py --models lora,adaptformer --rounds 60 --optimizers SAM,"Focal-SAM 1-bwd"
    python benchmarks/step_cost.py --device cuda --preset vit-b16 --compile   # GPU: step_cost_gpu.py

Models: `ft_focal.models.build_classifier` with a random-init CLIP vision tower (width 256, 4 blocks,
64 px images, patch 8: 65 tokens; no download), the toolkit's cosine head, default tuning settings:
  lora              transformers CLIPVisionModel + peft LoRA r=8 on q/k/v/out_proj and fc1/fc2
  adaptformer       open_clip ViT, AdaptFormer (bottleneck 32, learnable scale) in every block
  open_clip_lora    open_clip ViT + LoRA on attn (in_proj, out_proj), c_fc, c_proj (the recipes' LoRA)
  full              open_clip ViT, every parameter trained (LayerNorm, patch conv, embeddings: the
                    one-backward path falls back to the exact three-backward step)
Optimizers: ERM, SAM, ImbSAM and Focal-SAM with the official step (2F + 3B), and Focal-SAM / ImbSAM
with `one_backward=True` (2F + 2B). All drive the SAME model object on the same batch (each
with its own optimizer state; the weights keep moving, by small steps): separate copies of a model
differ in memory placement, which alone shifted step times by a few per cent here.

How it is timed. The machine is shared and its speed wanders by +-10 % from one step to the next,
so a ratio of two medians taken minutes apart says little. Every round runs one step of every
optimizer, in a fresh random order; the ratio to SAM is taken WITHIN the round (steps seconds
apart), and the table gives the median of those paired ratios with a 95 % bootstrap interval,
beside the median wall time. CPU time of the process is shown too. GFLOP: matmul FLOPs of one step
(torch.utils.flop_counter, forward + backward + the hook matmuls; elementwise work not counted) -
load-independent. Memory is allocated as in training: `ft_focal.training.malloc.keep_freed_memory()` (the
training loop applies it on the CPU) keeps freed buffers in the process; with glibc's defaults
(`--default-malloc`) every step page-faults its activation buffers in again, tens of thousands of
faults per step, a different number per optimizer. Peak MiB: the peak of memory allocated during one step above the level before
it (torch.profiler memory timeline): activations, gradients, optimizer buffers.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402 (after the environment it reads is set)
import torch.nn.functional as F  # noqa: E402 (after the environment it reads is set)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402 (after the environment it reads is set)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ft_focal.config import ModelConfig, TuningConfig  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.models import build_classifier  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.optim import ERM, SAM, FocalSAM, ImbSAM  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.training.builders import compile_model  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.training.malloc import keep_freed_memory  # noqa: E402 (after the sys.path entry it needs)

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]   # CIFAR-10-LT, imbalance factor 100
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)

MODELS = {   # name -> (family, tuning method, tuning kwargs)
    "lora": ("hf_clip", "lora", {}),
    "adaptformer": ("open_clip", "adaptformer", {"adapter_bottleneck": 32}),
    "open_clip_lora": ("open_clip", "lora", {}),
    "full": ("open_clip", "full", {}),
}

OPTIMIZERS = {
    "ERM": lambda ps, m: ERM(ps, torch.optim.SGD, **SGD),
    "SAM": lambda ps, m: SAM(ps, torch.optim.SGD, rho=0.05, **SGD),
    "ImbSAM": lambda ps, m: ImbSAM(ps, torch.optim.SGD, rho=0.05, class_counts=COUNTS, tail_threshold=100,
                                   model=m, one_backward=False, **SGD),
    "Focal-SAM": lambda ps, m: FocalSAM(ps, torch.optim.SGD, rho=0.05, gamma=1.5, lam=0.7,
                                        class_counts=COUNTS, model=m, one_backward=False, **SGD),
    "Focal-SAM 1-bwd": lambda ps, m: FocalSAM(ps, torch.optim.SGD, rho=0.05, gamma=1.5, lam=0.7,
                                              class_counts=COUNTS, model=m, one_backward=True, **SGD),
    "ImbSAM 1-bwd": lambda ps, m: ImbSAM(ps, torch.optim.SGD, rho=0.05, class_counts=COUNTS,
                                         tail_threshold=100, model=m, one_backward=True, **SGD),
}


def model_config(family: str, width: int, layers: int, image: int, patch: int) -> ModelConfig:
    heads = max(1, width // 64)
    if family == "hf_clip":
        config = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                  "num_attention_heads": heads, "image_size": image, "patch_size": patch}
    else:
        config = {"embed_dim": width,
                  "vision_cfg": {"image_size": image, "patch_size": patch, "width": width, "layers": layers,
                                 "head_width": 64, "mlp_ratio": 4.0},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    return ModelConfig(family=family, name=f"bench-{family}-{width}x{layers}", config=config, head="cosine",
                       head_init="random")


def build(kind: str, args: argparse.Namespace) -> torch.nn.Module:
    family, method, tuning = MODELS[kind]
    torch.manual_seed(0)
    model = build_classifier(model_config(family, args.width, args.layers, args.image, args.patch),
                             TuningConfig(method=method, **tuning), len(COUNTS), load_weights=False)
    with torch.no_grad():   # adapters away from their zero init, as after some training
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or ".up." in name):
                p.normal_(0, 0.02)
    return model.train()


def peak_step_memory(fn) -> float:
    """Peak bytes allocated during fn() above the level before it, from the allocation / free
    timeline of torch.profiler's memory profile (private API: NaN if unavailable)."""
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


def median_ci(values: list, rng: random.Random, resamples: int = 2000) -> tuple:
    """Median and a 95 % percentile-bootstrap interval of the median."""
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def bench(kind: str, names: list, args: argparse.Namespace) -> tuple:
    base = build(kind, args)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, len(COUNTS), (args.batch,), generator=g)
    params = [p for p in base.parameters() if p.requires_grad]
    optimizers = {name: OPTIMIZERS[name](params, base) for name in names}
    # Compiled AFTER the optimizers exist: a one-backward optimizer swaps the covered layers'
    # classes when it is built, and the compiled graphs must see those (as the Trainer does).
    forward = compile_model(base) if args.compile else base
    runs = {name: (opt, lambda: F.cross_entropy(forward(x), y, reduction="none"))
            for name, opt in optimizers.items()}
    n_train = sum(p.numel() for p in base.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    for _ in range(args.warmup):   # the first one-backward step is also checked against the exact path
        for opt, closure in runs.values():
            opt.step(closure, targets=y)
    if args.compile:
        print(f"{kind}: warm-up with compile (inductor, all optimizers) {time.perf_counter() - t0:.0f} s")
    wall = {n: [] for n in runs}
    cpu = {n: [] for n in runs}
    order = random.Random(0)
    for _ in range(args.rounds):
        names_now = list(runs)
        order.shuffle(names_now)   # no optimizer always runs right after another
        for name in names_now:
            opt, closure = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            opt.step(closure, targets=y)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    rows = []
    ref = "SAM" if "SAM" in runs else names[0]
    boot = random.Random(1)
    for name, (opt, closure) in runs.items():
        with FlopCounterMode(display=False) as fc:
            opt.step(closure, targets=y)
        flops = fc.get_total_flops()
        mem = float("nan") if args.no_memory else peak_step_memory(lambda opt=opt, closure=closure: opt.step(closure, targets=y))
        pc = opt.last_pass_counts
        sb = getattr(opt, "one_backward", None)
        note = (sb.disabled or ("fallback" if pc["backward"] > 2 else "")) if sb is not None else ""
        paired = [a / b for a, b in zip(wall[name], wall[ref], strict=True)]
        rows.append(dict(name=name, passes=f"{pc['forward']}F+{pc['backward']}B", flops=flops, mem=mem,
                         wall=statistics.median(wall[name]), cpu=statistics.median(cpu[name]),
                         ratio=median_ci(paired, boot),
                         cpu_ratio=statistics.median(a / b for a, b in zip(cpu[name], cpu[ref], strict=True)), note=note))
    return n_train, ref, rows


def print_table(kind: str, n_train: int, ref: str, rows: list) -> None:
    base = next(r for r in rows if r["name"] == ref)
    print(f"\n{kind} ({n_train:,} trainable parameters); ratios are to {ref}")
    print(f"| {'optimizer':<16}| passes | GFLOP | x {ref:<4}| wall ms | x {ref}, paired (95% CI) | CPU ms | x {ref} "
          f"| peak MiB | x {ref} | note")
    print(f"|{'-' * 17}|--------|-------|-------|---------|{'-' * (23 + len(ref))}|--------|-------|----------|-------|-----")
    for r in rows:
        med, lo, hi = r["ratio"]
        print(f"| {r['name']:<16}| {r['passes']:<6} | {r['flops'] / 1e9:5.2f} | {r['flops'] / base['flops']:5.3f} | "
              f"{1e3 * r['wall']:7.1f} | {med:5.3f} ({lo:5.3f} - {hi:5.3f}){' ' * (len(ref) + 2)}| "
              f"{1e3 * r['cpu']:6.0f} | {r['cpu_ratio']:5.3f} | {r['mem'] / 2 ** 20:8.1f} | "
              f"{r['mem'] / base['mem']:5.2f} | {r['note']}")


def main(argv: list | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--device" in argv:   # the GPU benchmark (ViT-B/16 preset, eager and compiled): step_cost_gpu.py
        i = argv.index("--device")
        if argv[i + 1] != "cpu":
            import step_cost_gpu
            return step_cost_gpu.main(argv[:i] + argv[i + 2:])
        argv = argv[:i] + argv[i + 2:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch, few rounds (a smoke run)")
    ap.add_argument("--models", default="lora,adaptformer,open_clip_lora,full", help=", ".join(MODELS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=", ".join(OPTIMIZERS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of every optimizer each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: least disturbed by other work on a shared 2-core machine)")
    ap.add_argument("--no-memory", action="store_true", help="skip the (slow) memory profile")
    ap.add_argument("--compile", action="store_true",
                    help="compile the model once with inductor (train.compile's setup) for every optimizer")
    ap.add_argument("--default-malloc", action="store_true",
                    help="glibc's default malloc settings instead of the training loop's (ft_focal.training.malloc)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.warmup = 8, 3, 1
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS] + [k for k in args.models.split(",") if k not in MODELS]
    if unknown:
        ap.error(f"unknown optimizer / model: {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    kept = False if args.default_malloc else keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # FlopCounterMode tracks modules through global hooks, which a compiled module warns about.
    warnings.filterwarnings("ignore", message="Using `torch.compile\\(module\\)` when there are global hooks")
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, CLIP vision tower width "
          f"{args.width} x {args.layers} blocks, image {args.image}, patch {args.patch}, cosine head, "
          f"{'compiled (inductor)' if args.compile else 'eager'}; "
          f"{args.rounds} rounds (one step of every optimizer per round, random order); freed memory "
          f"{'kept in the process' if kept else 'returned to the kernel (glibc defaults)'}")
    for kind in args.models.split(","):
        print_table(kind, *bench(kind, names, args))


if __name__ == "__main__":
    main()
