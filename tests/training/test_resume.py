"""Exact resume after a crash, checkpoint integrity and non-finite steps.

A crash is simulated in two ways:
* in-process (fast): one reference run keeps every checkpoint; a "crashed" run directory holds
  only the checkpoints written up to some update (what a kill -9 right after that checkpoint
  leaves on disk); running the same recipe there must give final weights BITWISE equal to the
  reference;
* through subprocesses (slow): `python -m ft_focal.train RECIPE key=value ...` is killed with
  SIGKILL at several points while polling the checkpoint directory, then run again to the end.

The tiny model has patch dropout, so the main process's RNG matters (a resumed run that drew
one more number from it would diverge); the digits data has random-crop augmentation, so the
per-item seeding matters; Focal-SAM with momentum has optimizer state; warm-up + cosine has an
LR schedule; every epoch ends with an evaluation and a best-model selection.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_focal.config import recipe_from_dict
from ft_focal.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]

MODEL = {  # the demo recipe's model block, plus patch dropout (a random op in every training forward)
    "family": "open_clip",
    "name": "tiny-open-clip-vit",
    "pretrained": None,
    "config": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16,
                       "mlp_ratio": 2.0, "patch_dropout": 0.25},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
    },
    "head": "cosine",
    "head_init": "text",
}


def raw_recipe(out: Path, epochs: int = 2, save_every: int = 3, keep: int = 100, workers: int = 0) -> dict:
    """digits-LT (544 training images: 8 updates of 64 per epoch), Focal-SAM with momentum."""
    return {
        "name": "resume",
        "output_dir": str(out),
        "seed": 3,
        "model": MODEL,
        "tuning": {"method": "full"},
        "data": {"dataset": "digits_lt", "imbalance_factor": 10, "image_size": 32, "test_resize": 32,
                 "train_crop_scale": [0.6, 1.0], "hflip": True, "num_workers": workers},
        "loss": {"name": "la"},
        "optim": {"name": "focal_sam", "lr": 0.05, "momentum": 0.9, "rho": 0.05, "gamma": 1.0, "lam": 0.8},
        "train": {"epochs": epochs, "batch_size": 64, "eval_batch_size": 256, "warmup_steps": 3,
                  "save_every_steps": save_every, "keep_checkpoints": keep, "log_every_steps": 1,
                  "eval_every_epochs": 1, "deterministic": True, "threads": 1},
        "eval": {"select_split": "val"},
    }


def final_weights(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def history_epochs(out: Path) -> list[int]:
    return [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]]


def crashed_copy(reference: Path, target: Path, up_to_step: int) -> list[str]:
    """The checkpoints a kill -9 right after update `up_to_step` would have left behind."""
    (target / "checkpoints").mkdir(parents=True)
    kept = []
    for path in ckpt.checkpoint_dirs(reference / "checkpoints"):
        if ckpt.checkpoint_step(path) <= up_to_step:
            shutil.copytree(path, target / "checkpoints" / path.name)
            kept.append(path.name)
    # A best model of a LATER epoch may be on disk (written before the crash, after the last
    # checkpoint): the checkpoint's own copy must win.
    if (reference / "best_model.safetensors").is_file():
        shutil.copy(reference / "best_model.safetensors", target / "best_model.safetensors")
    return kept


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    from ft_focal.training.trainer import train

    out = tmp_path_factory.mktemp("resume") / "reference"
    metrics = train(recipe_from_dict(raw_recipe(out)))
    return out, metrics


def test_resume_after_simulated_crashes_is_bitwise_exact(reference_run, tmp_path, caplog):
    """Crash between the last update of an epoch and its evaluation, right after an epoch-end
    evaluation, mid-epoch after a best model was written, and with the newest checkpoint
    truncated on disk."""
    from ft_focal.training.trainer import train

    ref, ref_metrics = reference_run
    names = [p.name for p in ckpt.checkpoint_dirs(ref / "checkpoints")]
    # save every 3 updates + one after each epoch-end evaluation (8 updates per epoch)
    assert names == [f"step_{s:08d}" for s in (3, 6, 8, 9, 12, 15, 16)]
    assert history_epochs(ref) == [0, 1]
    assert ref_metrics["updates"] == 16 and ref_metrics["skipped_steps"] == 0
    expected = final_weights(ref)

    # A crash between the last update of epoch 0 and its evaluation (the process dies in it).
    import ft_focal.evaluation.evaluate

    run = tmp_path / "crash_before_eval"
    original = ft_focal.evaluation.evaluate.evaluate_split
    with pytest.MonkeyPatch.context() as patch:
        def dying(*args, **kwargs):
            raise KeyboardInterrupt("killed")

        patch.setattr(ft_focal.evaluation.evaluate, "evaluate_split", dying)
        with pytest.raises(KeyboardInterrupt):
            train(recipe_from_dict(raw_recipe(run)))
    assert ft_focal.evaluation.evaluate.evaluate_split is original
    assert [p.name for p in ckpt.checkpoint_dirs(run / "checkpoints")] == ["step_00000003", "step_00000006"]
    train(recipe_from_dict(raw_recipe(run)))
    assert_bitwise_equal(final_weights(run), expected)
    assert history_epochs(run) == [0, 1]

    for step in (8, 13):
        run = tmp_path / f"crash_at_{step}"
        crashed_copy(ref, run, step)
        metrics = train(recipe_from_dict(raw_recipe(run)))
        assert_bitwise_equal(final_weights(run), expected)
        assert history_epochs(run) == [0, 1], f"crash at {step}: every epoch evaluated exactly once"
        assert metrics["history"] == ref_metrics["history"]
        assert metrics["pass_counts"] == ref_metrics["pass_counts"]
        assert metrics["selected"] == ref_metrics["selected"] and metrics["test"] == ref_metrics["test"]

    # A checkpoint truncated on disk (e.g. the disk filled up): the previous one is used, with a warning.
    run = tmp_path / "truncated"
    crashed_copy(ref, run, 12)
    weights = run / "checkpoints" / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ft_focal"):
        train(recipe_from_dict(raw_recipe(run)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_00000012" in w and "checksum mismatch in model.safetensors" in w for w in warnings), warnings
    assert any("resumed from" in r.getMessage() and "step_00000009" in r.getMessage() for r in caplog.records)
    assert_bitwise_equal(final_weights(run), expected)


def test_rerun_of_a_finished_run_recomputes_nothing(reference_run, tmp_path):
    from ft_focal.training.trainer import train

    ref, ref_metrics = reference_run
    run = tmp_path / "finished"
    crashed_copy(ref, run, 16)
    metrics = train(recipe_from_dict(raw_recipe(run)))
    assert metrics["history"] == ref_metrics["history"]  # no evaluation repeated
    assert metrics["pass_counts"] == ref_metrics["pass_counts"]  # cumulative, restored: no update re-run
    assert_bitwise_equal(final_weights(run), final_weights(ref))


# ------------------------------------------------------------------------ state round trips


def _toy(opt_name="sse_sam"):
    from ft_focal.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    kwargs = ({"rho_head": 0.05, "rho_tail": 0.1, "tail_threshold": 5, "switch_fraction": 0.5}
              if opt_name == "sse_sam" else {"rho": 0.05})
    opt = build_optimizer(opt_name, model.parameters(), [10, 4, 2], lr=0.1, momentum=0.9, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _one_step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y, reduction="none"), targets=y)
    sched.step()
    return loss


def test_checkpoint_restores_sse_sam_stage_momentum_schedule_scaler_and_rng(tmp_path):
    model, opt, sched = _toy()
    opt.set_epoch(6, 10)  # past switch_fraction * epochs: stage 2
    for seed in range(3):
        _one_step(model, opt, sched, seed)
    opt.skipped_steps = 2
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    torch.manual_seed(11)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"step": 3}, scaler=scaler)
    assert (path / "scaler.pt").is_file() and ckpt.verify(path) is None
    draw = torch.rand(4)
    _one_step(model, opt, sched, 99)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _toy()  # a fresh process: stage 1, no momentum, LR factor 1
    scaler2 = torch.amp.GradScaler("cpu")
    ckpt.load_checkpoint(path, model2, opt2, sched2, scaler=scaler2)
    assert opt2.switched and opt2.epoch == 6 and opt2.skipped_steps == 2
    assert scaler2.state_dict()["scale"] == 256.0 and scaler2.get_growth_interval() == 7
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    assert torch.equal(torch.rand(4), draw)  # RNG restored
    _one_step(model2, opt2, sched2, 99)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k  # same momentum, LR and stage: the same next update


def test_same_step_is_never_overwritten_and_latest_good_prefers_the_newer(tmp_path):
    model, opt, sched = _toy("sam")
    first = ckpt.save_checkpoint(tmp_path, 5, model, opt, sched, {"step": 5, "epoch_end_step": 0}, keep=1)
    second = ckpt.save_checkpoint(tmp_path, 5, model, opt, sched, {"step": 5, "epoch_end_step": 5}, keep=1)
    assert (first.name, second.name) == ("step_00000005", "step_00000005.1")
    assert ckpt.latest_good(tmp_path) == second and not first.exists()  # keep=1 pruned the older one
    # keep=1 and the newest save is corrupt afterwards: the next prune keeps the only good one
    third = ckpt.save_checkpoint(tmp_path, 6, model, opt, sched, {"step": 6}, keep=3)
    (third / "trainer.json").write_text("{}")
    ckpt.prune(tmp_path, keep=1)   # the corrupt newer one stays: no verified checkpoint supersedes it
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000005.1", "step_00000006"]
    shutil.rmtree(third)
    # a MANIFEST that does not list the weights is not a complete checkpoint
    (second / "MANIFEST.json").write_text(json.dumps({"trainer.json": "0" * 64}))
    assert ckpt.verify(second) == "MANIFEST.json does not list model.safetensors"
    assert ckpt.latest_good(tmp_path) is None
    # stray names never break the listing
    (tmp_path / "step_notanumber").mkdir()
    (tmp_path / "step_00000007.tmp").mkdir()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000005.1"]


def test_dataloader_worker_gives_the_same_augmented_items_as_the_main_process():
    """Augmentations are seeded per (seed, epoch, index): workers' own RNG does not matter."""
    from torch.utils.data import DataLoader

    from ft_focal.config import DataConfig
    from ft_focal.data import build_datasets
    from ft_focal.training.sampling import ResumableBatchSampler, SeededDataset

    pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    bundle = build_datasets(DataConfig(dataset="digits_lt", imbalance_factor=10, image_size=32, test_resize=32,
                                       train_crop_scale=[0.3, 1.0]), pre, 0)
    ds = SeededDataset(bundle.train, seed=5)
    ds.set_epoch(2)
    sampler = ResumableBatchSampler(len(ds), 16, seed=5, epoch=2, start_step=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=1, generator=torch.Generator().manual_seed(1))
    images, labels = next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)  # the loader drew nothing from the global RNG
    indices = list(sampler)[0]
    local = torch.stack([ds[i][0] for i in indices])
    assert torch.equal(images, local)
    ds.set_epoch(3)
    assert not torch.equal(torch.stack([ds[i][0] for i in indices]), local)


