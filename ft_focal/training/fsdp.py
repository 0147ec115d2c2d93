"""The training loop's FSDP2 path (``train.fsdp: true``): sharding, sharded checkpoints, ``final/``.

The Trainer applies ``fully_shard`` itself (per transformer block, then the root; ft_focal/training/sharding.py)
on the CPU (gloo) and on GPUs alike: Accelerate with ``cpu=True`` would wrap the model in DDP and
ignore an FSDP plugin, so nothing here goes through ``accelerator.prepare(model)``.

- The head is initialised (text / class means) on the whole model BEFORE sharding.
- Checkpoints: the trainable weights and the base optimizer's state go through
  torch.distributed.checkpoint (one ``__<rank>_0.distcp`` file per rank and ``.metadata``, all in
  the checkpoint folder, so MANIFEST.json covers every shard); the SAM-family wrapper's counters,
  the LR schedule, the trainer state and every rank's RNG are written as in ft_focal/training/checkpoint.py.
  DCP reshards on load, so a run may resume on another number of processes (untested here; the
  data order then differs from the uninterrupted run and a warning says so).
- After the loop the model is consolidated (every shard gathered into a plain copy on each rank),
  so evaluation, ``best_model.safetensors`` and ``final/`` are the same files as without FSDP.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ft_focal.errors import UserError
from ft_focal.files import write_json
from ft_focal.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

WRAPPER_FILE = "optimizer_wrapper.pt"


def fsdp_enabled(recipe: Any) -> bool:
    return bool(getattr(recipe.train, "fsdp", False))


def check_fsdp_recipe(recipe: Any) -> None:
    """One-line refusals of what FSDP2 cannot run (before anything heavy)."""
    cfg = recipe.train
    if cfg.mixed_precision == "fp16":
        raise UserError("recipe key 'train.mixed_precision': fp16 is not supported with train.fsdp (FSDP2 has no "
                        "sharded GradScaler here); use bf16 (bf16 parameters, fp32 gradient reduction) or no")
    if cfg.compile:
        raise UserError("recipe keys 'train.compile' and 'train.fsdp' together are not supported yet; set "
                        "train.compile: false")
    if recipe.optim.one_backward:
        logger.info("train.fsdp: optim.one_backward is switched off (the layer rules would see gathered weights "
                    "and bypass FSDP's reduce-scatter); the exact two-backward path runs (same update)")


def prepare_model(model: torch.nn.Module, recipe: Any, bundle: Any, accelerator: Any,
                  after_head_init: Optional[Callable[[torch.nn.Module], None]] = None) -> torch.nn.Module:
    """The module the loop calls: DDP-wrapped by Accelerate, or (``train.fsdp``) sharded in place with
    FSDP2. The head is initialised first in both cases (under FSDP2: on the unsharded model), then
    ``after_head_init(model)`` sees the whole initial model (e.g. to save it for WiSE-FT)."""
    from ft_focal.models.head_init import init_head_for_run

    if not fsdp_enabled(recipe):
        wrapped = accelerator.prepare(model)
        init_head_for_run(model, recipe, bundle, accelerator)
        if after_head_init is not None:
            after_head_init(model)
        return wrapped
    from ft_focal.training.sharding import assert_sharded, mixed_precision_policy, shard_model

    check_fsdp_recipe(recipe)
    if not torch.distributed.is_initialized():
        raise UserError("recipe key 'train.fsdp': needs a distributed launch (accelerate launch or torchrun with 2 or "
                        "more processes); one process has nothing to shard: set train.fsdp: false")
    model.to(accelerator.device)
    init_head_for_run(model, recipe, bundle, accelerator)
    if after_head_init is not None:
        after_head_init(model)
    if recipe.train.activation_checkpointing:
        from ft_focal.training.sharding import checkpoint_blocks

        checkpoint_blocks(model)
    try:
        shard_model(model, reshard_after_forward=recipe.train.fsdp_reshard_after_forward,
                    mp_policy=mixed_precision_policy(recipe.train.mixed_precision))
    except ValueError as exc:
        raise UserError(f"recipe key 'train.fsdp': {exc}") from None
    counts = _sharded_counts_of_every_rank(model, assert_sharded)
    logger.info("FSDP2 over %d process(es): %d trainable tensors sharded, checked on every rank (%s)",
                accelerator.num_processes, counts[0], ", ".join(map(str, counts)))
    return model


def _sharded_counts_of_every_rank(model: torch.nn.Module, assert_sharded: Callable) -> list[int]:
    """Every rank checks its own parameters are DTensors and the main process hears all answers, since
    only it logs INFO. A failing rank's reason reaches every rank, so none waits in a later collective."""
    try:
        answer: tuple[int, str | None] = (assert_sharded(model), None)
    except AssertionError as exc:
        answer = (0, str(exc))
    answers: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(answers, answer)
    for rank, (_, problem) in enumerate(answers):
        if problem:
            raise AssertionError(f"rank {rank}: {problem}")
    return [n for n, _ in answers]


# --------------------------------------------------------------------------- checkpoints

def _dcp_state(model: torch.nn.Module, optimizer: Any) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer.base_optimizer, options=options)}


