"""Export a trained model to a Hub-ready folder (no network); ft_focal/artifacts/hub.py pushes and loads it.

`ft-focal export RUN_DIR EXPORT_DIR [--merge-lora]` (no network) writes:

  model.safetensors            the whole classifier (canonical; what `load_model` / `ft-focal eval` read)
  recipe.yaml                  the resolved recipe, its `model` section rewritten to the resolved
                               architecture with no weights file (`pretrained: null`), so the
                               folder rebuilds anywhere; `--merge-lora` also sets `tuning.method: full`
  classnames.json, class_counts.json, preprocess.json   as in a run's final/ (ft_focal.artifacts.saved)
  preprocessor_config.json     the same test transform in transformers' image-processor terms
  adapter_config.json + adapter_model.safetensors       LoRA runs (not merged): the adapter in
                               peft's own format (keys `base_model.model.<backbone path>`), loadable
                               with `PeftModel.from_pretrained(backbone_without_lora, EXPORT_DIR)`
  trained_tensors.safetensors  PEFT runs: the head and every other trained tensor outside the adapter
  metrics.json (+ eval.json)   the run's metrics (and a later `ft-focal eval` of it, e.g. ImageNet-C)
  export.json                  what was exported from what (marks the folder as an export)
  README.md                    the model card (ft_focal.artifacts.card)

Weights are safetensors only; no pickle file (*.bin, *.pt, *.pth, *.pkl) is ever written or uploaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ft_focal.artifacts.provenance import base_model_id
from ft_focal.artifacts.saved import WEIGHTS, SavedModel, load_model_dir, save_model_dir, trained_head_init
from ft_focal.data.transforms import describe_test_transform, preprocessor_config
from ft_focal.errors import UserError
from ft_focal.files import save_safetensors, write_json

logger = logging.getLogger(__name__)

EXPORT_INFO = "export.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINED_TENSORS = "trained_tensors.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the module path
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
PICKLE_PATTERNS = [f"*{s}" for s in PICKLE_SUFFIXES]
# What an export writes itself (a re-export replaces these); eval.json only when it is the run's.
EXPORT_OWNED = frozenset({WEIGHTS, "recipe.yaml", "classnames.json", "class_counts.json", "preprocess.json",
                          "wnids.json", "preprocessor_config.json", ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINED_TENSORS,
                          "metrics.json", EXPORT_INFO, "README.md"})
# ----------------------------------------------------------------------------- helpers


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A run's output_dir -> its final/; a final/ or export folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if (path / "final" / WEIGHTS).is_file():
        return path / "final"
    if (path / WEIGHTS).is_file():
        return path
    if (path / EXPORT_INFO).is_file():
        raise UserError(f"{path}: an export without its {WEIGHTS} (the file was removed or the export was cut "
                        f"short); run `ft-focal export` again")
    if (path / "final").is_dir():
        raise UserError(f"{path / 'final'}: no {WEIGHTS} (final/ is incomplete: the file was removed or the run "
                        f"stopped while writing it); run the training command again to rewrite it")
    if (path / "classnames.json").is_file():
        raise UserError(f"{path}: a model folder without its {WEIGHTS} (the file was removed or never finished)")
    if (path / "recipe.yaml").is_file():
        raise UserError(f"{path}: no final/ yet (the run has not finished; final/ is written at its end)")
    raise UserError(f"{path}: not a run folder (with final/) nor a model folder (with {WEIGHTS})")


def is_export_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / EXPORT_INFO).is_file() and (path / WEIGHTS).is_file() and (path / "README.md").is_file()


def _read_json_optional(*candidates: Path) -> Optional[Any]:
    for file in candidates:
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{file}: corrupt JSON ({exc})") from None
    return None


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def _probe_input(preprocess: dict) -> torch.Tensor:
    size = int(preprocess.get("image_size", 224))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=generator)


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x).float()


def _check_same(reference: torch.Tensor, other: torch.Tensor, what: str) -> None:
    diff = float((reference - other).abs().max())
    tol = 1e-4 * max(1.0, float(reference.abs().max()))
    if not diff <= tol:  # also catches NaN
        raise RuntimeError(f"export check failed: {what} changes the logits by {diff:.3g} (tolerance {tol:.3g})")


def _adapter_module_path(model: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(getattr(module, "peft_config", None), dict):
            return f"model.{name}" if name else "model"
    return "model.backbone"


# ----------------------------------------------------------------------------- export


def _check_destination(source: Path, export_dir: Path) -> None:
    """Refuse an export folder that overlaps the model folder or holds something other than an export."""
    src_abs, out_abs = source.resolve(), export_dir.resolve()
    if out_abs == src_abs:
        raise UserError(f"{export_dir}: is the model folder itself; choose a new folder for the export")
    if src_abs in out_abs.parents:
        raise UserError(f"{export_dir}: is inside the model folder {source}; choose a folder outside it")
    if out_abs in src_abs.parents:
        raise UserError(f"{export_dir}: contains the model folder {source} (the export would replace it); "
                        "choose a folder outside it")
    if export_dir.exists():
        if not export_dir.is_dir():
            raise UserError(f"{export_dir}: exists and is not a folder")
        if any(export_dir.iterdir()) and not (export_dir / EXPORT_INFO).is_file():
            raise UserError(f"{export_dir}: exists, is not empty and is not an ft_focal export (choose a new folder)")


@dataclasses.dataclass
class _ExportBuild:
    """The loaded run and everything derived from it before any file is written."""

    source: Path
    run_root: Path
    saved: SavedModel               # as trained
    model: torch.nn.Module          # the trained model (LoRA merged into it when merge_lora)
    to_save: torch.nn.Module        # what model.safetensors holds
    export_recipe: Any              # rebuilds the architecture without any weights file
    metrics: dict
    eval_result: Optional[dict]
    probe: torch.Tensor
    reference: torch.Tensor         # logits of the trained model on `probe`, before any merge
    counts: Optional[dict]
    adapter_path: str
    base_model: Optional[str]
    merge_lora: bool

    @property
    def recipe(self) -> Any:
        return self.saved.recipe

    @property
    def method(self) -> str:
        return self.saved.recipe.tuning.method

    @property
    def adapter(self) -> bool:
        return self.method == "lora" and not self.merge_lora


def _build_export(source: Path, merge_lora: bool) -> _ExportBuild:
    from ft_focal.models import build_classifier

    saved = load_model_dir(source)
    recipe = saved.recipe  # as trained (the card describes this)
    model = saved.model
    method = recipe.tuning.method
    if merge_lora and method != "lora":
        raise UserError(f"--merge-lora applies to LoRA runs; {source} was trained with tuning.method={method}")
    run_root = source.parent if source.name == "final" else source
    metrics = _read_json_optional(source / "metrics.json", run_root / "metrics.json")
    if metrics is None:
        logger.warning("%s: no metrics.json; the model card will have no results", source)
        metrics = {}
    eval_result = _read_json_optional(source / "eval.json", run_root / "eval.json")

    export_recipe = copy.deepcopy(recipe)
    rebuild = getattr(model, "rebuild_config", None)
    if rebuild is not None:
        export_recipe.model = copy.deepcopy(rebuild)
    probe = _probe_input(saved.preprocess)
    reference = _logits(model, probe)
    counts = model.parameter_counts() if hasattr(model, "parameter_counts") else None
    adapter_path = _adapter_module_path(model)

    to_save = model
    if merge_lora:
        model.merge_lora()
        export_recipe.tuning.method = "full"
        to_save = build_classifier(export_recipe.model, export_recipe.tuning, len(saved.classnames),
                                   saved.classnames, load_weights=False)
        try:
            to_save.load_state_dict(model.state_dict(), strict=True)
        except RuntimeError as exc:  # the merged model must have the plain parameter names
            raise RuntimeError(f"merged LoRA weights do not fit a plain model: {str(exc).splitlines()[0]}") from None
    return _ExportBuild(source=source, run_root=run_root, saved=saved, model=model, to_save=to_save,
                        export_recipe=export_recipe, metrics=metrics, eval_result=eval_result, probe=probe,
                        reference=reference, counts=counts, adapter_path=adapter_path,
                        base_model=base_model_id(recipe.model), merge_lora=merge_lora)


def _write_model_files(tmp: Path, build: _ExportBuild) -> list[tuple[str, str]]:
    """Weights, recipe, class metadata, adapter and metrics; the (file, description) list for the card."""
    saved = build.saved
    save_model_dir(tmp, build.to_save, build.export_recipe, saved.classnames, saved.class_counts, saved.preprocess,
                   saved.wnids)
    files = [
        (WEIGHTS, "the whole classifier (backbone + adapters + head), read by `ft_focal.load_model`"),
        ("recipe.yaml", "the resolved recipe (architecture without a weights file, tuning, data, protocol)"),
        ("classnames.json", "class names in label order"),
        ("class_counts.json", "training images per class (defines the many / medium / few groups)"),
        ("preprocess.json", "image size, mean / std, interpolation (ft_focal)"),
        ("preprocessor_config.json", "the same test transform as a transformers image-processor config"),
    ]
    if saved.wnids:
        files.append(("wnids.json", "ImageNet synset ids in label order (maps ImageNet-C class folders)"))
    if build.adapter:
        _write_adapter(tmp, build.model, build.base_model)
        files += [(ADAPTER_CONFIG, "the LoRA configuration (peft)"),
                  (ADAPTER_WEIGHTS, "the LoRA weights (peft format)")]
    if build.method in ("lora", "adaptformer", "head") and not build.merge_lora:
        _write_trained_tensors(tmp, build.model)
        files.append((TRAINED_TENSORS, "the head and every other trained tensor outside the LoRA adapter"
                      if build.adapter else "every trained tensor (the PEFT modules and the head)"))
    write_json(tmp / "preprocessor_config.json", preprocessor_config(saved.preprocess, build.recipe.data))
    write_json(tmp / "metrics.json", build.metrics)
    files.append(("metrics.json", "metrics of the training run (validation / test accuracy by shot group)"))
    if build.eval_result is not None:
        write_json(tmp / "eval.json", build.eval_result)
        files.append(("eval.json", "a later `ft-focal eval` of this model (e.g. ImageNet-C)"))
    return files


def _write_export_info(tmp: Path, build: _ExportBuild) -> dict:
    from ft_focal.artifacts import card

    source, recipe = build.source, build.recipe
    info = {
        "format": "ft_focal-export",
        "format_version": 1,
        "ft_focal_version": card.framework_versions()["ft_focal"],
        "source": source.name if source.name != "final" else f"{build.run_root.name}/final",
        "trained_tuning": build.method,
        "merged_lora": bool(build.merge_lora),
        "adapter": build.adapter,
        "base_model": build.base_model,
        "trained_model_config": dataclasses.asdict(recipe.model),
        "head_init": trained_head_init(source, recipe.model.head_init),
    }
    write_json(tmp / EXPORT_INFO, info)
    return info


def _write_card(tmp: Path, build: _ExportBuild, info: dict, files: list[tuple[str, str]],
                repo_id: Optional[str]) -> None:
    from ft_focal.artifacts import card

    card_info = {
        **info,
        "adapter_module": build.adapter_path,
        "parameter_counts": build.counts,
        "transforms": describe_test_transform(build.saved.preprocess, build.recipe.data),
        "files": [("README.md", "this model card")] + files,
        "repo_id": repo_id,
    }
    (tmp / "README.md").write_text(card.render_card(build.recipe, build.metrics, build.eval_result, card_info))


def _write_export(tmp: Path, build: _ExportBuild, repo_id: Optional[str]) -> None:
    files = _write_model_files(tmp, build)
    info = _write_export_info(tmp, build)
    files.append((EXPORT_INFO, "what was exported from what"))
    _write_card(tmp, build, info, files, repo_id)


def _verify_export(tmp: Path, build: _ExportBuild) -> None:
    """The folder must reload to the same logits (catches a bad rebuild config or merge)."""
    reloaded = load_model_dir(tmp)
    _check_same(build.reference, _logits(reloaded.model, build.probe),
                "merging LoRA" if build.merge_lora else "reloading")
    bad = pickle_files(tmp)
    if bad:  # pragma: no cover - nothing above writes one
        raise RuntimeError(f"export would contain pickle files: {[p.name for p in bad]}")


def _swap_in(tmp: Path, export_dir: Path) -> None:
    if export_dir.exists():
        _replace_previous_export(export_dir, tmp)
    os.replace(tmp, export_dir)


def export_run(run_dir: str | os.PathLike, export_dir: str | os.PathLike, merge_lora: bool = False,
               repo_id: Optional[str] = None) -> Path:
    """Write a Hub-ready export of a run (or of a final/ folder) into `export_dir`; returns it.

    `merge_lora`: merge the LoRA adapter into the backbone and export a plain model instead of
    the adapter form. `repo_id` only fills the model card's loading example. No network.
    An existing `export_dir` is replaced only if it is empty or a previous export.
    """
    source = resolve_model_dir(run_dir)
    export_dir = Path(export_dir)
    _check_destination(source, export_dir)
    build = _build_export(source, merge_lora)
    # Everything is written to a sibling folder first so that a failed export never leaves a half-written one.
    tmp = export_dir.parent / f".{export_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_export(tmp, build, repo_id)
        _verify_export(tmp, build)
        _swap_in(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s%s", source, export_dir, " (LoRA merged)" if merge_lora else "")
    return export_dir


def _replace_previous_export(export_dir: Path, new: Path) -> None:
    """Clear the way for the new export. The files an export writes are replaced; anything else in
    the old folder (`ft-focal eval` / `sharpness` outputs: eval.json, eval_report.md, plots) was made
    FROM the old weights, so the whole old folder is moved aside (never deleted) and the log says where."""
    extra = sorted(entry.name for entry in export_dir.iterdir()
                   if entry.name not in EXPORT_OWNED and not _same_file(entry, new / entry.name))
    if not extra:
        shutil.rmtree(export_dir)
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = export_dir.with_name(f"{export_dir.name}.before-{stamp}")
    counter = 1
    while aside.exists():
        aside, counter = export_dir.with_name(f"{export_dir.name}.before-{stamp}-{counter}"), counter + 1
    os.replace(export_dir, aside)
    kept = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    logger.warning("%s held outputs made from the previous export (%s); the previous export is kept in %s",
                   export_dir, kept, aside)


def _same_file(old: Path, new: Path) -> bool:
    return old.is_file() and new.is_file() and old.read_bytes() == new.read_bytes()


def _write_adapter(folder: Path, model: torch.nn.Module, base_model: Optional[str]) -> None:
    state = model.lora_state_dict()
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_safetensors(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = copy.deepcopy(model.lora_config)
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    config.save_pretrained(str(folder))


def _write_trained_tensors(folder: Path, model: torch.nn.Module) -> None:
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
               if p.requires_grad and "lora_" not in name}
    if tensors:
        save_safetensors(tensors, folder / TRAINED_TENSORS, metadata={"format": "pt"})
