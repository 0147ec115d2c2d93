"""Overhead of the toolkit's training loop against a bare PyTorch loop doing the same math.

What is measured: --steps updates of the digits-LT demo recipe (recipes/demo/digits_lt_focal_sam.yaml:
tiny open_clip ViT, batch 32, LA loss, SGD + cosine LR) per optimizer (ERM, SAM, Focal-SAM), by two
loops on the SAME dataset objects (one `build_datasets` bundle), interleaved (toolkit, bare, ...)
--repeats times after a 2-step warm-up of each:
  * toolkit: `ft_focal.training.trainer.train(recipe, bundle)`: Accelerate, ResumableBatchSampler + SeededDataset
    (per-item RNG fork / reseed), the ft_focal.optim wrapper (non-finite checks, pass counts), LambdaLR,
    tqdm, logging. Time = metrics["train_seconds"] (the update loop; the final val/test evaluation,
    final/ and metrics.json come after it) MINUS what the loop does at its last update besides
    training: the end-of-run validation + best_model.safetensors (epoch end at step == total_steps)
    and one checkpoint (`save_due` is true at step == total_steps); those calls are wrapped, timed and
    subtracted ("excl s"). optim.one_backward=false, so Focal-SAM is the official 2F+3B step in both
    loops; "default" = the toolkit with its default (one_backward on: 2F+2B where every trainable
    layer allows it, plus one checking backward on the first step; else 2F+3B; "passes" shows which).
  * bare: DataLoader(shuffle=True, drop_last=True, num_workers=0) over bundle.train (same transforms,
    no reseeding), same model + seed, same loss, torch.optim.SGD, LambdaLR cosine, the update rule
    written out with .backward() (no checks, no wrapper).
Per-step time = loop time / steps (wall clock); "CPU ratio" uses process CPU time (less sensitive to
other jobs). Breakdown: toolkit time inside optimizer.step (forward + backward + update + checks) vs
the rest of its loop (data incl. SeededDataset, sampler, scheduler, bookkeeping); bare: update math
(+ scheduler) vs data loading.

How to run:
    python benchmarks/loop_overhead.py              # ~2-4 min on a 2-core CPU
    python benchmarks/loop_overhead.py --quick      # ~30 s smoke run
    python benchmarks/loop_overhead.py --tuning lora --optimizers focal_sam --threads 2
    python benchmarks/loop_overhead.py --device cuda   # ViT-B/16 AdaptFormer, synthetic, bf16: see
                                                       # benchmarks/loop_overhead_cuda.py

How to read the ratio: median toolkit ms/step / median bare ms/step; 1.00 = no overhead, 1.10 = the
loop adds 10 % per update. Per-repeat ratios show the noise: trust the spread, not the 2nd decimal.
The overhead is per step and per sample, not per FLOP, so with this tiny model (a few ms of math per
step) it is close to an upper bound; a real CLIP ViT makes the ratio smaller.
Not a test: nothing about timings is asserted.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import argparse  # noqa: E402 (after the environment it reads is set)
import contextlib  # noqa: E402 (after the environment it reads is set)
import gc  # noqa: E402 (after the environment it reads is set)
import logging  # noqa: E402 (after the environment it reads is set)
import shutil  # noqa: E402 (after the environment it reads is set)
import statistics  # noqa: E402 (after the environment it reads is set)
import sys  # noqa: E402 (after the environment it reads is set)
import tempfile  # noqa: E402 (after the environment it reads is set)
import time  # noqa: E402 (after the environment it reads is set)
import types  # noqa: E402 (after the environment it reads is set)
from pathlib import Path  # noqa: E402 (after the environment it reads is set)
from typing import Any, Callable, Iterator, Optional  # noqa: E402 (after the environment it reads is set)

import torch  # noqa: E402 (after the environment it reads is set)
from torch.utils.data import DataLoader  # noqa: E402 (after the environment it reads is set)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ft_focal.evaluation.evaluate as evaluate_mod  # noqa: E402 (after the sys.path entry it needs)
import ft_focal.training.builders as builders_mod  # noqa: E402 (after the sys.path entry it needs)
import ft_focal.training.checkpoint as ckpt_mod  # noqa: E402 (after the sys.path entry it needs)
import ft_focal.training.parts as parts_mod  # noqa: E402 (after the sys.path entry it needs)
import ft_focal.training.state as state_mod  # noqa: E402 (after the sys.path entry it needs)
import ft_focal.training.trainer as train_mod  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.config import Recipe, load_recipe  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.data import build_datasets  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.models import build_classifier, preprocess_for  # noqa: E402 (after the sys.path entry it needs)

sys.path.insert(0, str(ROOT / "benchmarks"))
import loop_overhead_cuda  # noqa: E402 (after the sys.path entry it needs)

RECIPE = ROOT / "recipes" / "demo" / "digits_lt_focal_sam.yaml"
VIT_RECIPE = ROOT / "recipes" / "imagenet_lt" / "clip_vit_b16_adaptformer_focal_sam.yaml"
PRESETS = {
    # the demo as it is (CPU default)
    "demo": {"recipe": RECIPE, "overrides": lambda args: []},
    # the GPU loop measurement's setup: ViT-B/16 AdaptFormer at 224 px, batch 128, bf16, 1000 synthetic classes
    # (random init: the FLOPs of the OpenAI weights), DataLoader workers as in the recipe
    "vit-b16": {"recipe": VIT_RECIPE, "overrides": lambda args: [
        "data.dataset=synthetic", "data.synthetic_num_classes=1000", "model.pretrained=null",
        "model.head_init=random", "train.mixed_precision=bf16", "data.synthetic_eval_size=256",
        f"data.synthetic_train_size={128 * (args.steps or 150)}", f"data.num_workers={args.workers}",
        f"train.compile={str(args.compile).lower()}"]},
}
METHODS = ("erm", "sam", "focal_sam")
UNUSED_KEYS = {"erm": ("rho", "gamma", "lam"), "sam": ("gamma", "lam"), "focal_sam": ()}  # must be null


def make_recipe(args: argparse.Namespace, method: str, steps: int, out: str,
                one_backward: Optional[bool] = False) -> Recipe:
    overrides = [f"optim.name={method}", f"tuning.method={args.tuning}", f"train.max_steps={steps}",
                 f"output_dir={out}", f"train.threads={args.threads}",  # else train() resets threads
                 "train.eval_every_epochs=1000000",  # no validation inside the timed loop ...
                 "train.save_every_steps=1000000000"]  # ... nor checkpoints (but the last one, see above)
    overrides += [f"optim.{key}=null" for key in UNUSED_KEYS[method]]
    if method == "focal_sam" and one_backward is not None:
        overrides.append(f"optim.one_backward={str(one_backward).lower()}")
    return load_recipe(PRESETS[args.preset]["recipe"], overrides + PRESETS[args.preset]["overrides"](args))


def clocks() -> tuple[float, float]:  # wall, process CPU
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def instrumented() -> Iterator[dict]:
    """Wrap (not replace) toolkit functions by module attribute for one `train` call; restored on exit."""
    probe = {"step": 0.0, "excl": 0.0, "excl_cpu": 0.0, "cpu_open": None, "cpu_close": None}
    saved = [(parts_mod, "build_optimizer_from"), (train_mod, "TrainLog"), (state_mod, "save_best"),
             (ckpt_mod, "save_checkpoint"), (evaluate_mod, "evaluate_split")]  # evaluate: imported by the Trainer
    real = {name: getattr(mod, name) for mod, name in saved}

    def timed(fn: Callable, is_step: bool) -> Callable:
        def wrapper(*a: Any, **kw: Any) -> Any:
            wall, cpu = clocks()
            try:
                return fn(*a, **kw)
            finally:
                wall2, cpu2 = clocks()
                if is_step:
                    probe["step"] += wall2 - wall
                elif probe["cpu_close"] is None:  # the final val/test evaluation is not in train_seconds
                    probe["excl"] += wall2 - wall
                    probe["excl_cpu"] += cpu2 - cpu
        return wrapper

    def optimizer_from(*a: Any, **kw: Any) -> Any:
        opt = real["build_optimizer_from"](*a, **kw)
        step = timed(opt.step, True)
        # A bound method: LambdaLR (built next) re-wraps opt.step and needs its __func__ / __self__.
        opt.step = types.MethodType(lambda _self, *a, **kw: step(*a, **kw), opt)
        return opt

    class TrainLog(real["TrainLog"]):  # opened when train_seconds' clock starts, closed when it stops
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            probe["cpu_open"] = time.process_time()

        def close(self) -> None:
            probe["cpu_close"] = time.process_time()
            super().close()

    wrappers = {"build_optimizer_from": optimizer_from, "TrainLog": TrainLog,
                "save_best": timed(real["save_best"], False), "save_checkpoint": timed(real["save_checkpoint"], False),
                "evaluate_split": timed(real["evaluate_split"], False)}
    try:
        for mod, name in saved:
            setattr(mod, name, wrappers[name])
        yield probe
    finally:
        for mod, name in saved:
            setattr(mod, name, real[name])


def toolkit_run(args: argparse.Namespace, method: str, steps: int, bundle: Any,
                one_backward: Optional[bool] = False) -> dict:
    out = tempfile.mkdtemp(prefix="loop_overhead_")  # fresh: a leftover checkpoint would make train() resume
    try:
        recipe = make_recipe(args, method, steps, out, one_backward)
        gc.collect()
        with instrumented() as probe:
            metrics = train_mod.train(recipe, bundle=bundle)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if metrics["updates"] != steps:
        raise RuntimeError(f"toolkit ran {metrics['updates']} updates, expected {steps}")
    loop = metrics["train_seconds"] - probe["excl"]  # train_seconds: time.time(), rounded to 10 ms
    cpu = probe["cpu_close"] - probe["cpu_open"] - probe["excl_cpu"]
    f, b = metrics["pass_counts"]["forward"] / steps, metrics["pass_counts"]["backward"] / steps
    return {"s": loop / steps, "cpu": cpu / steps, "step": probe["step"] / steps,
            "rest": (loop - probe["step"]) / steps, "excl": probe["excl"], "passes": f"{f:.3g}F+{b:.3g}B"}


def bare_run(recipe: Recipe, bundle: Any, method: str, steps: int) -> dict:
    """The same math in plain torch: model, loss, SGD, cosine LambdaLR, the update rule."""
    from accelerate.utils import set_seed

    cfg, ocfg = recipe.train, recipe.optim
    set_seed(recipe.seed)  # as train.py before preprocess_for + build_classifier: same initial weights
    preprocess_for(recipe.model)
    model = build_classifier(recipe.model, recipe.tuning, bundle.num_classes, bundle.classnames)
    criterion = builders_mod.build_loss_from(recipe, list(bundle.class_counts))  # per-sample losses
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=ocfg.lr, momentum=ocfg.momentum, weight_decay=ocfg.weight_decay,
                          nesterov=ocfg.nesterov)
    # the loop's own schedule function: the LR multipliers must be the same for "the same math"
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, builders_mod.lr_lambda(cfg.scheduler, cfg.warmup_steps, steps))
    counts = torch.tensor(list(bundle.class_counts), dtype=torch.float32)
    coef = ocfg.lam * (1.0 - counts / counts.sum()) ** ocfg.gamma  # a_c; a_j = coef[y_j]

    def grad(loss: torch.Tensor, retain: bool = False) -> list[torch.Tensor]:
        loss.backward(retain_graph=retain)
        out = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return out

    def grad_at_perturbed(g: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in g]))  # global over all params
        eps = [ocfg.rho * x / (norm + 1e-12) for x in g]
        with torch.no_grad():
            torch._foreach_add_(params, eps)  # w + eps
        g_adv = grad(loss_fn())
        with torch.no_grad():
            torch._foreach_sub_(params, eps)  # back to w
        return g_adv

    loader = DataLoader(bundle.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=0,
                        collate_fn=bundle.collate_fn, generator=torch.Generator().manual_seed(recipe.seed))
    model.train()
    done, data_s = 0, 0.0
    gc.collect()
    wall, cpu = clocks()
    while done < steps:
        t0 = time.perf_counter()
        batches = iter(loader)  # a new epoch (the toolkit builds a DataLoader per epoch)
        data_s += time.perf_counter() - t0
        while done < steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            data_s += time.perf_counter() - t0
            if batch is None:
                break
            x, y = batch
            if method == "erm":
                g = grad(criterion(model(x).float(), y).mean())
            elif method == "sam":
                g = grad(criterion(model(x).float(), y).mean())
                g = grad_at_perturbed(g, lambda x=x, y=y: criterion(model(x).float(), y).mean())
            else:  # focal_sam, official 2F+3B (ft_focal/optim/focal_sam.py): g1 + g3, eps from g2
                a = coef[y]
                losses = criterion(model(x).float(), y)
                g1 = grad(((1.0 - a) * losses).mean(), retain=True)
                g2 = grad((a * losses).mean())
                g3 = grad_at_perturbed(g2, lambda a=a, x=x, y=y: (a * criterion(model(x).float(), y)).mean())
                g = [u + v for u, v in zip(g1, g3, strict=True)]
            for p, gi in zip(params, g, strict=True):
                p.grad = gi
            opt.step()
            scheduler.step()
            done += 1
    wall2, cpu2 = clocks()
    total = wall2 - wall
    return {"s": total / steps, "cpu": (cpu2 - cpu) / steps, "math": (total - data_s) / steps, "data": data_s / steps}


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_tables(results: dict[str, dict[str, list[dict]]]) -> None:
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731 (a one-line closure reads better than a def here)
    head = (f"{'optimizer':<10} {'toolkit ms':>10} {'bare ms':>8} {'ratio':>6}  {'per-repeat ratios':<20}"
            f"{'CPU ratio':>9} {'excl s':>7}  {'passes':<7} {'default ms (passes)':>20}")
    print("\nPer-step time, median over repeats; ratio = toolkit / bare\n" + head + "\n" + "-" * len(head))
    for method, r in results.items():
        tk, bare, dflt = r["toolkit"], r["bare"], r["default"]
        per = " ".join(f"{t['s'] / b['s']:.2f}" for t, b in zip(tk, bare, strict=True))
        default = f"{ms(med(dflt, 's'))} ({dflt[-1]['passes']})" if dflt else "-"
        print(f"{method:<10} {ms(med(tk, 's')):>10} {ms(med(bare, 's')):>8} {med(tk, 's') / med(bare, 's'):>6.2f}  "
              f"{per:<20}{med(tk, 'cpu') / med(bare, 'cpu'):>9.2f} {med(tk, 'excl'):>7.2f}  {tk[-1]['passes']:<7} "
              f"{default:>20}")
    head = (f"{'optimizer':<10} {'toolkit opt.step':>16} {'toolkit rest':>12} {'bare math':>10} {'bare data':>10} "
            f"{'step - math':>12} {'rest - data':>12}")
    print("\nBreakdown, ms/step (medians): toolkit = optimizer.step + rest of loop; bare = math + data\n"
          + head + "\n" + "-" * len(head))
    for method, r in results.items():
        step, rest = med(r["toolkit"], "step"), med(r["toolkit"], "rest")
        math_, data = med(r["bare"], "math"), med(r["bare"], "data")
        print(f"{method:<10} {ms(step):>16} {ms(rest):>12} {ms(math_):>10} {ms(data):>10} {ms(step - math_):>12} "
              f"{ms(rest - data):>12}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="updates per run (default 136, --quick 34)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--optimizers", default="erm,sam,focal_sam", help="comma-separated subset of erm,sam,focal_sam")
    parser.add_argument("--tuning", default="full", choices=("full", "lora", "adaptformer"))
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 34 steps, 1 repeat")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: loop ms/update (difference of two run lengths) vs the step alone (default cpu)")
    parser.add_argument("--preset", default=None, choices=tuple(PRESETS),
                        help="recipe: demo (CPU default) or vit-b16 (CUDA default: the ViT-B/16 AdaptFormer recipe, "
                             "synthetic data, bf16)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (vit-b16 preset)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (vit-b16 preset)")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("vit-b16" if args.device == "cuda" else "demo")
    if args.device == "cuda":
        if args.tuning == "full" and args.preset == "vit-b16":
            args.tuning = "adaptformer"  # the preset's recipe
        return loop_overhead_cuda.run(args, sys.modules[__name__])
    # Whole epochs by default (17 updates of 32 out of 544 images): both loops build as many DataLoaders.
    steps = args.steps or (34 if args.quick else 136)
    repeats = args.repeats or (1 if args.quick else 3)
    methods = [m.strip() for m in args.optimizers.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--optimizers: choose from {', '.join(METHODS)}")
    logging.getLogger("ft_focal").setLevel(logging.ERROR)  # e.g. one_backward fallbacks: see "passes"
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    base = make_recipe(args, "focal_sam", steps, tempfile.gettempdir())  # model, data, rho/gamma/lam for bare
    bundle = build_datasets(base.data, preprocess_for(base.model), base.seed)  # shared by both loops
    model, vision = build_classifier(base.model, base.tuning, bundle.num_classes, bundle.classnames), \
        (base.model.config or {}).get("vision_cfg", {})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, float32")
    print(f"model: {base.model.family} {base.model.name} ({vision.get('layers')} blocks, width {vision.get('width')}, "
          f"{vision.get('image_size')} px, patch {vision.get('patch_size')}), {base.model.head} head, "
          f"tuning {args.tuning}: {model.describe()}")
    print(f"data: digits-LT, {len(bundle.train)} train images, batch {base.train.batch_size} "
          f"({len(bundle.train) // base.train.batch_size} updates/epoch); {steps} steps per run, {repeats} "
          f"repeat(s); lr {base.optim.lr}, rho {base.optim.rho}, gamma {base.optim.gamma}, lam {base.optim.lam}")
    del model
    for method in methods:  # warm-up: imports, Accelerate state, allocator, first-call paths
        toolkit_run(args, method, 2, bundle)
        bare_run(base, bundle, method, 2)
    results = {m: {"toolkit": [], "bare": [], "default": []} for m in methods}
    for rep in range(repeats):
        for method in methods:
            results[method]["toolkit"].append(toolkit_run(args, method, steps, bundle))
            results[method]["bare"].append(bare_run(base, bundle, method, steps))
            if method == "focal_sam":  # the toolkit's own default (optim.one_backward unset)
                results[method]["default"].append(toolkit_run(args, method, steps, bundle, None))
        print(f"repeat {rep + 1}/{repeats} done ({time.perf_counter() - wall:.0f} s)", flush=True)
    print_tables(results)
    print("\nexcl s: seconds per toolkit run subtracted from train_seconds (validation + best model + "
          f"checkpoint at step == total_steps).\nWall time {time.perf_counter() - wall:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
