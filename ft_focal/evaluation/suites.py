"""Evaluation suites: `eval/*.yaml` files (schema in eval/README.md) read, validated and run.

- `load_eval_suite(path, overrides)` reads a suite through the recipe engine of ft_focal/config/__init__.py
  (`read_yaml`, `apply_overrides`, `closest` for the "did you mean" hint), fills the defaults of
  its kind's schema and validates every key; relative paths are resolved against the file.
- `suite_transform(suite, mean, std)` is the suite's test transform (ft_focal/data/transforms.py).
- `run_imagenet_c_suite(predict, suite)` evaluates an `imagenet_c` suite end to end: scan,
  evaluate (benchmark + extra corruptions in one pass) and summarize (ft_focal/evaluation/corruption.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ft_focal.config.overrides import apply_overrides, closest, read_yaml
from ft_focal.data.imagenet_c import class_to_label_from_classnames
from ft_focal.data.transforms import EVAL_INTERPOLATIONS, FIVE_CROP_RESIZE, build_eval_transform
from ft_focal.errors import UserError
from ft_focal.evaluation.corruption import ALL_SEVERITIES, evaluate_corruptions, summarize_corruptions
from ft_focal.evaluation.shifts import SHIFT_KINDS, check_shift_suite, shift_schemas
from ft_focal.metrics import ALEXNET_CLEAN_ERROR, BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS

__all__ = ["load_eval_suite", "suite_transform", "run_imagenet_c_suite"]

_REQUIRED = object()


class _Key:
    def __init__(self, types: tuple, default: Any = _REQUIRED, choices: Optional[tuple] = None, path: bool = False):
        self.types, self.default, self.choices, self.path = types, default, choices, path


_PREPROCESSING = {
    "resize": _Key((int, type(None)), None),
    "crop": _Key((int, type(None)), 224),
    "interpolation": _Key((str,), "bicubic", EVAL_INTERPOLATIONS),
    "five_crop": _Key((bool,), False),
    "five_crop_resize": _Key((int,), FIVE_CROP_RESIZE),
    "mean": _Key((list, type(None)), None),
    "std": _Key((list, type(None)), None),
}
_COMMON = {
    "name": _Key((str,), None),
    "kind": _Key((str,), _REQUIRED),  # checked against _SCHEMAS before validation
    "description": _Key((str,), ""),
    "batch_size": _Key((int,), 256),
    "num_workers": _Key((int,), 4),
    "preprocessing": _PREPROCESSING,
}
_SCHEMAS: dict[str, dict[str, Any]] = {
    "long_tail": {
        **_COMMON,
        "split": _Key((str,), "test", ("test", "val")),
        "data": {
            "root": _Key((str,), _REQUIRED, path=True),
            "split_list": _Key((str,), _REQUIRED, path=True),
            "train_list": _Key((str, type(None)), None, path=True),
            "classnames": _Key((str, type(None)), None, path=True),
            "label_order": _Key((str,), "given", ("given", "alphabetical")),
        },
        "shots": {"many": _Key((int,), 100), "few": _Key((int,), 20)},
    },
    "imagenet_c": {
        **_COMMON,
        "root": _Key((str,), _REQUIRED, path=True),
        "classnames": _Key((str, type(None)), None, path=True),
        "corruptions": _Key((list,), list(BENCHMARK_CORRUPTIONS)),
        "extra_corruptions": _Key((list,), list(EXTRA_CORRUPTIONS)),
        "severities": _Key((list,), list(ALL_SEVERITIES)),
        "baseline": {
            "name": _Key((str,), "alexnet"),
            "table": _Key((str, type(None)), None, path=True),
            "clean_error": _Key((float, int, type(None)), ALEXNET_CLEAN_ERROR),
        },
        "clean_suite": _Key((str, type(None)), None, path=True),
    },
}
# The natural distribution shifts (ImageNet-V2 / -R / -A / -Sketch, ObjectNet, any set): evaluation/shifts.py
_SCHEMAS.update(shift_schemas({**_COMMON, "preprocessing": {**_PREPROCESSING, "resize": _Key((int, type(None)), 224)}},
                              _Key, _REQUIRED))


def _tname(types: tuple) -> str:
    names = [("null" if t is type(None) else t.__name__) for t in types]
    return " or ".join(names)


def _validate(raw: Any, schema: dict[str, Any], where: str, prefix: str, base_dir: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.') or 'suite'}' must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in schema:
            raise UserError(f"{where}: unknown key '{prefix}{key}'" + closest(key, list(schema), prefix))
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        full = prefix + key
        if isinstance(spec, dict):
            out[key] = _validate(raw.get(key) or {}, spec, where, full + ".", base_dir)
            continue
        if key not in raw:
            if spec.default is _REQUIRED:
                raise UserError(f"{where}: key '{full}' is required")
            out[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
            continue
        value = raw[key]
        ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
        if not ok:
            raise UserError(f"{where}: key '{full}' must be {_tname(spec.types)}, got {type(value).__name__} {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise UserError(f"{where}: key '{full}' is {value!r}, not one of {', '.join(spec.choices)}")
        if spec.path and isinstance(value, str):
            value = _resolve(value, base_dir)
        out[key] = value
    return out


def _resolve(value: str, base_dir: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base_dir / p))


def load_eval_suite(path: str | os.PathLike, overrides: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Read an evaluation suite YAML (schema: eval/README.md), fill defaults, validate.

    Unknown keys, wrong types and bad choices raise a one-line UserError naming the file and
    the key. Relative paths in the file are resolved against the file's folder; overrides
    (`key=value`, dotted keys, values parsed as YAML) take paths as given (cwd-relative).
    Returns a plain dict with every key of the suite's kind plus `path` (the suite file).
    """
    path = Path(path)
    where = str(path)
    raw = read_yaml(path, what="evaluation suite")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite must be a mapping of keys, got {type(raw).__name__}")
    base_dir = path.resolve().parent
    over_raw = apply_overrides({}, list(overrides or []), where=where, example="root=/data/imagenet-c")
    kind = over_raw.get("kind", raw.get("kind"))
    if kind not in _SCHEMAS:
        raise UserError(f"{where}: key 'kind' must be one of {', '.join(_SCHEMAS)}, got {kind!r}")
    schema = _SCHEMAS[kind]
    # overrides are validated with the same schema; their paths are relative to the cwd
    suite = _validate(_merge(raw, over_raw), schema, where, "", base_dir)
    _reresolve_overrides(suite, over_raw, schema)
    if suite["name"] is None:
        suite["name"] = path.stem
    _check_suite(suite, where)
    suite["path"] = str(path)
    return suite


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def _reresolve_overrides(suite: dict, over: dict, schema: dict) -> None:
    for k, v in over.items():
        spec = schema.get(k)
        if isinstance(spec, dict) and isinstance(v, dict):
            _reresolve_overrides(suite[k], v, spec)
        elif isinstance(spec, _Key) and spec.path and isinstance(v, str):
            suite[k] = os.path.abspath(os.path.expanduser(v))


