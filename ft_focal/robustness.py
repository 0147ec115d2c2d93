"""Corruption robustness: ImageNet-C evaluation (CE / mCE) and evaluation-suite files.

- `evaluate_corruptions(predict, root, class_to_label, corruptions, severities, transform)` runs
  ONE DataLoader over every requested (corruption, severity) subset (workers decode JPEGs while
  the model runs), counts correct / total per subset, and returns top-1 errors. With an
  `accelerate.Accelerator` (or an initialised `torch.distributed`) the sample list is sharded
  `i % world == rank` and the integer counts are summed across processes, so the result is
  exact: no sample is dropped or counted twice, whatever the world size.
- `summarize_corruptions(errors, clean_error, baseline)` turns the errors into CE / mCE /
  relative mCE (`ft_focal.metrics.mean_corruption_error`), per-severity means, and the 4 extra
  corruptions reported separately.
- `load_eval_suite(path)` reads and validates an evaluation suite YAML (`eval/*.yaml`,
  schema in eval/README.md); `run_imagenet_c_suite` evaluates one end to end.

`predict` is any callable mapping a float batch [B, 3, H, W] (already on `device`) to logits
[B, C] in the label order of `class_to_label`; put the model in eval mode first. Batches from a
five-crop transform ([B, 5, 3, H, W]) are flattened and the logits of the crops averaged.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import yaml

from ft_focal.data.imagenet_c import (
    ImageNetCDataset,
    class_to_label_from_classnames,
    discover_corruptions,
    scan_imagenet_c,
    subset_list,
)
from ft_focal.errors import UserError
from ft_focal.metrics import (
    ALEXNET_CLEAN_ERROR,
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    mean_corruption_error,
)
from ft_focal.sampling import shard_indices

__all__ = [
    "shard_indices",
    "describe_transform",
    "build_eval_transform",
    "evaluate_corruptions",
    "summarize_corruptions",
    "read_baseline_table",
    "load_eval_suite",
    "suite_transform",
    "run_imagenet_c_suite",
]

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


# ----------------------------------------------------------------------------- transforms

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


class _StackCrops:
    """FiveCrop output (tuple of PIL images) -> tensor [5, 3, H, W] (picklable for workers)."""

    def __init__(self, per_crop: Callable):
        self.per_crop = per_crop

    def __call__(self, crops):
        return torch.stack([self.per_crop(c) for c in crops])

    def __repr__(self) -> str:
        return f"StackCrops({self.per_crop!r})"


def build_eval_transform(
    resize: Optional[int] = None,
    crop: Optional[int] = 224,
    interpolation: str = "bicubic",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    five_crop: bool = False,
    five_crop_resize: int = 248,
) -> Callable:
    """Test-time transform: [Resize(resize)] + [CenterCrop(crop)] + ToTensor + [Normalize].

    five_crop=True: Resize(five_crop_resize) + FiveCrop(crop), giving [5, 3, crop, crop] per
    image (LIFT's test-time ensemble; `evaluate_corruptions` averages the crops' logits).
    """
    from torchvision import transforms as T

    if interpolation not in _INTERPOLATIONS:
        raise UserError(f"interpolation {interpolation!r} is not one of {', '.join(_INTERPOLATIONS)}")
    mode = getattr(T.InterpolationMode, interpolation.upper())
    to_tensor: list = [T.ToTensor()]
    if (mean is None) != (std is None):
        raise UserError("give both mean and std, or neither")
    if mean is not None:
        to_tensor.append(T.Normalize(list(mean), list(std)))
    if five_crop:
        if crop is None:
            raise UserError("five_crop needs a crop size")
        return T.Compose([T.Resize(five_crop_resize, interpolation=mode), T.FiveCrop(crop), _StackCrops(T.Compose(to_tensor))])
    steps: list = []
    if resize is not None:
        steps.append(T.Resize(resize, interpolation=mode))
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    return T.Compose(steps + to_tensor)


def _fmt_seq(v: Any) -> str:
    try:
        return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"
    except TypeError:
        return str(v)


def describe_transform(transform: Optional[Callable]) -> str:
    """Human-readable one-liner for a torchvision transform pipeline (falls back to repr)."""
    if transform is None:
        return "PIL decode -> RGB, no transform"
    try:
        from torchvision import transforms as T
    except ImportError:  # pragma: no cover
        return f"PIL decode -> RGB -> {transform!r}"

    def one(t: Any) -> str:
        if isinstance(t, T.Compose):
            return " + ".join(one(x) for x in t.transforms)
        if isinstance(t, T.Resize):
            interp = getattr(t.interpolation, "value", t.interpolation)
            return f"Resize({t.size}, {interp})"
        if isinstance(t, T.CenterCrop):
            s = t.size
            return f"CenterCrop({s[0] if len(s) == 2 and s[0] == s[1] else s})"
        if isinstance(t, T.FiveCrop):
            s = t.size
            return f"FiveCrop({s[0] if len(s) == 2 and s[0] == s[1] else s}, logits averaged)"
        if isinstance(t, T.ToTensor):
            return "ToTensor([0,1])"
        if isinstance(t, T.Normalize):
            return f"Normalize(mean={_fmt_seq(t.mean)}, std={_fmt_seq(t.std)})"
        if isinstance(t, _StackCrops):
            return one(t.per_crop) + " per crop"
        return repr(t).replace("\n", " ")

    return "PIL decode -> RGB -> " + one(transform)


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


def _clean_user_error(exc: UserError) -> UserError:
    """DataLoader workers re-raise as UserError('Caught UserError in worker...\\n<traceback>');
    keep only the original one-line message."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return exc
    msg = lines[-1]
    for prefix in ("ft_focal.errors.UserError:", "UserError:"):
        if msg.startswith(prefix):
            msg = msg[len(prefix):].strip()
    return UserError(msg)


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
    if transform is None:
        from torchvision import transforms as T

        transform = T.ToTensor()
    if corruptions is None:
        corruptions = discover_corruptions(root, list(BENCHMARK_CORRUPTIONS) + list(EXTRA_CORRUPTIONS))
    severities = [int(s) for s in (ALL_SEVERITIES if severities is None else severities)]
    samples = scan_imagenet_c(root, corruptions, severities, dict(class_to_label))
    subsets = subset_list(corruptions, severities)
    description = preprocessing or describe_transform(transform)

    world, rank = _dist_info(accelerator)
    if device is None:
        device = accelerator.device if accelerator is not None else "cpu"
    device = torch.device(device)
    split = _split_normalize(transform) if normalize_on_device is not False else None
    if split is not None and (normalize_on_device or device.type == "cuda" or num_workers == 0):
        transform, norm_mean, norm_std = split
        norm_mean, norm_std = norm_mean.to(device), norm_std.to(device)
    else:
        norm_mean = norm_std = None
    dataset = ImageNetCDataset(samples, transform, subsets)
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    shard = torch.utils.data.Subset(dataset, list(shard_indices(len(dataset), world, rank)))
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    S = len(subsets)
    correct = torch.zeros(S, dtype=torch.long, device=device)
    total = torch.zeros(S, dtype=torch.long, device=device)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shard), desc="imagenet-c", unit="img", dynamic_ncols=True)
    max_label = max(int(v) for v in class_to_label.values())
    t0 = time.perf_counter()
    batches = iter(loader)
    failure: Optional[BaseException] = None
    try:
        with torch.inference_mode():
            for x, y, sidx in batches:
                x = x.to(device, non_blocking=True)
                if norm_mean is not None:  # uint8 from the workers -> ToTensor + Normalize here
                    x = x.float().div_(255).sub_(norm_mean).div_(norm_std)
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
                dev = logits.device
                if correct.device != dev:
                    correct, total = correct.to(dev), total.to(dev)
                y = y.to(dev, non_blocking=True)
                sidx = sidx.to(dev, non_blocking=True)
                hit = (logits.argmax(1) == y).long()
                correct.scatter_add_(0, sidx, hit)
                total += torch.bincount(sidx, minlength=S)
                if bar is not None:
                    bar.update(int(y.shape[0]))
    except Exception as exc:  # re-raised below, after the other processes have been told
        failure = _clean_user_error(exc) if isinstance(exc, UserError) else exc
        _shutdown_loader(batches)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if world > 1:  # a failure on one rank must not leave the others waiting in the reduce
        failed = _sum_across(torch.tensor([int(failure is not None)]), accelerator, world)
        if int(failed) and failure is None:
            raise UserError("ImageNet-C evaluation failed in another process (see its message)")
    if failure is not None:
        raise failure
    n_local = len(shard)
    correct = _sum_across(correct.cpu(), accelerator, world)
    total = _sum_across(total.cpu(), accelerator, world)
    if int(total.sum()) != len(dataset):  # sharding must cover every sample exactly once
        raise RuntimeError(f"counted {int(total.sum())} images, expected {len(dataset)}")

    errors: dict[str, list[float]] = {}
    counts: dict[str, dict[str, list[int]]] = {}
    for i, (c, s) in enumerate(subsets):
        n, k = int(total[i]), int(correct[i])
        errors.setdefault(c, []).append((n - k) / n)
        cc = counts.setdefault(c, {"correct": [], "total": []})
        cc["correct"].append(k)
        cc["total"].append(n)
    return {
        "errors": errors,
        "severities": severities,
        "counts": counts,
        "num_images": len(dataset),
        "preprocessing": description,
        "world_size": world,
        "seconds": seconds,
        "images_per_second": n_local / seconds if seconds > 0 else 0.0,
    }


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