# ------------------------------------------------------------------------ non-finite steps


class _PoisonedLoss(torch.nn.Module):
    """The recipe's loss, returning NaN in the PERTURBED pass (2nd forward) of chosen updates."""

    def __init__(self, inner, bad_updates, passes_per_update=2):
        super().__init__()
        self.inner, self.bad, self.per = inner, set(bad_updates), passes_per_update
        self.calls = 0

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def forward(self, logits, labels):
        update, pass_ = divmod(self.calls, self.per)
        self.calls += 1
        losses = self.inner(logits, labels)
        if update + 1 in self.bad and pass_ == 1:
            return losses * float("nan")
        return losses


def _tiny_synthetic(out: Path, **train) -> dict:
    return {
        "name": "nonfinite", "output_dir": str(out), "model": MODEL | {"head_init": "random"},
        "tuning": {"method": "head"},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 4, "synthetic_train_size": 48,
                 "synthetic_eval_size": 8, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "optim": {"name": "focal_sam", "lr": 0.05, "rho": 0.05, "gamma": 1.0, "lam": 0.8, "one_backward": False},
        "train": {"epochs": 2, "batch_size": 8, "save_every_steps": 100, "threads": 1, **train},
        "eval": {"select_split": "val"},
    }


def _poison(monkeypatch, bad_updates):
    import ft_focal.training.parts as parts_module

    original = parts_module.build_loss_from
    monkeypatch.setattr(parts_module, "build_loss_from",
                        lambda recipe, counts: _PoisonedLoss(original(recipe, counts), bad_updates))


