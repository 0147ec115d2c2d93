"""The model card (`README.md`) of an export: YAML front matter for the Hub + a Markdown body.

Front matter (read by the Hub): `library_name: ft_focal` (the weights are loaded by
`ft_focal.load_model`, not by transformers / open_clip / peft directly; a LoRA export also
carries a peft adapter, hence the `peft` tag), `tags`, `base_model` (only when the backbone's
pretrained weights are known to come from a Hub repository; never a guess), `datasets` (only
Hub dataset ids), `metrics`, `pipeline_tag: image-classification` and a `model-index` with the
test accuracy overall / many / medium / few exactly as in metrics.json (fractions in [0, 1])
and, when an ImageNet-C evaluation exists (eval.json with "corruption"), its mCE (percent).

The body states what a reader needs to trust the numbers: optimizer and its hyperparameters,
the tuning method, precision, number of processes, the evaluation protocol (split, transforms,
model selection), framework versions, citations and how to load the model. No token or
credential is ever read here.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Optional

import yaml

from ft_focal.artifacts.provenance import dataset_info
from ft_focal.evaluation import robustness_report
from ft_focal.losses import LOSSES
from ft_focal.metrics import describe_mce, mce_name
from ft_focal.optim.registry import METHODS, RECIPE_KEYS
from ft_focal.training import zero_shot
from ft_focal.version import __version__

# ----------------------------------------------------------------------------- methods

TUNING = {
    "full": ("full fine-tuning", []),
    "head": ("linear probe (head only)", ["linear-probe"]),
    "lora": ("LoRA (peft)", ["peft", "lora"]),
    "adaptformer": ("AdaptFormer", ["adaptformer", "parameter-efficient-fine-tuning"]),
}

FAMILIES = {
    "open_clip": ("open_clip", ["clip", "open_clip", "vision-transformer"]),
    "hf_clip": ("transformers CLIPVisionModel", ["clip", "transformers", "vision-transformer"]),
    "hf_vit": ("transformers ViTModel", ["vit", "transformers", "vision-transformer"]),
    "timm": ("timm", ["timm", "vision-transformer"]),
}

# Optimizer hyperparameters worth stating (recipe `optim` keys): the method keys, then two runtime switches.
METHOD_KEYS = RECIPE_KEYS + ("sync_perturbation", "one_backward")


PACKAGES = (("torch", "torch"), ("torchvision", "torchvision"), ("open_clip", "open_clip_torch"),
            ("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
            ("safetensors", "safetensors"), ("huggingface_hub", "huggingface_hub"))


def framework_versions() -> dict:
    versions = {}
    for label, dist in PACKAGES:
        try:
            versions[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[label] = "not installed"
    versions["ft_focal"] = __version__
    return versions


# ----------------------------------------------------------------------------- card


def _default_lora_targets(family: str) -> str:
    try:
        from ft_focal.models import default_lora_targets

        return ", ".join(default_lora_targets(family)) + " (the family default)"
    except Exception:  # noqa: BLE001 - the card only describes
        return "the family default"


def _optimizer_tag(name: str) -> str:
    return METHODS[name].display if name in METHODS else name


def _metric(value: float, label: str, metric_type: str = "accuracy") -> dict:
    return {"type": metric_type, "value": value, "name": label}


def front_matter(recipe: Any, metrics: dict, eval_result: Optional[dict], info: dict) -> dict:
    """The YAML front matter as a dict (see the module docstring)."""
    tuning = info.get("trained_tuning", recipe.tuning.method)
    method = METHODS.get(recipe.optim.name)
    opt_label, opt_tags = (method.display, list(method.tags)) if method else (recipe.optim.name, [recipe.optim.name])
    _, family_tags = FAMILIES.get(recipe.model.family, (recipe.model.family, []))
    tuning_tags = list(TUNING.get(tuning, (tuning, []))[1])
    if info.get("merged_lora"):
        tuning_tags = ["lora", "merged-lora"]
    tags = ["ft_focal", "image-classification", "long-tail", *opt_tags, *family_tags, *tuning_tags]
    if zero_shot.metrics_are_zero_shot(metrics):
        tags.append("zero-shot")
    if recipe.loss.name in ("la", "balanced_softmax"):
        tags.append("logit-adjustment")
    tags = list(dict.fromkeys(t for t in tags if t))

    data_name, data_hub = dataset_info(recipe)
    meta: dict = {"library_name": "ft_focal", "tags": tags}
    base = info.get("base_model")
    if base:
        meta["base_model"] = base
    if data_hub:
        meta["datasets"] = [data_hub]
    meta["metrics"] = ["accuracy"]
    meta["pipeline_tag"] = "image-classification"

    results = []
    test = (metrics or {}).get("test") or {}
    split = recipe.eval.test_split
    accuracy = [
        _metric(test[key], label)
        for key, label in (("overall", f"Top-1 accuracy ({split}, overall)"),
                           ("many", f"Top-1 accuracy ({split}, many-shot)"),
                           ("medium", f"Top-1 accuracy ({split}, medium-shot)"),
                           ("few", f"Top-1 accuracy ({split}, few-shot)"))
        if test.get(key) is not None
    ]
    dataset_entry = {"name": data_name, "type": data_hub or recipe.data.dataset, "split": split}
    if accuracy:
        results.append({
            "task": {"type": "image-classification", "name": "Long-tailed image classification"},
            "dataset": dataset_entry,
            "metrics": accuracy,
        })
    corruption = (eval_result or {}).get("corruption") or {}
    if corruption.get("mCE") is not None:
        # A partial mean or an invalid baseline is not the benchmark's mCE: named and typed so.
        name = mce_name(corruption) + ("" if corruption.get("baseline_valid", True) else ", baseline not valid")
        kind = "mCE" if name == "mCE" else "mCE-not-comparable"
        metrics_c = [_metric(float(corruption["mCE"]), f"{name} (%, lower is better)", kind)]
        if corruption.get("relative_mCE") is not None:
            metrics_c.append(_metric(float(corruption["relative_mCE"]), f"relative {name} (%)",
                                     "relative-" + kind))
        results.append({
            "task": {"type": "image-classification", "name": "Robustness to common corruptions"},
            "dataset": {"name": "ImageNet-C", "type": "imagenet-c",
                        "args": {"baseline": str(corruption.get("baseline", "alexnet"))}},
            "metrics": metrics_c,
        })
    if results:
        meta["model-index"] = [{"name": recipe.name, "results": results}]
    return meta


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _intro_section(recipe: Any, metrics: dict, info: dict, versions: dict[str, str]) -> list[str]:
    tuning = info.get("trained_tuning", recipe.tuning.method)
    data_name, _ = dataset_info(recipe)
    family_label = FAMILIES.get(recipe.model.family, (recipe.model.family, []))[0]
    base = info.get("base_model")
    backbone = f"{family_label} `{recipe.model.name}`" + (f" (pretrained: [{base}](https://huggingface.co/{base}))"
                                                          if base else "")
    lines = [f"# {recipe.name}", ""]
    if zero_shot.metrics_are_zero_shot(metrics):
        lines.append(zero_shot.card_intro(data_name, backbone, recipe.model.head,
                                          info.get("head_init", recipe.model.head_init), versions["ft_focal"]))
    else:
        lines.append(f"An image classifier fine-tuned on **{data_name}** from {backbone} with "
                     f"**{TUNING.get(tuning, (tuning,))[0]}** under the **{_optimizer_tag(recipe.optim.name)}** "
                     f"optimizer, trained and exported with ft_focal {versions['ft_focal']}.")
    if info.get("merged_lora"):
        lines += ["", "The LoRA adapter was **merged** into the backbone weights: `model.safetensors` is a plain model "
                  "(its `recipe.yaml` says `tuning.method: full` so that it rebuilds without peft; it was trained "
                  "with LoRA, see the training section)."]
    lines.append("")
    return lines


def _results_section(recipe: Any, metrics: dict, eval_result: Optional[dict]) -> list[str]:
    test = (metrics or {}).get("test") or {}
    val = (metrics or {}).get("val") or {}
    lines = [
        "## Results",
        "",
        f"Top-1 accuracy (%) on the **{recipe.eval.test_split}** split; shot groups from the training counts "
        f"(many: n > {recipe.eval.many_threshold}, few: n < {recipe.eval.few_threshold}, medium otherwise); "
        "group accuracies are means of per-class accuracies.",
        "",
        "| split | overall | many | medium | few | ECE (%) |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(recipe.eval.test_split, test)]
    if val and recipe.eval.test_split != "val":
        rows.insert(0, ("val", val))
    for name, res in rows:
        ece = res.get("ece")
        lines.append(f"| {name} | {_pct(res.get('overall'))} | {_pct(res.get('many'))} | {_pct(res.get('medium'))} | "
                     f"{_pct(res.get('few'))} | {'n/a' if ece is None else f'{100 * ece:.2f}'} |")
    corruption = (eval_result or {}).get("corruption") or {}
    if corruption.get("mCE") is not None:
        lines += ["", f"ImageNet-C: **{describe_mce(corruption, '%')}** (normalised by the "
                  f"{corruption.get('baseline', 'alexnet')} errors; "
                  f"{corruption.get('mCE_corruptions', len(corruption.get('CE') or {}))} of the 15 benchmark "
                  "corruptions x 5 severities)."]
    lines += robustness_report.card_lines(eval_result)  # eval.json of `ft-focal eval --suite`, when run
    lines.append("")
    return lines


def _optimizer_lines(opt: Any) -> list[str]:
    opt_label = _optimizer_tag(opt.name)
    lines = [f"- **Optimizer**: {opt_label} (`optim.name: {opt.name}`) wrapping {opt.base.upper()} with lr {opt.lr:g}"
             + (f", momentum {opt.momentum:g}" + (" (Nesterov)" if opt.nesterov else "") if opt.base == "sgd" else "")
             + f", weight decay {opt.weight_decay:g}."]
    method = [f"`{k}` = {_fmt_value(getattr(opt, k))}" for k in METHOD_KEYS
              if getattr(opt, k, None) is not None and k not in ("sync_perturbation", "one_backward")]
    if method:
        lines.append(f"- **{opt_label} hyperparameters**: " + ", ".join(method) + ".")
    return lines


def _loss_line(loss: Any) -> str:
    loss_info = LOSSES.get(loss.name)
    loss_args = [f"`{k}` = {_fmt_value(getattr(loss, k))}" for k, _ in (loss_info.recipe_keys if loss_info else ())
                 if getattr(loss, k, None) is not None]
    return (f"- **Loss**: {loss_info.display if loss_info else loss.name} (`loss.name: {loss.name}`"
            + ("; " + ", ".join(loss_args) if loss_args else "") + ").")


def _schedule_line(tr: Any, metrics: dict) -> str:
    length = f"{tr.max_steps} updates (train.max_steps)" if tr.max_steps else f"{tr.epochs} epochs"
    updates = metrics.get("updates") if metrics else None
    return (f"- **Schedule**: {length}" + (f", {updates} updates run" if updates is not None else "")
            + f"; global batch {tr.batch_size} (gradient accumulation {tr.grad_accum_steps}); "
            f"{tr.scheduler} learning-rate schedule, {tr.warmup_steps} warm-up steps"
            + (f"; gradient clipping {tr.grad_clip:g}" if tr.grad_clip else "") + ".")


def _tuning_line(recipe: Any, info: dict) -> str:
    tuning = info.get("trained_tuning", recipe.tuning.method)
    tun = recipe.tuning
    detail = ""
    if tuning == "lora":
        detail = (f": rank {tun.lora_rank}, alpha {tun.lora_alpha:g}, dropout {tun.lora_dropout:g}, targets "
                  f"{', '.join(tun.lora_targets) if tun.lora_targets else _default_lora_targets(recipe.model.family)}")
    elif tuning == "adaptformer":
        detail = (f": bottleneck {tun.adapter_bottleneck or '2^max(0, floor(log2(C / 24)))'}, "
                  f"scale init {tun.adapter_scale_init:g}")
    counts = info.get("parameter_counts") or {}
    count_text = ""
    if counts.get("total"):
        count_text = (f"; {counts['trainable']:,} trainable of {counts['total']:,} parameters "
                      f"({100 * counts['trainable'] / counts['total']:.2f}%)")
    return (f"- **Tuning**: {TUNING.get(tuning, (tuning,))[0]}{detail}; head: {recipe.model.head} "
            f"(scale {recipe.model.head_scale:g}) initialised from `{info.get('head_init', recipe.model.head_init)}`"
            + ("" if tun.train_head else ", frozen") + f"{count_text}.")


def _run_lines(recipe: Any, metrics: dict) -> list[str]:
    tr = recipe.train
    world = metrics.get("world_size") if metrics else None
    return [
        f"- **Precision**: `{tr.mixed_precision}` mixed precision"
        if tr.mixed_precision != "no" else "- **Precision**: float32 (no mixed precision).",
        f"- **Processes**: {world if world is not None else 'unknown'} (Accelerate)"
        + (f"; training took {metrics['train_seconds']:.0f} s" if metrics and metrics.get("train_seconds") else "")
        + (f"; {metrics['skipped_steps']} updates skipped (non-finite)" if metrics and metrics.get("skipped_steps")
           else "") + ".",
        f"- **Seed**: {recipe.seed}.",
    ]


def _training_section(recipe: Any, metrics: dict, info: dict) -> list[str]:
    return ["## Training", "", *_optimizer_lines(recipe.optim), _loss_line(recipe.loss),
            _schedule_line(recipe.train, metrics), _tuning_line(recipe, info), *_run_lines(recipe, metrics), ""]


def _evaluation_section(recipe: Any, metrics: dict, eval_result: Optional[dict], info: dict) -> list[str]:
    data_name, _ = dataset_info(recipe)
    test = (metrics or {}).get("test") or {}
    selected = (metrics or {}).get("selected", "unknown")
    note = ("selected on the validation split; the test split was not used for selection"
            if str(selected).startswith("best on val") else
            "the last weights of training (no selection)" if selected == "last" else str(selected))
    lines = [
        "## Evaluation protocol",
        "",
        f"- **Test split**: `{recipe.eval.test_split}` of {data_name}"
        + (f" ({test.get('num_samples')} images)" if test.get("num_samples") is not None else "") + ".",
        f"- **Transforms**: {info.get('transforms', 'see preprocess.json')}"
        + ("; test-time five-crop ensemble (logits averaged)" if recipe.eval.five_crop else "") + ".",
        f"- **Model selection**: `{selected}` — {note}.",
    ]
    corruption = (eval_result or {}).get("corruption") or {}
    if corruption:
        lines.append(f"- **ImageNet-C**: {(eval_result or {}).get('preprocessing', 'same transforms')}; "
                     f"baseline {corruption.get('baseline', 'alexnet')}.")
    lines.append("")
    return lines


def _files_section(info: dict) -> list[str]:
    return ["## Files", "", *(f"- `{name}`: {what}" for name, what in info.get("files", [])), ""]


def _usage_section(info: dict) -> list[str]:
    source = info.get("repo_id") or "EXPORT_DIR_OR_REPO_ID"
    lines = [
        "## How to use",
        "",
        "```python",
        "import ft_focal",
        "from PIL import Image",
        "",
        f'm = ft_focal.load_model("{source}")   # a folder or a Hub repo id (uses the local cache offline)',
        'print(m.predict([Image.open("image.jpg")]))   # class names; m.logits(...) / m.predict_proba(...)',
        "model, transform = m.model, m.transform()   # torch module (eval mode) and its test transform",
        "```",
        "",
        "Evaluate it again (from a local copy of this folder): `ft-focal eval EXPORT_DIR` "
        "(reads `recipe.yaml` for the data; override paths with `data.root=...`).",
    ]
    if info.get("adapter"):
        lines += [
            "",
            f"The LoRA adapter alone is in peft's format (`adapter_config.json`, `adapter_model.safetensors`); it "
            f"applies to `{info.get('adapter_module', 'model.backbone')}`, the backbone wrapper of ft_focal "
            "without the head:",
            "",
            "```python",
            "from peft import PeftModel",
            "backbone = PeftModel.from_pretrained(plain_backbone, EXPORT_DIR)   # plain_backbone: the same "
            "wrapper without LoRA",
            "```",
            "",
            "The head and every other trained tensor outside the adapter are in `trained_tensors.safetensors`.",
        ]
    lines.append("")
    return lines


def _versions_section(versions: dict[str, str]) -> list[str]:
    return ["## Framework versions", "", "At export time:", "",
            *(f"- {name} {version}" for name, version in versions.items()), ""]


def _citation_section(optimizer: str) -> list[str]:
    cited = METHODS[optimizer].cite if optimizer in METHODS else ()
    keys = ["focal_sam"] + [k for k in cited if k != "focal_sam"]
    return ["## Citation", "", "```bibtex", "\n\n".join(METHODS[k].bibtex for k in dict.fromkeys(keys)), "```", ""]


def render_card(recipe: Any, metrics: dict, eval_result: Optional[dict], info: dict) -> str:
    """README.md text: YAML front matter + body. `recipe` is the recipe the run was TRAINED with.

    info keys: base_model, trained_tuning, merged_lora, adapter (bool), adapter_module,
    parameter_counts, preprocess, files, transforms (text), repo_id (optional)."""
    meta = front_matter(recipe, metrics, eval_result, info)
    versions = framework_versions()
    lines = [
        *_intro_section(recipe, metrics, info, versions),
        *_results_section(recipe, metrics, eval_result),
        *_training_section(recipe, metrics, info),
        *_evaluation_section(recipe, metrics, eval_result, info),
        *_files_section(info),
        *_usage_section(info),
        *_versions_section(versions),
        *_citation_section(recipe.optim.name),
    ]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n" + "\n".join(lines)


def read_front_matter(text: str) -> dict:
    """Parse the YAML front matter of a model card (tests, tooling)."""
    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}