def _check_preprocessing(pre: dict, where: str) -> None:
    for k in ("mean", "std"):
        v = pre[k]
        if v is not None and (len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise UserError(f"{where}: key 'preprocessing.{k}' must be a list of 3 numbers or null, got {v!r}")
    if (pre["mean"] is None) != (pre["std"] is None):
        raise UserError(f"{where}: keys 'preprocessing.mean' and 'preprocessing.std' must both be set or both null")
    for k in ("resize", "crop", "five_crop_resize"):
        if pre[k] is not None and pre[k] < 1:
            raise UserError(f"{where}: key 'preprocessing.{k}' must be >= 1, got {pre[k]}")


def _check_corruption_names(suite: dict, where: str) -> None:
    known = set(BENCHMARK_CORRUPTIONS) | set(EXTRA_CORRUPTIONS)
    seen: set[str] = set()
    for key in ("corruptions", "extra_corruptions"):
        for c in suite[key]:
            if not isinstance(c, str) or c not in known:
                raise UserError(f"{where}: key '{key}': {c!r} is not an ImageNet-C corruption" + closest(str(c), sorted(known)))
            if c in seen:
                raise UserError(f"{where}: key '{key}': corruption '{c}' listed twice")
            seen.add(c)


def _check_baseline(b: dict, where: str) -> None:
    if b["name"] != "alexnet" and b["table"] is None:
        raise UserError(f"{where}: key 'baseline.table' is required for baseline '{b['name']}'")
    if b["table"] is not None and not Path(b["table"]).is_file():
        raise UserError(f"{where}: key 'baseline.table': file {b['table']} not found")
    ce = b["clean_error"]
    if ce is not None and not (0.0 <= float(ce) <= 1.0 and math.isfinite(float(ce))):
        raise UserError(f"{where}: key 'baseline.clean_error' must be a fraction in [0, 1], got {ce}")


def _check_imagenet_c_suite(suite: dict, where: str) -> None:
    if suite["preprocessing"]["five_crop"]:
        raise UserError(f"{where}: key 'preprocessing.five_crop' is not supported for ImageNet-C (224 px images)")
    _check_corruption_names(suite, where)
    sev = suite["severities"]
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sev) or len(set(sev)) != len(sev):
        raise UserError(f"{where}: key 'severities' must be distinct integers in 1..5, got {sev!r}")
    _check_baseline(suite["baseline"], where)