def test_non_finite_updates_are_skipped_and_counted(tmp_path, monkeypatch):
    from ft_focal.training.trainer import train

    _poison(monkeypatch, {2, 3, 7})
    metrics = train(recipe_from_dict(_tiny_synthetic(tmp_path / "run", max_bad_steps=3)))
    assert metrics["updates"] == 12 and metrics["skipped_steps"] == 3


@pytest.mark.parametrize("fused", [False, True])
def test_too_many_consecutive_non_finite_updates_stop_with_a_checkpoint(tmp_path, monkeypatch, capsys, fused):
    """fused: the optimizer skips on the device and the loop checks the streak at its epoch end."""

    snapshots = {}
    original_step = None

    def recording_step(self, *args, **kwargs):
        loss = original_step(self, *args, **kwargs)
        snapshots[len(snapshots) + 1] = {n: p.detach().clone() for n, p in self.runtime.model.named_parameters()
                                         if p.requires_grad}
        return loss

    from ft_focal.optim import FocalSAM

    original_step = FocalSAM.step
    monkeypatch.setattr(FocalSAM, "step", recording_step)
    _poison(monkeypatch, {4, 5, 6, 7})
    out = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    recipe = _tiny_synthetic(out, max_bad_steps=3)
    recipe["optim"]["fused"] = fused
    path.write_text(yaml.safe_dump(recipe))
    from ft_focal.commands.train import main

    code = main([str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: training stopped at update 6: 3 consecutive updates had non-finite loss")
    assert "train.max_bad_steps" in line and str(out / "checkpoints") in line
    saved = ckpt.latest_good(out / "checkpoints")
    assert saved.name == "step_00000006"
    trainer = json.loads((saved / "trainer.json").read_text())
    assert trainer["bad_streak"] == 3
    weights = load_file(str(saved / "model.safetensors"))
    for name, value in snapshots[3].items():  # the weights after the last good update (3)
        assert torch.equal(weights[name], value), name
    skipped = torch.load(saved / "optimizer.pt", weights_only=True)["wrapper"]["skipped_steps"]
    assert skipped == 3
    assert trainer["history"] == []  # it stopped at the end of epoch 0 (6 updates), before its evaluation

    # Run again once the cause is gone: it resumes there and evaluates epoch 0 exactly once.
    monkeypatch.undo()
    assert main([str(path)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert metrics["updates"] == 12 and metrics["skipped_steps"] == 3


# ------------------------------------------------------------------------ kill -9 (subprocesses)


def _write_recipe(tmp_path: Path, out: Path, workers: int) -> Path:
    path = tmp_path / f"recipe_w{workers}.yaml"
    raw = raw_recipe(out, epochs=3, save_every=3, keep=2, workers=workers)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ft_focal.train", str(recipe), f"output_dir={out}"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
       "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _command_two_processes(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "ft_focal.train", str(recipe), f"output_dir={out}"]


def _run_to_end(recipe: Path, out: Path, command=_command) -> subprocess.CompletedProcess:
    done = subprocess.run(command(recipe, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_when(recipe: Path, out: Path, ready, timeout: float = 300, command=_command):
    """Start a run, SIGKILL it (its whole process group: launcher and workers) as soon as
    `ready(out)` holds; returns the checkpoint steps on disk right after the kill, or None if the
    run finished first."""
    proc = subprocess.Popen(command(recipe, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if ready(out):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                assert not (out / "metrics.json").exists()  # really interrupted before the end
                return steps_on_disk(out)
            time.sleep(0.01)
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def steps_on_disk(out: Path) -> list[int]:
    return [ckpt.checkpoint_step(p) for p in ckpt.checkpoint_dirs(out / "checkpoints")]


KILL_POINTS = {
    # the first checkpoint appears (possibly while it is being renamed / pruned)
    "first_checkpoint": lambda out: len(steps_on_disk(out)) >= 1,
    # mid-epoch 1 (updates 9..15), after the epoch-0 evaluation
    "mid_epoch": lambda out: any(8 < s < 16 for s in steps_on_disk(out)),
    # right after the epoch-1 evaluation (its checkpoint, the one after the evaluation, appears)
    "after_epoch_eval": lambda out: 16 in steps_on_disk(out),
    # while a checkpoint is being written (its temporary directory exists)
    "during_save": lambda out: any((out / "checkpoints").glob("step_0000001*.tmp")),
}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_kill_9_at_several_points_then_rerun_is_bitwise_exact(tmp_path, workers):
    recipe = _write_recipe(tmp_path, tmp_path / "unused", workers)
    reference = tmp_path / "reference"
    _run_to_end(recipe, reference)
    expected = final_weights(reference)
    assert history_epochs(reference) == [0, 1, 2]
    landed = {}
    for name, ready in KILL_POINTS.items():
        out = tmp_path / name
        landed[name] = _kill_when(recipe, out, ready)
        done = _run_to_end(recipe, out)
        assert "Traceback" not in done.stderr
        if landed[name]:
            assert f"resumed from {out / 'checkpoints'}" in done.stderr, name
        assert_bitwise_equal(final_weights(out), expected)
        assert history_epochs(out) == [0, 1, 2], name
    # the runs were really interrupted (a run may rarely finish before a late kill point)
    assert sum(steps is not None for steps in landed.values()) >= 3, landed


@pytest.mark.slow
def test_two_processes_kill_9_mid_epoch_then_rerun_is_bitwise_exact(tmp_path):
    """DDP over gloo, 2 processes: every process's RNG, the data shards and the optimizer state are
    restored, so a run killed mid-epoch and run again ends bitwise equal to an uninterrupted one."""
    recipe = _write_recipe(tmp_path, tmp_path / "unused", 0)
    reference = tmp_path / "reference"
    _run_to_end(recipe, reference, _command_two_processes)
    assert json.loads((reference / "metrics.json").read_text())["world_size"] == 2
    out = tmp_path / "killed"
    steps = _kill_when(recipe, out, KILL_POINTS["mid_epoch"], command=_command_two_processes)
    assert steps, "the run finished before the kill point"
    done = _run_to_end(recipe, out, _command_two_processes)
    assert f"resumed from {out / 'checkpoints'}" in done.stderr
    assert_bitwise_equal(final_weights(out), final_weights(reference))
    assert history_epochs(out) == [0, 1, 2]
