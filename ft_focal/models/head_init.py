"""Head initialisations beyond a single text prompt: prompt ensembles and class means (LIFT).

- `text_head_weights`: the text initialisation with one template or an ensemble of templates.
  Each template gives unit class embeddings [C, D] (the backbone's text encoder already maps them
  into the feature space, docs/algorithms.md "CLIP fine-tuning protocol"); an ensemble averages the
  unit embeddings of all templates per class and re-normalises (CLIP's prompt ensembling).
- `class_mean_weights` / `init_head_from_class_means`: w_c = normalize(mean_{j: y_j = c}
  normalize(f_j)), the features f_j [D] taken from the backbone at initialisation (PEFT modules
  start as the identity: AdaptFormer's up-projection and LoRA's B are zero) over the training split
  with the test transform, as LIFT's `init_head_class_mean`. A class with no training image keeps
  its current row (a random unit vector, or its text embedding) and is named in one warning.
- `init_head_for_run`: what the training loop calls once the model is on its device. It fills
  the head for `model.head_init: class_mean`, and also for `text` when the backbone has no text
  tower (or no class names were given): class means are the sensible default there, a random
  head is not.

Note on ensembles: the text encoders return unit vectors already mapped through proj^T, so the
average is taken after that mapping. CLIP / LIFT average in the joint text space before it; the
two differ only by each template's norm |normalize(e_t) proj^T| (one template: identical).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ft_focal.models.heads import class_prompts

logger = logging.getLogger("ft_focal")

HEAD_INITS = ("text", "class_mean", "random")


def templates_of(prompt_template: Union[str, Sequence[str]]) -> list[str]:
    """`model.prompt_template` as a list of templates (a single string is a one-template list)."""
    return [prompt_template] if isinstance(prompt_template, str) else [str(t) for t in prompt_template]


@torch.no_grad()
def text_head_weights(text_encoder: Callable[[list], torch.Tensor], classnames: Sequence[str],
                      prompt_template: Union[str, Sequence[str]]) -> torch.Tensor:
    """Unit class embeddings [C, D] from one template or the mean over an ensemble of T templates.

    text_encoder: prompts (list of N strings) -> unit embeddings [N, D] in the feature space.
    Ensemble: w_c = normalize(sum_t u_{t,c} / T), u_{t,c} = text_encoder(template_t(c)).
    """
    templates = templates_of(prompt_template)
    prompts = [p for template in templates for p in class_prompts(list(classnames), template)]
    # One call for all T x C prompts, so the encoder batches them together.
    emb = text_encoder(prompts).float().reshape(len(templates), len(classnames), -1)
    if len(templates) == 1:
        return emb[0]
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1)


@torch.no_grad()
def class_feature_sums(features: Callable[[torch.Tensor], torch.Tensor], batches: Any, num_classes: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of unit features [C, D] (float32) and image counts [C] (int64).

    features: images [B, 3, H, W] -> features [B, D]; batches: iterable of (images, labels) or
    None (a batch whose every image was unreadable, with data.skip_bad_images).
    """
    sums: Optional[torch.Tensor] = None
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    for batch in batches:
        if batch is None:
            continue
        images, labels = batch
        labels = torch.as_tensor(labels, device=device).long()
        unit = F.normalize(features(images.to(device)).float(), dim=-1)
        if sums is None:
            sums = torch.zeros(num_classes, unit.shape[-1], device=device)
        sums.index_add_(0, labels, unit)
        counts += torch.bincount(labels, minlength=num_classes)
    if sums is None:
        raise ValueError("no training image to compute class means from")
    return sums, counts


def class_mean_weights(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """normalize(sums_c / counts_c) [C, D]; rows of classes with no image are zero."""
    means = sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)
    return F.normalize(means, dim=-1)


@torch.no_grad()
def init_head_from_class_means(model: nn.Module, dataset: Dataset, classnames: Optional[Sequence[str]] = None,
                               batch_size: int = 256, num_workers: int = 0, collate_fn: Optional[Callable] = None,
                               accelerator: Any = None) -> torch.Tensor:
    """Write the class means of `dataset` (test transform) into `model.head`; returns counts [C].

    model: an `ImageClassifier` (`.features`, `.head`, `.num_classes`). With several processes
    (`accelerator`), each reads its shard rank::world and the sums are all-reduced, so every
    process writes the same head. Classes with no image keep their row (one warning).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the means are those of the model as evaluated
    try:
        autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with autocast:
            sums, counts = class_feature_sums(model.features, loader, model.num_classes, device)
    finally:
        model.train(was_training)
    if world > 1:
        sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
    weights = class_mean_weights(sums, counts)
    head = model.head
    present = counts > 0
    head.weight[present] = weights[present].to(head.weight.dtype)
    if getattr(head, "bias", None) is not None:
        head.bias.zero_()
    empty = (~present).nonzero().flatten().tolist()
    if empty:
        names = [repr(classnames[c]) if classnames else str(c) for c in empty[:5]]
        logger.warning("model.head_init=class_mean: %d of %d classes have no training image (e.g. %s); their head "
                       "rows keep their initial value", len(empty), len(counts), ", ".join(names))
    return counts.cpu()


def init_head_for_run(model: nn.Module, recipe: Any, bundle: Any, accelerator: Any = None) -> str:
    """The training loop's data-dependent head initialisation; returns the one used.

    "class_mean" when `model.head_init` asks for it, or asks for "text" that the backbone could
    not give (`model.head_init_used == "random"` after `build_classifier`); else what
    `build_classifier` did. The result is recorded as `model.head_init_used`. A resumed run
    computes the means again (deterministic: test transform, eval mode), then the checkpoint's
    trainable head replaces them; a frozen head (tuning.train_head=false) is not in checkpoints.
    """
    wanted = recipe.model.head_init
    used = getattr(model, "head_init_used", wanted)
    if wanted == "class_mean" or (wanted == "text" and used == "random"):
        if wanted == "text":
            logger.info("model.head_init=text is not possible for this backbone: initialising the head from "
                        "class means of the training features instead")
        init_head_from_class_means(model, bundle.eval_dataset("train"), bundle.classnames,
                                   batch_size=recipe.train.eval_batch_size, num_workers=recipe.data.num_workers,
                                   collate_fn=bundle.collate_fn, accelerator=accelerator)
        used = "class_mean"
        logger.info("head initialised from class means of %d training images (test transform)", len(bundle.train))
    model.head_init_used = used
    return used


__all__ = ["HEAD_INITS", "class_feature_sums", "class_mean_weights", "init_head_for_run",
           "init_head_from_class_means", "templates_of", "text_head_weights"]
