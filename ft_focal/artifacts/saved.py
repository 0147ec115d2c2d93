"""A trained model on disk: the `final/` folder of a run (also the core of an export).

  model.safetensors   the whole classifier's state dict (backbone + adapters + head)
  recipe.yaml         the resolved recipe (architecture, tuning, data, protocol)
  classnames.json     class names in label order
  class_counts.json   training-set count per class (shot groups are defined from these)
  preprocess.json     image size, mean / std, interpolation, test resize
  wnids.json          ImageNet synset ids in label order (when known; maps ImageNet-C folders)

Everything needed to rebuild the classifier without the original pretrained weights file:
the architecture comes from the recipe with random init, then the saved tensors are loaded.
`write_run_artifacts` writes what a finished training run leaves next to its `final/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from ft_focal.config import Recipe, load_recipe, save_recipe
from ft_focal.errors import UserError
from ft_focal.files import with_output_permissions, write_json

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


@dataclass
class SavedModel:
    """A reloaded classifier with what is needed to use and evaluate it."""

    model: torch.nn.Module
    recipe: Recipe
    classnames: list[str]
    class_counts: list[int]
    preprocess: dict
    path: Path
    wnids: Optional[list[str]] = None

    def transform(self):
        """The test-time transform (Resize + CenterCrop + Normalize) of this model."""
        from ft_focal.data import build_transform

        return build_transform(self.preprocess, self.recipe.data, train=False)


def save_model_dir(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    recipe: Recipe,
    classnames: list[str],
    class_counts: list[int],
    preprocess: dict,
    wnids: Optional[list[str]] = None,
) -> Path:
    """Write a reloadable model folder; each file is written to a temporary name then renamed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS + ".tmp")
    st_save_model(model, str(tmp))
    with_output_permissions(tmp)
    os.replace(tmp, directory / WEIGHTS)
    # The recipe that reloads the folder: the resolved architecture with no weights file, so the
    # folder stays loadable when the original pretrained weights are not on this machine.
    rebuild = getattr(model, "rebuild_config", None)
    if rebuild is not None:
        recipe = dataclasses.replace(recipe, model=rebuild)
    save_recipe(recipe, directory / "recipe.yaml")
    write_json(directory / "classnames.json", list(classnames))
    write_json(directory / "class_counts.json", [int(c) for c in class_counts])
    write_json(directory / "preprocess.json", dict(preprocess))
    if wnids:
        write_json(directory / "wnids.json", list(wnids))
    return directory


def _read_json(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: missing (not a model folder written by ft_focal?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: corrupt JSON ({exc})") from None


def _check_head_size(weights: Path, model: torch.nn.Module, num_classes: int, classnames_file: Path) -> None:
    """A clear error when the saved head and classnames.json disagree on the number of classes."""
    from safetensors import safe_open

    own = model.state_dict()
    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()
                      if key.startswith("head.") and key in own}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: corrupt safetensors file ({' '.join(str(exc).split())})") from None
    for key, shape in shapes.items():
        if shape and tuple(own[key].shape) != shape and tuple(own[key].shape)[0] == num_classes:
            raise UserError(f"{weights}: the classifier head has {shape[0]} classes ({key} {list(shape)}) but "
                            f"{classnames_file} lists {num_classes}")


def load_model_dir(directory: str | os.PathLike, overrides: Optional[list[str]] = None) -> SavedModel:
    """Rebuild the classifier of a `final/` or export folder and load its weights (CPU)."""
    from ft_focal.models import build_classifier

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: model folder not found")
    recipe = load_recipe(directory / "recipe.yaml", overrides or [])
    classnames = _read_json(directory / "classnames.json")
    class_counts = _read_json(directory / "class_counts.json")
    preprocess = _read_json(directory / "preprocess.json")
    if len(classnames) != len(class_counts):
        raise UserError(
            f"{directory}: classnames.json has {len(classnames)} classes but class_counts.json {len(class_counts)}"
        )
    model = build_classifier(recipe.model, recipe.tuning, len(classnames), classnames, load_weights=False)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: weights file missing")
    _check_head_size(weights, model, len(classnames), directory / "classnames.json")
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False)
    except SafetensorError as exc:
        raise UserError(f"{weights}: corrupt safetensors file ({exc})") from None
    except RuntimeError as exc:  # shape mismatch, e.g. a head of another size
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[-1] if first else str(exc))
        raise UserError(f"{weights}: does not fit the model built from recipe.yaml ({detail})") from None
    if missing or unexpected:
        raise UserError(
            f"{weights}: tensors do not match the model built from recipe.yaml "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.eval()
    wnids = _read_json(directory / "wnids.json") if (directory / "wnids.json").is_file() else None
    return SavedModel(model, recipe, classnames, [int(c) for c in class_counts], preprocess, directory, wnids)


def trained_head_init(model_dir: Path, default: str) -> str:
    """How the head of a `final/` or export folder was initialised in training.

    The folder's recipe.yaml is the REBUILD recipe (head_init random: reloading needs no text
    tower), so this reads what an export recorded, else what the run did (metrics.json "head_init":
    text may have fallen back to class_mean), else the run's own recipe.yaml next to `final/`.
    """
    import yaml

    model_dir = Path(model_dir)
    exported = model_dir / "export.json"
    run_recipe = model_dir.parent / "recipe.yaml"
    metrics = model_dir / "metrics.json"
    try:
        if exported.is_file():
            return str(json.loads(exported.read_text()).get("head_init") or default)
        if metrics.is_file() and json.loads(metrics.read_text()).get("head_init"):
            return str(json.loads(metrics.read_text())["head_init"])
        if model_dir.name == "final" and run_recipe.is_file():
            return str((yaml.safe_load(run_recipe.read_text()) or {})["model"]["head_init"])
    except (ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        pass  # unreadable: the card falls back to the folder's recipe
    return default


def write_run_artifacts(out: Path, results: dict, model: torch.nn.Module, recipe: Recipe, bundle: Any,
                        class_counts: list[int], preprocess: Any, accelerator: Any) -> None:
    """The end of a training run (ft_focal/training/trainer.py): on the main process `out/final/` (safetensors
    + what reloads it), `metrics.json` (in `out/` and `final/`) and `report.md`; then, on every
    process, the end of training (the Hub push is the caller's: ft_focal.artifacts.hub imports this module)."""
    if accelerator.is_main_process:
        from ft_focal.training.log import percent

        final = save_model_dir(out / "final", model, recipe, bundle.classnames, class_counts, preprocess,
                               getattr(bundle, "wnids", None))
        write_json(out / "metrics.json", results)
        write_json(final / "metrics.json", results)
        try:
            from ft_focal.evaluation.report import write_run_report

            write_run_report(out, results)
        except Exception as exc:  # a plotting problem must not lose a finished run
            logger.warning("could not write the report: %s", exc)
        test = results["test"] or {}
        logger.info("test: overall %s many %s medium %s few %s (%s)", *(percent(test.get(k)) for k in
                    ("overall", "many", "medium", "few")), results["selected"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
