"""`ft-focal corrupt RECIPE_OR_SPLIT --out DIR`: an ImageNet-C style copy of a test split.

RECIPE_OR_SPLIT is
  * a recipe YAML: its test split (any source: split files, image folders, HF, digits-LT);
    class folders are the wnids when the classnames file gives them, else the label numbers;
  * a split list (`relative/path label` lines) with `--root`: class folders from the paths;
  * a folder of `<class>/<image>` files.
Output: DIR/<corruption>/<severity>/<class>/<image>.JPEG, 224 px, JPEG quality 85, after
Resize(256) + CenterCrop(224) as in Hendrycks & Dietterich. Resumable: finished files are
skipped, every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import list_flag, run_guarded
from ft_focal.config import load_recipe
from ft_focal.errors import UserError


def sources_from_recipe(path: str, overrides: list[str], split: str) -> list[tuple[str, object]]:
    """(relative output path, file path or uint8 array) for every image of a recipe's split."""
    from ft_focal.data.build import build_datasets

    recipe = load_recipe(path, overrides)
    preprocess = {"image_size": 224, "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bicubic"}
    bundle = build_datasets(recipe.data, preprocess, recipe.seed)
    dataset = bundle.split(split)
    if dataset is None:
        raise UserError(f"{path}: the recipe has no '{split}' split")
    class_dirs = list(bundle.wnids) if getattr(bundle, "wnids", None) else [str(i) for i in range(bundle.num_classes)]
    sources: list[tuple[str, object]] = []
    for i in range(len(dataset)):
        label = int(dataset.labels[i])
        if hasattr(dataset, "file"):  # images on disk: let the workers read them
            stem = Path(dataset.file(i)).stem
            sources.append((f"{class_dirs[label]}/{i:07d}_{stem}", dataset.file(i)))
        else:  # in memory (digits, CIFAR, HF): hand over the decoded RGB pixels
            pixels = np.asarray(dataset.load_image(i).convert("RGB"), dtype=np.uint8)
            sources.append((f"{class_dirs[label]}/{i:07d}", pixels))
    return sources


def summary_sentence(summary: dict, n_corruptions: int, n_severities: int) -> str:
    """What `render_corruptions` did, in one sentence."""
    failed = summary.get("failed") or []
    text = (f"Rendered {summary['written']} of {summary['outputs_total']} images ({summary['images']} source images x "
            f"{n_corruptions} corruption(s) x {n_severities} severity level(s)) into {summary['out_dir']} in "
            f"{summary['seconds']:.1f} s ({summary['outputs_per_second']:.1f} images/s)")
    if summary.get("skipped"):
        text += f"; {summary['skipped']} already there were kept"
    if failed:
        text += f"; {len(failed)} failed (run the command again to retry them)"
    return text + "."


def main(argv: Optional[list[str]] = None) -> int:
    def run() -> int:
        from ft_focal.data.corrupt import render_corruptions
        from ft_focal.data.corrupt_sources import sources_from_folder, sources_from_split_list
        from ft_focal.metrics import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS

        parser = CommandParser(prog="ft-focal corrupt", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("source", help="recipe YAML, split list (with --root) or image folder")
        parser.add_argument("--out", required=True, help="output folder (ImageNet-C layout)")
        parser.add_argument("--root", help="image root of a split list")
        parser.add_argument("--split", default="test", help="recipe split to render (default test)")
        parser.add_argument("--corruptions", nargs="+", default=list(BENCHMARK_CORRUPTIONS),
                            help="names, 'a,b' or 'a b' (default: the 15 benchmark corruptions; 'all' adds the 4 extra)")
        parser.add_argument("--severities", nargs="+", default=["1,2,3,4,5"], help="e.g. 1,3,5 or 1 3 5")
        parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
        parser.add_argument("--quality", type=int, default=85)
        parser.add_argument("--limit", type=int, help="render only N evenly spaced images (a quick subset)")
        args = parser.parse_command(argv)
        args.corruptions = list_flag(args.corruptions, str, "--corruptions")
        args.severities = list_flag(args.severities, int, "--severities")
        corruptions = list(BENCHMARK_CORRUPTIONS) + list(EXTRA_CORRUPTIONS) if args.corruptions == ["all"] else args.corruptions
        source = Path(args.source)
        if source.suffix in (".yaml", ".yml"):
            sources = sources_from_recipe(args.source, args.overrides, args.split)
        elif source.is_dir():
            sources = sources_from_folder(source)
        else:
            if not args.root:
                raise UserError(f"{source}: a split list needs --root (the folder its paths are relative to)")
            sources = sources_from_split_list(args.root, source)
        if args.limit and args.limit < len(sources):
            step = len(sources) / args.limit
            sources = [sources[int(i * step)] for i in range(args.limit)]
        summary = render_corruptions(sources, args.out, corruptions, args.severities, workers=args.workers,
                                     quality=args.quality)
        print(summary_sentence(summary, len(corruptions), len(args.severities)))
        return 0

    return run_guarded(run)
