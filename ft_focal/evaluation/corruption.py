"""ImageNet-C evaluation: top-1 error per (corruption, severity), then CE / mCE.

- `evaluate_corruptions(predict, root, class_to_label, corruptions, severities, transform)` runs
  ONE DataLoader over every requested (corruption, severity) subset (workers decode JPEGs while
  the model runs), counts correct / total per subset, and returns top-1 errors. With an
  `accelerate.Accelerator` (or an initialised `torch.distributed`) the sample list is sharded
  `i % world == rank` and the integer counts are summed across processes, so the result is
  exact: no sample is dropped or counted twice, whatever the world size.
- `summarize_corruptions(errors, clean_error, baseline)` turns the errors into CE / mCE /
  relative mCE (`ft_focal.metrics.mean_corruption_error`; definitions in docs/metrics.md),
  per-severity means, and the 4 extra corruptions reported separately.

`predict` is any callable mapping a float batch [B, 3, H, W] (already on `device`) to logits
[B, C] in the label order of `class_to_label`; put the model in eval mode first. Batches from a
five-crop transform ([B, 5, 3, H, W]) are flattened and the logits of the crops averaged.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ft_focal.data.imagenet_c import ImageNetCDataset, discover_corruptions, scan_imagenet_c, subset_list
from ft_focal.data.transforms import build_eval_transform, describe_transform
from ft_focal.errors import UserError, unwrap_worker_error
from ft_focal.metrics import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, mean_corruption_error
from ft_focal.training.sampling import shard_indices

__all__ = ["ALL_SEVERITIES", "evaluate_corruptions", "summarize_corruptions", "read_baseline_table"]

ALL_SEVERITIES = (1, 2, 3, 4, 5)


# ----------------------------------------------------------------------------- sharding

def _dist_info(accelerator: Any) -> tuple[int, int]:
    if accelerator is not None:
        return int(accelerator.num_processes), int(accelerator.process_index)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _sum_across(t: torch.Tensor, accelerator: Any, world: int) -> torch.Tensor:
    if world == 1:
        return t
    if accelerator is not None:
        out = accelerator.reduce(t.to(accelerator.device), reduction="sum")
        return out.to(t.device)
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


# ----------------------------------------------------------------------------- evaluation

def _split_normalize(transform: Callable) -> Optional[tuple[Callable, torch.Tensor, torch.Tensor]]:
    """Compose([..., ToTensor(), Normalize(m, s)]) -> (Compose([..., PILToTensor()]), m, s);
    None for any other transform."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None) if isinstance(transform, T.Compose) else None
    if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    norm = steps[-1]
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return T.Compose(list(steps[:-2]) + [T.PILToTensor()]), mean, std


