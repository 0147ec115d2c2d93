"""`ft-focal wise RUN_DIR`: evaluate WiSE-FT models over a grid of alphas, choose one, write it out.

For every alpha (ft_focal/evaluation/wise.py builds the model): the validation split, the test
split (in-distribution, with the run's own protocol: five-crop when the recipe asks) and every
given suite (shifts / ImageNet-C, ft_focal/evaluation/shift_eval.py), by shot group. A head-only
run computes the features once and applies each alpha's head to them. Alpha is the one with the
best validation `eval.select_metric` (the smallest alpha among ties), or the one given.

Writes RUN_DIR/wise/ (an older wise/ is moved aside to wise.prev-N, never deleted):
  wise.json        every alpha's results and the choice
  wise.md          alpha table (val, ID test and every shift by shot group), the ID-OOD curve, and
                   the robustness table of the chosen model
  wise_curve.png   OOD against ID accuracy, one panel per shot group, one line per shift
  final/           the chosen model as a model folder: `ft-focal eval RUN_DIR/wise/final`,
                   `ft-focal export RUN_DIR/wise EXPORT_DIR`
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch

from ft_focal.errors import UserError
from ft_focal.evaluation.shift_eval import GROUPS, model_outputs, prepare_suites, score_shift, shift_row, short
from ft_focal.evaluation.wise import INITIAL, initial_backbone, interpolate_head, interpolate_model, load_initial_state

logger = logging.getLogger(__name__)


def _run_root(path: Path) -> Path:
    if (path / INITIAL).is_file() or (path / "final").is_dir():
        return path
    if path.name == "final" and (path.parent / INITIAL).is_file():
        return path.parent
    return path


class _Evaluator:
    """Val / test / suite results of one alpha; a head-only run reuses features computed once."""

    def __init__(self, saved: Any, datasets: dict, prepared: list, accelerator: Any, head_only: bool):
        self.saved, self.datasets, self.prepared, self.acc = saved, datasets, prepared, accelerator
        self.cfg = saved.recipe
        self.features: Optional[dict] = None
        if head_only:
            self.features = {name: self._predict(saved.model.backbone, ds) for name, ds in datasets.items()}
            self.features.update({i: model_outputs(saved.model.backbone, item.dataset, item.suite["batch_size"],
                                                    accelerator, item.suite["num_workers"])
                                  for i, item in enumerate(prepared)})

    def _predict(self, module: torch.nn.Module, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from ft_focal.evaluation.evaluate import predict

        return predict(module, dataset, self.cfg.train.eval_batch_size, self.acc, self.cfg.data.num_workers)

    def _head_logits(self, head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        device = next(head.parameters()).device
        with torch.no_grad():
            return torch.cat([head(chunk.to(device)).float().cpu()
                              for chunk in features.split(self.cfg.train.eval_batch_size)]) if len(features) else features

    def evaluate(self, model: torch.nn.Module, id_split: str) -> dict:
        from ft_focal.evaluation.evaluate import summarize

        ev = self.cfg.eval
        out: dict[str, Any] = {}
        for name, ds in self.datasets.items():
            if self.features is not None:
                feats, labels = self.features[name]
                logits = self._head_logits(model.head, feats)
            else:
                logits, labels = self._predict(model, ds)
            out[name] = summarize(logits, labels, self.saved.class_counts, ev.many_threshold, ev.few_threshold,
                                  ev.ece_bins)
        id_result = out[id_split]
        clean_error = None if id_result.get("overall") is None else 1.0 - id_result["overall"]
        rows = []
        for i, item in enumerate(self.prepared):
            if self.features is not None:
                preds = item.shift.project(self._head_logits(model.head, self.features[i])).argmax(dim=1)
            else:
                def fn(x: torch.Tensor, item: Any = item) -> torch.Tensor:
                    return item.shift.project(model(x).float()).argmax(dim=1)

                preds = model_outputs(fn, item.dataset, item.suite["batch_size"], self.acc, item.suite["num_workers"])
            rows.append(shift_row(item, score_shift(item, preds, clean_error), id_result))
        out["shifts"] = rows
        return out


def run_wise(run_dir: str | Path, alphas: Sequence[float], alpha: Optional[float] = None,
             suites: Sequence[dict] = (), accelerator: Any = None, export_dir: Optional[str] = None,
             overrides: Optional[list[str]] = None) -> dict:
    """The sweep (module docstring); returns the content of wise.json. `overrides`: recipe key=value
    (e.g. data.root), as for `ft-focal eval`."""
    from ft_focal.artifacts.export import resolve_model_dir
    from ft_focal.artifacts.saved import load_model_dir
    from ft_focal.data.build import build_datasets

    root = _run_root(Path(run_dir))
    source = resolve_model_dir(root)
    head0, meta = load_initial_state(root)
    saved = load_model_dir(source, overrides)
    recipe, method = saved.recipe, saved.recipe.tuning.method
    if meta.get("tuning") not in (None, method):
        raise UserError(f"{root / INITIAL}: written for tuning '{meta.get('tuning')}', the model is '{method}'")
    prepared = prepare_suites(list(suites), saved) if suites else []
    bundle = build_datasets(recipe.data, saved.preprocess, recipe.seed)
    test_split = recipe.eval.test_split
    datasets = {"val": bundle.eval_dataset("val"),
                test_split: bundle.eval_dataset(test_split, five_crop=recipe.eval.five_crop and test_split != "val")}
    datasets = {k: v for k, v in datasets.items() if v is not None}
    if alpha is None and "val" not in datasets:
        raise UserError(f"{root}: the recipe has no validation split to choose alpha on: give --alpha A "
                        "(or train with a validation split, e.g. data.val_fraction)")
    grid = sorted(set(alphas) | ({float(alpha)} if alpha is not None else set()))
    backbone0 = initial_backbone(root, head0, meta, len(saved.classnames), saved.classnames)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    saved.model.to(device).eval()
    head_only = method == "head" and not recipe.eval.five_crop
    evaluator = _Evaluator(saved, datasets, prepared, accelerator, head_only)
    rows = []
    for a in grid:
        model = _alpha_model(saved.model, method, a, head0, backbone0, head_only)
        res = evaluator.evaluate(model, test_split)
        rows.append({"alpha": a, "results": res})
        logger.info("alpha %.3g: val %s test %s", a, _fmt((res.get("val") or {}).get("overall")),
                    _fmt(res[test_split].get("overall")))
    chosen, how = _choose(rows, alpha, recipe.eval.select_metric)
    out = {"run": str(root), "tuning": method, "alphas": grid, "chosen_alpha": chosen, "chosen_by": how,
           "id_split": test_split, "rows": [_short_row(r, test_split) for r in rows]}
    if accelerator is None or accelerator.is_main_process:
        _write_outputs(root, saved, out, rows, chosen, method, head0, backbone0, export_dir)
    return out


def _alpha_model(model: torch.nn.Module, method: str, a: float, head0: dict, backbone0: Optional[dict],
                 head_only: bool) -> Any:
    if head_only:  # only the head changes and the features are computed once: no copy of the backbone
        return SimpleNamespace(head=interpolate_head(model.head, head0, a))
    return interpolate_model(model, method, a, head0, backbone0)


def _choose(rows: list, given: Optional[float], metric: str) -> tuple[float, str]:
    if given is not None:
        return float(given), "given (--alpha)"
    scored = [(r["results"]["val"].get(metric), r["alpha"]) for r in rows if r["results"]["val"].get(metric) is not None]
    if not scored:
        raise UserError(f"validation '{metric}' is undefined for every alpha (empty validation split?); give --alpha")
    best = max(s for s, _ in scored)
    return min(a for s, a in scored if s == best), f"best validation {metric} (smallest alpha among ties)"


def _short_row(row: dict, id_split: str) -> dict:
    res = row["results"]
    return {"alpha": row["alpha"], "val": short(res["val"]) if "val" in res else None, id_split: short(res[id_split]),
            "shifts": [{**s, "result": short(s["result"])} for s in res["shifts"]]}


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _move_aside(folder: Path) -> Optional[Path]:
    if not folder.exists():
        return None
    serial = 1
    while folder.with_name(f"{folder.name}.prev-{serial}").exists():
        serial += 1
    target = folder.with_name(f"{folder.name}.prev-{serial}")
    folder.rename(target)
    logger.warning("%s existed: moved to %s", folder, target)
    return target


def _write_outputs(root: Path, saved: Any, out: dict, rows: list, chosen: float, method: str, head0: dict,
                   backbone0: Optional[dict], export_dir: Optional[str]) -> None:
    import json

    from ft_focal.artifacts.saved import save_model_dir
    from ft_focal.evaluation.wise_report import write_wise_report
    from ft_focal.files import write_json

    wise_dir = root / "wise"
    _move_aside(wise_dir)
    model = interpolate_model(saved.model, method, chosen, head0, backbone0)
    final = save_model_dir(wise_dir / "final", model, saved.recipe, saved.classnames, saved.class_counts,
                           saved.preprocess, saved.wnids)
    run_metrics_file = root / "metrics.json"
    metrics = json.loads(run_metrics_file.read_text()) if run_metrics_file.is_file() else {}
    chosen_res = next(r["results"] for r in rows if r["alpha"] == chosen)
    metrics.update({k: v for k, v in chosen_res.items() if k != "shifts"})
    metrics["test"] = chosen_res[out["id_split"]]
    metrics["selected"] = f"WiSE-FT alpha={chosen:g}, {out['chosen_by']}"
    metrics["wise"] = {"alpha": chosen, "chosen_by": out["chosen_by"], "run": str(root)}
    write_json(final / "metrics.json", metrics)
    write_json(wise_dir / "wise.json", out)
    robustness = {"in_distribution": short(chosen_res[out["id_split"]]), "shifts": chosen_res["shifts"]}
    if robustness["shifts"]:
        write_json(final / "eval.json", {"model_dir": str(final), "split": out["id_split"], "robustness": robustness,
                                         "test": chosen_res[out["id_split"]]})
    write_wise_report(wise_dir, out, robustness)
    if export_dir:
        from ft_focal.artifacts.export import export_run

        export_run(wise_dir, export_dir)


__all__ = ["GROUPS", "run_wise"]
