"""`ft-focal sharpness MODEL_DIR`: loss-landscape curvature of each shot group (or class).

For each group G (many / medium / few from the TRAINING counts, or `--classes`), on G's own
mean training loss L_G with respect to the trainable parameters (PEFT or full): the top-k
Hessian eigenvalues (power iteration with Hessian-vector products through double backward),
the Hutchinson trace estimate (Rademacher vectors, with its standard error) and the SAM-style
first-order sharpness L_G(w + rho g/||g||) - L_G(w). Training images are read with the TEST
transform (no augmentation), in a fixed order, `--batches` batches streamed from disk each pass,
so the numbers are deterministic given `--seed` and memory stays bounded.

Runs with the recipe's `train.threads` CPU threads (as training does; `train.threads=1` overrides).
Each loss evaluation is one pass over the batches (forward + double backward); the passes are
counted and a progress line with the time left is logged about every 10 s (an upper bound: the
power iteration may converge early). A `--classes` id outside the model's classes is an error.

Writes OUT/sharpness.json and OUT/sharpness.png (+ OUT/trace_vs_count.png with --per-class);
OUT defaults to RUN_DIR/sharpness when MODEL_DIR is a run's final/, so the run report links it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import list_flag, run_guarded
from ft_focal.files import write_json

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0   # seconds between progress lines


class PassProgress:
    """Counts passes over the data (calls of the stream) against an upper bound `total`; logs
    "pass N of at most T (P%), M:SS elapsed, about M:SS left" at most every PROGRESS_EVERY_S."""

    def __init__(self, total: int) -> None:
        self.total, self.done = max(int(total), 1), 0
        self.start = self.last = time.monotonic()

    def tick(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and self.done != 1:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / max(self.done - 1, 1) * max(self.total - self.done + 1, 0) if self.done > 1 else None
        logger.info("sharpness: pass %d of at most %d (%d%%), %s elapsed, %s", self.done, self.total,
                    min(100, 100 * self.done // self.total), _clock(elapsed),
                    "estimating time left" if left is None else f"about {_clock(left)} left")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def planned_passes(groups: dict[str, set[int]], k: int, iters: int, trace_samples: int, per_class: bool,
                   per_class_samples: int = 10) -> int:
    """The most passes `group_sharpness` makes (ft_focal/sharpness/groups.py): per group one to
    count its samples, k * iters for the eigenvalues, trace_samples for the trace, 2 for the SAM
    sharpness, and per class (with per_class) one count + per_class_samples."""
    per_group = 1 + k * iters + trace_samples + 2
    return sum(per_group + (len(c) * (1 + per_class_samples) if per_class else 0) for c in groups.values())


def measure(model_dir: str, groups: Optional[list[str]] = None, classes: Optional[list[int]] = None,
            batches: int = 4, batch_size: int = 64, k: int = 1, iters: int = 30, trace_samples: int = 30,
            rho: float = 0.05, seed: int = 0, per_class: bool = False, overrides: Optional[list[str]] = None) -> dict:
    """The sharpness of each group of a saved model on (a fixed part of) its training split."""
    from ft_focal.artifacts.saved import load_model_dir
    from ft_focal.data.build import build_datasets
    from ft_focal.errors import UserError
    from ft_focal.sharpness import group_sharpness, shot_group_classes
    from ft_focal.training.builders import build_loss_from

    saved = load_model_dir(model_dir, overrides)
    recipe = saved.recipe
    num_classes = len(saved.class_counts)
    outside = [c for c in (classes or []) if not 0 <= int(c) < num_classes]
    if outside:
        raise UserError(f"--classes: {outside[0]} is not a class of this model (it has {num_classes} classes, "
                        f"ids 0..{num_classes - 1})")
    bundle = build_datasets(recipe.data, saved.preprocess, recipe.seed)
    train_eval = bundle.eval_dataset("train") if hasattr(bundle, "eval_dataset") else None
    if train_eval is None:
        raise UserError(f"{model_dir}: the recipe's training split cannot be read")
    count = min(len(train_eval), batches * batch_size)
    # A seeded subset spread over all classes (the split may be sorted by class).
    order = torch.randperm(len(train_eval), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    subset = Subset(train_eval, sorted(order))

    def stream():
        progress.tick()
        return iter(DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0))

    if classes:
        wanted = {f"class_{c}": {int(c)} for c in classes}
    else:
        wanted = shot_group_classes(saved.class_counts, recipe.eval.many_threshold, recipe.eval.few_threshold)
        if groups:
            unknown = [g for g in groups if g not in ("many", "medium", "few")]
            if unknown:
                raise UserError(f"--groups: unknown group(s) {unknown}; use many, medium, few")
            wanted = {g: wanted[g] for g in groups if g in wanted}
    params = [p for p in saved.model.parameters() if p.requires_grad]
    criterion = build_loss_from(recipe, saved.class_counts)
    # Hessian-vector products need double backward, which the fused attention kernels lack.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    progress = PassProgress(planned_passes(wanted, k, iters, trace_samples, per_class))
    logger.info("sharpness: %d group(s), at most %d passes over %d training images", len(wanted), progress.total,
                count)
    threads_before = torch.get_num_threads()
    if recipe.train.threads:   # as in training: the default (all cores) oversubscribes small models
        torch.set_num_threads(recipe.train.threads)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            result = group_sharpness(saved.model, params, stream, criterion, wanted, k=k, iters=iters,
                                     trace_samples=trace_samples, rho=rho, seed=seed, per_class_trace=per_class)
    finally:
        torch.set_num_threads(threads_before)
    logger.info("sharpness: %d passes in %s", progress.done, _clock(time.monotonic() - progress.start))
    return {
        "model_dir": str(model_dir), "recipe": recipe.name, "loss": recipe.loss.name,
        "samples": count, "batch_size": batch_size, "seed": seed, "rho": rho, "iters": iters,
        "trace_samples": trace_samples, "trainable_parameters": sum(p.numel() for p in params),
        "class_counts": saved.class_counts, "groups": result,
    }


def main(argv: Optional[list[str]] = None) -> int:
    def run() -> int:
        from ft_focal.evaluation import plots

        parser = CommandParser(prog="ft-focal sharpness", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("model_dir", help="a run's final/ folder or an export")
        parser.add_argument("--groups", nargs="+", help="subset of many,medium,few ('a,b' or 'a b')")
        parser.add_argument("--classes", nargs="+", help="class ids instead of shot groups ('1,3,5' or '1 3 5')")
        parser.add_argument("--batches", type=int, default=4, help="training batches per loss evaluation")
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--k", type=int, default=1, help="number of top eigenvalues")
        parser.add_argument("--iters", type=int, default=30, help="power-iteration steps")
        parser.add_argument("--trace-samples", type=int, default=30, help="Hutchinson vectors")
        parser.add_argument("--rho", type=float, default=0.05)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--per-class", action="store_true", help="also the trace of every class")
        parser.add_argument("--out", help="output folder")
        args = parser.parse_command(argv)
        result = measure(
            args.model_dir, list_flag(args.groups, str, "--groups") or None,
            list_flag(args.classes, int, "--classes") or None,
            args.batches, args.batch_size, args.k, args.iters, args.trace_samples, args.rho, args.seed,
            args.per_class, args.overrides)
        model_dir = Path(args.model_dir)
        default = model_dir.parent / "sharpness" if model_dir.name == "final" else model_dir / "sharpness"
        out = Path(args.out) if args.out else default
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "sharpness.json", result)
        plots.plot_sharpness(result["groups"], out / "sharpness.png")
        per_class = {c: v for g in result["groups"].values() for c, v in (g.get("per_class_trace") or {}).items()}
        if per_class:
            plots.plot_trace_vs_count(per_class, result["class_counts"], out / "trace_vs_count.png")
        for name, entry in result["groups"].items():
            eig = entry.get("eigenvalues")
            print(f"{name:>8}: n={entry.get('num_samples')} top eigenvalue "
                  f"{eig[0] if eig else float('nan'):.4g} trace {entry.get('trace') or float('nan'):.4g} "
                  f"(+- {entry.get('trace_stderr') or float('nan'):.2g}) "
                  f"sam sharpness {entry.get('sam_sharpness') or float('nan'):.4g}")
        print(f"-> {out / 'sharpness.json'}")
        return 0

    return run_guarded(run)
