"""Render an ImageNet-C-style corrupted copy of any image set (resumable, parallel, deterministic).

Pipeline per source image, as in Hendrycks & Dietterich's `make_imagenet_c.py`:
decode -> RGB -> Resize(256) (shorter side, PIL bilinear) -> CenterCrop(224) -> corruption
(`imagecorruptions.corrupt`) -> JPEG quality 85 (`optimize=True`), written to

    out_dir/<corruption>/<severity>/<relative_out_path>.JPEG

which is the layout `ft_focal.data.imagenet_c.scan_imagenet_c` reads. Small images (e.g. the
8x8 digits of the demo) are upscaled by the same Resize(256).

Properties:
- Parallel: a `multiprocessing` pool of `workers` processes; one task = one source image, loaded
  and resized ONCE, then every requested (corruption, severity) still missing for it.
- Resumable: outputs that exist are skipped (images whose outputs all exist are never even
  loaded). Each file is written to `<name>.tmp` in its final folder and `os.replace`d, so a
  killed run never leaves a truncated `.JPEG`; leftover `*.tmp` files in the folders a run
  touches are deleted at the start of the next run. Do not run two renders into the same
  folders at the same time.
- Deterministic: `imagecorruptions` draws from numpy's global RNG (and takes explicit seeds for
  glass_blur / impulse_noise); the RNG is seeded before every call from a hash of
  (relative_out_path, corruption, severity), so a rerun or a different worker count writes
  byte-identical files.
- Settings are recorded in `out_dir/render_info.json`; resuming with different settings
  (quality, resize, crop, corruption package) is refused instead of mixing outputs.

Note: `imagecorruptions` re-implements the ImageNet-C corruptions for arbitrary image sizes;
the rendered images are ImageNet-C-like, not the released ImageNet-C files (numbers from a
rendered set are comparable across models on that set, not to published ImageNet-C tables).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

import numpy as np

from ft_focal.data.corrupt_image import ImageSource, check_corruptions, corrupt_image, corruption_seed, prepare_image, save_jpeg
from ft_focal.data.imagenet_c import IMAGE_EXTENSIONS
from ft_focal.errors import UserError
from ft_focal.files import write_json

__all__ = ["render_corruptions", "INFO_FILE"]

INFO_FILE = "render_info.json"


# ----------------------------------------------------------------------------- workers

_CFG: dict[str, Any] = {}


def _init_worker(cfg: dict[str, Any], limit_threads: bool) -> None:
    _CFG.clear()
    _CFG.update(cfg)
    if limit_threads:
        try:
            import cv2

            cv2.setNumThreads(1)
        except Exception:  # pragma: no cover - cv2 comes with imagecorruptions
            pass


def _render_task(task: tuple[str, ImageSource, list[tuple[str, int]]]) -> tuple[str, int, list[str], int]:
    """Render the missing outputs of one source image. Returns (rel, n_written, failures, n_jobs)."""
    rel, source, jobs = task
    out_dir, quality = _CFG["out_dir"], _CFG["quality"]
    try:
        image = prepare_image(source, _CFG["resize"], _CFG["crop"])
    except UserError as exc:
        where = _describe(rel, source)
        msg = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
        return rel, 0, [msg], len(jobs)
    except Exception as exc:  # decoding problems, odd arrays: report, keep going
        return rel, 0, [f"{_describe(rel, source)}: {type(exc).__name__}: {' '.join(str(exc).split())}"], len(jobs)
    written = 0
    failures: list[str] = []
    for corruption, severity in jobs:
        path = os.path.join(out_dir, corruption, str(severity), rel + ".JPEG")
        try:
            arr = corrupt_image(image, corruption, severity, corruption_seed(rel, corruption, severity))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_jpeg(arr, path, quality)
            written += 1
        except Exception as exc:
            failures.append(f"{rel} {corruption}/{severity}: {type(exc).__name__}: {' '.join(str(exc).split())}")
    return rel, written, failures, len(jobs)


def _describe(rel: str, source: ImageSource) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"array for {rel}"


# ----------------------------------------------------------------------------- driver

def _normalise_rel(rel: Any, index: int) -> str:
    if not isinstance(rel, (str, os.PathLike)):
        raise UserError(f"source {index}: relative output path must be a string, got {type(rel).__name__}")
    text = os.fspath(rel).replace("\\", "/")
    p = PurePosixPath(text)
    if not text or p.is_absolute() or any(part in ("..", "") for part in text.split("/")):
        raise UserError(f"source {index}: relative output path {text!r} must be relative, without '..' or empty parts")
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        p = p.with_suffix("")
    return str(p)


def _settings(corruption_package: str, quality: int, resize: Optional[int], crop: Optional[int]) -> dict[str, Any]:
    return {
        "corruption_package": corruption_package,
        "jpeg_quality": quality,
        "jpeg_optimize": True,
        "resize": resize,
        "resize_interpolation": "bilinear",
        "crop": crop,
        "seed": "sha256(relative_out_path|corruption|severity)[:4], numpy global RNG seeded per call",
    }


def _package_version() -> str:
    from importlib import metadata

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "imagecorruptions (unknown version)"


def _check_info(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    info_path = out_dir / INFO_FILE
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{info_path}: unreadable; delete it to resume this render") from None
    old = info.get("settings", {})
    diff = [k for k in ("corruption_package", "jpeg_quality", "resize", "crop") if old.get(k) != settings[k]]
    if diff:
        k = diff[0]
        raise UserError(
            f"{out_dir}: was rendered with {k}={old.get(k)!r}, this run has {k}={settings[k]!r}; "
            "use the same settings to resume, or a new out_dir"
        )
    return info


def render_corruptions(
    sources: Sequence[tuple[str, ImageSource]],
    out_dir: str | os.PathLike,
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    workers: int = 2,
    quality: int = 85,
    progress: bool = True,
    resize: Optional[int] = 256,
    crop: Optional[int] = 224,
    strict: bool = True,
    mp_context: Optional[str] = None,
) -> dict[str, Any]:
    """Write out_dir/<corruption>/<severity>/<relative_out_path>.JPEG for every source.

    Args:
        sources: (relative_out_path, image) pairs; relative_out_path like "<class_dir>/<stem>"
            (a trailing image extension is dropped, ".JPEG" is always added); image is a file
            path or a uint8 numpy array HxW / HxWx3.
        corruptions: imagecorruptions names (see `available_corruptions()`).
        severities: subset of 1..5.
        workers: processes; <= 1 renders in the calling process.
        quality: JPEG quality (85 = ImageNet-C).
        resize, crop: Resize(shorter side) and CenterCrop sizes (256 / 224 = ImageNet-C).
        strict: raise a UserError after the run if any image failed (all others are written
            first, so a rerun only redoes the failures); False returns them in the summary.
        mp_context: multiprocessing start method; default "fork" where available.

    Returns a summary dict: images, outputs_total, written, skipped, failed (list of messages),
    tmp_removed, seconds, outputs_per_second, settings.
    """
    check_corruptions(corruptions, severities)
    severities = [int(s) for s in severities]
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    out_dir = Path(out_dir)
    tasks_in = _checked_sources(sources)
    settings = _settings(_package_version(), quality, resize, crop)
    info = _check_info(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tasks, skipped, tmp_removed = _pending(tasks_in, out_dir, corruptions, severities)
    write_json(out_dir / INFO_FILE, {
        "settings": settings,
        "corruptions": sorted(set(info.get("corruptions", [])) | set(corruptions)),
        "severities": sorted(set(info.get("severities", [])) | set(severities)),
        "layout": "<corruption>/<severity>/<relative_out_path>.JPEG",
    }, indent=2)
    cfg = {"out_dir": os.fspath(out_dir), "quality": quality, "resize": resize, "crop": crop}
    written, failures = _render(tasks, cfg, corruptions, workers, progress, mp_context)
    seconds = time.perf_counter() - t0
    summary = {
        "out_dir": os.fspath(out_dir),
        "images": len(tasks_in),
        "outputs_total": len(tasks_in) * len(corruptions) * len(severities),
        "written": written,
        "skipped": skipped,
        "failed": failures,
        "tmp_removed": tmp_removed,
        "seconds": seconds,
        "outputs_per_second": written / seconds if seconds > 0 else 0.0,
        "settings": settings,
    }
    if failures and strict:
        more = f" ({len(failures)} failures in total; rerun to retry them)" if len(failures) > 1 else ""
        raise UserError(f"corruption rendering failed for {failures[0]}{more}")
    return summary


def _checked_sources(sources: Sequence[tuple[str, ImageSource]]) -> list[tuple[str, ImageSource]]:
    """Every (relative path, image) pair checked before any work: one UserError for the first problem."""
    tasks_in: list[tuple[str, ImageSource]] = []
    seen: dict[str, int] = {}
    missing_files: list[str] = []
    for i, item in enumerate(sources):
        try:
            rel, src = item
        except (TypeError, ValueError):
            raise UserError(f"source {i}: expected a (relative_out_path, image) pair") from None
        rel = _normalise_rel(rel, i)
        if rel in seen:
            raise UserError(f"sources {seen[rel]} and {i} both write '{rel}.JPEG'")
        seen[rel] = i
        if isinstance(src, np.ndarray):
            if src.dtype != np.uint8:
                raise UserError(f"source {i} ('{rel}'): image array has dtype {src.dtype}; expected uint8")
        elif isinstance(src, (str, os.PathLike)):
            if not os.path.isfile(src):
                missing_files.append(os.fspath(src))
        else:
            raise UserError(f"source {i} ('{rel}'): image must be a file path or a uint8 array, got {type(src).__name__}")
        tasks_in.append((rel, src))
    if missing_files:
        more = f" (and {len(missing_files) - 1} more)" if len(missing_files) > 1 else ""
        raise UserError(f"{missing_files[0]}: source image not found{more}")
    if not tasks_in:
        raise UserError("no source images to corrupt")
    return tasks_in


def _pending(tasks_in: list[tuple[str, ImageSource]], out_dir: Path, corruptions: Sequence[str],
             severities: Sequence[int]) -> tuple[list[tuple[str, ImageSource, list[tuple[str, int]]]], int, int]:
    """(tasks with the outputs still to write, outputs already there, stale *.tmp files removed):
    one directory listing per output folder."""
    listing: dict[str, set[str]] = {}
    tmp_removed = 0

    def existing(folder: str) -> set[str]:
        nonlocal tmp_removed
        names = listing.get(folder)
        if names is None:
            names = set()
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        if e.name.endswith(".tmp"):
                            try:
                                os.remove(e.path)
                                tmp_removed += 1
                            except OSError:
                                pass
                        else:
                            names.add(e.name)
            except FileNotFoundError:
                pass
            listing[folder] = names
        return names

    tasks: list[tuple[str, ImageSource, list[tuple[str, int]]]] = []
    skipped = 0
    for rel, src in tasks_in:
        parent, name = os.path.split(rel)
        jobs = []
        for c in corruptions:
            for s in severities:
                if name + ".JPEG" in existing(os.path.join(out_dir, c, str(s), parent)):
                    skipped += 1
                else:
                    jobs.append((c, s))
        if jobs:
            tasks.append((rel, src, jobs))
    return tasks, skipped, tmp_removed


def _render(tasks: list, cfg: dict[str, Any], corruptions: Sequence[str], workers: int, progress: bool,
            mp_context: Optional[str]) -> tuple[int, list[str]]:
    """Render the pending tasks (in worker processes when there are several); (written, failure messages)."""
    total = sum(len(j) for _, _, j in tasks)
    written = 0
    failures: list[str] = []
    bar = None
    if progress and total:
        bar = _progress(total)
    try:
        if total and workers > 1 and len(tasks) > 1:
            if "glass_blur" in corruptions:
                _warm_glass_blur()  # compile numba once here; forked workers inherit it
            method = mp_context or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            ctx = mp.get_context(method)
            with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(cfg, True)) as pool:
                for _, n, fails, njobs in pool.imap_unordered(_render_task, tasks, chunksize=1):
                    written += n
                    failures.extend(fails)
                    if bar is not None:
                        bar.update(njobs)
        elif total:
            _init_worker(cfg, False)
            for task in tasks:
                _, n, fails, njobs = _render_task(task)
                written += n
                failures.extend(fails)
                if bar is not None:
                    bar.update(njobs)
    finally:
        if bar is not None:
            bar.close()
    return written, failures


class _PlainProgress:
    """Progress for a log that is not a terminal (`> log.txt`, nohup, SLURM): one line per tenth
    of the work instead of a bar's carriage-return updates, which would fill the file."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.shown, self.started = total, 0, 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        tenth = 10 * self.done // self.total
        if tenth > self.shown:
            self.shown = tenth
            seconds = time.perf_counter() - self.started
            print(f"corrupt: {self.done}/{self.total} images ({100 * self.done // self.total}%), "
                  f"{self.done / max(seconds, 1e-9):.1f} images/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int):
    """A tqdm bar on a terminal, plain lines otherwise."""
    if not sys.stderr.isatty():
        return _PlainProgress(total)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="corrupt", unit="img", dynamic_ncols=True, file=sys.stderr)


def _warm_glass_blur() -> None:
    try:
        corrupt_image(np.zeros((32, 32, 3), np.uint8), "glass_blur", 1, 0)
    except Exception:  # the real call reports the failure with its file name
        pass
