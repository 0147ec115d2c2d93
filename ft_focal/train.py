"""The training loop: `accelerate launch -m ft_focal.train RECIPE.yaml [key=value ...]`.

Read it top to bottom: recipe -> data (+ class counts) -> model (+ PEFT) -> loss -> optimizer
(SAM family, one `step` call per update) -> loop with checkpoints -> selection on validation ->
test report -> `final/` + metrics.json -> (optional) push.

Gradient accumulation with a multi-pass optimizer: `train.batch_size` is the GLOBAL batch of
one update. It is split over processes and then into `train.grad_accum_steps` micro-batches;
the optimizer receives all micro-batches of the update at once and runs every pass over all of
them (ascent gradient accumulated over the whole batch, then the perturbation, then the
descent gradient accumulated over the whole batch). The update is therefore the one the method
computes on the full batch — not an average of per-micro-batch SAM steps, which would perturb
with a noisier gradient and is what `accelerator.accumulate` would give if it allowed it.

Crash safety: running the same command again after a kill at any moment continues from the
newest checkpoint that verifies (ft_focal.checkpoint) and ends with final weights bitwise equal
to an uninterrupted run on the CPU. A checkpoint restores the trainable weights, the optimizer
(incl. the SAM-family wrapper state: skipped steps, loss-scale growth, SSE-SAM stage via its
epoch), the LR schedule, the GradScaler, the RNG of every process, the best model so far and
`state` (update count, validation history, best, whether the epoch-end evaluation ran). Data
order and augmentations are pure functions of (seed, epoch, position) and the DataLoader draws
its worker seeds from its own generator, so nothing else depends on how many updates ran in
this process. An epoch end (evaluation, best-model selection) is recorded by the ONE checkpoint
written after it; a crash before that checkpoint re-runs the epoch end exactly once.
Non-finite updates (loss or gradient NaN / inf in any pass) are skipped by the optimizer and
counted; `train.max_bad_steps` consecutive ones stop the run with a checkpoint and one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle  # only for the exception type raised by torch.load(weights_only=True)
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from ft_focal import checkpoint as ckpt
from ft_focal.config import Recipe, load_recipe, save_recipe
from ft_focal.errors import UserError
from ft_focal.malloc import keep_freed_memory
from ft_focal.sampling import ResumableBatchSampler, SeededDataset, steps_per_epoch

logger = logging.getLogger("ft_focal")

# Optimizer-specific recipe keys, passed to the optimizer only when set (not null).
METHOD_KEYS = ("rho", "gamma", "lam", "tail_threshold", "tail_weight", "rho_head", "rho_tail",
               "switch_fraction", "scope", "flat_ratio")
LOSS_KEYS = {
    "ce": (), "focal": ("focal_gamma",), "cb_ce": ("beta",), "la": ("tau",), "balanced_softmax": (),
    "ldam": ("max_m", "s"), "ldam_drw": ("max_m", "s", "beta", "drw_epoch"), "vs": ("vs_gamma", "vs_tau"),
}


BEST = "best_model.safetensors"  # in output_dir: trainable tensors of the best epoch on validation
# Recipe keys that do not change what a run computes: a resumed run may change them freely.
OPERATIONAL_KEYS = (("data", "num_workers"), ("train", "threads"), ("train", "keep_checkpoints"),
                    ("train", "save_every_steps"), ("train", "log_every_steps"), ("train", "eval_batch_size"),
                    ("train", "max_bad_steps"))


def make_accelerator(recipe: Recipe):
    from ft_focal.accel import make_accelerator as accelerator_for
    from accelerate.utils import ProjectConfiguration

    trackers = None
    try:
        import tensorboard  # noqa: F401

        trackers = "tensorboard"
    except ImportError:
        pass
    return accelerator_for(
        mixed_precision=recipe.train.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")),
    )


def build_loss_from(recipe: Recipe, class_counts: list[int]):
    from ft_focal.losses import build_loss

    cfg = recipe.loss
    kwargs = {key: getattr(cfg, key) for key in LOSS_KEYS[cfg.name] if getattr(cfg, key) is not None}
    renames = {"focal_gamma": "gamma", "vs_gamma": "gamma", "vs_tau": "tau"}
    kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
    try:
        return build_loss(cfg.name, class_counts, **kwargs)
    except ValueError as exc:
        raise UserError(f"recipe section 'loss': {exc}") from None


def build_optimizer_from(recipe: Recipe, model: torch.nn.Module, wrapped: torch.nn.Module, class_counts: list[int],
                         accelerator: Any):
    """The recipe's optimizer over the trainable parameters, wired to Accelerate."""
    from ft_focal.optim import build_optimizer

    cfg = recipe.optim
    base_kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.base == "sgd":
        base_kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    method = {key: getattr(cfg, key) for key in METHOD_KEYS if getattr(cfg, key) is not None}
    if cfg.name in ("focal_sam", "imbsam", "sse_sam"):
        # Exact either way; the one-backward path is cheaper and falls back by itself.
        method["single_backward"] = True if cfg.single_backward is None else cfg.single_backward
    elif cfg.single_backward:
        raise UserError(f"recipe key 'optim.single_backward' applies to focal_sam, imbsam and sse_sam, not {cfg.name}")
    if cfg.name == "ccsam":
        method["classifier_params"] = list(model.head.parameters())
    runtime: dict[str, Any] = {"model": model, "sync_perturbation": cfg.sync_perturbation}
    if accelerator.num_processes > 1:
        runtime["no_sync"] = lambda: accelerator.no_sync(wrapped)
    if accelerator.scaler is not None:  # fp16: accelerator.backward scales the loss itself
        runtime.update(scaler=accelerator.scaler, backward=accelerator.backward, backward_applies_scaler=True)
    else:
        runtime["backward"] = accelerator.backward
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the recipe's tuning leaves no trainable parameter (check 'tuning.method')")
    try:
        return build_optimizer(cfg.name, params, class_counts, base=cfg.base, **base_kwargs, **method, **runtime)
    except (ValueError, TypeError) as exc:
        raise UserError(f"recipe section 'optim': {exc}") from None


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base LR at update `step`: linear warm-up, then cosine / linear / constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def train(recipe: Recipe, bundle: Any = None) -> dict:
    """Run a recipe to the end (resuming from its last good checkpoint); returns metrics.json.

    `train.deterministic` switches torch's deterministic algorithms on for the run; the previous
    setting is restored afterwards (the switch is process-wide).
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        return _train(recipe, bundle)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]


def _train(recipe: Recipe, bundle: Any = None) -> dict:
    from accelerate.utils import set_seed

    from ft_focal.data import build_datasets
    from ft_focal.evaluate import evaluate_split
    from ft_focal.models import build_classifier, preprocess_for
    from ft_focal.saved import save_model_dir, write_json

    cfg = recipe.train
    out = Path(recipe.output_dir)
    if bundle is None:
        from ft_focal.preflight import check_paths

        check_paths(recipe)  # every missing weights / data path at once, before anything heavy
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:  # before the accelerator touches CUDA: cuBLAS reads this at init
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = make_accelerator(recipe)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.device.type == "cpu":
        # Reuse each step's freed activation buffers instead of page-faulting them in again
        # (ft_focal/malloc.py: ~50 000 faults per step on a small CLIP otherwise).
        keep_freed_memory()
    set_seed(recipe.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise UserError(f"recipe key 'train.batch_size' ({cfg.batch_size}) must be divisible by "
                        f"processes x grad_accum_steps = {world * cfg.grad_accum_steps}")
    if accelerator.is_main_process:
        save_recipe(recipe, out / "recipe.yaml")

    # 1. Data. Class counts are those of the TRAINING split: the optimizers and losses need them.
    preprocess = preprocess_for(recipe.model)
    bundle = bundle or build_datasets(recipe.data, preprocess, recipe.seed)
    class_counts = list(bundle.class_counts)
    n_steps_epoch = steps_per_epoch(len(bundle.train), cfg.batch_size)
    if n_steps_epoch == 0:
        raise UserError(f"recipe key 'train.batch_size' ({cfg.batch_size}) exceeds the training set ({len(bundle.train)} images)")
    total_steps = cfg.epochs * n_steps_epoch if cfg.max_steps is None else cfg.max_steps
    logger.info("data: %d train / %s val / %d test images, %d classes, %d updates per epoch, %d in all",
                len(bundle.train), len(bundle.val) if bundle.val is not None else "no", len(bundle.test),
                bundle.num_classes, n_steps_epoch, total_steps)

    # 2. Model, then 3. loss and optimizer over its trainable parameters.
    model = build_classifier(recipe.model, recipe.tuning, bundle.num_classes, bundle.classnames)
    logger.info("model: %s", model.describe())
    criterion = build_loss_from(recipe, class_counts).to(accelerator.device)
    wrapped = accelerator.prepare(model)
    if cfg.compile:
        # The SAM family back-propagates one forward graph twice (the official ImbSAM / Focal-SAM /
        # SSE-SAM steps, the one-backward path's first-step check): AOT autograd's donated buffers
        # would make that second backward fail.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        # Dynamo does not guard on module hooks: code compiled earlier in this process without the
        # one-backward path's layer hooks would be reused and hide them (the step then falls back
        # to 2F + 3B). Start from an empty cache so the first, hooked forward is what gets compiled.
        torch._dynamo.reset()
        wrapped = torch.compile(wrapped)
    optimizer = build_optimizer_from(recipe, model, wrapped, class_counts, accelerator)
    if cfg.grad_clip:
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Clip the FINAL (descent) gradient, right before the base optimizer applies it.
        def clip(*_: Any) -> None:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)

        optimizer.base_optimizer.register_step_pre_hook(clip)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, total_steps))

    # 4. Resume from the newest checkpoint that verifies, if any. Everything a later update
    # depends on is restored: trainable weights, optimizer (incl. the SAM-family wrapper: skipped
    # steps, scaler growth, SSE-SAM epoch), LR schedule, GradScaler, the RNG of every process,
    # and `state` (update count, history, best, whether the epoch-end evaluation already ran).
    # Data order and augmentations are functions of (seed, epoch, position): nothing to restore.
    state = {"step": 0, "best": None, "best_epoch": None, "best_sha256": None, "history": [],
             "bad_streak": 0, "bad_images": 0, "epoch_end_step": 0, "train_seconds": 0.0,
             "recipe_sha256": _recipe_digest(recipe)}
    ckpt_root = out / "checkpoints"
    resume_from = ckpt.latest_good(ckpt_root)
    if resume_from is not None:
        try:
            restored = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, rank, accelerator.scaler)
        except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused an object
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = f"it references {found.group(1)}" if found else _one_line(exc)[:120]
            raise UserError(f"{resume_from}: refusing to load a checkpoint file that holds more than tensors "
                            f"({what}); remove this checkpoint") from None
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise UserError(f"{resume_from}: cannot resume from this checkpoint ({_one_line(exc)}); it does not fit "
                            f"this recipe or holds more than tensors: use another output_dir or remove it") from None
        if restored.get("recipe_sha256") not in (None, state["recipe_sha256"]):
            logger.warning("the recipe differs from the one %s was written with: the resumed run is not the "
                           "run this recipe describes from scratch", resume_from)
        if restored.get("world_size", world) != world:
            logger.warning("%s was written by %s process(es), this run has %d", resume_from,
                           restored.get("world_size"), world)
        restored.pop("world_size", None)
        state.update(restored)
        state["recipe_sha256"] = _recipe_digest(recipe)
        if accelerator.is_main_process and (resume_from / BEST).is_file():
            # The best model as of the checkpoint (a later one may have been written before the crash).
            shutil.copyfile(resume_from / BEST, out / (BEST + ".tmp"))
            os.replace(out / (BEST + ".tmp"), out / BEST)
        accelerator.wait_for_everyone()
        logger.info("resumed from %s (update %d of %d)", resume_from, state["step"], total_steps)
    if accelerator.trackers:
        accelerator.init_trackers(recipe.name.replace("/", "_"))

    # torchvision's training transforms draw from torch's generator only (see SeededDataset)
    train_set = SeededDataset(bundle.train, recipe.seed, generators=("torch",))
    bad_images_before = int(state["bad_images"])  # skipped before a resume (data.skip_bad_images)
    started = time.time()
    seconds_before = float(state["train_seconds"])

    def save(step: int) -> None:
        state["bad_images"] = bad_images_before + getattr(bundle.train, "bad_count", 0)
        state["train_seconds"] = round(seconds_before + time.time() - started, 3)
        best = out / BEST
        files = {BEST: best} if rank == 0 and state["best_sha256"] and best.is_file() else None
        ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler, state, rank, world,
                             accelerator.wait_for_everyone, cfg.keep_checkpoints, accelerator.scaler, files)

    def save_due(step: int) -> bool:
        return step % cfg.save_every_steps == 0 or step == total_steps

    def at_epoch_end(step: int) -> bool:
        return step > 0 and (step % n_steps_epoch == 0 or step >= total_steps)

    collate = bundle.collate_fn
    val_set = bundle.eval_dataset("val") if bundle.val is not None and recipe.eval.select_split == "val" else None

    def epoch_end(epoch: int) -> bool:
        """Evaluation / model selection after the last update of `epoch`; True if it evaluated."""
        state["epoch_end_step"] = state["step"]
        if val_set is None or not ((epoch + 1) % cfg.eval_every_epochs == 0 or state["step"] >= total_steps):
            return False
        val = evaluate_split(model, val_set, class_counts, recipe.eval, cfg.eval_batch_size,
                             accelerator, recipe.data.num_workers, collate)
        score = val[recipe.eval.select_metric]
        state["history"].append({"epoch": epoch, "step": state["step"], "val": _short(val)})
        accelerator.log({f"val/{k}": v for k, v in _short(val).items() if v is not None}, step=state["step"])
        if score is not None and (state["best"] is None or score > state["best"]):
            state["best"], state["best_epoch"] = score, epoch
            if accelerator.is_main_process:
                state["best_sha256"] = _save_best(out, model)
        return True

    # 5. The loop. Each update: load the micro-batches, one optimizer call, one scheduler step.
    # At an epoch end: evaluation (if due), then ONE checkpoint that records it, so a crash between
    # the last update of an epoch and its evaluation re-runs that evaluation exactly once.
    progress = _progress(accelerator, total_steps, min(state["step"], total_steps))
    while True:
        if at_epoch_end(state["step"]) and state.get("epoch_end_step") != state["step"]:
            evaluated = epoch_end((state["step"] - 1) // n_steps_epoch)
            if evaluated or save_due(state["step"]):
                save(state["step"])
        if state["step"] >= total_steps:
            break
        epoch, first = divmod(state["step"], n_steps_epoch)
        train_set.set_epoch(epoch)
        criterion.set_epoch(epoch)
        optimizer.set_epoch(epoch, cfg.epochs)
        sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, rank, world, cfg.grad_accum_steps,
                                        recipe.seed, epoch, first)
        # The loader's own generator: creating an iterator must not draw from the global RNG,
        # or a resumed run (one more iterator) would continue with other dropout masks.
        loader_rng = torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch)
        batches = iter(DataLoader(train_set, batch_sampler=sampler, num_workers=recipe.data.num_workers,
                                  collate_fn=collate, pin_memory=accelerator.device.type == "cuda",
                                  generator=loader_rng))
        wrapped.train()
        for _ in range(first, n_steps_epoch):
            micro = [next(batches) for _ in range(cfg.grad_accum_steps)]
            micro = [m for m in micro if m is not None]  # None: every image of it was unreadable and skipped
            if not micro:
                loss = None
                state["step"] += 1
                scheduler.step()
            else:
                closures, targets = [], []
                for images, labels in micro:
                    images, labels = images.to(accelerator.device), labels.to(accelerator.device)
                    closures.append(lambda images=images, labels=labels: criterion(wrapped(images).float(), labels))
                    targets.append(labels)
                skipped_before = optimizer.skipped_steps
                loss = optimizer.step(closures, targets=targets)
                scheduler.step()
                state["step"] += 1
                state["bad_streak"] = state["bad_streak"] + 1 if optimizer.skipped_steps > skipped_before else 0
                if state["bad_streak"] >= cfg.max_bad_steps:
                    # Skipped updates leave weights and optimizer state as after the last good update.
                    save(state["step"])
                    raise UserError(
                        f"training stopped at update {state['step']}: {state['bad_streak']} consecutive updates had "
                        f"non-finite loss or gradients (limit 'train.max_bad_steps' = {cfg.max_bad_steps}); the last "
                        f"good weights are saved in {ckpt_root} (try a lower 'optim.lr' or 'train.mixed_precision')")
            if loss is not None and (state["step"] % cfg.log_every_steps == 0 or state["step"] == total_steps):
                logs = {"train/loss": float(loss), "train/lr": scheduler.get_last_lr()[0],
                        "train/skipped_steps": optimizer.skipped_steps}
                accelerator.log(logs, step=state["step"])
                progress.set_postfix(loss=f"{float(loss):.4f}", lr=f"{logs['train/lr']:.2e}")
            progress.update(1)
            if at_epoch_end(state["step"]):
                break  # the epoch-end block at the top of the loop evaluates and saves
            if save_due(state["step"]):
                save(state["step"])
        del batches
    progress.close()
    train_seconds = seconds_before + time.time() - started
    skipped_train_images = bad_images_before + getattr(bundle.train, "bad_count", 0)
    if skipped_train_images:
        logger.warning("skipped %d unreadable training image(s) in all (data.skip_bad_images; counted each "
                       "time an image was drawn)", skipped_train_images)

    # 6. Model selection on validation, final report on test.
    selected = "last"
    best_file = out / BEST
    if recipe.eval.select_split == "val" and state["best"] is not None:
        from safetensors.torch import load_file

        if best_file.is_file() and state.get("best_sha256") in (None, ckpt._sha256(best_file)):
            ckpt.load_trainable_state(model, load_file(str(best_file)))
            selected = f"best on val ({recipe.eval.select_metric}) at epoch {state['best_epoch']}"
        else:
            logger.warning("%s is missing or not the best model this run recorded (epoch %s); reporting the "
                           "last weights instead", best_file, state["best_epoch"])
    results = {"recipe": recipe.name, "world_size": world, "selected": selected, "class_counts": class_counts,
               "skipped_images": {"train": skipped_train_images},
               "optimizer": recipe.optim.name, "updates": state["step"], "train_seconds": round(train_seconds, 2),
               "skipped_steps": optimizer.skipped_steps, "pass_counts": dict(optimizer.pass_counts),
               "history": state["history"]}
    for split in dict.fromkeys(["val", recipe.eval.test_split]):
        dataset = bundle.eval_dataset(split, five_crop=recipe.eval.five_crop and split != "val")
        if dataset is not None:
            results[split] = evaluate_split(model, dataset, class_counts, recipe.eval, cfg.eval_batch_size,
                                            accelerator, recipe.data.num_workers, collate)
            results["skipped_images"][split] = getattr(dataset, "bad_count", 0)
    results["test"] = results.get(recipe.eval.test_split)

    # 7. Artefacts: final/ (safetensors + what reloads it), metrics.json, the report.
    if accelerator.is_main_process:
        final = save_model_dir(out / "final", model, recipe, bundle.classnames, class_counts, preprocess,
                               getattr(bundle, "wnids", None))
        write_json(out / "metrics.json", results)
        write_json(final / "metrics.json", results)
        try:
            from ft_focal.report import write_run_report

            write_run_report(out, results)
        except Exception as exc:  # a plotting problem must not lose a finished run
            logger.warning("could not write the report: %s", exc)
        test = results["test"] or {}
        logger.info("test: overall %s many %s medium %s few %s (%s)", *(_pct(test.get(k)) for k in
                    ("overall", "many", "medium", "few")), selected)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if recipe.hub.push and accelerator.is_main_process:
        from ft_focal.hub import push_run

        push_run(out, recipe.hub.repo_id, private=recipe.hub.private, revision=recipe.hub.revision)
    return results


def _save_best(out: Path, model: torch.nn.Module) -> str:
    """Write best_model.safetensors atomically; returns its sha256 (recorded in the checkpoint)."""
    from safetensors.torch import save_file

    tmp = out / (BEST + ".tmp")
    save_file(ckpt.trainable_state(model), str(tmp))
    digest = ckpt._sha256(tmp)
    os.replace(tmp, out / BEST)
    return digest


def _recipe_digest(recipe: Recipe) -> str:
    """sha256 of the resolved recipe without where it is written (a resumed run must match it)."""
    import dataclasses
    import hashlib

    raw = dataclasses.asdict(recipe)
    raw.pop("output_dir", None)
    raw.pop("hub", None)
    for section, key in OPERATIONAL_KEYS:
        raw[section].pop(key, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _short(result: dict) -> dict:
    return {k: result.get(k) for k in ("overall", "many", "medium", "few", "ece")}


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


class _NoProgress:
    def update(self, *_: Any) -> None: ...
    def set_postfix(self, **_: Any) -> None: ...
    def close(self) -> None: ...


def _progress(accelerator: Any, total: int, initial: int):
    if not accelerator.is_main_process:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, disable=None)


def main(argv: Optional[list[str]] = None) -> int:
    from ft_focal.cli import run_guarded

    return run_guarded(lambda: _main(argv))


def _main(argv: Optional[list[str]]) -> int:
    parser = argparse.ArgumentParser(prog="ft-focal train", description="Fine-tune a model from a recipe.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.005 train.epochs=5")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny backbone of the same family + synthetic images: build everything, 2 updates, 1 eval")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from ft_focal.preflight import dry_run

        dry_run(recipe)
        return 0
    train(recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
