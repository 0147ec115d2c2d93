"""Typed recipes: YAML files plus `key=value` overrides, validated before anything heavy starts.

A recipe is flat and explicit (no inheritance): sections `model`, `tuning`, `data`, `loss`,
`optim`, `train`, `eval`, `hub`, and top-level `name`, `output_dir`, `seed`. Every key has a
type; an unknown key or a value of the wrong type is a `UserError` naming the key (with the
closest valid key suggested), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ft_focal.config.overrides import apply_overrides, closest, parse_override, read_yaml  # noqa: F401 (public here too)
from ft_focal.config.renamed import renamed_override, renamed_section
from ft_focal.errors import UserError
from ft_focal.losses import RECIPE_LOSSES
from ft_focal.optim import BASE_OPTIMIZERS
from ft_focal.optim.registry import METHODS


@dataclass
class ModelConfig:
    """Backbone and head.

    family: "open_clip" | "hf_clip" (transformers CLIPVisionModel) | "hf_vit" (transformers ViT)
        | "timm" (timm.create_model ViT / EVA: name "vit_base_patch16_clip_224.openai", config = its kwargs,
        pretrained = a .safetensors file; no text tower).
    name: open_clip model name (e.g. "ViT-B-16") or, with `config`, a free label.
    pretrained: weights on disk: a file (open_clip), "local-dir:/path" (open_clip), a directory
        for `from_pretrained` (transformers); null = random init (tests, demo).
    config: architecture overrides for a tiny custom model (open_clip `vision_cfg`/`text_cfg`
        dict, or transformers config kwargs); null = the named architecture.
    head: "cosine" (logits = head_scale * cos) | "linear".
    head_init: "text" (CLIP text embeddings of `prompt_template`; a backbone without a text tower
        falls back to class_mean in a training run) | "class_mean" (each class's mean unit feature
        of the training split, test transform, as LIFT) | "random".
    prompt_template: one template with "{}" for the class name, or a list of them (a prompt
        ensemble: unit embeddings averaged per class, then re-normalised).
    """

    family: str = "open_clip"
    name: str = "ViT-B-16"
    pretrained: Optional[str] = None
    config: Optional[dict] = None
    head: str = "cosine"
    head_init: str = "text"
    head_scale: float = 25.0
    prompt_template: Union[str, list] = "a photo of a {}."


@dataclass
class TuningConfig:
    """What is trained: "full" | "lora" | "adaptformer" | "head" (linear probe).

    lora_targets null = the family's default (open_clip: attn c_fc c_proj; hf_clip: q_proj k_proj
    v_proj out_proj fc1 fc2; hf_vit: q_proj k_proj v_proj o_proj fc1 fc2; timm: qkv (EVA: q_proj k_proj
    v_proj) proj fc1 (EVA: fc1_g fc1_x) fc2, inside the blocks only).
    adapter_bottleneck null = 2^max(0, floor(log2(C / 24))) (docs/algorithms.md).
    adapter_norm: "shared" = the adapter reads the block's own LN(h) (the MLP input);
        "own" = the adapter has its own trainable LayerNorm on h (LIFT's AdaptFormer).
    """

    method: str = "adaptformer"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Optional[list] = None
    adapter_bottleneck: Optional[int] = None
    adapter_scale_init: float = 1.0
    adapter_norm: str = "shared"
    train_head: bool = True


@dataclass
class DataConfig:
    """Where images and labels come from.

    dataset: "digits_lt" (embedded demo) | "split_file" (ImageNet-LT / iNat / Places-LT lists)
        | "image_folder" | "hf" (Hugging Face datasets, local) | "cifar_lt" | "synthetic".
    Split lists have lines `relative/path label`; classnames lines `<id> <name>`.
    label_order: "given" | "alphabetical" (iNaturalist: remap labels to sorted class names).
    imbalance_factor / imbalance_profile ("exp" | "step"): long-tailed subsampling of a balanced
        training set (CIFAR-LT convention); null = use the data as given.
    val_fraction: for data without a validation split (iNat, CIFAR-LT): hold out this fraction of
        each class of the training split (after long-tailed subsampling; at least one image of every
        class with two or more) as the validation split. Drawn with `split_seed` (0 when null), never
        the run seed, so every run and every sweep trial sees the same split. null = no hold-out;
        set on data that has a validation split, it is an error.
    """

    dataset: str = "digits_lt"
    root: Optional[str] = None
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    test_list: Optional[str] = None
    classnames: Optional[str] = None
    num_classes: Optional[int] = None
    label_order: str = "given"
    hf_path: Optional[str] = None
    hf_train_split: str = "train"
    hf_val_split: Optional[str] = None
    hf_test_split: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    imbalance_factor: Optional[float] = None
    imbalance_profile: str = "exp"
    val_fraction: Optional[float] = None
    image_size: int = 224
    test_resize: int = 224
    train_crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    num_workers: int = 2
    skip_bad_images: bool = False
    synthetic_num_classes: int = 10
    synthetic_train_size: int = 64
    synthetic_eval_size: int = 32
    split_seed: Optional[int] = 0  # seed of data splits / long-tailed subsampling (null = the run seed)


@dataclass
class LossConfig:
    """Per-sample training loss (see ft_focal.losses); `la` is Focal-SAM's choice (tau 1)."""

    name: str = "la"
    tau: float = 1.0
    beta: float = 0.9999
    max_m: float = 0.5
    s: float = 30.0
    drw_epoch: Optional[int] = None
    vs_gamma: float = 0.05
    vs_tau: float = 0.75
    focal_gamma: float = 1.0


@dataclass
class OptimConfig:
    """Optimizer of the SAM family wrapping a base optimizer (see ft_focal.optim).

    name: a method of ft_focal/optim/registry.py ("erm" | "sam" | "asam" | "imbsam" | "ccsam" |
        "focal_sam" | "sse_sam"); the method keys each takes are its `recipe_keys` there.
    Method keys that the chosen optimizer does not take are ignored only if left at null.
    fused: the base optimizer's fused kernel (torch's ``fused=True``). null = on CUDA only. Fused,
        a non-finite update is skipped by the kernel itself, so a steady-state update reads nothing
        on the host and the GPU never waits for the loop (ft_focal/optim/_step.py).
    """

    name: str = "focal_sam"
    base: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    rho: Optional[float] = None
    gamma: Optional[float] = None
    lam: Optional[float] = None
    tail_threshold: Optional[int] = None
    tail_weight: Optional[float] = None
    rho_head: Optional[float] = None
    rho_tail: Optional[float] = None
    switch_fraction: Optional[float] = None
    scope: Optional[str] = None
    flat_ratio: Optional[float] = None
    sync_perturbation: bool = True
    one_backward: Optional[bool] = None
    fused: Optional[bool] = None


@dataclass
class TrainConfig:
    """The loop. batch_size is the GLOBAL batch (split over processes and accumulation steps).

    compile: torch.compile the model (default inductor). The loop then resets dynamo's cache and
        turns off AOT autograd's donated buffers (the SAM family back-propagates one graph twice).
        The one-backward path compiles without graph breaks (two graphs: the plain forward and the
        one with the per-sample ratio; ft_focal/optim/one_backward/__init__.py). Measured on one H200
        (ViT-B/16, bf16, batch 128): the step runs 1.6x faster compiled, after ~1-2 min warm-up.
    log_with: Accelerate trackers to log to (tensorboard, wandb, trackio, ...; each an optional
        package). Empty = none; train_log.jsonl in output_dir is always written.
    fsdp: shard the model with FSDP2 (torch fully_shard per transformer block, then the root) on
        every process, CPU or GPU; every method runs exactly (ft_focal/training/fsdp.py).
        fsdp_reshard_after_forward: free the gathered weights after each forward (less memory,
        one more all-gather per backward). activation_checkpointing: recompute each block's
        activations in backward (docs/design.md, "Sharded training").
    max_bad_steps: this many consecutive skipped (non-finite) updates stop the run with a
        checkpoint. With a fused base optimizer (optim.fused) skips are counted on the device and the
        streak is checked at log steps, checkpoints and epoch ends, not after every update.
    """

    epochs: int = 10  # 0 (or max_steps 0): zero-shot, the initial head is evaluated without training
    max_steps: Optional[int] = None
    batch_size: int = 128
    grad_accum_steps: int = 1
    eval_batch_size: int = 256
    scheduler: str = "cosine"
    warmup_steps: int = 0
    mixed_precision: str = "no"
    grad_clip: Optional[float] = None
    save_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    eval_every_epochs: int = 1
    max_bad_steps: int = 20
    deterministic: bool = False
    compile: bool = False
    threads: Optional[int] = None
    log_with: list = field(default_factory=list)
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True
    activation_checkpointing: bool = False


@dataclass
class EvalConfig:
    """Model selection on `select_split`, final report on `test_split`."""

    select_split: str = "val"
    select_metric: str = "overall"
    test_split: str = "test"
    five_crop: bool = False
    ece_bins: int = 15
    many_threshold: int = 100
    few_threshold: int = 20


@dataclass
class HubConfig:
    push: bool = False
    repo_id: Optional[str] = None
    private: bool = False
    revision: Optional[str] = None


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)


SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Recipe).items() if dataclasses.is_dataclass(hint)
}

CHOICES = {
    "model.family": ("open_clip", "hf_clip", "hf_vit", "timm"),   # = models.backbones.loaders() (a test pins it)
    "model.head": ("cosine", "linear"),
    "model.head_init": ("text", "class_mean", "random"),
    "tuning.method": ("full", "lora", "adaptformer", "head"),
    "tuning.adapter_norm": ("shared", "own"),
    "data.dataset": ("digits_lt", "split_file", "image_folder", "hf", "cifar_lt", "synthetic"),
    "data.label_order": ("given", "alphabetical"),
    "data.imbalance_profile": ("exp", "step"),
    "loss.name": RECIPE_LOSSES,   # the loss registry
    "optim.name": tuple(METHODS),  # the method registry
    "optim.base": tuple(BASE_OPTIMIZERS),
    "optim.scope": (None, "network", "classifier"),
    "train.scheduler": ("cosine", "constant", "linear"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "eval.select_split": ("val", "test", "none"),
    "eval.select_metric": ("overall", "many", "medium", "few"),
}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_REJECTED = object()  # a value of the wrong type (None can be a valid value)


def _coerce_to(value: Any, annotation: Any, origin: Any) -> Any:
    """`value` as the non-union type `annotation`, or _REJECTED."""
    if annotation is bool:
        return value if isinstance(value, bool) else _REJECTED
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _REJECTED
    if annotation is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _REJECTED
    if annotation is str:
        return value if isinstance(value, str) else _REJECTED
    if annotation is list or origin is list:
        return value if isinstance(value, list) else _REJECTED
    if annotation is dict or origin is dict:
        return value if isinstance(value, dict) else _REJECTED
    return value  # pragma: no cover - every field uses one of the types above


def _coerce_union(key: str, value: Any, annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    for alternative in inner[1:]:  # Union[str, list]: the first type that accepts the value
        try:
            return _coerce(key, value, alternative)
        except UserError:
            pass
    return _coerce(key, value, inner[0])


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return _coerce_union(key, value, annotation)
    if value is None:
        raise UserError(f"recipe key '{key}': null is not allowed here (expected {_type_name(annotation)})")
    coerced = _coerce_to(value, annotation, origin)
    if coerced is _REJECTED:
        raise UserError(
            f"recipe key '{key}': expected {_type_name(annotation)}, got {type(value).__name__} {value!r}"
        )
    return coerced


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _build_section(cls: type, section: str, values: dict) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"recipe section '{section}' must be a mapping, got {type(values).__name__}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in renamed_section(section, values).items():
        full = f"{section}.{key}"
        if key not in types_:
            raise UserError(f"unknown recipe key '{full}'" + closest(key, list(types_), f"{section}."))
        if value is False and "no" in CHOICES.get(full, ()):
            value = "no"  # YAML 1.1 reads a bare `no` as false; it is Accelerate's spelling of "off"
        if full == "train.log_with" and isinstance(value, str):
            value = [value]  # train.log_with=tensorboard on the command line
        value = _coerce(full, value, types_[key])
        if full in CHOICES and value not in CHOICES[full]:
            valid = ", ".join(str(c) for c in CHOICES[full])
            raise UserError(f"recipe key '{full}': {value!r} is not one of {valid}")
        kwargs[key] = value
    return cls(**kwargs)


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a plain mapping (from YAML) into a `Recipe`; raises UserError on any bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    top_types = _field_types(Recipe)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top_types:
            raise UserError(f"{source}: unknown recipe key '{key}'" + closest(str(key), list(top_types)))
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], key, value or {})
        else:
            kwargs[key] = _coerce(key, value, top_types[key])
    recipe = Recipe(**kwargs)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Cross-field checks that a type alone cannot express."""
    t = recipe.train
    if t.batch_size < 1 or t.grad_accum_steps < 1 or t.eval_batch_size < 1:
        raise UserError("recipe keys 'train.batch_size', 'train.grad_accum_steps', 'train.eval_batch_size' must be >= 1")
    if t.epochs < 0 or (t.max_steps is not None and t.max_steps < 0):
        raise UserError("recipe keys 'train.epochs' and 'train.max_steps' must be >= 0 (0: zero-shot evaluation)")
    _validate_templates(recipe.model.prompt_template)
    if t.batch_size % t.grad_accum_steps:
        raise UserError(
            f"recipe key 'train.batch_size' ({t.batch_size}) must be divisible by 'train.grad_accum_steps' ({t.grad_accum_steps})"
        )
    if recipe.optim.lr <= 0:
        raise UserError(f"recipe key 'optim.lr' must be > 0, got {recipe.optim.lr}")
    if recipe.hub.push and not recipe.hub.repo_id:
        raise UserError("recipe key 'hub.repo_id' is required when 'hub.push' is true")
    fraction = recipe.data.val_fraction
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise UserError(f"recipe key 'data.val_fraction' must be between 0 and 1 (exclusive), got {fraction}")
    if recipe.data.dataset == "split_file":
        missing = [k for k in ("root", "train_list", "test_list") if getattr(recipe.data, k) is None]
        if missing:
            raise UserError("data.dataset=split_file needs " + ", ".join(f"'data.{k}'" for k in missing))


def _validate_templates(templates: Any) -> None:
    """model.prompt_template: a template or a non-empty list of templates, each with one "{}"."""
    items = [templates] if isinstance(templates, str) else templates
    if not items or not all(isinstance(t, str) and t.count("{}") == 1 for t in items):
        raise UserError(f"recipe key 'model.prompt_template': {templates!r} must be a template or a non-empty "
                        "list of templates, each with one '{}' where the class name goes")


def load_recipe(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a recipe YAML, apply `key=value` overrides, validate. Raises UserError."""
    raw = read_yaml(path)
    if isinstance(raw, dict):   # old key names in the file first, so that an override with either name wins
        raw = {k: renamed_section(k, v) if isinstance(v, dict) else v for k, v in raw.items()}
    raw = apply_overrides(raw, [renamed_override(text) for text in overrides or []])
    recipe = recipe_from_dict(raw, source=str(path))
    if "name" not in raw:
        recipe.name = Path(path).stem
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (every key, defaults included) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    os.replace(tmp, path)
