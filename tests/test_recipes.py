"""The shipped recipes and accelerate configs: they load, say how to launch them, match the paper's
released settings where they claim to, and build (``--dry-run``) on the CPU.

The dry run of every recipe builds a tiny backbone of the same family with the recipe's tuning,
head, loss and optimizer, on synthetic images with the recipe's REAL class count, and runs two
updates and one evaluation. Three representative ones (AdaptFormer / LoRA on open_clip, full
fine-tuning of the demo) run by default; the rest are marked slow (`pytest -m slow`). The timm-family
recipes (timm_*.yaml: one per backbone, no paper row) are checked for their model, header and
preprocessing, and each dry-runs in the default suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ft_focal.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = ROOT / "recipes"
ACCEL_DIR = RECIPES_DIR / "accelerate"
# The timm-family recipes (timm_*.yaml: other backbones, no paper row) are TIMM_RECIPES, checked below.
RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if ACCEL_DIR not in p.parents and not p.name.startswith("timm_"))
ACCEL_CONFIGS = sorted(ACCEL_DIR.glob("*.yaml"))

NUM_CLASSES = {"imagenet_lt": 1000, "inat2018": 8142, "places_lt": 365, "cifar100_lt": 100,
               "cifar10_lt": 10, "demo": 10}
TRAIN_IMAGES = {"imagenet_lt": 115846, "inat2018": 437513, "places_lt": 62500, "cifar100_lt": 10847,
                "cifar10_lt": 12406}
# docs/algorithms.md, released Focal-SAM settings (CLIP ViT-B/16 AdaptFormer rows): rho, gamma, lam.
# Places-LT has no released row: its recipes use the ImageNet-LT settings (and say so).
PAPER = {"imagenet_lt": (0.05, 0.5, 0.8), "inat2018": (0.02, 0.2, 1.0), "cifar100_lt": (0.05, 5.5, 0.8),
         "cifar10_lt": (0.05, 1.5, 0.7), "places_lt": (0.05, 0.5, 0.8)}
SELECT = {"imagenet_lt": "val", "places_lt": "val", "inat2018": "none", "cifar100_lt": "none",
          "cifar10_lt": "none", "demo": "val"}
# One dry run per tuning method / family runs by default; the others are slow.
FAST_DRY_RUNS = {
    "imagenet_lt/clip_vit_b16_adaptformer_focal_sam.yaml",
    "cifar10_lt/clip_vit_b16_lora_focal_sam.yaml",
    "demo/digits_lt_focal_sam.yaml",
}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def dataset_of(path: Path) -> str:
    return path.relative_to(RECIPES_DIR).parts[0]


def header_of(path: Path) -> str:
    """The comment block at the top of a file (up to the first non-comment, non-blank line)."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            lines.append(line)
        else:
            break
    return "\n".join(lines)


def ids(paths):
    return [p.relative_to(RECIPES_DIR).as_posix() for p in paths]


# ------------------------------------------------------------------------------------ inventory


def test_every_benchmark_has_the_three_tunings_and_imagenet_lt_every_optimizer():
    names = {p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES}
    for ds in TRAIN_IMAGES:
        for tuning in ("adaptformer", "lora", "full"):
            assert f"{ds}/clip_vit_b16_{tuning}_focal_sam.yaml" in names
    for opt in ("erm", "sam", "imbsam", "ccsam", "sse_sam", "focal_sam"):
        assert f"imagenet_lt/clip_vit_b16_adaptformer_{opt}.yaml" in names
    for demo in ("digits_lt_focal_sam", "digits_lt_sam", "digits_lt_erm"):
        assert f"demo/{demo}.yaml" in names
    assert all(dataset_of(p) in NUM_CLASSES for p in RECIPES), "a recipe folder without an expected class count"


