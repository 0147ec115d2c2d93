"""Bad input ends with ONE line `error: ...` naming the file / line / key, exit code 2, no traceback.

Every case goes through the command line (`ft_focal.cli.main([...])` in-process, and a few
through a real subprocess). Training cases use a tiny split-file dataset of generated images and
a tiny open_clip model with only the head trained, so each run fails (or finishes) in a second.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ft_focal.cli import main

MODEL = {
    "family": "open_clip", "name": "tiny-open-clip-vit", "head_init": "random",
    "config": {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 16,
                              "mlp_ratio": 2.0},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}},
}


def float_rgb_tiff(path: Path) -> None:
    """A valid TIFF whose pixel format (3 x 32-bit float) Pillow cannot decode."""
    w = h = 2
    spp, bps = 3, 32
    data = b"\x00" * (w * h * spp * bps // 8)
    bps_bytes = struct.pack("<HHH", bps, bps, bps) + b"\x00\x00"
    data_off = 8 + len(bps_bytes)
    ifd_off = data_off + len(data)
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, spp, 8), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, data_off), (277, 3, 1, spp), (278, 3, 1, h), (279, 4, 1, len(data)),
            (284, 3, 1, 1), (339, 3, 1, 3)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_off) + bps_bytes + data + ifd)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/imgs: 12 RGB PNGs plus one image of each mode that is converted (not rejected), a
    truncated PNG and a float-RGB TIFF; classnames a, b, c."""
    base = tmp_path_factory.mktemp("bad_input")
    imgs = base / "root" / "imgs"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    Image.new("CMYK", (20, 20), (10, 200, 30, 5)).save(imgs / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(imgs / "deep16.png")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    palette.save(imgs / "palette.png")
    Image.new("L", (20, 20), 128).save(imgs / "gray.png")
    raw = (imgs / "0.png").read_bytes()
    (imgs / "cut.png").write_bytes(raw[: len(raw) // 2])
    float_rgb_tiff(imgs / "float_rgb.tif")
    (base / "classnames.txt").write_text("a\nb\nc\n")
    return base


GOOD = [f"imgs/{i}.png {i % 3}" for i in range(12)] + [
    "imgs/cmyk.jpg 0", "imgs/deep16.png 1", "imgs/palette.png 2", "imgs/gray.png 0"]


def write_recipe(tree: Path, tmp_path: Path, train_lines=None, workers: int = 0, **sections) -> Path:
    train = tmp_path / "train.txt"
    train.write_text("\n".join(GOOD if train_lines is None else train_lines) + "\n")
    test = tmp_path / "test.txt"
    test.write_text("\n".join(GOOD[:6]) + "\n")
    raw = {
        "name": "bad_input", "output_dir": str(tmp_path / "run"), "model": json.loads(json.dumps(MODEL)),
        "tuning": {"method": "head"},
        "data": {"dataset": "split_file", "root": str(tree / "root"), "classnames": str(tree / "classnames.txt"),
                 "train_list": str(train), "test_list": str(test), "image_size": 32, "test_resize": 32,
                 "num_workers": workers},
        "optim": {"name": "focal_sam", "rho": 0.05, "gamma": 1.0, "lam": 0.8, "lr": 0.01},
        "train": {"epochs": 1, "batch_size": 4, "threads": 1, "save_every_steps": 100},
        "eval": {"select_split": "none"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the command line; assert exit code 2, no traceback, and return the `error:` line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("bad,needle,workers", [
    ("imgs/gone.png", "gone.png: image file not found", 0),
    ("imgs/cut.png", "cut.png: corrupt image (truncated image file", 1),  # raised in a DataLoader worker
    ("imgs/float_rgb.tif", "float_rgb.tif: unsupported image mode (TIFF: unknown pixel mode", 0),
])
def test_bad_image_in_training_is_one_line_naming_file_and_list_line(tree, tmp_path, capsys, bad, needle, workers):
    lines = GOOD + [f"{bad} 1"]
    recipe = write_recipe(tree, tmp_path, lines, workers=workers)
    line = one_line_error(capsys, ["train", str(recipe)])
    assert line.startswith(f"error: {tree / 'root' / bad}: ")
    assert needle in line
    assert f"(listed in {tmp_path / 'train.txt'} line {len(lines)})" in line


def test_converted_modes_pass_check_data_and_every_problem_is_listed_at_once(tree, tmp_path, capsys):
    recipe = write_recipe(tree, tmp_path)
    assert main(["check-data", str(recipe), "--workers", "2"]) == 0
    out = capsys.readouterr()
    assert "all images readable" in out.out  # CMYK, 16-bit, palette and grayscale are converted
    assert "check train" in out.err  # the progress bar

    lines = GOOD + ["imgs/gone.png 1", "imgs/cut.png 2", "no_label_here", "imgs/1.png 7", "imgs/float_rgb.tif 0"]
    recipe = write_recipe(tree, tmp_path, lines)
    assert main(["check-data", str(recipe), "--workers", "2"]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    problems = [line for line in out.err.splitlines() if line.startswith(str(tmp_path)) or line.startswith(str(tree))]
    train = tmp_path / "train.txt"
    n = len(GOOD)
    expected = [f"{train}:{n + 3}: malformed line", f"{train}:{n + 4}: label 7 out of range for 3 classes",
                "gone.png: image file not found", "cut.png: corrupt image", "float_rgb.tif: unsupported image mode"]
    for needle in expected:
        assert sum(needle in p for p in problems) == 1, (needle, problems)
    assert len(problems) == 5
    assert "5 problem(s) found" in out.out


def test_skip_bad_images_counts_them_in_the_log_and_metrics(tree, tmp_path, capsys, caplog):
    lines = GOOD + ["imgs/gone.png 1", "imgs/cut.png 2"]
    recipe = write_recipe(tree, tmp_path, lines, data={"skip_bad_images": True})
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(recipe)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # 18 images, batches of 4: 4 updates per epoch see 16 of them; the two bad ones are skipped
    # whenever they are drawn (the data order decides whether the dropped tail holds them)
    assert 1 <= metrics["skipped_images"]["train"] <= 2
    assert metrics["skipped_images"]["test"] == 0
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping bad image" in logged and "skipped" in logged and "unreadable training image" in logged


# ------------------------------------------------------------------------------ split lists


def test_malformed_split_line_names_file_and_line(tree, tmp_path, capsys):
    recipe = write_recipe(tree, tmp_path, GOOD[:3] + ["imgs/3.png"])
    line = one_line_error(capsys, ["train", str(recipe)])
    assert line == f"error: {tmp_path / 'train.txt'}:4: malformed line, expected 'relative/path label', got 'imgs/3.png'"


def test_label_out_of_range_names_file_line_and_class_count(tree, tmp_path, capsys):
    recipe = write_recipe(tree, tmp_path, GOOD[:3] + ["imgs/3.png 3"])
    line = one_line_error(capsys, ["train", str(recipe)])
    assert line == f"error: {tmp_path / 'train.txt'}:4: label 3 out of range for 3 classes (valid 0..2)"


def test_empty_training_class_is_allowed_and_reported(tree, tmp_path, capsys, caplog):
    lines = [entry for entry in GOOD if not entry.endswith(" 2")]
    recipe = write_recipe(tree, tmp_path, lines)
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(recipe)]) == 0
    assert any("1 of 3 classes have no training images (e.g. 'c')" in r.getMessage() for r in caplog.records)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["class_counts"][2] == 0 and metrics["skipped_steps"] == 0
    from ft_focal.optim import FocalSAM

    opt = FocalSAM(torch.nn.Linear(2, 3).parameters(), torch.optim.SGD, rho=0.05, gamma=1.0, lam=0.8,
                   class_counts=metrics["class_counts"], lr=0.1)
    assert torch.isfinite(opt.coefficients).all() and float(opt.coefficients[2]) == pytest.approx(0.8)


# ------------------------------------------------------------------------------ recipes


def test_unknown_recipe_key_suggests_the_closest(tree, tmp_path, capsys):
    recipe = write_recipe(tree, tmp_path)
    line = one_line_error(capsys, ["train", str(recipe), "optim.lamda=0.5"])
    assert line == "error: unknown recipe key 'optim.lamda' (did you mean 'optim.lam'?)"
    raw = yaml.safe_load(recipe.read_text())
    raw["trian"] = raw.pop("train")
    recipe.write_text(yaml.safe_dump(raw))
    line = one_line_error(capsys, ["train", str(recipe)])
    assert line == f"error: {recipe}: unknown recipe key 'trian' (did you mean 'train'?)"


def test_wrong_value_type_names_the_key(tree, tmp_path, capsys):
    recipe = write_recipe(tree, tmp_path, data={"hflip": "sometimes"})
    line = one_line_error(capsys, ["train", str(recipe)])
    assert line == "error: recipe key 'data.hflip': expected bool, got str 'sometimes'"
    line = one_line_error(capsys, ["train", str(recipe), "data.hflip=true", "train.epochs=two"])
    assert line == "error: recipe key 'train.epochs': expected int, got str 'two'"


def test_missing_recipe_and_weights_files(tree, tmp_path, capsys):
    line = one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert line == f"error: {tmp_path / 'nope.yaml'}: recipe file not found"
    recipe = write_recipe(tree, tmp_path, model={"pretrained": str(tmp_path / "weights" / "clip.bin")})
    line = one_line_error(capsys, ["train", str(recipe)])
    assert line == f"error: 1 path(s) of the recipe do not exist: model.pretrained: {tmp_path / 'weights' / 'clip.bin'}"


def test_errors_through_a_real_process_are_one_line(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("optim:\n  name: focal_sam\n  rho: [0.05\n")
    done = subprocess.run([sys.executable, "-m", "ft_focal.cli", "train", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    expected = f"error: {bad} line 4: not valid YAML (expected ',' or ']', but got '<stream end>')"
    assert done.stderr.strip().splitlines() == [expected]


# ------------------------------------------------------------------------------ saved models, ImageNet-C


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ft_focal.artifacts.saved import save_model_dir
    from ft_focal.config import recipe_from_dict
    from ft_focal.models import build_classifier, preprocess_for

    recipe = recipe_from_dict({"model": MODEL, "tuning": {"method": "head"},
                               "data": {"dataset": "synthetic", "synthetic_num_classes": 3, "synthetic_eval_size": 6,
                                        "image_size": 32, "test_resize": 32, "num_workers": 0}})
    model = build_classifier(recipe.model, recipe.tuning, 3, ["a", "b", "c"])
    out = tmp_path_factory.mktemp("model") / "final"
    save_model_dir(out, model, recipe, ["a", "b", "c"], [5, 3, 1], preprocess_for(recipe.model))
    return out


def test_classnames_and_head_size_mismatch(model_dir, tmp_path, capsys):
    copy = tmp_path / "final"
    shutil.copytree(model_dir, copy)
    (copy / "classnames.json").write_text(json.dumps(["a", "b", "c", "d"]))
    (copy / "class_counts.json").write_text("[5, 3, 1, 1]")
    line = one_line_error(capsys, ["eval", str(copy), "--no-report"])
    assert line == (f"error: {copy / 'model.safetensors'}: the classifier head has 3 classes (head.weight [3, 64]) "
                    f"but {copy / 'classnames.json'} lists 4")
    (copy / "class_counts.json").write_text("[5, 3, 1]")
    line = one_line_error(capsys, ["eval", str(copy), "--no-report"])
    assert line == f"error: {copy}: classnames.json has 4 classes but class_counts.json 3"


def test_missing_weights_of_a_model_folder(model_dir, tmp_path, capsys):
    copy = tmp_path / "final"
    shutil.copytree(model_dir, copy)
    (copy / "model.safetensors").unlink()
    line = one_line_error(capsys, ["eval", str(copy), "--no-report"])
    assert line == f"error: {copy}: a model folder without its model.safetensors (the file was removed or never finished)"


def test_imagenet_c_folder_missing_corruptions_and_severities_listed_at_once(model_dir, tmp_path, capsys):
    from ft_focal.data.imagenet_c import scan_imagenet_c

    root = tmp_path / "imagenet_c"
    for corruption, severities in {"fog": [1, 2, 4, 5], "snow": [1, 2, 3, 4], "frost": [1, 2, 3, 4, 5]}.items():
        for s in severities:
            for name in ("a", "b", "c"):
                (root / corruption / str(s) / name).mkdir(parents=True)
    line = one_line_error(capsys, ["eval", str(model_dir), "--no-report", "--imagenet-c", str(root)])
    assert line == f"error: {root}: missing 2 ImageNet-C folder(s): snow/5/, fog/3/"
    with pytest.raises(Exception, match=r"missing 3 ImageNet-C folder\(s\): fog/3/, snow/5/, brightness/"):
        scan_imagenet_c(root, ["fog", "snow", "brightness"], [1, 2, 3, 4, 5], {"a": 0, "b": 1, "c": 2})
