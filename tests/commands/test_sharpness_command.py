"""`ft-focal sharpness` on a LoRA run of a tiny CLIP: JSON by shot group, plots, determinism."""

import json
from pathlib import Path

from ft_focal.cli import main
from ft_focal.config import recipe_from_dict
from ft_focal.models import tiny_model_config
from ft_focal.training.trainer import train


def test_sharpness_command_on_a_tiny_clip_lora_run(tmp_path):
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": tiny_model_config("open_clip"),
        "tuning": {"method": "lora", "lora_rank": 2},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 4, "synthetic_train_size": 32,
                 "synthetic_eval_size": 16, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "optim": {"name": "sam", "rho": 0.05},
        "train": {"epochs": 1, "batch_size": 16, "threads": 1},
    })
    train(recipe)
    final = Path(recipe.output_dir) / "final"
    args = ["sharpness", str(final), "--batches", "1", "--batch-size", "32", "--iters", "4", "--trace-samples", "4"]
    assert main(args) == 0
    out = Path(recipe.output_dir) / "sharpness"
    result = json.loads((out / "sharpness.json").read_text())
    assert result["trainable_parameters"] > 0 and result["groups"]
    for entry in result["groups"].values():
        if entry["num_samples"]:
            assert entry["trace"] is not None and len(entry["eigenvalues"]) == 1
            assert entry["sam_sharpness"] is not None
    assert (out / "sharpness.png").stat().st_size > 1000
    # Deterministic given the seed.
    assert main(args + ["--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "sharpness.json").read_text())
    assert again["groups"] == result["groups"]
    assert main(["sharpness", str(final), "--groups", "tiny"]) == 2


def _tiny_run(tmp_path) -> Path:
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": tiny_model_config("open_clip"),
        "tuning": {"method": "head"},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 4, "synthetic_train_size": 32,
                 "synthetic_eval_size": 16, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "optim": {"name": "sam", "rho": 0.05},
        "train": {"epochs": 1, "batch_size": 16},
    })
    train(recipe)
    return Path(recipe.output_dir) / "final"


def test_sharpness_threads_progress_and_class_range(tmp_path, monkeypatch, capsys, caplog):
    """train.threads is used while measuring (and restored); passes are counted against the
    announced upper bound with the time left; a class id the model lacks is one line, exit 2."""
    import logging

    import torch

    import ft_focal.commands.sharpness as command
    import ft_focal.sharpness

    final = _tiny_run(tmp_path)
    threads_seen = []
    measure_groups = ft_focal.sharpness.group_sharpness

    def recording(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return measure_groups(*args, **kwargs)

    monkeypatch.setattr(ft_focal.sharpness, "group_sharpness", recording)
    monkeypatch.setattr(command, "PROGRESS_EVERY_S", 0.0)
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    args = ["sharpness", str(final), f"train.threads={wanted}", "--batches", "1", "--batch-size", "32",
            "--iters", "3", "--trace-samples", "2", "--classes", "0", "3"]
    with caplog.at_level(logging.INFO, logger="ft_focal"):
        assert main(args) == 0
    assert threads_seen == [wanted] and torch.get_num_threads() == before
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sharpness: ")]
    total = 2 * (1 + 3 + 2 + 2)   # two classes: count + k*iters + trace + SAM (2 passes)
    assert lines[0] == f"sharpness: 2 group(s), at most {total} passes over 32 training images"
    passes = [ln for ln in lines if " of at most " in ln]
    assert passes[0].startswith(f"sharpness: pass 1 of at most {total} (") and "estimating time left" in passes[0]
    assert all("elapsed, about " in ln and ln.endswith(" left") for ln in passes[1:])
    done = int(lines[-1].split()[1])
    assert lines[-1].startswith(f"sharpness: {done} passes in ") and len(passes) == done <= total

    capsys.readouterr()
    assert main(["sharpness", str(final), "--classes", "0", "7", "--iters", "1", "--trace-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --classes: 7 is not a class of this model (it has 4 classes, ids 0..3)"
