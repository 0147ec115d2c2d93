"""The Trainer under FSDP2 (train.fsdp: true), 2 gloo processes launched by accelerate on the CPU.

The run shards for real: the main process logs "FSDP2 over 2 process(es): N trainable tensors sharded,
checked on every rank (N, N)" only after every rank checked each trainable parameter is a DTensor
(ft_focal.training.sharding.assert_sharded).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import (  # noqa: E402 (after the sys.path entry it needs)
    ENV,
    KILL_POINTS,
    _command_two_processes,
    _kill_when,
    _run_to_end,
    assert_bitwise_equal,
    final_weights,
    history_epochs,
    raw_recipe,
    steps_on_disk,
)

from ft_focal.training import checkpoint as ckpt  # noqa: E402 (after the sys.path entry it needs)


def _recipe(tmp_path: Path, fsdp: bool, **train) -> Path:
    raw = raw_recipe(tmp_path / "unused", epochs=2, save_every=3, keep=2)
    raw["train"].update(fsdp=fsdp, **train)
    path = tmp_path / f"recipe_fsdp{int(fsdp)}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sharded_tensors(stderr: str) -> int:
    found = re.findall(r"FSDP2 over 2 process\(es\): (\d+) trainable tensors sharded, checked on every rank "
                       r"\((\d+), (\d+)\)", stderr)
    assert len(found) == 1, "the main process must report both processes' DTensor parameters"
    assert len(set(found[0])) == 1, found
    return int(found[0][0])


@pytest.mark.slow
def test_fsdp2_run_killed_mid_epoch_reruns_bitwise_and_matches_ddp(tmp_path):
    recipe = _recipe(tmp_path, fsdp=True)
    reference = tmp_path / "fsdp"
    done = _run_to_end(recipe, reference, _command_two_processes)
    assert _sharded_tensors(done.stderr) > 0
    # the one-backward path cannot run on shards: "auto" says so once, at INFO, and the exact path runs
    assert "one_backward='auto': off (FSDP2 shards the parameters)" in done.stderr
    assert "first update: focal_sam runs 2F + 3B" in done.stderr
    # every rank's shard is in the checkpoint and in its manifest
    last = ckpt.checkpoint_dirs(reference / "checkpoints")[-1]
    manifest = json.loads((last / ckpt.MANIFEST).read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest)
    assert ckpt.verify(last) is None
    assert json.loads((last / "trainer.json").read_text())["fsdp"] is True

    # kill -9 mid-epoch, rerun: bitwise equal to the uninterrupted FSDP2 run
    out = tmp_path / "killed"
    steps = _kill_when(recipe, out, KILL_POINTS["mid_epoch"], command=_command_two_processes)
    assert steps, "the run finished before the kill point"
    again = _run_to_end(recipe, out, _command_two_processes)
    assert f"resumed from {out / 'checkpoints'}" in again.stderr
    assert_bitwise_equal(final_weights(out), final_weights(reference))
    assert history_epochs(out) == [0, 1]

    # the same recipe under DDP: the same training to float rounding
    ddp = tmp_path / "ddp"
    _run_to_end(_recipe(tmp_path, fsdp=False), ddp, _command_two_processes)
    a, b = final_weights(reference), final_weights(ddp)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-12) for k in b)
    assert worst < 1e-4, worst

    # final/ is one consolidated file that load_model reads as today
    from ft_focal.artifacts.hub import load_model

    model = load_model(str(reference / "final"), plain=True)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert not list((reference / "final").glob("*.distcp"))


def _command_processes(n: int):
    def command(recipe: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "ft_focal.train", str(recipe), f"output_dir={out}"]
    return command


@pytest.mark.slow
def test_fsdp2_sigterm_writes_a_checkpoint_and_a_rerun_on_four_processes_reshards_it(tmp_path):
    """SLURM preemption under FSDP2: SIGTERM to every process of the job step; each rank finishes its
    update, the sharded checkpoint is written and the run stops with one line. Rerun with another
    process count (4; the batch of 64 must divide by it): DCP reshards the weights and optimizer state,
    the run says so and finishes."""
    recipe = _recipe(tmp_path, fsdp=True)
    out = tmp_path / "terminated"
    proc = subprocess.Popen(_command_two_processes(recipe, out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not steps_on_disk(out):
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before the signal"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stop = re.search(r"stopped by SIGTERM at update (\d+) of 16: a checkpoint is written in (\S+);", err)
    assert stop and stop.group(2) == str(out / "checkpoints"), err[-3000:]
    step = int(stop.group(1))
    assert step in steps_on_disk(out) and not (out / "metrics.json").exists()
    last = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    assert ckpt.verify(last) is None and {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in last.iterdir()}

    done = _run_to_end(recipe, out, _command_processes(4))
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in done.stderr
    assert "was written by 2 process(es), this run has 4: the weights and optimizer state were resharded" in done.stderr
    assert re.search(r"FSDP2 over 4 process\(es\): (\d+) .* on every rank \(\1, \1, \1, \1\)", done.stderr)
    assert json.loads((out / "metrics.json").read_text())
    assert history_epochs(out) == [0, 1]
