"""Run shift suites (and ImageNet-C) on a model and summarise them against in-distribution accuracy.

`prepare_suites(suites, saved)` turns suite dicts (ft_focal/evaluation/suites.py) into datasets
with their scoring rule; `model_outputs` runs a batch function over a dataset on one or several
processes (dataset order, every sample once, as ft_focal/evaluation/evaluate.py `predict`); `score_shift`
gives accuracy overall and by the shot group of each class in the TRAINING data; `compare_to_id`
adds the drop and the effective robustness (docs/metrics.md "Distribution shifts").
`evaluate_suites` does all of it for one model (`ft-focal eval MODEL --suite ...`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ft_focal.errors import UserError
from ft_focal.evaluation.shifts import SHIFT_KINDS, ShiftImages, ShiftSet, build_shift_sets
from ft_focal.metrics import BENCHMARK_CORRUPTIONS, long_tail_accuracy

GROUPS = ("overall", "many", "medium", "few")


@dataclass
class PreparedSet:
    """A ShiftSet with its dataset (suite transform applied) and the suite it came from."""

    shift: ShiftSet
    dataset: Dataset
    suite: dict


def _transform_for(suite: dict, saved: Any) -> Callable:
    from ft_focal.evaluation.suites import suite_transform

    if suite["kind"] == "shift" and suite["transform"] == "model":
        return saved.transform()
    return suite_transform(suite, saved.preprocess.get("mean"), saved.preprocess.get("std"))


def _imagenet_c_set(suite: dict, saved: Any) -> ShiftSet:
    from ft_focal.data.imagenet_c import class_to_label_for, class_to_label_from_classnames, scan_imagenet_c, subset_list

    if suite["classnames"] is not None:
        class_to_label = class_to_label_from_classnames(suite["classnames"])
    else:
        class_to_label = class_to_label_for(suite["root"], saved.classnames, getattr(saved, "wnids", None))
    corruptions = list(suite["corruptions"]) + list(suite["extra_corruptions"])
    samples = scan_imagenet_c(suite["root"], corruptions, suite["severities"], class_to_label)
    names = subset_list(corruptions, suite["severities"])
    index = {cs: i for i, cs in enumerate(names)}
    return ShiftSet(suite["name"], [s[2] for s in samples], np.array([s[3] for s in samples]),
                    [int(c) for c in saved.class_counts],
                    subsets=np.array([index[(s[0], int(s[1]))] for s in samples]), subset_names=names)


def prepare_suites(suites: Sequence[dict], saved: Any) -> list[PreparedSet]:
    """Every suite's sets, all checked (folders, class lists, model classes) before any image is read."""
    prepared = []
    for suite in suites:
        kind = suite["kind"]
        if kind == "imagenet_c":
            sets = [_imagenet_c_set(suite, saved)]
        elif kind in SHIFT_KINDS:
            sets = build_shift_sets(suite, getattr(saved, "wnids", None), saved.classnames, saved.class_counts)
        else:
            raise UserError(f"{suite.get('path', suite['name'])}: kind '{kind}' is not a robustness suite "
                            f"(imagenet_c or {', '.join(SHIFT_KINDS)})")
        transform = _transform_for(suite, saved)
        prepared += [PreparedSet(s, ShiftImages(s, transform), suite) for s in sets]
    return prepared


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i[0] for i in items]), torch.tensor([int(i[1]) for i in items])


@torch.no_grad()
def model_outputs(fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
                  accelerator: Any = None, num_workers: int = 0) -> torch.Tensor:
    """fn(images [B, 3, H, W] on the device) -> [B, ...] for every sample, [N, ...] on the CPU in dataset order.

    Process r computes the samples i % world == r; the shards are gathered and interleaved back
    (as ft_focal/evaluation/evaluate.py `predict`), so every process gets the full result.
    """
    from ft_focal.training.sampling import eval_batches

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    loader = DataLoader(dataset, batch_sampler=eval_batches(len(dataset), batch_size, rank, world),
                        num_workers=num_workers, collate_fn=_collate)
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    parts = []
    with autocast:
        for images, _ in loader:
            parts.append(fn(images.to(device)).float().cpu())
    if not parts:  # this process's shard is empty (fewer samples than processes): shape from one sample
        with autocast:
            parts.append(fn(_collate([dataset[0]])[0].to(device)).float().cpu()[:0])
    from ft_focal.training.sampling import gather_in_order

    return gather_in_order(torch.cat(parts), accelerator, len(dataset))


