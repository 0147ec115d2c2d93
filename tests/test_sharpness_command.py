"""`ft-focal sharpness` on a LoRA run of a tiny CLIP: JSON by shot group, plots, determinism."""

import json
from pathlib import Path

from ft_focal.cli import main
from ft_focal.config import recipe_from_dict
from ft_focal.models import tiny_model_config
from ft_focal.train import train


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
