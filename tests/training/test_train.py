"""CPU smoke tests of the whole training path: recipe -> data -> model -> optimizer -> loop ->
final/ + metrics.json, for each backbone family and tuning method, plus two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_focal.config import recipe_from_dict
from ft_focal.models import tiny_model_config
from ft_focal.training.trainer import train

REPO = Path(__file__).resolve().parents[2]


def tiny_recipe(tmp_path, family="open_clip", tuning="lora", optim="focal_sam", **extra):
    model = tiny_model_config(family)
    raw = {
        "name": f"smoke_{family}_{tuning}_{optim}",
        "output_dir": str(tmp_path / "run"),
        "model": model,
        "tuning": {"method": tuning, "lora_rank": 4},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 6, "synthetic_train_size": 48,
                 "synthetic_eval_size": 24, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "loss": {"name": "la"},
        "optim": {"name": optim, "lr": 0.01, **({"rho": 0.05, "gamma": 1.0, "lam": 0.8} if optim == "focal_sam" else {})},
        "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "save_every_steps": 4, "threads": 1},
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return recipe_from_dict(raw)


def check_run(out: Path, world_size: int = 1) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == world_size
    test = metrics["test"]
    for key in ("overall", "many", "medium", "few"):
        assert test[key] is None or 0.0 <= test[key] <= 1.0
    assert len(test["per_class"]) == len(metrics["class_counts"])
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "recipe.yaml").is_file()
    assert (out / "report.md").is_file() and (out / "per_class_accuracy.png").stat().st_size > 1000
    return metrics


FAST = [("open_clip", "lora"), ("hf_clip", "adaptformer"), ("hf_vit", "full")]
SLOW = [(f, t) for f in ("open_clip", "hf_clip", "hf_vit") for t in ("full", "lora", "adaptformer", "head")
        if (f, t) not in FAST]


def _smoke(tmp_path, family, tuning, monkeypatch):
    import ft_focal.models as models

    built = {}
    original = models.build_classifier

    def recording_build(*args, **kwargs):  # keep the initial weights of the model train() builds
        model = original(*args, **kwargs)
        built["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        built["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return model

    monkeypatch.setattr(models, "build_classifier", recording_build)
    recipe = tiny_recipe(tmp_path, family, tuning)
    metrics = train(recipe)
    out = Path(recipe.output_dir)
    check_run(out)
    assert metrics["updates"] == 2 * (48 // 16)
    assert metrics["skipped_steps"] == 0
    # Exactly the tuning method's parameters moved; every frozen tensor is bit-identical.
    final = load_file(str(out / "final" / "model.safetensors"))
    changed = {n for n, p in built["initial"].items() if not torch.equal(final[n], p)}
    assert changed and changed <= built["trainable"], sorted(changed - built["trainable"])[:3]
    assert any("head" in n for n in changed)
    if tuning != "head":
        assert any("head" not in n for n in changed)


@pytest.mark.parametrize("family,tuning", FAST)
def test_smoke_family_and_tuning(tmp_path, family, tuning, monkeypatch):
    _smoke(tmp_path, family, tuning, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("family,tuning", SLOW)
def test_smoke_family_and_tuning_full_matrix(tmp_path, family, tuning, monkeypatch):
    _smoke(tmp_path, family, tuning, monkeypatch)


@pytest.mark.parametrize("optim", ["erm", "sam", "imbsam", "sse_sam"])
def test_every_optimizer_runs_in_the_loop(tmp_path, optim):
    extra = {"optim__rho_head": 0.05, "optim__rho_tail": 0.1} if optim == "sse_sam" else {}
    if optim in ("sam", "imbsam"):
        extra["optim__rho"] = 0.05
    recipe = tiny_recipe(tmp_path, "hf_vit", "head", optim, train__epochs=1, **extra)
    metrics = train(recipe)
    assert metrics["optimizer"] == optim and metrics["updates"] == 3
    passes = metrics["pass_counts"]
    assert passes["forward"] >= 3 and passes["backward"] >= 3


def test_gradient_accumulation_and_bf16_run(tmp_path):
    recipe = tiny_recipe(tmp_path, "open_clip", "adaptformer", train__grad_accum_steps=2,
                         train__mixed_precision="bf16", train__epochs=1, train__grad_clip=1.0)
    metrics = train(recipe)
    assert metrics["updates"] == 3
    check_run(Path(recipe.output_dir))


def test_rerun_of_a_finished_run_resumes_instead_of_retraining(tmp_path):
    recipe = tiny_recipe(tmp_path, "hf_vit", "head", train__epochs=1)
    first_metrics = train(recipe)
    first = load_file(str(Path(recipe.output_dir) / "final" / "model.safetensors"))
    metrics = train(recipe)
    assert metrics["pass_counts"] == first_metrics["pass_counts"]  # restored, no pass recomputed
    assert metrics["updates"] == first_metrics["updates"]
    again = load_file(str(Path(recipe.output_dir) / "final" / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


# accelerate.debug_launcher forks: in this test process, autograd (and on a GPU machine CUDA) threads
# already exist, and a fork after threads start can hang or fail. It runs in a fresh interpreter instead.
_TWO_PROCESSES = """
import sys
from accelerate import debug_launcher


def body(recipe_path):
    from ft_focal.config import load_recipe
    from ft_focal.training.trainer import train

    train(load_recipe(recipe_path))


if __name__ == "__main__":
    debug_launcher(body, args=(sys.argv[1],), num_processes=2)
"""


def test_two_processes_with_debug_launcher(tmp_path):
    from ft_focal.config import save_recipe

    recipe = tiny_recipe(tmp_path, "hf_vit", "lora", train__epochs=1)
    path = tmp_path / "recipe.yaml"
    save_recipe(recipe, path)
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESSES)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = check_run(Path(recipe.output_dir), world_size=2)
    assert metrics["updates"] == 3


@pytest.mark.slow
def test_demo_recipe_with_accelerate_launch_two_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ft_focal.train",
           str(REPO / "recipes/demo/digits_lt_focal_sam.yaml"), f"output_dir={tmp_path / 'run'}", "train.epochs=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_resolved_recipe_written_to_output_dir(tmp_path):
    recipe = tiny_recipe(tmp_path, "hf_vit", "head", train__epochs=1)
    train(recipe)
    written = yaml.safe_load((Path(recipe.output_dir) / "recipe.yaml").read_text())
    assert written["optim"]["lam"] == 0.8 and written["train"]["batch_size"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("one_backward", [False, True])
def test_compiled_model_with_inductor_runs_focal_sam(tmp_path, one_backward):
    """train.compile with inductor: the official step back-propagates one forward twice (and the
    one-backward path does so on its first-step check), which AOT autograd's donated buffers forbid
    unless the loop turns them off; the one-backward path keeps 2F + 2B after the first update."""
    recipe = tiny_recipe(tmp_path, "open_clip", "lora", train__epochs=1, train__compile=True,
                         optim__one_backward=one_backward)
    metrics = train(recipe)
    assert metrics["updates"] == 3 and metrics["skipped_steps"] == 0
    backward = metrics["pass_counts"]["backward"]
    assert backward == (3 * 2 + 1 if one_backward else 3 * 3)   # +1: the first-step check
    check_run(Path(recipe.output_dir))