# ------------------------------------------------------------------------------- load + validate


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_loads_and_names_itself(path):
    recipe = load_recipe(path)
    stem = path.relative_to(RECIPES_DIR).with_suffix("").as_posix()
    assert recipe.name in (stem, path.stem)
    assert recipe.output_dir == f"runs/{stem}"
    raw = yaml.safe_load(path.read_text())
    # flat and explicit: every section spelled out, no inheritance keys
    assert set(raw) >= {"name", "output_dir", "seed", "model", "tuning", "data", "loss", "optim", "train", "eval"}


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_header_gives_launch_reproduction_and_estimates(path):
    head = header_of(path)
    r = rel(path)
    assert "accelerate launch --config_file recipes/accelerate/" in head
    assert f"-m ft_focal.train {r}" in head
    assert f"ft-focal train {r}" in head
    assert "Reproduces:" in head
    assert "Time per epoch" in head
    assert "Memory" in head
    if dataset_of(path) != "demo":
        # the arithmetic of the estimate is shown, with the dataset's real training-set size
        assert "35.2 GFLOP" in head and "TFLOP/s" in head
        assert f"{TRAIN_IMAGES[dataset_of(path)]:,} images x" in head
        assert "batch 128" in head


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_dataset_class_count_and_protocol(path):
    recipe = load_recipe(path)
    ds = dataset_of(path)
    assert recipe.data.num_classes == NUM_CLASSES[ds]
    assert recipe.eval.select_split == SELECT[ds]
    assert recipe.eval.test_split == "test"
    if ds == "demo":
        return
    assert recipe.model.family == "open_clip" and recipe.model.name == "ViT-B-16-quickgelu"
    assert recipe.model.head == "cosine" and recipe.model.head_init == "text" and recipe.model.head_scale == 25
    assert recipe.model.pretrained and recipe.model.pretrained.endswith((".safetensors", ".bin"))
    assert (recipe.data.image_size, recipe.data.test_resize) == (224, 224)
    assert recipe.train.mixed_precision == "bf16"
    assert recipe.data.label_order == ("alphabetical" if ds == "inat2018" else "given")
    if ds.startswith("cifar"):
        assert recipe.data.dataset == "cifar_lt" and recipe.data.imbalance_factor == 100
        assert recipe.data.val_list is None
    else:
        assert recipe.data.dataset == "split_file" and recipe.data.imbalance_factor is None
        assert (recipe.data.val_list is None) == (ds == "inat2018")


def test_vit_b16_quickgelu_is_the_openai_architecture():
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")
    assert cfg["quick_gelu"] is True
    assert open_clip.pretrained.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True
    base = dict(open_clip.get_model_config("ViT-B-16"))
    assert {k: v for k, v in cfg.items() if k != "quick_gelu"} == base


def test_builtin_class_name_files_have_the_recipes_class_count():
    from ft_focal.data.splits import parse_classnames, resolve_path

    seen = set()
    for path in RECIPES:
        recipe = load_recipe(path)
        names = recipe.data.classnames
        if names and names.startswith("builtin:") and names not in seen:
            seen.add(names)
            parsed = parse_classnames(resolve_path(names, "data.classnames"))
            assert len(parsed.names) == recipe.data.num_classes, (path, names)
    assert seen == {"builtin:imagenet_lt/classnames.txt", "builtin:inat2018/categories.json.gz"}


# ------------------------------------------------------------------------- paper settings


@pytest.mark.parametrize("ds", sorted(PAPER))
def test_adaptformer_focal_sam_uses_the_released_settings(ds):
    recipe = load_recipe(RECIPES_DIR / ds / "clip_vit_b16_adaptformer_focal_sam.yaml")
    o, t = recipe.optim, recipe.train
    assert (o.name, o.base, o.lr, o.momentum, o.weight_decay) == ("focal_sam", "sgd", 0.01, 0.9, 5e-4)
    assert (o.rho, o.gamma, o.lam) == PAPER[ds]
    assert (t.epochs, t.batch_size, t.scheduler, t.warmup_steps) == (20, 128, "cosine", 0)
    assert (recipe.loss.name, recipe.loss.tau) == ("la", 1.0)
    assert recipe.tuning.method == "adaptformer" and recipe.tuning.adapter_bottleneck is None


