"""The zero-shot baseline: `train.epochs: 0` / `--zero-shot` evaluates the
initial head through the same metrics.json, report and model card, with no optimizer step."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from ft_focal.artifacts.card import read_front_matter
from ft_focal.config import recipe_from_dict
from ft_focal.errors import UserError
from ft_focal.models import tiny_model_config


def _raw(out: Path, family: str = "open_clip", **train: object) -> dict:
    return {
        "name": "zs", "output_dir": str(out), "seed": 0, "model": tiny_model_config(family),
        "tuning": {"method": "adaptformer"},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 4, "synthetic_train_size": 24,
                 "synthetic_eval_size": 8, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "optim": {"name": "focal_sam", "lr": 0.01},
        "train": {"epochs": 0, "batch_size": 8, "eval_batch_size": 16, "threads": 1, **train},
    }


@pytest.fixture(scope="module")
def zero_shot_run(tmp_path_factory):
    """A zero-shot run of the text-initialised tiny CLIP, every optimizer step made to fail."""
    from ft_focal.training.trainer import train

    out = tmp_path_factory.mktemp("zs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        def no_step(*args, **kwargs):
            raise AssertionError("an optimizer step was taken in a zero-shot run")
        mp.setattr(torch.optim.SGD, "step", no_step)
        metrics = train(recipe_from_dict(_raw(out)))
    return out, metrics


def test_zero_shot_run_writes_metrics_json_with_no_update(zero_shot_run):
    out, metrics = zero_shot_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["zero_shot"] is True and saved["updates"] == 0 and saved["head_init"] == "text"
    assert saved["pass_counts"] == {"forward": 0, "backward": 0}
    assert saved["selected"].startswith("initial head (zero-shot")
    assert saved["test"]["num_samples"] == 8 and saved["test"]["overall"] == metrics["test"]["overall"]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert (out / "final" / "model.safetensors").is_file()


def test_zero_shot_report_says_no_training(zero_shot_run):
    out, _ = zero_shot_run
    assert "**Zero-shot baseline: no training update.**" in (out / "report.md").read_text()


def test_zero_shot_export_card_says_untrained(zero_shot_run, tmp_path):
    from ft_focal.artifacts.hub import export_run

    out, _ = zero_shot_run
    card = (export_run(out, tmp_path / "export") / "README.md").read_text()
    assert "zero-shot" in read_front_matter(card)["tags"]
    assert "A **zero-shot (untrained) baseline**" in card and "**no training update**" in card
    assert "fine-tuned on" not in card


def test_zero_shot_refuses_the_folder_of_a_training_run(tmp_path):
    from ft_focal.training.trainer import train

    (tmp_path / "run" / "checkpoints" / "step_00000004").mkdir(parents=True)
    with pytest.raises(UserError, match="holds checkpoints of a training run"):
        train(recipe_from_dict(_raw(tmp_path / "run")))


def test_zero_shot_switch_runs_the_recipe_untrained_in_its_own_folder(tmp_path):
    from ft_focal.commands.train import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tmp_path / "run", epochs=3)))
    assert main([str(recipe), "--zero-shot"]) == 0
    metrics = json.loads((tmp_path / "run_zero_shot" / "metrics.json").read_text())
    assert metrics["zero_shot"] is True and metrics["updates"] == 0 and metrics["recipe"] == "zs_zero_shot"
    assert not (tmp_path / "run").exists()


def test_negative_epochs_is_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"'train.epochs' and 'train.max_steps' must be >= 0"):
        recipe_from_dict({"train": {"epochs": -1}})


def test_text_head_without_a_text_tower_falls_back_to_class_means_of_the_training_split(tmp_path):
    """hf_vit has no text tower: head_init=text gives the class means (test transform) in a run."""
    from ft_focal.artifacts.saved import load_model_dir
    from ft_focal.data import synthetic_bundle
    from ft_focal.training.trainer import train

    raw = _raw(tmp_path / "run", family="hf_vit")
    raw["model"]["head_init"] = "text"
    metrics = train(recipe_from_dict(raw))
    assert metrics["head_init"] == "class_mean"
    model = load_model_dir(tmp_path / "run" / "final").model
    bundle = synthetic_bundle(4, {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, 24, 8, 0)
    train_set = bundle.eval_dataset("train")
    with torch.no_grad():
        feats = torch.stack([F.normalize(model.features(train_set[i][0][None])[0], dim=-1)
                             for i in range(len(train_set))])
    labels = torch.tensor([int(train_set[i][1]) for i in range(len(train_set))])
    expected = torch.stack([F.normalize(feats[labels == c].mean(0), dim=-1) for c in range(4)])
    torch.testing.assert_close(model.head.weight.detach(), expected, atol=1e-5, rtol=0)


def _run_recipe_file(path):
    from ft_focal.config import load_recipe
    from ft_focal.training.trainer import train as run

    run(load_recipe(path))


def test_class_means_of_two_processes_equal_those_of_one(tmp_path):
    """Each process reads its shard rank::2 of 25 images (uneven); the sums are all-reduced."""
    from accelerate import debug_launcher
    from safetensors.torch import load_file

    from ft_focal.training.trainer import train

    raw = _raw(tmp_path / "two", family="hf_vit")
    raw["model"]["head_init"] = "class_mean"
    raw["data"]["synthetic_train_size"] = 25
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    debug_launcher(_run_recipe_file, args=(str(tmp_path / "r.yaml"),), num_processes=2)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    train(recipe_from_dict({**raw, "output_dir": str(tmp_path / "one")}))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))["head.weight"]
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))["head.weight"]
    torch.testing.assert_close(two, one, atol=1e-6, rtol=0)