def _shutdown_loader(batches: Any) -> None:
    """Stop DataLoader workers now. After an error, an iterator left to the garbage collector
    waits ~5 s per worker whose result queue nobody drains."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        for w in getattr(batches, "_workers", []):
            if w.is_alive():
                w.terminate()  # workers only decode images; nothing to flush
        shutdown()
    except Exception:  # pragma: no cover - best effort cleanup
        pass


def evaluate_corruptions(
    predict: Callable[[torch.Tensor], torch.Tensor],
    root: str | os.PathLike,
    class_to_label: Mapping[str, int],
    corruptions: Optional[Sequence[str]] = None,
    severities: Optional[Sequence[int]] = ALL_SEVERITIES,
    transform: Optional[Callable] = None,
    batch_size: int = 256,
    num_workers: int = 2,
    pin_memory: Optional[bool] = None,
    device: Any = None,
    progress: bool = True,
    accelerator: Any = None,
    preprocessing: Optional[str] = None,
    normalize_on_device: Optional[bool] = None,
) -> dict[str, Any]:
    """Top-1 error of `predict` on every (corruption, severity) subset of an ImageNet-C folder.

    Args:
        predict: batch [B, 3, H, W] on `device` -> logits [B, C].
        root: folder with the layout root/<corruption>/<severity>/<class>/<image>.
        class_to_label: class folder (wnid) -> label, in the model's label order.
        corruptions: names to evaluate; None = every corruption folder under `root` (the 15
            benchmark ones first, then the 4 extra ones, then others).
        severities: None = 1..5.
        transform: PIL RGB image -> tensor [3, H, W] (or [5, 3, H, W] for five crops);
            default = ToTensor only.
        pin_memory: None = pin when `device` is CUDA.
        device: where batches go; default = accelerator.device, else "cpu".
        accelerator: accelerate.Accelerator; shards the samples across its processes and sums
            the counts (every process gets the same full result). Without it, an initialised
            torch.distributed process group is used the same way.
        preprocessing: text for the report; default describes `transform`.
        normalize_on_device: for a transform ending in ToTensor + Normalize, let the workers
            produce uint8 tensors and do the float conversion and normalisation on the batch
            on `device` (4x less pinned memory and host-to-device traffic, less worker CPU;
            same arithmetic). None = on when `device` is CUDA or num_workers is 0 (then the
            float work runs once per batch instead of once per image in the main process).

    Returns a dict:
        errors: {corruption: [top-1 error per severity, in `severities` order]} (fractions);
        severities; counts: {corruption: {"correct": [...], "total": [...]}};
        num_images; preprocessing; world_size; seconds (this process); images_per_second.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    transform = transform if transform is not None else build_eval_transform(crop=None)  # ToTensor only
    if corruptions is None:
        corruptions = discover_corruptions(root, list(BENCHMARK_CORRUPTIONS) + list(EXTRA_CORRUPTIONS))
    severities = [int(s) for s in (ALL_SEVERITIES if severities is None else severities)]
    samples = scan_imagenet_c(root, corruptions, severities, dict(class_to_label))
    subsets = subset_list(corruptions, severities)
    description = preprocessing or describe_transform(transform)

    world, rank = _dist_info(accelerator)
    device = torch.device(device if device is not None else accelerator.device if accelerator is not None else "cpu")
    transform, norm = _normalize_where(transform, normalize_on_device, device, num_workers)
    dataset = ImageNetCDataset(samples, transform, subsets)
    shard = torch.utils.data.Subset(dataset, list(shard_indices(len(dataset), world, rank)))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda" if pin_memory is None else pin_memory,
                                         prefetch_factor=2 if num_workers > 0 else None)
    max_label = max(int(v) for v in class_to_label.values())
    t0 = time.perf_counter()
    correct, total, failure = _count_correct(predict, loader, len(subsets), device, norm, max_label,
                                             progress and rank == 0, len(shard))
    seconds = time.perf_counter() - t0
    correct, total = _reduce_counts(correct, total, failure, accelerator, world, len(dataset))
    return {
        **_errors_and_counts(subsets, correct, total),
        "severities": severities,
        "num_images": len(dataset),
        "preprocessing": description,
        "world_size": world,
        "seconds": seconds,
        "images_per_second": len(shard) / seconds if seconds > 0 else 0.0,
    }


