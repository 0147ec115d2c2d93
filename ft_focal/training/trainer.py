"""The training loop: `Trainer` and `train(recipe)`; launched by `ft-focal train` (ft_focal/commands/train.py)
or `accelerate launch -m ft_focal.train RECIPE.yaml [key=value ...]`.

`Trainer.run` reads top to bottom, one named phase each: `setup` (recipe -> data + class counts
-> model + PEFT -> loss -> optimizer of the SAM family, one `step` call per update -> LR schedule),
`resume` (the newest checkpoint that verifies), then per epoch `train_epoch` (the updates, periodic
checkpoints, logs: ft_focal/training/log.py) and `epoch_end` (validation, best model, the epoch's
checkpoint), then `select_and_report` (best weights on validation, test report) and
`write_artifacts` (`final/`, metrics.json, report.md, optional push: ft_focal/artifacts/saved.py). What it builds from the
recipe lives in ft_focal/training/builders.py.

Hot path: batches come from pinned memory with non-blocking copies, one update ahead
(`prefetch_to_device`), and the loop reads no device value on the host between log steps (the
loss is summed on the device and read at log steps only; every read is a GPU sync).

Gradient accumulation with a multi-pass optimizer: `train.batch_size` is the GLOBAL batch of
one update. It is split over processes and then into `train.grad_accum_steps` micro-batches;
the optimizer receives all micro-batches of the update at once and runs every pass over all of
them (ascent gradient accumulated over the whole batch, then the perturbation, then the
descent gradient accumulated over the whole batch). The update is therefore the one the method
computes on the full batch — not an average of per-micro-batch SAM steps, which would perturb
with a noisier gradient and is what `accelerator.accumulate` would give if it allowed it.

Crash safety: running the same command again after a kill at any moment continues from the
newest checkpoint that verifies (ft_focal.training.checkpoint) and ends with final weights bitwise equal
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
Checkpoints exist but none verifies: the run stops and says why (never starts over next to them);
`restart=True` (`--restart`) moves old checkpoints aside first. SIGTERM / SIGUSR1 write a
checkpoint at the end of the current update and stop (ft_focal/training/run_control.py).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from ft_focal.config import Recipe
from ft_focal.errors import UserError
from ft_focal.sweeps.pruning import validation_hook_from_env
from ft_focal.training import checkpoint as ckpt
from ft_focal.training import run_control as runcontrol
from ft_focal.training.fsdp import consolidate, fsdp_enabled, load_checkpoint_for, save_best_for, save_sharded_checkpoint
from ft_focal.training.log import TrainLog, validation_summary
from ft_focal.training.parts import RunParts, build_run
from ft_focal.training.run_control import Preempted, StopSignals, flat_recipe
from ft_focal.training.sampling import ResumableBatchSampler, SeededDataset, prefetch_to_device
from ft_focal.training.state import BEST, OPERATIONAL_KEYS, SkipStreak, TrainState, recipe_digest
from ft_focal.training.zero_shot import mark_zero_shot, refuse_checkpoints

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "train"]


class Trainer:
    """One run of a recipe: `run()` = setup, resume, (train_epoch, epoch_end)*, select_and_report,
    write_artifacts. `bundle`: prebuilt datasets (tests, the dry run); None = read the recipe's data.
    `restart`: move existing checkpoints aside and start from update 0."""

    def __init__(self, recipe: Recipe, bundle: Any = None, restart: bool = False,
                 on_validation: Optional[Callable] = None) -> None:
        self.recipe, self.cfg, self.prebuilt, self.restart = recipe, recipe.train, bundle, restart
        # on_validation(trainer, epoch, val) after each epoch-end validation, on every process; it may stop
        # the run. In a sweep trial: the pruning callback (ft_focal/sweeps/pruning.py), else None.
        self.on_validation = on_validation or validation_hook_from_env()
        self.out = Path(recipe.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.state = TrainState(recipe_sha256=recipe_digest(recipe))
        self.parts: Optional[RunParts] = None   # built by setup()
        self.signals = StopSignals()

    def run(self) -> dict:
        self.setup()
        self.resume()
        self.start_loop()
        self.signals.install()
        try:
            self.epoch_end()  # a run killed between an epoch's last update and its checkpoint
            while self.state.step < self.parts.total_steps:
                self.train_epoch(self.state.step // self.parts.steps_per_epoch)
                self.epoch_end()
        finally:
            self.signals.restore()
        self.log.close()
        consolidate(self)   # FSDP2: one plain model for evaluation and final/
        results = self.select_and_report()
        self.write_artifacts(results)
        return results

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """The run's parts (ft_focal/training/parts.py), then the training and validation sets."""
        self.parts = build_run(self.recipe, self.prebuilt, after_head_init=self._save_initial_state)
        acc, data = self.parts.accelerator, self.parts.data
        self.rank, self.world = acc.process_index, acc.num_processes
        # torchvision's training transforms draw from torch's generator only (see SeededDataset)
        self.train_set = SeededDataset(data.train, self.recipe.seed, generators=("torch",))
        has_val = data.val is not None and self.recipe.eval.select_split == "val"
        self.val_set = data.eval_dataset("val") if has_val else None

    # ------------------------------------------------------------------ resume
    def _save_initial_state(self, model: torch.nn.Module, accelerator: Any) -> None:
        """alpha = 0 of `ft-focal wise` (ft_focal/evaluation/wise.py): the initial head (and backbone
        where it cannot be rebuilt), written once by the main process."""
        if accelerator.is_main_process:
            from ft_focal.evaluation.wise import save_initial_state

            save_initial_state(self.out, model, self.recipe)

    def resume(self) -> None:
        """Restore the newest checkpoint that verifies, if any.

        Everything a later update depends on: trainable weights, optimizer (incl. the SAM-family
        wrapper: skipped steps, scaler growth, SSE-SAM epoch), LR schedule, GradScaler, the RNG of
        every process, and the TrainState. Data order and augmentations are functions of
        (seed, epoch, position): nothing to restore.
        """
        if self.parts.total_steps == 0:
            return refuse_checkpoints(self.ckpt_root)
        acc = self.parts.accelerator
        if self.restart:
            runcontrol.restart_aside(self.out, ("checkpoints", BEST), acc)
        resume_from = ckpt.latest_good(self.ckpt_root)
        if resume_from is None:
            return runcontrol.refuse_unverifiable(self.ckpt_root)
        restored = runcontrol.load_for_resume(resume_from, lambda: load_checkpoint_for(self, resume_from))
        digest = self.state.recipe_sha256
        runcontrol.warn_if_run_differs(resume_from, restored, self.recipe, digest, self.world,
                                       tuple(".".join(key) for key in OPERATIONAL_KEYS))
        self.state = dataclasses.replace(TrainState.from_json(restored), recipe_sha256=digest)
        if acc.is_main_process:  # the best model as of the checkpoint (a later one may predate the crash)
            runcontrol.restore_file(resume_from / BEST, self.out / BEST)
        acc.wait_for_everyone()
        logger.info("resumed from %s (update %d of %d)", resume_from, self.state.step, self.parts.total_steps)

    def start_loop(self) -> None:
        """Trackers, the log and the training clock (train_seconds counts from here)."""
        if self.parts.accelerator.trackers:
            self.parts.accelerator.init_trackers(self.recipe.name.replace("/", "_"))
        # unreadable files met before a resume (data.skip_bad_images): marked again, so that they are
        # neither logged nor counted twice; a checkpoint without the list only has their number
        known = list(self.state.bad_image_indices or [])
        if known and hasattr(self.parts.data.train, "mark_bad"):
            self.parts.data.train.mark_bad(known)
        self.bad_images_before = max(0, int(self.state.bad_images) - len(known))
        self.bad_consumed = getattr(self.parts.data.train, "bad_count", 0)
        self.first_update_logged = False
        self.streak = SkipStreak(self.state.bad_streak)
        p = self.parts
        self.log = TrainLog(self.out, p.accelerator, p.total_steps, min(self.state.step, p.total_steps),
                            self.cfg.batch_size, float(self.state.train_seconds), p.steps_per_epoch)

    # ------------------------------------------------------------------ the loop
    def train_epoch(self, epoch: int) -> None:
        """The updates of `epoch` from where the run stands, up to the epoch end (or the run's end)."""
        s, cfg, n = self.state, self.cfg, self.parts.steps_per_epoch
        self.train_set.set_epoch(epoch)
        self.parts.loss.set_epoch(epoch)
        self.parts.optimizer.set_epoch(epoch, cfg.epochs)
        last = min(n, self.parts.total_steps - epoch * n)  # no group is loaded past the run's last update
        self.parts.wrapped.train()
        groups = self._groups(epoch, s.step - epoch * n, last)
        try:
            for group, bad_count in prefetch_to_device(groups, self.parts.accelerator.device, self._bad_count):
                self.bad_consumed = bad_count
                loss, skipped = self._update(group)
                self.log.add_loss(loss, skipped)
                log_due = s.step % cfg.log_every_steps == 0 or s.step == self.parts.total_steps
                # Skips counted on the device are read at log steps and checkpoints, not every update.
                if not self.streak.on_device or log_due or self._at_epoch_end(s.step) or self._save_due(s.step):
                    self._stop_if_stuck()
                self._stop_if_signalled(log_due or self._save_due(s.step))
                if log_due:
                    p = self.parts
                    self.log.write(s.step, (s.step - 1) // n, p.schedule.get_last_lr()[0], p.optimizer.skipped_steps)
                self.log.tick()
                if self._at_epoch_end(s.step):
                    return  # epoch_end evaluates and saves
                if self._save_due(s.step):
                    self.save()
        finally:
            # A run stopped mid-epoch (signal, error) ends its DataLoader workers here: they ignore
            # SIGTERM (run_control.ignore_stop_signals), so the interpreter's exit would wait on them.
            groups.close()

    def _groups(self, epoch: int, first: int, last: int) -> Any:
        """The micro-batches of updates first..last-1 of `epoch`, one list per update."""
        cfg = self.cfg
        sampler = ResumableBatchSampler(len(self.train_set), cfg.batch_size, self.rank, self.world,
                                        cfg.grad_accum_steps, self.recipe.seed, epoch, first)
        # The loader's own generator: creating an iterator must not draw from the global RNG,
        # or a resumed run (one more iterator) would continue with other dropout masks.
        loader_rng = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + epoch)
        batches = iter(DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.recipe.data.num_workers,
                                  collate_fn=self.parts.data.collate_fn, worker_init_fn=runcontrol.ignore_stop_signals,
                                  pin_memory=self.parts.accelerator.device.type == "cuda", generator=loader_rng))
        try:
            for _ in range(first, last):
                yield [next(batches) for _ in range(cfg.grad_accum_steps)]
        finally:
            del batches   # the iterator's release shuts its workers down (the only way they end)

    def _bad_count(self) -> int:
        return getattr(self.parts.data.train, "bad_count", 0)

    def _update(self, group: list) -> tuple[Optional[torch.Tensor], Any]:
        """One optimizer call and one scheduler step: (the mean loss on the device, whether the
        optimizer skipped the update: a bool, or a 0-d device flag when it skips on the device)."""
        s = self.state
        micro = [m for m in group if m is not None]  # None: every image of it was unreadable and skipped
        if not micro:
            s.step += 1
            self.parts.schedule.step()
            return None, False
        wrapped, criterion = self.parts.wrapped, self.parts.loss
        closures = [lambda images=images, labels=labels: criterion(wrapped(images).float(), labels)
                    for images, labels in micro]
        loss = self.parts.optimizer.step(closures, targets=[labels for _, labels in micro])
        self.parts.schedule.step()
        s.step += 1
        if not self.first_update_logged:
            self.first_update_logged = True
            logger.info("first update: %s runs %s", self.recipe.optim.name, self.parts.optimizer.describe_last_passes())
        skipped = self.parts.optimizer.last_skipped
        self.streak.add(skipped)
        return loss, skipped

    def _stop_if_stuck(self) -> None:
        """Save and stop once `train.max_bad_steps` updates in a row were skipped. Skipped updates
        leave weights and optimizer state as after the last good update. With a fused base
        optimizer the streak is counted on the device and checked at log steps and checkpoints."""
        s = self.state
        s.bad_streak, longest = self.streak.read()
        if longest < self.cfg.max_bad_steps:
            return
        self.save()
        raise UserError(runcontrol.stuck_message(s.step, longest, self.cfg.max_bad_steps, self.ckpt_root,
                                                 self.recipe.optim.lr))

    def _stop_if_signalled(self, agreed_point: bool) -> None:
        """After an update: when SIGTERM / SIGUSR1 arrived, write a checkpoint and raise Preempted
        (with several processes: checked at `agreed_point`s only, see StopSignals.agreed)."""
        received = self.signals.agreed(self.parts.accelerator, agreed_point)
        if received is not None:
            self.save()
            raise Preempted(f"stopped by {received} at update {self.state.step} of {self.parts.total_steps}: a checkpoint "
                            f"is written in {self.ckpt_root}; run the same command again to continue from it")

    def _at_epoch_end(self, step: int) -> bool:
        return step > 0 and (step % self.parts.steps_per_epoch == 0 or step >= self.parts.total_steps)

    def _save_due(self, step: int) -> bool:
        return step % self.cfg.save_every_steps == 0 or step == self.parts.total_steps

    # ------------------------------------------------------------------ epoch end
    def epoch_end(self) -> None:
        """After an epoch's last update: validation (if due), best model, then ONE checkpoint that
        records it, so a crash between the last update and that checkpoint re-runs it exactly once."""
        s = self.state
        if not self._at_epoch_end(s.step) or s.epoch_end_step == s.step:
            return
        epoch = (s.step - 1) // self.parts.steps_per_epoch
        s.epoch_end_step = s.step
        due = (epoch + 1) % self.cfg.eval_every_epochs == 0 or s.step >= self.parts.total_steps
        evaluated = self.val_set is not None and due
        if evaluated:
            self._validate(epoch)
        if evaluated or self._save_due(s.step):
            self.save()

    def _validate(self, epoch: int) -> None:
        from ft_focal.evaluation.evaluate import evaluate_split

        s, recipe, acc = self.state, self.recipe, self.parts.accelerator
        val = evaluate_split(self.parts.model, self.val_set, self.parts.class_counts, recipe.eval, self.cfg.eval_batch_size,
                             acc, recipe.data.num_workers, self.parts.data.collate_fn)
        score = val[recipe.eval.select_metric]
        s.history.append({"epoch": epoch, "step": s.step, "val": validation_summary(val)})
        self.log.write_validation(s.step, epoch, validation_summary(val))
        acc.log({f"val/{k}": v for k, v in validation_summary(val).items() if v is not None}, step=s.step)
        if score is not None and (s.best is None or score > s.best):
            s.best, s.best_epoch = score, epoch
            s.best_sha256 = save_best_for(self)
        if self.on_validation is not None:
            self.on_validation(self, epoch, val)

    def save(self) -> None:
        """A checkpoint of the current update (atomic; every process writes its RNG state)."""
        if fsdp_enabled(self.recipe):
            save_sharded_checkpoint(self)
            return
        s, acc = self.state, self.parts.accelerator
        bad_files = self.parts.data.train.bad_indices() if hasattr(self.parts.data.train, "bad_indices") else []
        s.bad_images, s.bad_image_indices = self.bad_images_before + len(bad_files), bad_files
        s.train_seconds = round(self.log.elapsed(), 3)
        best = self.out / BEST
        files = {BEST: best} if self.rank == 0 and s.best_sha256 and best.is_file() else None
        ckpt.save_checkpoint(self.ckpt_root, s.step, self.parts.model, self.parts.optimizer, self.parts.schedule,
                             {**dataclasses.asdict(s), "recipe": flat_recipe(self.recipe)}, rank=self.rank, world_size=self.world,
                             barrier=acc.wait_for_everyone, keep=self.cfg.keep_checkpoints, scaler=acc.scaler,
                             files=files)

    # ------------------------------------------------------------------ after the loop
    def select_and_report(self) -> dict:
        """Best weights on validation (else the last ones), then the val / test evaluation."""
        from ft_focal.evaluation.evaluate import evaluate_split

        s, recipe, cfg, bundle = self.state, self.recipe, self.cfg, self.parts.data
        train_seconds = self.log.elapsed()
        skipped_train_images = self.bad_images_before + self._bad_count()
        if skipped_train_images:
            logger.warning("skipped %d unreadable training image file(s) in all (data.skip_bad_images; each "
                           "logged and counted once, however often it was drawn)", skipped_train_images)
        selected = "last"
        best_file = self.out / BEST
        if recipe.eval.select_split == "val" and s.best is not None:
            from safetensors.torch import load_file

            if best_file.is_file() and s.best_sha256 in (None, ckpt.sha256(best_file)):
                ckpt.load_trainable_state(self.parts.model, load_file(str(best_file)))
                selected = f"best on val ({recipe.eval.select_metric}) at epoch {s.best_epoch + 1}"
            else:
                logger.warning("%s is missing or not the best model this run recorded (epoch %s); reporting the "
                               "last weights instead", best_file, s.best_epoch + 1)
        opt = self.parts.optimizer
        results = {"recipe": recipe.name, "world_size": self.world, "selected": selected,
                   "class_counts": self.parts.class_counts, "skipped_images": {"train": skipped_train_images},
                   "optimizer": recipe.optim.name, "updates": s.step, "train_seconds": round(train_seconds, 2),
                   "skipped_steps": opt.skipped_steps, "pass_counts": dict(opt.pass_counts), "history": s.history}
        for split in dict.fromkeys(["val", recipe.eval.test_split]):
            dataset = bundle.eval_dataset(split, five_crop=recipe.eval.five_crop and split != "val")
            if dataset is not None:
                results[split] = evaluate_split(self.parts.model, dataset, self.parts.class_counts, recipe.eval,
                                                cfg.eval_batch_size, self.parts.accelerator, recipe.data.num_workers,
                                                bundle.collate_fn)
                results["skipped_images"][split] = getattr(dataset, "bad_count", 0)
        results["test"] = results.get(recipe.eval.test_split)
        results["head_init"] = getattr(self.parts.model, "head_init_used", recipe.model.head_init)
        return mark_zero_shot(results, results["head_init"]) if self.parts.total_steps == 0 else results

    def write_artifacts(self, results: dict) -> None:
        """final/, metrics.json, report.md, then the optional push (ft_focal/artifacts/saved.py)."""
        from ft_focal.artifacts.saved import write_run_artifacts

        write_run_artifacts(self.out, results, self.parts.model, self.recipe, self.parts.data, self.parts.class_counts,
                            self.parts.preprocess, self.parts.accelerator)
        hub = self.recipe.hub
        if hub.push and self.parts.accelerator.is_main_process:
            from ft_focal.artifacts.hub import push_run

            push_run(self.out, hub.repo_id, private=hub.private, revision=hub.revision)


def train(recipe: Recipe, bundle: Any = None, restart: bool = False) -> dict:
    """Run a recipe to the end (resuming from its last good checkpoint; `restart`: moving existing
    checkpoints aside and starting from update 0); returns metrics.json. Raises Preempted
    (ft_focal/training/run_control.py) after writing a checkpoint when SIGTERM / SIGUSR1 arrives.

    `train.deterministic` switches torch's deterministic algorithms on for the run; the previous
    setting is restored afterwards (the switch is process-wide).
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        return Trainer(recipe, bundle, restart).run()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