# ----------------------------------------------------------------------------- suites

_REQUIRED = object()


class _Key:
    def __init__(self, types: tuple, default: Any = _REQUIRED, choices: Optional[tuple] = None, path: bool = False):
        self.types, self.default, self.choices, self.path = types, default, choices, path


_PREPROCESSING = {
    "resize": _Key((int, type(None)), None),
    "crop": _Key((int, type(None)), 224),
    "interpolation": _Key((str,), "bicubic", _INTERPOLATIONS),
    "five_crop": _Key((bool,), False),
    "five_crop_resize": _Key((int,), 248),
    "mean": _Key((list, type(None)), None),
    "std": _Key((list, type(None)), None),
}
_COMMON = {
    "name": _Key((str,), None),
    "kind": _Key((str,), _REQUIRED, ("long_tail", "imagenet_c")),
    "description": _Key((str,), ""),
    "batch_size": _Key((int,), 256),
    "num_workers": _Key((int,), 4),
    "preprocessing": _PREPROCESSING,
}
_SCHEMAS: dict[str, dict[str, Any]] = {
    "long_tail": {
        **_COMMON,
        "split": _Key((str,), "test", ("test", "val")),
        "data": {
            "root": _Key((str,), _REQUIRED, path=True),
            "split_list": _Key((str,), _REQUIRED, path=True),
            "train_list": _Key((str, type(None)), None, path=True),
            "classnames": _Key((str, type(None)), None, path=True),
            "label_order": _Key((str,), "given", ("given", "alphabetical")),
        },
        "shots": {"many": _Key((int,), 100), "few": _Key((int,), 20)},
    },
    "imagenet_c": {
        **_COMMON,
        "root": _Key((str,), _REQUIRED, path=True),
        "classnames": _Key((str, type(None)), None, path=True),
        "corruptions": _Key((list,), list(BENCHMARK_CORRUPTIONS)),
        "extra_corruptions": _Key((list,), list(EXTRA_CORRUPTIONS)),
        "severities": _Key((list,), list(ALL_SEVERITIES)),
        "baseline": {
            "name": _Key((str,), "alexnet"),
            "table": _Key((str, type(None)), None, path=True),
            "clean_error": _Key((float, int, type(None)), ALEXNET_CLEAN_ERROR),
        },
        "clean_suite": _Key((str, type(None)), None, path=True),
    },
}