def _normalize_where(transform: Callable, normalize_on_device: Optional[bool], device: torch.device,
                     num_workers: int) -> tuple[Callable, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """(worker transform, (mean, std) on `device` or None): see `normalize_on_device` above."""
    split = _split_normalize(transform) if normalize_on_device is not False else None
    if split is not None and (normalize_on_device or device.type == "cuda" or num_workers == 0):
        transform, norm_mean, norm_std = split
        return transform, (norm_mean.to(device), norm_std.to(device))
    return transform, None


def _reduce_counts(correct: torch.Tensor, total: torch.Tensor, failure: Optional[BaseException], accelerator: Any,
                   world: int, expected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts summed over the processes; a failure in any process raises in every process."""
    if world > 1:  # a failure on one rank must not leave the others waiting in the reduce
        failed = _sum_across(torch.tensor([int(failure is not None)]), accelerator, world)
        if int(failed) and failure is None:
            raise UserError("ImageNet-C evaluation failed in another process (see its message)")
    if failure is not None:
        raise failure
    correct = _sum_across(correct.cpu(), accelerator, world)
    total = _sum_across(total.cpu(), accelerator, world)
    if int(total.sum()) != expected:  # sharding must cover every sample exactly once
        raise RuntimeError(f"counted {int(total.sum())} images, expected {expected}")
    return correct, total


def _count_correct(predict: Callable, loader: Any, n_subsets: int, device: torch.device, norm: Optional[tuple],
                   max_label: int, progress: bool, n_images: int) -> tuple[torch.Tensor, torch.Tensor, Optional[BaseException]]:
    """Correct and total counts per subset of this process's shard; the exception that stopped it, if any
    (returned, not raised: the other processes must hear of it first)."""
    correct = torch.zeros(n_subsets, dtype=torch.long, device=device)
    total = torch.zeros(n_subsets, dtype=torch.long, device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_images, desc="imagenet-c", unit="img", dynamic_ncols=True)
    batches = iter(loader)
    failure: Optional[BaseException] = None
    try:
        with torch.inference_mode():
            for x, y, sidx in batches:
                logits = _predict_batch(predict, x.to(device, non_blocking=True), norm, max_label)
                dev = logits.device
                if correct.device != dev:
                    correct, total = correct.to(dev), total.to(dev)
                sidx = sidx.to(dev, non_blocking=True)
                correct.scatter_add_(0, sidx, (logits.argmax(1) == y.to(dev, non_blocking=True)).long())
                total += torch.bincount(sidx, minlength=n_subsets)
                if bar is not None:
                    bar.update(int(y.shape[0]))
    except Exception as exc:  # re-raised by the caller, after the other processes have been told
        failure = unwrap_worker_error(exc) if isinstance(exc, UserError) else exc
        _shutdown_loader(batches)
    finally:
        if bar is not None:
            bar.close()
    return correct, total, failure


def _predict_batch(predict: Callable, x: torch.Tensor, norm: Optional[tuple], max_label: int) -> torch.Tensor:
    """Logits [B, C] of one batch: normalised on the device if the workers sent uint8, crops averaged."""
    if norm is not None:  # uint8 from the workers -> ToTensor + Normalize here
        x = x.float().div_(255).sub_(norm[0]).div_(norm[1])
    crops = 1
    if x.ndim == 5:  # [B, n_crops, 3, H, W]
        crops = x.shape[1]
        x = x.flatten(0, 1)
    logits = predict(x)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"predict must return logits [B, C] for a batch of {x.shape[0]}, got {shape}")
    if max_label >= logits.shape[1]:
        raise UserError(
            f"class_to_label has label {max_label} but the model outputs {logits.shape[1]} classes; "
            "check the classnames file against the checkpoint"
        )
    if crops > 1:
        logits = logits.view(-1, crops, logits.shape[-1]).mean(1)
    return logits


def _errors_and_counts(subsets: list, correct: torch.Tensor, total: torch.Tensor) -> dict[str, Any]:
    errors: dict[str, list[float]] = {}
    counts: dict[str, dict[str, list[int]]] = {}
    for i, (c, _) in enumerate(subsets):
        n, k = int(total[i]), int(correct[i])
        errors.setdefault(c, []).append((n - k) / n)
        cc = counts.setdefault(c, {"correct": [], "total": []})
        cc["correct"].append(k)
        cc["total"].append(n)
    return {"errors": errors, "counts": counts}


# ----------------------------------------------------------------------------- summary

def read_baseline_table(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read a baseline error table: CSV with header `corruption,s1,s2,s3,s4,s5`, one row per
    corruption, errors as fractions (the format of eval/alexnet_errors.csv)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: baseline error table not found")
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read baseline table ({exc})") from None
    want = ["corruption", "s1", "s2", "s3", "s4", "s5"]
    if not rows or [h.strip() for h in rows[0]] != want:
        raise UserError(f"{path} line 1: header must be '{','.join(want)}'")
    table: dict[str, list[float]] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 6:
            raise UserError(f"{path} line {lineno}: expected 6 columns, got {len(row)}")
        name = row[0].strip()
        try:
            vals = [float(v) for v in row[1:]]
        except ValueError:
            raise UserError(f"{path} line {lineno}: errors must be numbers, got {row[1:]}") from None
        if not all(0.0 <= v <= 1.0 for v in vals):
            raise UserError(f"{path} line {lineno}: errors must be fractions in [0, 1], got {vals}")
        if name in table:
            raise UserError(f"{path} line {lineno}: corruption '{name}' appears twice")
        table[name] = vals
    if not table:
        raise UserError(f"{path}: baseline table has no rows")
    return table


def summarize_corruptions(
    errors: Mapping[str, Any],
    clean_error: Optional[float] = None,
    baseline: Any = "alexnet",
    baseline_clean_error: Optional[float] = None,
) -> dict[str, Any]:
    """CE / mCE / relative mCE plus per-severity errors; the 4 extra corruptions separately.

    Args:
        errors: {corruption: [5 errors, severities 1..5]} (fractions), or the dict returned by
            `evaluate_corruptions` (its severities must be 1..5).
        clean_error: the model's clean top-1 error (fraction) -> relative CE / mCE.
        baseline: "alexnet" (packaged table, clean error 0.4348), a path to a CSV table
            (`read_baseline_table`) or a dict {corruption: [5 errors]}.
        baseline_clean_error: the baseline's clean error (required for relative metrics with a
            custom baseline).

    Returns `metrics.mean_corruption_error(...)` (CE, mCE, relative_CE, relative_mCE,
    mean_error, ... in PERCENT) extended with:
        errors: the per-severity top-1 errors (fractions) of every corruption (benchmark first);
        per_severity: {"1".."5": mean error over the benchmark corruptions present, percent};
        benchmark_mean_error: mean over benchmark corruptions and severities, percent;
        extra: {errors, mean_error, per_severity, CE, relative_CE} of the extra corruptions
            (speckle_noise, gaussian_blur, spatter, saturate and any custom name) -- never in mCE;
        baseline: "alexnet" / the table path / "custom".
    """
    if "errors" in errors and isinstance(errors.get("errors"), Mapping):
        sev = list(errors.get("severities", ALL_SEVERITIES))
        if sev != list(ALL_SEVERITIES):
            raise UserError(f"CE / mCE need all five severities 1..5 in order; this evaluation has {sev}")
        errors = errors["errors"]
    errs = {str(c): [float(v) for v in vals] for c, vals in errors.items()}
    bad = [c for c, v in errs.items() if len(v) != 5]
    if bad:
        raise UserError(f"corruption '{bad[0]}' has {len(errs[bad[0]])} severities; CE / mCE need all five (1..5)")

    label = "alexnet"
    if isinstance(baseline, (str, os.PathLike)) and str(baseline).lower() != "alexnet":
        label = os.fspath(baseline)
        baseline = read_baseline_table(baseline)
    elif isinstance(baseline, Mapping):
        label = "custom"
    try:
        out = mean_corruption_error(errs, baseline=baseline, clean_error=clean_error, baseline_clean_error=baseline_clean_error)
    except ValueError as exc:
        raise UserError(f"mCE: {exc}") from None

    bench = [c for c in BENCHMARK_CORRUPTIONS if c in errs]
    others = [c for c in errs if c not in BENCHMARK_CORRUPTIONS]

    def per_sev(names: list[str]) -> dict[str, Optional[float]]:
        if not names:
            return {str(s): None for s in ALL_SEVERITIES}
        return {str(s): 100.0 * sum(errs[c][s - 1] for c in names) / len(names) for s in ALL_SEVERITIES}

    out["errors"] = {c: errs[c] for c in bench + others}
    out["per_severity"] = per_sev(bench)
    out["benchmark_mean_error"] = 100.0 * sum(sum(errs[c]) for c in bench) / (5 * len(bench)) if bench else None
    out["extra"] = {
        "errors": {c: errs[c] for c in others},
        "mean_error": {c: 100.0 * sum(errs[c]) / 5 for c in others},
        "per_severity": per_sev(others),
        "CE": out.get("extra_CE", {}),
        "relative_CE": out.get("extra_relative_CE", {}),
        "expected": [c for c in EXTRA_CORRUPTIONS if c in errs],
    }
    out["baseline"] = label
    return out
