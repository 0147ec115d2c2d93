"""The Trainer under FSDP2 (train.fsdp: true), 2 gloo processes launched by accelerate on the CPU.

The run shards for real: the main process logs "FSDP2 over 2 process(es): N trainable tensors sharded,
checked on every rank (N, N)" only after every rank checked each trainable parameter is a DTensor
(ft_focal.training.sharding.assert_sharded).
"""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import (  # noqa: E402
    KILL_POINTS,
    _command_two_processes,
    _kill_when,
    _run_to_end,
    assert_bitwise_equal,
    final_weights,
    history_epochs,
    raw_recipe,
)

from ft_focal.training import checkpoint as ckpt  # noqa: E402


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
    assert "one_backward" not in done.stderr or "switched off" in done.stderr
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
