"""Evaluation of a classifier: long-tail accuracy by shot group, calibration, ImageNet-C.

`predict` runs a model over a dataset on one or several processes and returns the logits of
EVERY sample exactly once in dataset order: process r takes indices i with i % world == r, and
the shards are gathered (padded to equal length for the collective, then trimmed), so an
uneven split neither duplicates nor drops a sample.

Command line: `ft-focal eval MODEL_DIR [key=value ...] --out FILE.json`
(ft_focal/commands/eval.py; `accelerate launch -m ft_focal.commands.eval MODEL_DIR ...` for several processes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ft_focal.errors import UserError
from ft_focal.metrics import expected_calibration_error, long_tail_accuracy
from ft_focal.training.run_control import ignore_stop_signals
from ft_focal.training.sampling import eval_batches, gather_in_order

logger = logging.getLogger(__name__)


def _collate_keep_bad(items: list) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Stack a batch; an unreadable image (None, with data.skip_bad_images) keeps its slot as label -1.

    Keeping the slot keeps every process's shard aligned with the dataset order for the gather.
    """
    good = [item for item in items if item is not None]
    labels = torch.tensor([-1 if item is None else int(item[1]) for item in items], dtype=torch.long)
    if not good:
        return None, labels
    template = torch.zeros_like(good[0][0])
    images = torch.stack([template if item is None else item[0] for item in items])
    return images, labels


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    accelerator: Any = None,
    num_workers: int = 0,
    collate_fn=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float32, CPU) and labels [N] (int64) for every readable sample of `dataset`.

    Items may be (image [3,H,W], label) or five-crop (crops [K,3,H,W], label); the logits of
    the K crops are averaged (the CLIP protocol's optional test-time ensemble). Images skipped
    as unreadable (data.skip_bad_images) are left out of the result. `collate_fn` is accepted
    for symmetry with training and ignored: evaluation keeps unreadable slots to stay aligned.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    batches = eval_batches(len(dataset), batch_size, rank, world)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate_keep_bad,
        worker_init_fn=ignore_stop_signals,   # SIGTERM / SIGUSR1: the training loop stops at its next safe point
    )
    was_training = model.training
    model.eval()
    logits_parts, label_parts = [], []
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    batches_left = iter(loader)
    try:
        with autocast:
            for images, labels in batches_left:
                if images is None:  # the whole batch was unreadable
                    logits_parts.append(None)
                    label_parts.append(labels)
                    continue
                images = images.to(device, non_blocking=True)
                if images.dim() == 5:  # [B, K, 3, H, W]: average over the K crops
                    b, k = images.shape[:2]
                    out = model(images.flatten(0, 1)).float().view(b, k, -1).mean(1)
                else:
                    out = model(images).float()
                logits_parts.append(out.cpu())
                label_parts.append(labels)
    finally:
        # Workers ignore SIGTERM: released here, an error's traceback cannot keep them (and the
        # interpreter's exit, which waits for them) alive.
        del batches_left
    model.train(was_training)
    num_classes = _num_outputs(model, [p for p in logits_parts if p is not None])
    logits_parts = [torch.zeros(len(lab), num_classes) if p is None else p
                    for p, lab in zip(logits_parts, label_parts, strict=True)]
    local_logits = torch.cat(logits_parts) if logits_parts else torch.zeros(0, num_classes)
    local_labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.long)
    logits = gather_in_order(local_logits, accelerator, len(dataset))
    labels = gather_in_order(local_labels, accelerator, len(dataset))
    readable = labels >= 0
    return logits[readable], labels[readable]


def _num_outputs(model: torch.nn.Module, parts: list[torch.Tensor]) -> int:
    if parts:
        return parts[0].shape[-1]
    num = getattr(model, "num_classes", None)
    return int(num) if num is not None else 0


def summarize(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: list[int],
    many: int = 100,
    few: int = 20,
    ece_bins: int = 15,
) -> dict:
    """Accuracy overall / many / medium / few / per class (fractions) and ECE of one split."""
    result = long_tail_accuracy(logits, labels, class_counts, num_classes=len(class_counts), many=many, few=few)
    result["ece"] = float(expected_calibration_error(logits, labels, n_bins=ece_bins, inputs="logits")) if len(labels) else None
    return result


def evaluate_split(
    model: torch.nn.Module,
    dataset: Dataset,
    class_counts: list[int],
    eval_cfg: Any,
    batch_size: int,
    accelerator: Any = None,
    num_workers: int = 0,
    collate_fn=None,
) -> dict:
    logits, labels = predict(model, dataset, batch_size, accelerator, num_workers, collate_fn)
    return summarize(logits, labels, class_counts, eval_cfg.many_threshold, eval_cfg.few_threshold, eval_cfg.ece_bins)


