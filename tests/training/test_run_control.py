"""Nothing is lost when a run stops or restarts (ft_focal/training/run_control.py): unverifiable checkpoints
stop the run instead of being rotated away, `--restart` moves them aside, the non-finite stop's
advice works when followed, a changed recipe is named key by key, and SIGTERM / SIGUSR1 write a
checkpoint from which a rerun continues bitwise exactly (the harness of tests/training/test_resume.py)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import (  # noqa: E402 (after the sys.path entry it needs)
    ENV,
    _command,
    _run_to_end,
    _tiny_synthetic,
    _write_recipe,
    assert_bitwise_equal,
    final_weights,
    history_epochs,
    raw_recipe,
    steps_on_disk,
)

from ft_focal.config import recipe_from_dict
from ft_focal.training import checkpoint as ckpt
from ft_focal.training.run_control import PREEMPTED_EXIT_CODE, Preempted


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run of tests/training/test_resume.py's recipe."""
    from ft_focal.training.trainer import train

    out = tmp_path_factory.mktemp("uninterrupted") / "reference"
    return out, train(recipe_from_dict(raw_recipe(out)))


def _recipe_file(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_unverifiable_checkpoints_stop_the_run_and_restart_moves_them_aside(tmp_path, capsys, caplog):
    from ft_focal.commands.train import main

    out = tmp_path / "run"
    recipe = _recipe_file(tmp_path, _tiny_synthetic(out))
    assert main([str(recipe)]) == 0
    names = [p.name for p in ckpt.checkpoint_dirs(out / "checkpoints")]
    assert names == ["step_00000006", "step_00000012"]
    (out / "checkpoints" / names[0] / "model.safetensors").write_bytes(b"broken")
    (out / "checkpoints" / names[1] / "trainer.json").write_text("{}")   # its weights are intact
    before = _tree(out / "checkpoints")
    capsys.readouterr()

    with caplog.at_level(logging.INFO, logger="ft_focal"):
        assert main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {out / 'checkpoints'}: 2 checkpoint(s) and none verifies") and "--restart" in line
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.endswith("step_00000006: checksum mismatch in model.safetensors") for m in errors), errors
    assert any(m.endswith("step_00000012: checksum mismatch in trainer.json (its model.safetensors is intact)")
               for m in errors), errors
    assert not any("resumed from" in r.getMessage() or r.getMessage().startswith("first update")
                   for r in caplog.records), "nothing may start next to unverifiable checkpoints"
    assert _tree(out / "checkpoints") == before   # nothing deleted or changed

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ft_focal"):
        assert main([str(recipe), "--restart"]) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("previous_")]
    assert len(aside) == 1 and _tree(aside[0] / "checkpoints") == before
    assert (aside[0] / "best_model.safetensors").is_file()   # the old run's best model went along
    assert any(f"the previous checkpoints are in {aside[0]}" in r.getMessage() for r in caplog.records)
    assert [p.name for p in ckpt.checkpoint_dirs(out / "checkpoints")] == names   # the new run's own


