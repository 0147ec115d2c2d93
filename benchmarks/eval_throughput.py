"""Throughput of the corruption pipeline: ImageNet-C evaluation and corruption rendering.

    python benchmarks/eval_throughput.py --quick          # ~1 minute on 2 CPU cores
    python benchmarks/eval_throughput.py --model conv     # a tiny conv net instead of a tiny ViT

1. Rendering: `render_corruptions` on synthetic 320x240 images (Resize(256) + CenterCrop(224) +
   corruption + JPEG 85), outputs/s with 1 worker (in process) vs 2 worker processes.
   glass_blur is left out (its numba JIT dominates a short run; it is also by far the slowest
   corruption per image).
2. Evaluation: `evaluate_corruptions` over the rendered ImageNet-C-layout folder with a tiny
   model standing in, images/s with num_workers 0 vs 2, against the same model on tensors
   preloaded in memory (the ceiling: ratio 1.0 means decoding costs nothing).
Not a test; numbers depend on the machine (and on other load: each timing is the best of
--repeats interleaved runs). Prints a table and, with --json, a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ft_focal.data.corrupt import render_corruptions  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.data.imagenet_c import ImageNetCDataset, scan_imagenet_c, wnid_mapping  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.evaluation import build_eval_transform, evaluate_corruptions  # noqa: E402 (after the sys.path entry it needs)

CORRUPTIONS = ["gaussian_noise", "shot_noise", "defocus_blur", "motion_blur", "snow", "fog",
               "contrast", "elastic_transform", "pixelate", "jpeg_compression"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def synthetic_sources(n: int, classes: int, seed: int = 0):
    """Smooth random 240x320 RGB images (natural-image-like spectra, so JPEG sizes are real)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        low = rng.random((15, 20, 3))
        img = np.kron(low, np.ones((16, 16, 1)))  # 240 x 320 blocks
        img = img + 0.15 * rng.standard_normal(img.shape)
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        out.append((f"n{i % classes:08d}/img_{i:05d}", img))
    return out


