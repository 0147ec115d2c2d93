"""Rendering ImageNet-C-style corruptions: layout, determinism, resume, errors, evaluability."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ft_focal.data.corrupt import render_corruptions
from ft_focal.data.corrupt_image import available_corruptions, corruption_seed, prepare_image
from ft_focal.data.corrupt_sources import sources_from_arrays, sources_from_folder
from ft_focal.data.imagenet_c import class_to_label_for, wnid_mapping
from ft_focal.errors import UserError
from ft_focal.evaluation import evaluate_corruptions, summarize_corruptions
from ft_focal.metrics import ALL_CORRUPTIONS

# fast corruptions (glass_blur compiles numba ~3 s and zoom_blur is slow: kept for the slow test)
CORRS = ["gaussian_noise", "contrast", "pixelate"]
SEVS = [1, 3]


def _digits_like(n: int, seed: int = 0) -> list[np.ndarray]:
    """8x8 uint8 images, like scikit-learn's digits scaled to 0..255."""
    rng = np.random.default_rng(seed)
    return [(rng.random((8, 8)) * 255).astype(np.uint8) for _ in range(n)]


def _sources(tmp_path: Path):
    arrays = sources_from_arrays(_digits_like(3), [0, 1, 1], class_dirs=["cls_a", "cls_b"])
    f = tmp_path / "src" / "photo.png"
    f.parent.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).convert("RGBA").save(f)
    return arrays + [("cls_a/photo.png", str(f))]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != "render_info.json"
    }


def test_installed_package_has_all_19_corruptions():
    assert sorted(available_corruptions()) == sorted(ALL_CORRUPTIONS)


def test_prepare_image_matches_torchvision_resize_centercrop():
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(256), T.CenterCrop(224)])
    rng = np.random.default_rng(0)
    for shape in [(8, 8), (375, 500, 3), (500, 333, 3), (224, 224, 3)]:
        a = (rng.random(shape) * 255).astype(np.uint8)
        ref = np.asarray(tf(Image.fromarray(a).convert("RGB")))
        assert np.array_equal(prepare_image(a), ref)


def test_render_layout_resume_and_determinism(tmp_path):
    out = tmp_path / "out"
    sources = _sources(tmp_path)
    s1 = render_corruptions(sources, out, CORRS, SEVS, workers=2, progress=False)
    n = len(sources) * len(CORRS) * len(SEVS)
    assert (s1["written"], s1["skipped"], s1["failed"]) == (n, 0, [])
    files = sorted(out.rglob("*.JPEG"))
    assert len(files) == n
    assert (out / "contrast" / "3" / "cls_a" / "photo.JPEG").is_file()
    assert (out / "gaussian_noise" / "1" / "cls_b" / "img_000002.JPEG").is_file()
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.size == (224, 224) and im.mode == "RGB"
    before = _digest(out)
    info = json.loads((out / "render_info.json").read_text())
    assert info["settings"]["jpeg_quality"] == 85 and info["corruptions"] == sorted(CORRS)

    # kill simulation: one output gone, a half-written temp next to it, a stray temp elsewhere
    victim = out / "pixelate" / "3" / "cls_b" / "img_000001.JPEG"
    victim.unlink()
    (victim.parent / (victim.name + ".tmp")).write_bytes(b"half a jpeg")
    (out / "contrast" / "1" / "cls_a" / "junk.tmp").write_bytes(b"x")
    mtimes = {f: f.stat().st_mtime_ns for f in files if f != victim}
    s2 = render_corruptions(sources, out, CORRS, SEVS, workers=2, progress=False)
    assert (s2["written"], s2["skipped"], s2["tmp_removed"]) == (1, n - 1, 2)
    assert not list(out.rglob("*.tmp"))
    assert _digest(out) == before  # the regenerated file is byte-identical too
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())

    # same bytes with another worker count (seeded per image, corruption, severity)
    other = tmp_path / "serial"
    render_corruptions(sources, other, CORRS, SEVS, workers=1, progress=False)
    assert _digest(other) == before
    # nothing left to do
    s3 = render_corruptions(sources, out, CORRS, SEVS, workers=2, progress=False)
    assert (s3["written"], s3["skipped"]) == (0, n)


def test_seeds_differ_per_image_corruption_severity():
    seeds = {corruption_seed(r, c, s) for r in ("a/x", "a/y") for c in CORRS for s in (1, 2)}
    assert len(seeds) == 12 and all(0 <= s < 2**32 for s in seeds)


