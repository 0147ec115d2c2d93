"""WiSE-FT (Wortsman et al. 2022): the model between the initial one (alpha = 0) and the fine-tuned one (alpha = 1).

Definitions per tuning method (docs/algorithms.md "WiSE-FT"), a in [0, 1]:
- head (every method): h(a) = (1 - a) h0 + a h1, h0 the head at the start of training (text,
  prompt-ensemble or class-mean initialisation, saved by the training run), h1 the final head;
- full: every backbone weight w(a) = (1 - a) w0 + a w1, w0 the initial backbone: re-read from the
  recipe's pretrained weights (checked against the SHA-256 recorded at the start of training), or,
  for a randomly initialised backbone (`model.pretrained: null`), the copy saved at the start;
- LoRA: the unmerged branch scaled by a: W + s (a B) A = W + a (s B A) (lora_B multiplied by a);
- AdaptFormer: the adapter's output scaled by a (its learnable scale s multiplied by a); its
  up-projection starts at zero, so a = 0 is the initial model.
At a = 0 every formula gives the initial weights exactly and at a = 1 the final ones exactly
((1 - 0) w0 + 0 w1 = w0; 0 w0 + 1 w1 = w1; multiplying by 1 is exact).

The training run writes `initial_head.safetensors` (`save_initial_state`) once its head is initialised.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ft_focal.errors import UserError
from ft_focal.files import save_safetensors

INITIAL = "initial_head.safetensors"
HEAD_PREFIX = "head."
BACKBONE_PREFIX = "backbone."


def backbone_digest(backbone: nn.Module) -> str:
    """SHA-256 over the backbone's parameters (name, dtype, shape, bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_initial_state(out_dir: str | os.PathLike, model: nn.Module, recipe: Any) -> Path:
    """Write `out_dir/initial_head.safetensors`: the initial head (and, for full tuning, what defines w0).

    Metadata: tuning method, head_init used, and for full tuning either `backbone: saved` (random
    init: the backbone tensors are in the file) or `backbone: pretrained` with its SHA-256.
    Written to a temporary name, then renamed (atomic).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {HEAD_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in model.head.state_dict().items()}
    meta = {"tuning": recipe.tuning.method, "head_init": str(getattr(model, "head_init_used", recipe.model.head_init))}
    if recipe.tuning.method == "full":
        if recipe.model.pretrained is None:  # a seeded random init: nothing to re-read it from
            meta["backbone"] = "saved"
            tensors.update({BACKBONE_PREFIX + k: v.detach().cpu().contiguous().clone()
                            for k, v in model.backbone.state_dict().items()})
        else:
            meta["backbone"] = "pretrained"
            meta["backbone_sha256"] = backbone_digest(model.backbone)
    tmp = out / (INITIAL + ".tmp")
    save_safetensors(tensors, tmp, metadata={"ft_focal_wise": json.dumps(meta)})  # the other outputs' mode
    os.replace(tmp, out / INITIAL)
    return out / INITIAL


def load_initial_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a run's initial_head.safetensors; one line when the run has none."""
    path = Path(run_dir) / INITIAL
    if not path.is_file():
        raise UserError(f"{run_dir}: no {INITIAL} (the run predates WiSE-FT support: alpha = 0, its initial "
                        "model, is not defined; train it again to use `ft-focal wise`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("ft_focal_wise", "{}"))
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: corrupt safetensors file ({' '.join(str(exc).split())})") from None
    return tensors, meta


def initial_backbone(run_dir: Path, tensors: dict, meta: dict, num_classes: int,
                     classnames: list) -> Optional[dict[str, torch.Tensor]]:
    """w0 of a full-tuning run (None for other methods: their frozen backbone IS w0)."""
    if meta.get("tuning") != "full":
        return None
    if meta.get("backbone") == "saved":
        return {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    from ft_focal.config import load_recipe
    from ft_focal.models import build_classifier

    recipe_file = Path(run_dir) / "recipe.yaml"
    if not recipe_file.is_file():
        raise UserError(f"{recipe_file}: missing (the run's recipe names the pretrained weights, w0 of WiSE-FT)")
    recipe = load_recipe(recipe_file)
    model_cfg = copy.deepcopy(recipe.model)
    model_cfg.head_init = "random"  # only the backbone is needed
    rebuilt = build_classifier(model_cfg, recipe.tuning, num_classes, classnames, load_weights=True)
    if backbone_digest(rebuilt.backbone) != meta.get("backbone_sha256"):
        raise UserError(f"{run_dir}: the pretrained weights of recipe.yaml ({recipe.model.pretrained}) are not the "
                        "ones this run started from (SHA-256 differs): w0 cannot be rebuilt exactly")
    return {k: v.detach().clone() for k, v in rebuilt.backbone.state_dict().items()}


@torch.no_grad()
def interpolate_head(head: nn.Module, head0: dict[str, torch.Tensor], alpha: float) -> nn.Module:
    """A copy of `head` with every tensor (1 - a) h0 + a h1."""
    new = copy.deepcopy(head)
    for name, tensor in new.state_dict().items():
        h0 = head0[HEAD_PREFIX + name].to(tensor.device, tensor.dtype)
        tensor.copy_((1.0 - alpha) * h0 + alpha * tensor)
    return new


@torch.no_grad()
def interpolate_model(model: nn.Module, method: str, alpha: float, head0: dict[str, torch.Tensor],
                      backbone0: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """The WiSE-FT model at `alpha` (a new module; `model`, the fine-tuned one, is not changed)."""
    from ft_focal.models.tuning import BottleneckAdapter

    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    new = copy.deepcopy(model)
    new.head = interpolate_head(model.head, head0, alpha)
    if method == "full":
        if backbone0 is None:
            raise ValueError("full tuning needs the initial backbone")
        for name, param in new.backbone.named_parameters():  # buffers were not trained: w0 = w1
            w0 = backbone0[name].to(param.device, param.dtype)
            param.copy_((1.0 - alpha) * w0 + alpha * param)
    elif method == "lora":
        for name, param in new.backbone.named_parameters():
            if ".lora_B." in f".{name}":
                param.mul_(alpha)
    elif method == "adaptformer":
        for module in new.backbone.modules():
            if isinstance(module, BottleneckAdapter):
                module.scale.mul_(alpha)
    elif method != "head":
        raise UserError(f"WiSE-FT: tuning method '{method}' has no interpolation (full, head, lora, adaptformer)")
    new.eval()
    return new


def parse_alphas(text: str) -> list[float]:
    """'0:1:0.1' (start:stop:step, stop included) or '0,0.5,1' -> sorted distinct alphas in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--alphas: {text!r} is neither START:STOP:STEP (step > 0) nor a list a,b,c of numbers") from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if not values or bad:
        raise UserError(f"--alphas: every alpha must be in [0, 1], got {bad or text!r}")
    return sorted(set(values))


__all__ = ["INITIAL", "backbone_digest", "initial_backbone", "interpolate_head", "interpolate_model",
           "load_initial_state", "parse_alphas", "save_initial_state"]