def test_resume_with_another_recipe_names_each_changed_key(tmp_path, caplog):
    from ft_focal.commands.train import main

    out = tmp_path / "run"
    raw = _tiny_synthetic(out, epochs=1)
    assert main([str(_recipe_file(tmp_path, raw))]) == 0
    raw["train"]["epochs"] = 2
    raw["optim"]["lr"] = 0.01
    raw["train"]["log_every_steps"] = 3   # operational: may change on resume, not reported
    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        assert main([str(_recipe_file(tmp_path, raw))]) == 0
    warnings = [r.getMessage() for r in caplog.records if "the recipe differs" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "optim.lr: 0.05 -> 0.01" in warnings[0] and "train.epochs: 1 -> 2" in warnings[0]
    assert "log_every_steps" not in warnings[0]


def test_following_the_non_finite_stop_advice_finishes_the_run(tmp_path, monkeypatch, capsys):
    """A learning rate that blows up (here: the loss turns NaN whenever the optimizer's ACTUAL
    learning rate is above 0.1) stops the run; the line's advice, followed as printed, finishes it.
    (Resuming with a lower optim.lr does not: the checkpoint restores the old one.)"""
    import ft_focal.training.parts as parts_module
    from ft_focal.commands.train import main

    optimizers = []
    build_optimizer, build_loss = parts_module.build_optimizer_from, parts_module.build_loss_from

    def recording_optimizer(*args, **kwargs):
        optimizers.append(build_optimizer(*args, **kwargs))
        return optimizers[-1]

    def exploding_loss(recipe, counts):
        inner = build_loss(recipe, counts)

        class Exploding(type(inner)):
            def forward(self, logits, labels):
                losses = super().forward(logits, labels)
                return losses * float("nan") if optimizers[-1].param_groups[0]["lr"] > 0.1 else losses

        inner.__class__ = Exploding
        return inner

    monkeypatch.setattr(parts_module, "build_optimizer_from", recording_optimizer)
    monkeypatch.setattr(parts_module, "build_loss_from", exploding_loss)
    out = tmp_path / "run"
    raw = _tiny_synthetic(out, max_bad_steps=3)
    raw["optim"]["lr"] = 0.5
    recipe = _recipe_file(tmp_path, raw)
    assert main([str(recipe)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: training stopped at update 3: 3 consecutive updates had non-finite loss")
    advice = re.search(r"adding (optim\.lr=\S+ --restart)", line)
    assert advice, line
    assert main([str(recipe), *advice.group(1).split()]) == 0
    assert (out / "metrics.json").is_file()
    assert optimizers[-1].param_groups[0]["initial_lr"] == pytest.approx(0.05)
    aside = [p for p in out.iterdir() if p.name.startswith("previous_")]
    assert [p.name for p in ckpt.checkpoint_dirs(aside[0] / "checkpoints")] == ["step_00000003"]


def test_sigusr1_writes_a_checkpoint_and_the_rerun_is_bitwise_exact(reference_run, tmp_path, monkeypatch):
    """The signal arrives during update 5 (mid-epoch, between periodic checkpoints): the run ends
    that update, writes step 5 and stops; the rerun ends bitwise equal to the uninterrupted run."""
    from ft_focal.optim import FocalSAM
    from ft_focal.training.trainer import train

    ref, ref_metrics = reference_run
    original_step, calls = FocalSAM.step, []

    def signalled_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original_step(self, *args, **kwargs)

    previous_handler = signal.getsignal(signal.SIGUSR1)
    run = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        patch.setattr(FocalSAM, "step", signalled_step)
        with pytest.raises(Preempted, match=r"stopped by SIGUSR1 at update 5 of 16: a checkpoint is written in"):
            train(recipe_from_dict(raw_recipe(run)))
    assert signal.getsignal(signal.SIGUSR1) is previous_handler   # handlers restored
    assert steps_on_disk(run) == [3, 5] and not (run / "metrics.json").exists()
    metrics = train(recipe_from_dict(raw_recipe(run)))
    assert_bitwise_equal(final_weights(run), final_weights(ref))
    assert metrics["history"] == ref_metrics["history"] and history_epochs(run) == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_to_a_real_process_checkpoints_exits_75_and_the_rerun_is_bitwise_exact(tmp_path, workers):
    """workers=1: the signal goes to the whole process group, DataLoader worker included, as SLURM
    sends it to every process of a job step."""
    recipe = _write_recipe(tmp_path, tmp_path / "unused", workers)
    reference = tmp_path / "reference"
    _run_to_end(recipe, reference)
    out = tmp_path / "terminated"
    proc = subprocess.Popen(_command(recipe, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not steps_on_disk(out):
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before the signal"
        if workers:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err
    stop = re.search(r"stopped by SIGTERM at update (\d+) of 24: a checkpoint is written in (\S+);", err)
    assert stop and stop.group(2) == str(out / "checkpoints"), err[-2000:]
    assert int(stop.group(1)) in steps_on_disk(out) and not (out / "metrics.json").exists()
    done = _run_to_end(recipe, out)
    assert f"resumed from {out / 'checkpoints' / f'step_{int(stop.group(1)):08d}'}" in done.stderr
    assert_bitwise_equal(final_weights(out), final_weights(reference))
    assert history_epochs(out) == [0, 1, 2]
