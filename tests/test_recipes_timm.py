"""The timm-family recipes (recipes/*/timm_*.yaml): one per backbone (CLIP, ImageNet-21k, DINOv2, SigLIP,
EVA-02), flat, with a header saying how to launch them, where the weights go and that no paper row is
reproduced; each dry-runs (`--dry-run`: a tiny stand-in of the SAME timm architecture, the recipe's
tuning / head / loss / optimizer, 1000 classes, two updates and one evaluation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ft_focal.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("timm_*.yaml"))
# recipe stem -> timm model name (architecture.tag) and the real model's parameter count (millions)
EXPECTED = {
    "timm_clip_vit_b16_adaptformer_focal_sam": ("vit_base_patch16_clip_224.openai", 85.8),
    "timm_vit_b16_in21k_adaptformer_focal_sam": ("vit_base_patch16_224.augreg_in21k", 85.8),
    "timm_dinov2_vit_b14_adaptformer_focal_sam": ("vit_base_patch14_dinov2.lvd142m", 85.8),
    "timm_siglip_vit_b16_adaptformer_focal_sam": ("vit_base_patch16_siglip_224.webli", 92.9),
    "timm_eva02_b14_adaptformer_focal_sam": ("eva02_base_patch14_224.mim_in22k", 85.8),
}


def header_of(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not (line.startswith("#") or not line.strip()):
            break
        lines.append(line)
    return "\n".join(lines)


def test_one_timm_recipe_per_family():
    assert sorted(p.stem for p in RECIPES) == sorted(EXPECTED)
    assert all(p.parent.name == "imagenet_lt" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_timm_recipe_model_and_header(path):
    recipe = load_recipe(path)
    rel = path.relative_to(ROOT).as_posix()
    name, _ = EXPECTED[path.stem]
    raw = yaml.safe_load(path.read_text())
    assert set(raw) >= {"name", "output_dir", "seed", "model", "tuning", "data", "loss", "optim", "train", "eval"}
    assert recipe.name == f"imagenet_lt/{path.stem}" and recipe.output_dir == f"runs/imagenet_lt/{path.stem}"
    m = recipe.model
    assert (m.family, m.name, m.head, m.head_init) == ("timm", name, "cosine", "class_mean")
    assert m.pretrained == f"/data/weights/timm/{name}/model.safetensors"
    assert recipe.tuning.method == "adaptformer" and recipe.optim.name == "focal_sam"
    assert recipe.data.num_classes == 1000 and recipe.data.image_size == 224
    head = header_of(path)
    assert f"accelerate launch --config_file recipes/accelerate/single_gpu_bf16.yaml -m ft_focal.train {rel}" in head
    assert f"ft-focal train {rel}" in head and f"ft-focal train {rel} --dry-run" in head
    assert "Reproduces: no paper row" in head
    assert f"hf download timm/{name} model.safetensors" in head and f"--local-dir /data/weights/timm/{name}" in head
    assert "Time per epoch" in head and "Memory" in head


def test_timm_recipes_share_the_clip_adaptformer_settings_except_the_model():
    clip = yaml.safe_load((ROOT / "recipes/imagenet_lt/clip_vit_b16_adaptformer_focal_sam.yaml").read_text())
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())
        for section in ("seed", "tuning", "data", "loss", "optim", "train", "eval", "hub"):
            assert raw[section] == clip[section], (path.stem, section)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_timm_recipe_preprocess_and_size_of_the_real_model(path):
    from ft_focal.models import preprocess_for
    from ft_focal.training.preflight import real_parameter_counts

    recipe = load_recipe(path)
    assert preprocess_for(recipe.model)["image_size"] == 224  # DINOv2 through model.config img_size
    counts = real_parameter_counts(recipe, 1000)  # the real architecture on the meta device
    _, millions = EXPECTED[path.stem]
    head = 768 * 1000
    assert counts["total"] - counts["trainable"] == pytest.approx(millions * 1e6, rel=0.01)
    assert head < counts["trainable"] < head + 1e6  # head + 12 blocks of bottleneck-32 adapters


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])  # ~1.5 s each: all in the default suite
def test_timm_recipe_dry_run(path, tmp_path, capsys):
    from ft_focal.commands.dry_run import dry_run

    recipe = load_recipe(path)
    plan = dry_run(recipe, output_dir=str(tmp_path / "run"))
    printed = capsys.readouterr().out
    assert plan["family"] == "timm" and plan["classes"] == 1000 and plan["dry_run_updates"] == 2
    assert "dry run OK" in printed and any(m.startswith("model.pretrained") for m in plan["missing_paths"])
    # Pass counts with a random head: on the dry run's noise images a tiny random-init DINOv2 (LayerScale
    # 1e-5) gives nearly one feature for every image, so the class-mean rows are parallel to every feature
    # and the head's gradient (its part tangent to each row) is ~1e-6 of its terms: the first-step check
    # then sees float32 rounding as a difference and takes the exact path (same update, one more backward).
    plan = dry_run(load_recipe(path, ["model.head_init=random"]), output_dir=str(tmp_path / "run_random_head"))
    # two updates of 2F + 2B (the one-backward path covers AdaptFormer + head) + the first one's checking backward;
    # the three-backward path would count 6 backward passes
    assert plan["dry_run_pass_counts"] == {"forward": 4, "backward": 5}