def evaluate_saved(
    model_dir: str,
    overrides: Optional[list[str]] = None,
    split: Optional[str] = None,
    five_crop: Optional[bool] = None,
    imagenet_c: Optional[str] = None,
    baseline: Optional[str] = None,
    accelerator: Any = None,
    suites: Optional[list] = None,
) -> dict:
    """Evaluate a saved model folder on its recipe's test split (and optionally a -C set, and
    robustness suites: `result["robustness"]`, ft_focal/evaluation/shift_eval.py)."""
    from ft_focal.artifacts.saved import load_model_dir
    from ft_focal.data.build import build_datasets

    saved = load_model_dir(model_dir, overrides)
    recipe = saved.recipe
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    model = saved.model.to(device)
    prepared = None
    if suites:  # every suite's folders and class lists checked before the first image is read
        from ft_focal.evaluation.shift_eval import prepare_suites

        prepared = prepare_suites(suites, saved)
    bundle = build_datasets(recipe.data, saved.preprocess, recipe.seed)
    split = split or recipe.eval.test_split
    use_five_crop = recipe.eval.five_crop if five_crop is None else five_crop
    dataset = bundle.eval_dataset(split, five_crop=use_five_crop)
    if dataset is None:
        raise UserError(f"{model_dir}: the recipe has no '{split}' split")
    result: dict = {
        "model_dir": str(model_dir),
        "recipe": recipe.name,
        "split": split,
        "world_size": accelerator.num_processes if accelerator is not None else 1,
        "five_crop": bool(use_five_crop),
        "preprocessing": describe_preprocess(saved.preprocess, recipe.data, use_five_crop),
    }
    result[split] = evaluate_split(
        model, dataset, saved.class_counts, recipe.eval, recipe.train.eval_batch_size, accelerator,
        recipe.data.num_workers,
    )
    if split != "test":
        result["test"] = result[split]
    if imagenet_c:
        result["corruption"] = evaluate_corruption_set(saved, model, imagenet_c, result[split]["overall"], baseline, accelerator)
    if prepared:
        from ft_focal.evaluation.shift_eval import evaluate_suites

        result["robustness"] = evaluate_suites(model, prepared, result[split], accelerator)
    return result


def describe_preprocess(preprocess: dict, data_cfg: Any, five_crop: bool = False) -> str:
    """The test-time transform in words, as `ft_focal.data.build_transform` builds it."""
    from ft_focal.data.transforms import FIVE_CROP_RESIZE, describe_test_transform, scaled_resize

    text = describe_test_transform(preprocess, data_cfg)
    if five_crop:
        size = preprocess.get("image_size", data_cfg.image_size)
        text = (f"Resize({scaled_resize(FIVE_CROP_RESIZE, size)}) + FiveCrop({size}), logits averaged; "
                + text.split(" + ", 2)[-1])
    return text


def evaluate_corruption_set(saved: Any, model: torch.nn.Module, root: str, clean_accuracy: Optional[float],
                            baseline: Optional[str], accelerator: Any = None) -> dict:
    """CE / mCE on an ImageNet-C-layout folder; `baseline` = "alexnet" or a baseline run's JSON."""
    from ft_focal.data import build_transform
    from ft_focal.data.imagenet_c import class_to_label_for
    from ft_focal.evaluation.corruption import evaluate_corruptions, summarize_corruptions
    from ft_focal.metrics import imagenet_classes

    class_to_label = class_to_label_for(root, saved.classnames, getattr(saved, "wnids", None))
    transform = build_transform(saved.preprocess, saved.recipe.data, train=False)
    device = accelerator.device if accelerator is not None else torch.device("cpu")

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images.to(device))

    raw = evaluate_corruptions(run, root, class_to_label, None, None, transform,
                               batch_size=saved.recipe.train.eval_batch_size,
                               num_workers=saved.recipe.data.num_workers, accelerator=accelerator)
    clean_error = None if clean_accuracy is None else 1.0 - clean_accuracy
    base, base_clean = "alexnet", None
    if baseline and baseline != "alexnet":
        base, base_clean = load_baseline_errors(baseline)
    summary = summarize_corruptions(raw["errors"], clean_error, baseline=base, baseline_clean_error=base_clean)
    note = None
    if base == "alexnet" and not imagenet_classes(getattr(saved, "wnids", None)):
        # The AlexNet errors were measured on ImageNet's 1000 classes: on other classes the ratio is not an mCE.
        note = (f"AlexNet's ImageNet-C errors are not a valid baseline for this model's {len(saved.classnames)} "
                "non-ImageNet classes: pass --baseline with a baseline run's eval.json")
        logger.warning("%s", note)
    return {**raw, **summary, "baseline": baseline or "alexnet", "baseline_valid": note is None, "baseline_note": note}


def load_baseline_errors(path: str) -> tuple[dict, Optional[float]]:
    """Per-corruption errors and the clean error of a baseline run's evaluation JSON."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: baseline metrics file not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt JSON ({exc})") from None
    corruption = data.get("corruption", {})
    if "errors" not in corruption:
        raise UserError(f"{path}: has no 'corruption.errors' (evaluate the baseline with --imagenet-c first)")
    # The clean error as a fraction, from the baseline's own clean accuracy on the same split.
    overall = (data.get(data.get("split", "test")) or data.get("test") or {}).get("overall")
    clean = None if overall is None else 1.0 - overall
    return corruption["errors"], clean
