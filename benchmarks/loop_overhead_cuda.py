"""`loop_overhead.py --device cuda`: ms per update of the toolkit's loop vs its step alone, on one GPU.

Preset vit-b16 (default): recipes/imagenet_lt/clip_vit_b16_adaptformer_focal_sam.yaml with
data.dataset=synthetic (1000 classes), random init (the FLOPs of the OpenAI weights), bf16, batch
128, `--workers` DataLoader workers (8), as in the README's loop measurement.
  loop ms   = (loop(N) - loop(N/3)) / (N - N/3), loop(n) = train_seconds of an n-update run minus
              the end-of-run validation + checkpoint (loop_overhead.toolkit_run): model build,
              compilation and DataLoader start-up cancel out. `--steps` sets N (default 150).
  in-loop   = the same difference of the time spent inside optimizer.step. With a fused base
              optimizer (optim.fused, the default on CUDA) step() reads nothing on the host and
              returns once its work is queued: in-loop is then the host's queueing time, and
              loop ms is the measure.
  step ms   = the toolkit's optimizer.step alone, on one batch already on the GPU (the loop's own
              objects: Trainer.setup, Accelerate's bf16 autocast), median of timed calls, each
              ended by torch.cuda.synchronize.
  bare ms   = the same update in plain torch under bf16 autocast, no wrapper, no checks: ERM 1F+1B,
              SAM 2F+2B (foreach norm and perturbation), Focal-SAM's official 2F+3B.
Focal-SAM runs with the toolkit's default (optim.one_backward unset: 2F+2B where it applies).
Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader


def _timed(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median seconds of `fn` with the GPU drained before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bare_update(method: str, model: torch.nn.Module, criterion: Any, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, rho: float, coef: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def losses() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return criterion(model(x).float(), y)

    def perturbed_grad(g: list[torch.Tensor], weight: Any) -> list[torch.Tensor]:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        eps = torch._foreach_mul(g, rho / (norm + 1e-12))
        with torch.no_grad():
            torch._foreach_add_(params, eps)
        g_adv = torch.autograd.grad((weight * losses()).mean(), params)
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        return list(g_adv)

    def update() -> None:
        if method == "erm":
            grads = torch.autograd.grad(losses().mean(), params)
        elif method == "sam":
            grads = perturbed_grad(list(torch.autograd.grad(losses().mean(), params)), 1.0)
        else:  # Focal-SAM, official 2F+3B: g1 + g3, eps from g2
            a = coef[y]
            per_sample = losses()
            g1 = torch.autograd.grad(((1.0 - a) * per_sample).mean(), params, retain_graph=True)
            g2 = torch.autograd.grad((a * per_sample).mean(), params)
            grads = torch._foreach_add(g1, perturbed_grad(list(g2), a))
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    return update


def step_times(recipe: Any, bundle: Any, method: str, warmup: int, iters: int) -> tuple[float, float]:
    """(toolkit optimizer.step, bare-torch update) median seconds on one batch on the GPU."""
    from ft_focal.training.parts import build_run

    parts = build_run(recipe, bundle)
    device = parts.accelerator.device
    loader = DataLoader(bundle.train, batch_size=recipe.train.batch_size, collate_fn=bundle.collate_fn)
    images, labels = (t.to(device) for t in next(iter(loader)))
    parts.wrapped.train()
    closure = lambda: parts.loss(parts.wrapped(images).float(), labels)  # noqa: E731 (a one-line closure reads better than a def here)
    toolkit = _timed(lambda: parts.optimizer.step([closure], targets=[labels]), warmup, iters)
    model = parts.model
    params = [p for p in model.parameters() if p.requires_grad]
    o = recipe.optim
    opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    counts = torch.tensor(parts.class_counts, dtype=torch.float32, device=device)
    coef = (o.lam or 0.8) * (1.0 - counts / counts.sum()) ** (o.gamma or 0.5)
    bare = _timed(_bare_update(method, model, parts.loss, opt, images, labels, o.rho or 0.05, coef),
                  warmup, iters)
    parts = model = opt = None  # free the GPU memory (the lambdas above are not called again)
    torch.cuda.empty_cache()
    return toolkit, bare


def run(args: argparse.Namespace, lo: Any) -> int:
    """The CUDA table; `lo` is the loop_overhead module (recipes, toolkit_run)."""
    import logging

    from ft_focal.data import build_datasets
    from ft_focal.models import preprocess_for

    if not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.optimizers.split(",") if m.strip()]
    long = args.steps or 150
    short = max(2, long // 3)
    args.steps = long
    logging.getLogger("ft_focal").setLevel(logging.ERROR)
    wall = time.perf_counter()
    out = tempfile.mkdtemp(prefix="loop_overhead_cuda_")
    try:
        base = lo.make_recipe(args, "focal_sam", long, out, None)
        bundle = build_datasets(base.data, preprocess_for(base.model), base.seed)
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, preset {args.preset}: "
              f"{base.model.name} {args.tuning}, {base.data.image_size} px, batch {base.train.batch_size}, "
              f"{bundle.num_classes} classes, {base.train.mixed_precision}, {args.workers} workers, "
              f"compile {args.compile}; runs of {short} and {long} updates", flush=True)
        lo.toolkit_run(args, methods[0], 3, bundle, None)  # CUDA context, cuBLAS / cuDNN handles, workers
        rows = []
        for method in methods:
            a = lo.toolkit_run(args, method, short, bundle, None)
            b = lo.toolkit_run(args, method, long, bundle, None)
            loop = (b["s"] * long - a["s"] * short) / (long - short)
            in_loop = (b["step"] * long - a["step"] * short) / (long - short)
            step, bare = step_times(lo.make_recipe(args, method, long, out, None), bundle, method, 3, 10)
            rows.append((method, loop, in_loop, step, bare, b["passes"]))
            print(f"{method} done ({time.perf_counter() - wall:.0f} s)", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    head = (f"{'optimizer':<10} {'loop ms/upd':>11} {'in-loop step':>12} {'step ms':>8} {'bare ms':>8} "
            f"{'loop/step':>9} {'loop/bare':>9} {'img/s':>7}  passes")
    print("\nms per update (loop: difference of two run lengths; step / bare: median, one batch on the GPU)\n"
          + head + "\n" + "-" * len(head))
    for method, loop, in_loop, step, bare, passes in rows:
        print(f"{method:<10} {1000 * loop:>11.1f} {1000 * in_loop:>12.1f} {1000 * step:>8.1f} {1000 * bare:>8.1f} "
              f"{loop / step:>9.2f} {loop / bare:>9.2f} {base.train.batch_size / loop:>7.0f}  {passes}")
    print(f"\nWall time {time.perf_counter() - wall:.0f} s.")
    return 0