@pytest.mark.parametrize("ds", sorted(PAPER))
def test_lora_and_full_differ_from_adaptformer_only_where_they_say(ds):
    def load(tuning):
        return yaml.safe_load((RECIPES_DIR / ds / f"clip_vit_b16_{tuning}_focal_sam.yaml").read_text())

    ada, lora, full = load("adaptformer"), load("lora"), load("full")
    for other, tuning in ((lora, "lora"), (full, "full")):
        for section in ("model", "data", "loss", "train", "eval"):
            assert other[section] == ada[section], (ds, tuning, section)
        opt = dict(other["optim"])
        expected_lr = 1e-3 if tuning == "full" else 0.01
        assert opt.pop("lr") == expected_lr
        assert opt == {k: v for k, v in ada["optim"].items() if k != "lr"}
        assert other["tuning"]["method"] == tuning


def test_imagenet_lt_comparison_differs_only_in_the_optimizer():
    base = yaml.safe_load((RECIPES_DIR / "imagenet_lt" / "clip_vit_b16_adaptformer_focal_sam.yaml").read_text())
    for opt in ("erm", "sam", "imbsam", "ccsam", "sse_sam"):
        path = RECIPES_DIR / "imagenet_lt" / f"clip_vit_b16_adaptformer_{opt}.yaml"
        other = yaml.safe_load(path.read_text())
        assert set(other) == set(base)
        for key in base:
            if key in ("name", "output_dir", "optim"):
                continue
            assert other[key] == base[key], (opt, key)
        assert other["optim"]["name"] == opt
        for key in ("base", "lr", "momentum", "weight_decay", "nesterov", "sync_perturbation"):
            assert other["optim"][key] == base["optim"][key], (opt, key)