def save_sharded_checkpoint(trainer: Any) -> Path:
    """A checkpoint of the trainer's current update (collective: every rank calls it). Atomic like
    ckpt.save_checkpoint: written into ``step_N.tmp``, manifest last, then renamed by rank 0."""
    import torch.distributed.checkpoint as dcp

    s, acc, rank = trainer.state, trainer.parts.accelerator, trainer.rank
    s.bad_images = trainer.bad_images_before + trainer.bad_consumed
    s.train_seconds = round(trainer.log.elapsed(), 3)
    root = trainer.ckpt_root
    tmp = root / f"step_{s.step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    dcp.save(_dcp_state(trainer.parts.model, trainer.parts.optimizer), checkpoint_id=str(tmp))
    rng_file = tmp / f"rng_rank{rank}.pt"
    torch.save(ckpt._plain_rng(ckpt.rng_state()), rng_file)
    ckpt._fsync_file(rng_file)
    if rank == 0:
        torch.save(trainer.parts.optimizer.state_dict()["wrapper"], tmp / WRAPPER_FILE)
        torch.save(trainer.parts.schedule.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "trainer.json", {**dataclasses.asdict(s), "world_size": trainer.world, "fsdp": True})
        best = trainer.out / ckpt_best_name()
        if s.best_sha256 and best.is_file():
            shutil.copy2(best, tmp / best.name)
    acc.wait_for_everyone()
    final = tmp
    if rank == 0:
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            ckpt._fsync_file(tmp / name)
        write_json(tmp / ckpt.MANIFEST, {name: ckpt.sha256(tmp / name) for name in names}, fsync=True)
        ckpt._fsync_dir(tmp)
        final = ckpt._target(root, s.step)
        os.replace(tmp, final)
        ckpt._fsync_dir(root)
        ckpt.prune(root, trainer.cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def ckpt_best_name() -> str:
    from ft_focal.training.state import BEST

    return BEST


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def load_sharded_checkpoint(path: Path, trainer: Any) -> dict:
    """Restore a checkpoint of ``save_sharded_checkpoint`` into the sharded model and optimizer
    (DCP reshards when the number of processes differs); returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not fsdp_enabled(trainer.recipe):
        raise UserError(f"{path}: a sharded (train.fsdp) checkpoint; resume it with train.fsdp: true")
    model, opt = trainer.parts.model, trainer.parts.optimizer
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(path))
    options = StateDictOptions(ignore_frozen_params=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, opt.base_optimizer, state["optim"], options=options)
    wrapper = torch.load(path / WRAPPER_FILE, weights_only=True)
    opt.load_state_dict({"base_optimizer": opt.base_optimizer.state_dict(), "wrapper": wrapper})
    trainer.parts.schedule.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    restored = json.loads((path / "trainer.json").read_text())
    rng_file = path / f"rng_rank{trainer.rank}.pt"
    if rng_file.is_file() and restored.get("world_size") == trainer.world:
        ckpt.set_rng_state(ckpt._from_plain_rng(torch.load(rng_file, weights_only=True)))
    else:
        logger.warning("%s was written by %s process(es), this run has %d: the weights and optimizer state were "
                       "resharded; the data order and random streams differ from an uninterrupted run", path,
                       restored.get("world_size"), trainer.world)
    return restored


def load_checkpoint_for(trainer: Any, path: Path) -> dict:
    """Resume from ``path``: the sharded layout under train.fsdp, else ft_focal.training.checkpoint's."""
    if is_sharded_checkpoint(path) or fsdp_enabled(trainer.recipe):
        if not is_sharded_checkpoint(path):
            raise UserError(f"{path}: written without train.fsdp; resume it with train.fsdp: false")
        return load_sharded_checkpoint(path, trainer)
    return ckpt.load_checkpoint(path, trainer.parts.model, trainer.parts.optimizer, trainer.parts.schedule, trainer.rank,
                                trainer.parts.accelerator.scaler)


# --------------------------------------------------------------------------- whole weights

def save_best_for(trainer: Any) -> Any:
    """best_model.safetensors of the current weights; returns its sha256 on rank 0 (collective
    under FSDP2: every rank gathers the shards, rank 0 writes)."""
    from ft_focal.training.state import save_best

    main = trainer.parts.accelerator.is_main_process
    if not fsdp_enabled(trainer.recipe):
        return save_best(trainer.out, trainer.parts.model) if main else trainer.state.best_sha256
    plain = consolidated_copy(trainer)
    return save_best(trainer.out, plain) if main else trainer.state.best_sha256


def consolidated_copy(trainer: Any) -> torch.nn.Module:
    """A plain (unsharded) model holding the sharded model's weights (collective)."""
    from ft_focal.models import build_classifier
    from ft_focal.training.sharding import full_state_dict

    full = full_state_dict(trainer.parts.model)
    recipe, bundle = trainer.recipe, trainer.parts.data
    rng = torch.get_rng_state()   # building draws random init values: keep the run's stream
    arch = getattr(trainer.parts.model, "rebuild_config", None) or recipe.model
    plain = build_classifier(arch, recipe.tuning, bundle.num_classes, bundle.classnames, load_weights=False)
    torch.set_rng_state(rng)
    plain.load_state_dict(full)
    plain.head_init_used = getattr(trainer.parts.model, "head_init_used", recipe.model.head_init)
    return plain.to(trainer.parts.accelerator.device)


def consolidate(trainer: Any) -> None:
    """After the loop: replace the sharded model by a consolidated plain one (evaluation and
    final/ then run as without FSDP)."""
    if fsdp_enabled(trainer.recipe):
        plain = consolidated_copy(trainer)
        trainer.parts = dataclasses.replace(trainer.parts, model=plain.eval(), wrapped=plain)