def score_shift(prepared: PreparedSet, scores: torch.Tensor, clean_error: Optional[float] = None) -> dict:
    """Accuracy of scores [N, K] (already projected) or predictions [N] by shot group; for
    ImageNet-C also the error of every (corruption, severity) and, with all five severities, CE / mCE."""
    shift, suite = prepared.shift, prepared.suite
    preds = scores.argmax(dim=1) if scores.dim() == 2 else scores.long()
    preds, labels = preds.numpy(), shift.labels
    shots = suite.get("shots") or {"many": 100, "few": 20}
    if shift.subsets is None:
        result = long_tail_accuracy(preds, labels, shift.counts, many=shots["many"], few=shots["few"])
        return {**result, "kind": suite["kind"]}
    # ImageNet-C: shot groups over the benchmark corruptions (all severities), errors per subset
    bench = np.array([shift.subset_names[s][0] in BENCHMARK_CORRUPTIONS for s in shift.subsets], dtype=bool)
    result = long_tail_accuracy(preds[bench], labels[bench], shift.counts, many=shots["many"], few=shots["few"])
    errors: dict[str, list[float]] = {}
    correct = preds == labels
    for i, (corruption, _) in enumerate(shift.subset_names):
        in_subset = shift.subsets == i
        errors.setdefault(corruption, []).append(float(1.0 - correct[in_subset].mean()))
    result.update(kind="imagenet_c", errors=errors, severities=list(suite["severities"]))
    if list(suite["severities"]) == [1, 2, 3, 4, 5]:
        from ft_focal.evaluation.corruption import summarize_corruptions

        b = suite["baseline"]
        summary = summarize_corruptions(errors, clean_error, b["table"] if b["table"] is not None else b["name"],
                                        b["clean_error"])
        result.update(mCE=summary["mCE"], relative_mCE=summary.get("relative_mCE"), corruption=summary)
    return result


def effective_robustness(id_accuracy: float, ood_accuracy: float, intercept: float, slope: float) -> float:
    """OOD accuracy minus the OOD accuracy the logit-space linear fit predicts from the ID accuracy
    (Taori et al. 2020; docs/metrics.md): ood - sigmoid(intercept + slope * logit(id)), fractions."""
    eps = 1e-12
    p = min(max(id_accuracy, eps), 1 - eps)
    z = intercept + slope * math.log(p / (1 - p))
    return float(ood_accuracy - 1.0 / (1.0 + math.exp(-z)))


def compare_to_id(id_result: dict, ood: dict, fit: Optional[dict]) -> dict:
    """The drop ID - OOD per shot group and, given a fit, the effective robustness (overall)."""
    drop = {g: (None if id_result.get(g) is None or ood.get(g) is None else float(id_result[g] - ood[g]))
            for g in GROUPS}
    out: dict[str, Any] = {"drop": drop, "effective_robustness": None}
    if fit and fit.get("slope") is not None and id_result.get("overall") is not None and ood.get("overall") is not None:
        out["effective_robustness"] = effective_robustness(id_result["overall"], ood["overall"],
                                                           float(fit["intercept"]), float(fit["slope"]))
        out["fit"] = dict(fit)
    return out


def short(result: dict) -> dict:
    """The numbers a robustness table shows (no per-class list)."""
    keep = GROUPS + ("num_samples", "group_num_classes", "kind", "mCE", "relative_mCE")
    return {k: result[k] for k in keep if k in result}


def evaluate_suites(model: torch.nn.Module, prepared: Sequence[PreparedSet], id_result: dict,
                    accelerator: Any = None) -> dict:
    """Every prepared set (`prepare_suites`) on `model`; returns {"in_distribution", "shifts": [{name, kind,
    suite, result, drop, effective_robustness}]} (fractions; mCE in percent). id_result: the test-split result."""
    model.eval()
    clean_error = None if id_result.get("overall") is None else 1.0 - id_result["overall"]
    rows = []
    for item in prepared:
        def predict(x: torch.Tensor, item: PreparedSet = item) -> torch.Tensor:
            return item.shift.project(model(x).float()).argmax(dim=1)

        preds = model_outputs(predict, item.dataset, item.suite["batch_size"], accelerator, item.suite["num_workers"])
        rows.append(shift_row(item, score_shift(item, preds, clean_error), id_result))
    return {"in_distribution": short(id_result), "shifts": rows}


def shift_row(item: PreparedSet, result: dict, id_result: dict) -> dict:
    fit = item.suite.get("effective_robustness")
    return {"name": item.shift.name, "kind": item.suite["kind"], "suite": item.suite.get("path"),
            "result": result, **compare_to_id(id_result, result, fit)}


__all__ = ["PreparedSet", "compare_to_id", "effective_robustness", "evaluate_suites", "model_outputs",
           "prepare_suites", "score_shift", "shift_row", "short"]