# ------------------------------------------------------------- registries (optimizer, loss)


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_optimizer_and_loss_keys_are_accepted_by_the_registries(path):
    import torch

    from ft_focal.losses import loss_kwargs
    from ft_focal.optim import build_optimizer, optimizer_kwargs
    from ft_focal.training.builders import LOSS_KEYS, METHOD_KEYS, build_loss_from

    recipe = load_recipe(path)
    o = recipe.optim
    method = {k: getattr(o, k) for k in METHOD_KEYS if getattr(o, k) is not None}
    accepted = set(optimizer_kwargs(o.name))
    assert set(method) <= accepted, f"{path.name}: optim keys {sorted(set(method) - accepted)} not taken by {o.name}"
    if o.one_backward is not None:
        assert "one_backward" in accepted
    counts = [max(1, 100 // (c + 1)) for c in range(recipe.data.num_classes)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, recipe.data.num_classes))
    extra = {"classifier_params": list(model[1].parameters())} if o.name == "ccsam" else {}
    opt = build_optimizer(o.name, list(model.parameters()), counts, base=o.base, lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, nesterov=o.nesterov, **method, **extra)
    assert opt.param_groups[0]["lr"] == o.lr
    # loss: the recipe's keys exist in the loss registry and the loss builds with the counts
    from ft_focal.losses import LOSSES

    keys = dict(LOSSES[recipe.loss.name].recipe_keys)
    assert {keys[k] for k in LOSS_KEYS[recipe.loss.name]} <= set(loss_kwargs(recipe.loss.name))
    loss = build_loss_from(recipe, counts)
    logits = torch.randn(5, recipe.data.num_classes)
    out = loss(logits, torch.arange(5) % recipe.data.num_classes)
    assert out.shape == (5,) and torch.isfinite(out).all()


# -------------------------------------------------------------------------------- dry runs


def _dry_run_params():
    out = []
    for p in RECIPES:
        key = p.relative_to(RECIPES_DIR).as_posix()
        marks = () if key in FAST_DRY_RUNS else (pytest.mark.slow,)
        out.append(pytest.param(p, id=key, marks=marks))
    return out


@pytest.mark.parametrize("path", _dry_run_params())
def test_dry_run(path, tmp_path, capsys):
    from ft_focal.commands.dry_run import dry_run

    recipe = load_recipe(path)
    plan = dry_run(recipe, output_dir=str(tmp_path / "run"))
    printed = capsys.readouterr().out
    expected = NUM_CLASSES[dataset_of(path)]
    assert plan["classes"] == expected
    assert plan["dry_run_updates"] == 2
    assert f"classes {expected}" in printed and "dry run OK" in printed
    assert plan["tuning"] == recipe.tuning.method and plan["optimizer"] == recipe.optim.name
    if dataset_of(path) == "demo":
        assert plan["missing_paths"] == []
    else:  # the placeholders of the real weights / data are reported, not fatal, in a dry run
        assert any(m.startswith("model.pretrained") for m in plan["missing_paths"])
        params = plan["parameters"]
        if params is not None:  # the real ViT-B/16 counted on the meta device
            assert 85e6 < params["total"] < 100e6
            if recipe.tuning.method == "full":
                assert params["trainable"] == params["total"]
            else:
                assert params["trainable"] < 0.15 * params["total"]  # iNat: 6.3 M head + 4.7 M adapters


# ------------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize("path", ACCEL_CONFIGS, ids=[p.name for p in ACCEL_CONFIGS])
def test_accelerate_config_loads_with_accelerates_parser(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    assert cfg.num_processes % cfg.num_machines == 0
    head = header_of(path)
    assert f"accelerate launch --config_file recipes/accelerate/{path.name}" in head
    assert path.name in (ACCEL_DIR / "README.md").read_text()


def test_accelerate_config_set():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfgs = {p.name: load_config_from_file(str(p)) for p in ACCEL_CONFIGS}
    # no FSDP config: the loop does not drive the SAM family under FSDP (README)
    assert set(cfgs) == {"cpu_2proc.yaml", "single_gpu_bf16.yaml", "multi_gpu_bf16.yaml", "multi_node.yaml"}
    cpu = cfgs["cpu_2proc.yaml"]
    # MULTI_GPU = the torchrun launcher, the only one that starts 2 local processes (see its header)
    assert cpu.num_processes == 2 and cpu.distributed_type == DistributedType.MULTI_GPU and cpu.use_cpu
    assert cpu.mixed_precision == "no"
    single = cfgs["single_gpu_bf16.yaml"]
    assert single.num_processes == 1 and single.distributed_type == DistributedType.NO
    assert cfgs["multi_gpu_bf16.yaml"].distributed_type == DistributedType.MULTI_GPU
    node = cfgs["multi_node.yaml"]
    assert node.num_machines > 1 and node.main_process_ip and node.main_process_port
    for name in ("single_gpu_bf16.yaml", "multi_gpu_bf16.yaml", "multi_node.yaml"):
        assert cfgs[name].mixed_precision == "bf16"


@pytest.mark.slow
def test_cpu_2proc_config_really_starts_two_processes(tmp_path):
    script = tmp_path / "nproc.py"
    script.write_text(textwrap.dedent("""\
        from accelerate import Accelerator
        a = Accelerator(cpu=True)
        print(f"rank {a.process_index} of {a.num_processes}", flush=True)
    """))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ACCEL_DIR / "cpu_2proc.yaml"), str(script)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    # both processes share the pipe: their lines may interleave mid-line, so match, don't split
    ranks = sorted(re.findall(r"rank (\d+) of (\d+)", out.stdout))
    assert ranks == [("0", "2"), ("1", "2")], out.stdout


# ----------------------------------------------------------------- data sections, on fake roots


def _fake_split_root(root: Path) -> None:
    from PIL import Image

    for split, folder in (("train", "train"), ("test", "val")):
        (root / folder / "n01440764").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(root / folder / "n01440764" / f"{split}{i}.JPEG")
    train = "".join(f"train/n01440764/train{i}.JPEG {i % 3}\n" for i in range(6))
    test = "".join(f"val/n01440764/test{i}.JPEG {i % 3}\n" for i in range(6))
    for name, text in (("ImageNet_LT_train.txt", train), ("ImageNet_LT_val.txt", "".join(train.splitlines(True)[:3])),
                       ("ImageNet_LT_test.txt", test), ("iNaturalist18_train.txt", train),
                       ("iNaturalist18_val.txt", test)):
        (root / name).write_text(text)


@pytest.mark.parametrize("ds", ["imagenet_lt", "inat2018"])
def test_split_file_recipes_build_their_data_with_the_builtin_class_names(ds, tmp_path):
    from ft_focal.data import build_datasets

    _fake_split_root(tmp_path)
    recipe = load_recipe(RECIPES_DIR / ds / "clip_vit_b16_adaptformer_focal_sam.yaml", [f"data.root={tmp_path}"])
    preprocess = {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    bundle = build_datasets(recipe.data, preprocess, recipe.seed)
    assert bundle.num_classes == recipe.data.num_classes
    assert len(bundle.train) == 6 and len(bundle.test) == 6
    assert (bundle.val is None) == (ds == "inat2018")
    image, label = bundle.train[0]
    assert tuple(image.shape) == (3, 224, 224)
    if ds == "inat2018":  # labels follow the alphabetical order of the species names
        assert bundle.classnames == sorted(bundle.classnames)


def test_preflight_accepts_builtin_class_names(tmp_path):
    from ft_focal.training.preflight import missing_paths

    _fake_split_root(tmp_path)
    recipe = load_recipe(RECIPES_DIR / "imagenet_lt" / "clip_vit_b16_adaptformer_focal_sam.yaml",
                         [f"data.root={tmp_path}", "model.pretrained=null"])
    assert missing_paths(recipe) == []


# The shot-group thresholds of each dataset's paper protocol (docs/metrics.md lists their sources).
SHOT_THRESHOLDS = {"cifar10_lt": (1000, 200)}


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_shot_group_thresholds_follow_the_papers_protocol_and_the_header_says_so(path):
    recipe = load_recipe(str(path))
    ds = dataset_of(path)
    assert (recipe.eval.many_threshold, recipe.eval.few_threshold) == SHOT_THRESHOLDS.get(ds, (100, 20))
    if ds != "demo":
        assert "Shot groups" in header_of(path)


TIMM_RECIPES = sorted((ROOT / "recipes").rglob("timm_*.yaml"))
# recipe stem -> timm model name (architecture.tag) and the real model's parameter count (millions)
EXPECTED = {
    "timm_clip_vit_b16_adaptformer_focal_sam": ("vit_base_patch16_clip_224.openai", 85.8),
    "timm_vit_b16_in21k_adaptformer_focal_sam": ("vit_base_patch16_224.augreg_in21k", 85.8),
    "timm_dinov2_vit_b14_adaptformer_focal_sam": ("vit_base_patch14_dinov2.lvd142m", 85.8),
    "timm_siglip_vit_b16_adaptformer_focal_sam": ("vit_base_patch16_siglip_224.webli", 92.9),
    "timm_eva02_b14_adaptformer_focal_sam": ("eva02_base_patch14_224.mim_in22k", 85.8),
}




def test_one_timm_recipe_per_family():
    assert sorted(p.stem for p in TIMM_RECIPES) == sorted(EXPECTED)
    assert all(p.parent.name == "imagenet_lt" for p in TIMM_RECIPES)


@pytest.mark.parametrize("path", TIMM_RECIPES, ids=[p.stem for p in TIMM_RECIPES])
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
    for path in TIMM_RECIPES:
        raw = yaml.safe_load(path.read_text())
        for section in ("seed", "tuning", "data", "loss", "optim", "train", "eval", "hub"):
            assert raw[section] == clip[section], (path.stem, section)


@pytest.mark.parametrize("path", TIMM_RECIPES, ids=[p.stem for p in TIMM_RECIPES])
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


@pytest.mark.parametrize("path", TIMM_RECIPES, ids=[p.stem for p in TIMM_RECIPES])  # ~1.5 s each: all in the default suite
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
