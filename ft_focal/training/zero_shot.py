"""The zero-shot baseline: `train.epochs: 0` (or `ft-focal train RECIPE --zero-shot`).

The run builds everything as a training run does (data, model with its initialised head, loss,
optimizer), takes no update, and evaluates the initial model through the same selection-free
report: `final/`, metrics.json (with "zero_shot": true and "updates": 0), report.md, and the
model card of `ft-focal export` say that the model is untrained. With `model.head_init: text`
this is CLIP's zero-shot classifier in the cosine-head form (docs/algorithms.md); with `class_mean`
it is the nearest-class-mean baseline of the frozen features.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ft_focal.errors import UserError

logger = logging.getLogger("ft_focal")

SELECTED = "initial head (zero-shot: no training)"


def is_zero_shot(train_cfg: Any) -> bool:
    """True when the recipe's `train` section asks for no update at all."""
    return train_cfg.max_steps == 0 or (train_cfg.max_steps is None and train_cfg.epochs == 0)


def zero_shot_recipe(recipe: Any) -> Any:
    """The recipe of `--zero-shot`: no update, and an output folder and name of its own.

    The `_zero_shot` suffix keeps the baseline out of the folder of the same recipe's training run
    (whose checkpoints it must neither resume from nor overwrite)."""
    import dataclasses

    from ft_focal.config import validate

    zero = dataclasses.replace(recipe, name=f"{recipe.name}_zero_shot", output_dir=f"{recipe.output_dir}_zero_shot",
                               train=dataclasses.replace(recipe.train, epochs=0, max_steps=None))
    validate(zero)
    return zero


def refuse_checkpoints(ckpt_root: Path) -> None:
    """A zero-shot run must not report (and overwrite) the weights of a training run's folder."""
    if Path(ckpt_root).is_dir() and any(Path(ckpt_root).iterdir()):
        raise UserError(f"{ckpt_root.parent}: holds checkpoints of a training run; a zero-shot evaluation "
                        "(train.epochs=0) would overwrite its final/ and metrics.json: set another 'output_dir'")


def mark_zero_shot(results: dict, head_init: str) -> dict:
    """Record in metrics.json that the reported model is the untrained initial one."""
    if head_init == "random":
        logger.warning("zero-shot evaluation of a RANDOM head (model.head_init=random): a chance-level baseline")
    results.update(zero_shot=True, selected=SELECTED, head_init=head_init)
    return results


def metrics_are_zero_shot(metrics: dict) -> bool:
    return bool((metrics or {}).get("zero_shot"))


def card_intro(data_name: str, backbone: str, head: str, head_init: str, version: str) -> str:
    """The model card's first paragraph for a zero-shot export (replaces "fine-tuned on ...")."""
    source = {"text": "the text embeddings of the class names",
              "class_mean": "the class means of the training features"}.get(head_init, f"`{head_init}`")
    return (f"A **zero-shot (untrained) baseline** on **{data_name}**: {backbone} with a {head} head initialised "
            f"from {source} and **no training update**, evaluated and exported with ft_focal {version}. "
            "The optimizer and schedule below are those of the recipe; none of them ran.")


__all__ = ["SELECTED", "card_intro", "is_zero_shot", "mark_zero_shot", "metrics_are_zero_shot",
           "refuse_checkpoints", "zero_shot_recipe"]