def tiny_model(kind: str, num_classes: int) -> torch.nn.Module:
    if kind == "vit":
        from torchvision.models import VisionTransformer

        return VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=3,
                                 hidden_dim=192, mlp_dim=384, num_classes=num_classes)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, stride=4, padding=3), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, num_classes),
    )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (~1 minute)")
    ap.add_argument("--model", choices=["vit", "conv"], default="vit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="keep the generated folders here (default: a temp dir, deleted)")
    ap.add_argument("--repeats", type=int, default=None, help="best of N timings (default 2 quick, 3 full)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    return args


def time_rendering(sources: list, work: Path, corrs: list[str], sevs: list[int], repeats: int) -> dict:
    """1 vs 2 workers (separate folders, identical bytes); best of `repeats`."""
    render: dict = {}
    for _ in range(repeats):
        for w in (1, 2):
            out = work / f"render_w{w}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            s = render_corruptions(sources, out, corrs, sevs, workers=w, progress=False)
            sec = time.perf_counter() - t
            if w not in render or sec < render[w]["seconds"]:
                render[w] = {"outputs": s["written"], "seconds": sec, "outputs_per_s": s["written"] / sec}
    return render


def time_preloaded(ds: ImageNetCDataset, predict: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> tuple[float, float]:
    """-> (decode + transform images/s in one thread, model images/s on the decoded tensors)."""
    n = len(ds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    t = time.perf_counter()
    pre = torch.stack([ds[i][0] for i in range(n)])  # decode once, outside the model timing
    decode = n / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        predict(pre[:batch_size])  # warm-up
        t = time.perf_counter()
        for i in range(0, n, batch_size):
            predict(pre[i : i + batch_size]).argmax(1)
        preloaded = n / (time.perf_counter() - t)
    return decode, preloaded


def time_evaluation(args: argparse.Namespace, root: Path, corrs: list[str], sevs: list[int], classes: int) -> dict:
    mapping = wnid_mapping([f"n{i:08d}" for i in range(classes)])
    transform = build_eval_transform(resize=None, crop=224, mean=CLIP_MEAN, std=CLIP_STD)
    torch.manual_seed(0)
    model = tiny_model(args.model, classes).eval()

    def predict(x):
        return model(x)

    samples = scan_imagenet_c(root, corrs, sevs, mapping)
    n = len(samples)
    ds = ImageNetCDataset(samples, transform)
    best = {"preloaded": 0.0, "decode": 0.0, 0: None, 2: None}
    for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
        decode, preloaded = time_preloaded(ds, predict, args.batch_size)
        best["decode"] = max(best["decode"], decode)
        best["preloaded"] = max(best["preloaded"], preloaded)
        for nw in (0, 2):
            t = time.perf_counter()
            res = evaluate_corruptions(predict, root, mapping, corrs, sevs, transform=transform,
                                       batch_size=args.batch_size, num_workers=nw, progress=False)
            wall = n / (time.perf_counter() - t)
            if best[nw] is None or res["images_per_second"] > best[nw]["loop_images_per_s"]:
                best[nw] = {"loop_images_per_s": res["images_per_second"], "wall_images_per_s": wall}
    for nw in (0, 2):
        best[nw]["ratio_to_preloaded"] = best[nw]["loop_images_per_s"] / best["preloaded"]
    return {"images": n, "preloaded_images_per_s": best["preloaded"], "decode_only_images_per_s": best["decode"],
            "evaluate": {nw: best[nw] for nw in (0, 2)}}


def print_report(results: dict, args: argparse.Namespace, n_images: int, corrs: list[str], sevs: list[int]) -> None:
    r, e = results["render"], results["evaluate"]
    print(f"machine: {results['cpus']} CPUs (load average {results['load_average_at_start']}), torch threads "
          f"{results['torch_threads']}; model tiny {args.model}; batch {args.batch_size}; best of {args.repeats}")
    print(f"rendering ({n_images} images x {len(corrs)} corruptions x {len(sevs)} severities = {r[1]['outputs']} JPEGs):")
    for w in (1, 2):
        print(f"  workers={w}: {r[w]['outputs_per_s']:8.1f} outputs/s  ({r[w]['seconds']:.2f} s)")
    print(f"  speed-up 2 vs 1 worker: {r[2]['outputs_per_s'] / r[1]['outputs_per_s']:.2f}x")
    print(f"evaluation ({results['images']} JPEGs, 224 px):")
    print(f"  model on preloaded tensors: {results['preloaded_images_per_s']:8.1f} img/s")
    print(f"  decode + transform only (1 process, 1 thread): {results['decode_only_images_per_s']:8.1f} img/s")
    for nw in (0, 2):
        print(f"  evaluate_corruptions num_workers={nw}: {e[nw]['loop_images_per_s']:8.1f} img/s in the loop, "
              f"{e[nw]['wall_images_per_s']:8.1f} img/s incl. scan/startup; ratio to preloaded "
              f"{e[nw]['ratio_to_preloaded']:.2f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    n_images = 16 if args.quick else 100
    corrs = CORRUPTIONS[:4] if args.quick else CORRUPTIONS
    sevs = [1, 3, 5] if args.quick else [1, 2, 3, 4, 5]
    classes = 8
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ft_focal_bench_"))
    results: dict = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "model": args.model,
                     "batch_size": args.batch_size, "repeats": args.repeats,
                     "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        sources = synthetic_sources(n_images, classes)
        # warm imports / first-call costs outside the timings
        render_corruptions(sources[:1], work / "warm", corrs, [1], workers=1, progress=False)
        results["render"] = time_rendering(sources, work, corrs, sevs, args.repeats)
        results.update(time_evaluation(args, work / "render_w2", corrs, sevs, classes))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_report(results, args, n_images, corrs, sevs)
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