def _suggest(name: str, options: Sequence[str]) -> str:
    m = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else f" (valid: {', '.join(sorted(options))})"


def _tname(types: tuple) -> str:
    names = [("null" if t is type(None) else t.__name__) for t in types]
    return " or ".join(names)


def _validate(raw: Any, schema: dict[str, Any], where: str, prefix: str, base_dir: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.') or 'suite'}' must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in schema:
            raise UserError(f"{where}: unknown key '{prefix}{key}'" + _suggest(key, list(schema)))
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        full = prefix + key
        if isinstance(spec, dict):
            out[key] = _validate(raw.get(key) or {}, spec, where, full + ".", base_dir)
            continue
        if key not in raw:
            if spec.default is _REQUIRED:
                raise UserError(f"{where}: key '{full}' is required")
            out[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
            continue
        value = raw[key]
        ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
        if not ok:
            raise UserError(f"{where}: key '{full}' must be {_tname(spec.types)}, got {type(value).__name__} {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise UserError(f"{where}: key '{full}' is {value!r}, not one of {', '.join(spec.choices)}")
        if spec.path and isinstance(value, str):
            value = _resolve(value, base_dir)
        out[key] = value
    return out


def _resolve(value: str, base_dir: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base_dir / p))


def _set_override(raw: dict, text: str, where: str) -> None:
    if "=" not in text:
        raise UserError(f"{where}: override '{text}' must look like key=value (e.g. root=/data/imagenet-c)")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"{where}: override '{key}': '{part}' is not a section")
    node[parts[-1]] = parsed


def load_eval_suite(path: str | os.PathLike, overrides: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Read an evaluation suite YAML (schema: eval/README.md), fill defaults, validate.

    Unknown keys, wrong types and bad choices raise a one-line UserError naming the file and
    the key. Relative paths in the file are resolved against the file's folder; overrides
    (`key=value`, dotted keys, values parsed as YAML) take paths as given (cwd-relative).
    Returns a plain dict with every key of the suite's kind plus `path` (the suite file).
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserError(f"{path}: evaluation suite not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite must be a mapping of keys, got {type(raw).__name__}")
    base_dir = path.resolve().parent
    over_raw: dict = {}
    for text in overrides or []:
        _set_override(over_raw, text, where)
    kind = over_raw.get("kind", raw.get("kind"))
    if kind not in _SCHEMAS:
        raise UserError(f"{where}: key 'kind' must be one of {', '.join(_SCHEMAS)}, got {kind!r}")
    schema = _SCHEMAS[kind]
    # overrides are validated with the same schema; their paths are relative to the cwd
    suite = _validate(_merge(raw, over_raw), schema, where, "", base_dir)
    _reresolve_overrides(suite, over_raw, schema)
    if suite["name"] is None:
        suite["name"] = path.stem
    _check_suite(suite, where)
    suite["path"] = str(path)
    return suite


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def _reresolve_overrides(suite: dict, over: dict, schema: dict) -> None:
    for k, v in over.items():
        spec = schema.get(k)
        if isinstance(spec, dict) and isinstance(v, dict):
            _reresolve_overrides(suite[k], v, spec)
        elif isinstance(spec, _Key) and spec.path and isinstance(v, str):
            suite[k] = os.path.abspath(os.path.expanduser(v))


def _check_suite(suite: dict, where: str) -> None:
    pre = suite["preprocessing"]
    for k in ("mean", "std"):
        v = pre[k]
        if v is not None and (len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise UserError(f"{where}: key 'preprocessing.{k}' must be a list of 3 numbers or null, got {v!r}")
    if (pre["mean"] is None) != (pre["std"] is None):
        raise UserError(f"{where}: keys 'preprocessing.mean' and 'preprocessing.std' must both be set or both null")
    for k in ("resize", "crop", "five_crop_resize"):
        if pre[k] is not None and pre[k] < 1:
            raise UserError(f"{where}: key 'preprocessing.{k}' must be >= 1, got {pre[k]}")
    if suite["batch_size"] < 1 or suite["num_workers"] < 0:
        raise UserError(f"{where}: keys 'batch_size' must be >= 1 and 'num_workers' >= 0")
    if suite["kind"] == "long_tail":
        if suite["shots"]["few"] > suite["shots"]["many"]:
            raise UserError(f"{where}: key 'shots.few' ({suite['shots']['few']}) exceeds 'shots.many' ({suite['shots']['many']})")
        return
    if pre["five_crop"]:
        raise UserError(f"{where}: key 'preprocessing.five_crop' is not supported for ImageNet-C (224 px images)")
    known = set(BENCHMARK_CORRUPTIONS) | set(EXTRA_CORRUPTIONS)
    seen: set[str] = set()
    for key in ("corruptions", "extra_corruptions"):
        for c in suite[key]:
            if not isinstance(c, str) or c not in known:
                raise UserError(f"{where}: key '{key}': {c!r} is not an ImageNet-C corruption" + _suggest(str(c), sorted(known)))
            if c in seen:
                raise UserError(f"{where}: key '{key}': corruption '{c}' listed twice")
            seen.add(c)
    sev = suite["severities"]
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sev) or len(set(sev)) != len(sev):
        raise UserError(f"{where}: key 'severities' must be distinct integers in 1..5, got {sev!r}")
    b = suite["baseline"]
    if b["name"] != "alexnet" and b["table"] is None:
        raise UserError(f"{where}: key 'baseline.table' is required for baseline '{b['name']}'")
    if b["table"] is not None and not Path(b["table"]).is_file():
        raise UserError(f"{where}: key 'baseline.table': file {b['table']} not found")
    ce = b["clean_error"]
    if ce is not None and not (0.0 <= float(ce) <= 1.0 and math.isfinite(float(ce))):
        raise UserError(f"{where}: key 'baseline.clean_error' must be a fraction in [0, 1], got {ce}")


def suite_transform(suite: Mapping[str, Any], mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Callable:
    """The suite's test transform; the suite's mean/std win, else the model's `mean`/`std`."""
    pre = suite["preprocessing"]
    m = pre["mean"] if pre["mean"] is not None else mean
    s = pre["std"] if pre["std"] is not None else std
    return build_eval_transform(
        resize=pre["resize"], crop=pre["crop"], interpolation=pre["interpolation"], mean=m, std=s,
        five_crop=pre["five_crop"], five_crop_resize=pre["five_crop_resize"],
    )


def run_imagenet_c_suite(
    predict: Callable[[torch.Tensor], torch.Tensor],
    suite: Mapping[str, Any] | str | os.PathLike,
    class_to_label: Optional[Mapping[str, int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    clean_error: Optional[float] = None,
    device: Any = None,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an `imagenet_c` suite end to end: scan, evaluate (benchmark + extra corruptions
    in one pass), summarize. `class_to_label` defaults to the suite's `classnames` file.
    Returns {"suite", "evaluation" (evaluate_corruptions output), "summary"} (summary is None
    unless all five severities were evaluated)."""
    if not isinstance(suite, Mapping):
        suite = load_eval_suite(suite)
    if suite.get("kind") != "imagenet_c":
        raise UserError(f"{suite.get('path', 'suite')}: kind is {suite.get('kind')!r}, expected 'imagenet_c'")
    if class_to_label is None:
        if suite["classnames"] is None:
            raise UserError(f"{suite.get('path', 'suite')}: key 'classnames' is needed (or pass the model's class order)")
        class_to_label = class_to_label_from_classnames(suite["classnames"])
    corruptions = list(suite["corruptions"]) + list(suite["extra_corruptions"])
    evaluation = evaluate_corruptions(
        predict, suite["root"], class_to_label, corruptions, suite["severities"],
        transform=suite_transform(suite, mean, std), batch_size=suite["batch_size"],
        num_workers=suite["num_workers"], device=device, progress=progress, accelerator=accelerator,
    )
    summary = None
    if list(suite["severities"]) == list(ALL_SEVERITIES):
        b = suite["baseline"]
        baseline: Any = b["table"] if b["table"] is not None else b["name"]
        summary = summarize_corruptions(evaluation, clean_error, baseline, b["clean_error"])
        summary["preprocessing"] = evaluation["preprocessing"]
    return {"suite": dict(suite), "evaluation": evaluation, "summary": summary}