def test_rendered_folder_is_evaluable(tmp_path):
    out = tmp_path / "c"
    sources = sources_from_arrays(_digits_like(6, seed=3), [0, 1, 2, 0, 1, 2], class_dirs=["n02", "n00", "n01"])
    render_corruptions(sources, out, ["contrast", "jpeg_compression"], [1, 2, 3, 4, 5], workers=2, progress=False)
    seen = []

    def predict(x):
        seen.append(x.shape)
        return torch.zeros(x.shape[0], 3).index_fill_(1, torch.tensor([1]), 1.0)  # always label 1

    res = evaluate_corruptions(predict, out, wnid_mapping(["n02", "n00", "n01"]), ["contrast", "jpeg_compression"],
                               batch_size=4, num_workers=0, progress=False)
    assert seen[0][1:] == (3, 224, 224)
    # label 1 = folder n00 holds 2 of the 6 images -> error 4/6 everywhere
    assert res["errors"] == {"contrast": [4 / 6] * 5, "jpeg_compression": [4 / 6] * 5}


def test_digits_style_render_then_evaluate_with_discovery(tmp_path):
    """The demo path: arrays with numeric class folders, corruptions discovered, labels by number."""
    out = tmp_path / "c"
    labels = [0, 1, 2, 2]
    render_corruptions(sources_from_arrays(_digits_like(4, seed=5), labels), out, ["pixelate", "contrast"],
                       [1, 2, 3, 4, 5], workers=1, progress=False)
    mapping = class_to_label_for(out, classnames=["zero", "one", "two"])
    assert mapping == {"0": 0, "1": 1, "2": 2}
    res = evaluate_corruptions(lambda x: torch.tensor([[0.0, 0.0, 1.0]]).repeat(x.shape[0], 1), out, mapping,
                               None, None, None, batch_size=3, num_workers=0, progress=False)
    assert list(res["errors"]) == ["contrast", "pixelate"]  # benchmark order, render_info.json ignored
    assert res["errors"]["pixelate"] == [0.5] * 5
    summary = summarize_corruptions(res["errors"], 0.5)
    assert summary["errors"].keys() == {"contrast", "pixelate"} and summary["mCE_complete"] is False


def test_source_folder_helper(tmp_path):
    for rel in ("n01/a.JPEG", "n01/b.png", "n02/c.jpg", "n02/notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(exist_ok=True)
        if rel.endswith(".txt"):
            p.write_text("x")
        else:
            Image.new("RGB", (40, 40)).save(p, format="PNG" if rel.endswith("png") else "JPEG")
    assert [r for r, _ in sources_from_folder(tmp_path)] == ["n01/a", "n01/b", "n02/c"]


def test_bad_requests_are_user_errors(tmp_path):
    img = ("a/x", np.zeros((40, 40), np.uint8))
    with pytest.raises(UserError, match="unknown corruption.*fogg"):
        render_corruptions([img], tmp_path, ["fogg"], [1], progress=False)
    with pytest.raises(UserError, match="severity 6"):
        render_corruptions([img], tmp_path, ["fog"], [6], progress=False)
    with pytest.raises(UserError, match="missing.png: source image not found"):
        render_corruptions([img, ("a/y", str(tmp_path / "missing.png"))], tmp_path, ["fog"], [1], progress=False)
    with pytest.raises(UserError, match="dtype float64"):
        render_corruptions([("a/x", np.zeros((40, 40)))], tmp_path, ["fog"], [1], progress=False)
    with pytest.raises(UserError, match="both write 'a/x.JPEG'"):
        render_corruptions([img, ("a/x.png", np.zeros((40, 40), np.uint8))], tmp_path, ["fog"], [1], progress=False)
    with pytest.raises(UserError, match="must be relative"):
        render_corruptions([("../x", img[1])], tmp_path, ["fog"], [1], progress=False)


def test_changed_settings_refused_and_failures_reported(tmp_path):
    img = ("a/x", np.full((40, 40, 3), 100, np.uint8))
    render_corruptions([img], tmp_path, ["contrast"], [1], progress=False)
    with pytest.raises(UserError, match="jpeg_quality=85"):
        render_corruptions([img], tmp_path, ["contrast"], [1], quality=90, progress=False)
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8 nope")
    srcs = [img, ("b/y", str(broken)), ("b/z", np.full((40, 40), 7, np.uint8))]
    with pytest.raises(UserError) as err:
        render_corruptions(srcs, tmp_path, ["contrast"], [1, 2], workers=2, progress=False)
    assert "broken.JPEG" in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "contrast" / "2" / "b" / "z.JPEG").is_file()  # the others were written
    summary = render_corruptions(srcs, tmp_path, ["contrast"], [1, 2], workers=1, progress=False, strict=False)
    assert summary["written"] == 0 and len(summary["failed"]) == 1


@pytest.mark.slow
def test_all_19_corruptions_all_severities(tmp_path):
    srcs = sources_from_arrays(_digits_like(2), [0, 1])
    s = render_corruptions(srcs, tmp_path, available_corruptions(), [1, 2, 3, 4, 5], workers=2, progress=False)
    assert s["written"] == 2 * 19 * 5 and not s["failed"]