def _check_suite(suite: dict, where: str) -> None:
    _check_preprocessing(suite["preprocessing"], where)
    if suite["batch_size"] < 1 or suite["num_workers"] < 0:
        raise UserError(f"{where}: keys 'batch_size' must be >= 1 and 'num_workers' >= 0")
    if suite["kind"] in SHIFT_KINDS:
        return check_shift_suite(suite, where)
    if suite["kind"] == "long_tail":
        if suite["shots"]["few"] > suite["shots"]["many"]:
            raise UserError(f"{where}: key 'shots.few' ({suite['shots']['few']}) exceeds 'shots.many' ({suite['shots']['many']})")
        return
    _check_imagenet_c_suite(suite, where)


def suite_transform(suite: Mapping[str, Any], mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None) -> Callable:
    """The suite's test transform; the suite's mean/std win, else the model's `mean`/`std`."""
    pre = suite["preprocessing"]
    m = pre["mean"] if pre["mean"] is not None else mean
    s = pre["std"] if pre["std"] is not None else std
    return build_eval_transform(
        resize=pre["resize"], crop=pre["crop"], interpolation=pre["interpolation"], mean=m, std=s,
        five_crop=pre["five_crop"], five_crop_resize=pre["five_crop_resize"],
    )


def run_imagenet_c_suite(
    predict: Callable[[torch.Tensor], torch.Tensor],
    suite: Mapping[str, Any] | str | os.PathLike,
    class_to_label: Optional[Mapping[str, int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    clean_error: Optional[float] = None,
    device: Any = None,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an `imagenet_c` suite end to end: scan, evaluate (benchmark + extra corruptions
    in one pass), summarize. `class_to_label` defaults to the suite's `classnames` file.
    Returns {"suite", "evaluation" (evaluate_corruptions output), "summary"} (summary is None
    unless all five severities were evaluated)."""
    if not isinstance(suite, Mapping):
        suite = load_eval_suite(suite)
    if suite.get("kind") != "imagenet_c":
        raise UserError(f"{suite.get('path', 'suite')}: kind is {suite.get('kind')!r}, expected 'imagenet_c'")
    if class_to_label is None:
        if suite["classnames"] is None:
            raise UserError(f"{suite.get('path', 'suite')}: key 'classnames' is needed (or pass the model's class order)")
        class_to_label = class_to_label_from_classnames(suite["classnames"])
    corruptions = list(suite["corruptions"]) + list(suite["extra_corruptions"])
    evaluation = evaluate_corruptions(
        predict, suite["root"], class_to_label, corruptions, suite["severities"],
        transform=suite_transform(suite, mean, std), batch_size=suite["batch_size"],
        num_workers=suite["num_workers"], device=device, progress=progress, accelerator=accelerator,
    )
    summary = None
    if list(suite["severities"]) == list(ALL_SEVERITIES):
        b = suite["baseline"]
        baseline: Any = b["table"] if b["table"] is not None else b["name"]
        summary = summarize_corruptions(evaluation, clean_error, baseline, b["clean_error"])
        summary["preprocessing"] = evaluation["preprocessing"]
    return {"suite": dict(suite), "evaluation": evaluation, "summary": summary}
