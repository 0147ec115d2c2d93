"""Sweep files: what `ft-focal sweep SWEEP.yaml [key=value ...]` reads, validated like a recipe.

A sweep file names a recipe, the recipe keys every trial sets (`fixed`), a search space over
recipe keys, the validation objective (maximised), a sampler, a pruner, the study's total number
of trials, the seeds of each configuration (the objective is their mean) and the fault settings.
Every unknown key or wrong value is ONE line naming the file and the key, with the closest key
suggested (ft_focal/config/overrides.py). On the command line `key=value` sets a sweep key
(`trials=4`, `pruner.name=none`) or, for a recipe section, a fixed recipe key (`train.epochs=2`).
See docs/design.md ("Sweeps") and sweeps/*.yaml.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ft_focal.config import SECTIONS, Recipe, recipe_from_dict
from ft_focal.config.overrides import closest, parse_override, read_yaml
from ft_focal.errors import UserError
from ft_focal.sweeps.objective import OBJECTIVES

PARAM_TYPES = ("float", "log_float", "int", "categorical")
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
# recipe keys a sweep sets itself (folders, names, seeds): not searchable
RESERVED_RECIPE_KEYS = ("name", "output_dir", "seed")


@dataclass
class SamplerSpec:
    name: str = "tpe"
    seed: int = 0
    startup_trials: int = 5  # TPE: random trials before the model is used


@dataclass
class PrunerSpec:
    """`startup_trials` / `warmup_epochs`: median pruner; `min_resource` / `reduction_factor`:
    successive halving and Hyperband (resources counted in reported epochs). With several seeds the
    k-th seed's epoch e is step k * epochs + e, so every trial is compared at the same seed and epoch."""

    name: str = "median"
    startup_trials: int = 3
    warmup_epochs: int = 0
    min_resource: int = 1
    reduction_factor: int = 3


@dataclass
class FaultSpec:
    """Heartbeat of a running trial and the time after which another worker takes over a dead one."""

    heartbeat_seconds: int = 30
    grace_seconds: int = 120
    max_retry: int = 3


@dataclass
class ParamSpec:
    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    choices: Optional[list] = None

    def grid_values(self) -> list:
        """The finite set of values a grid sampler runs (int / stepped float / categorical)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


@dataclass
class SweepSpec:
    name: str
    recipe: str
    output_dir: str
    space: list[ParamSpec]
    fixed: dict = field(default_factory=dict)
    objective: str = "overall"
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    trials: int = 12
    seeds: list = field(default_factory=lambda: [0])
    faults: FaultSpec = field(default_factory=FaultSpec)
    source: str = "sweep file"

    def recipe_raw(self) -> dict:
        """The recipe mapping every trial starts from: the recipe file plus `fixed`."""
        return _set_keys(read_yaml(self.recipe), self.fixed)

    def trial_recipe(self, params: dict, seed: int, output_dir: str, name: str) -> Recipe:
        """The full recipe of one run of a trial (ready for `ft-focal train`)."""
        raw = _set_keys(self.recipe_raw(), params)
        raw.update(seed=int(seed), output_dir=str(output_dir), name=name)
        return recipe_from_dict(raw, source=self.recipe)


SECTION_SPECS = {"sampler": SamplerSpec, "pruner": PrunerSpec, "faults": FaultSpec}
TOP_KEYS = ("name", "recipe", "output_dir", "fixed", "space", "objective", "trials", "seeds") + tuple(SECTION_SPECS)


def load_sweep(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> SweepSpec:
    """Read and validate a sweep file; `overrides` are `key=value` strings. Raises UserError."""
    where = str(path)
    raw = read_yaml(path, what="sweep file")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a sweep file must be a mapping, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides or []:
        key, value = parse_override(text, f"{where}: ", example="trials=4")
        _route_override(raw, key, value, where)
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown sweep key '{unknown[0]}'" + closest(str(unknown[0]), list(TOP_KEYS)))
    for key in ("recipe", "space"):
        if not raw.get(key):
            raise UserError(f"{where}: sweep key '{key}' is required")
    spec = SweepSpec(
        name=_typed(where, "name", raw.get("name", Path(where).stem), str),
        recipe=_resolve_recipe(where, raw["recipe"]),
        output_dir=_typed(where, "output_dir", raw.get("output_dir", f"runs/sweeps/{Path(where).stem}"), str),
        space=[], fixed=_typed(where, "fixed", raw.get("fixed") or {}, dict),
        objective=_typed(where, "objective", raw.get("objective", "overall"), str),
        trials=_typed(where, "trials", raw.get("trials", 12), int),
        seeds=_seeds(where, raw.get("seeds", [0])), source=where,
        **{name: _section(where, name, cls, raw.get(name) or {}) for name, cls in SECTION_SPECS.items()})
    _check_choice(where, "objective", spec.objective, OBJECTIVES)
    _check_choice(where, "sampler.name", spec.sampler.name, SAMPLERS)
    _check_choice(where, "pruner.name", spec.pruner.name, PRUNERS)
    if spec.trials < 1:
        raise UserError(f"{where}: sweep key 'trials' must be >= 1, got {spec.trials}")
    base = _base_recipe(spec)
    space = _typed(where, "space", raw["space"], dict)
    spec.space = [_param(where, key, entry, spec) for key, entry in space.items()]
    if spec.sampler.name == "grid":
        for p in spec.space:
            if p.type in ("float", "log_float") and p.step is None:
                raise UserError(f"{where}: space '{p.key}': the grid sampler needs a finite set: give 'step' "
                                "or use type categorical")
    require_validation_split(base, where)
    return spec


def _route_override(raw: dict, key: str, value: Any, where: str) -> None:
    """`trials=4` / `sampler.name=grid` set sweep keys; `train.epochs=2` (a recipe section) a fixed recipe key."""
    head, _, rest = key.partition(".")
    if head in SECTION_SPECS and rest:
        section = raw.setdefault(head, {})
        if not isinstance(section, dict):
            raise UserError(f"{where}: sweep key '{head}' must be a mapping")
        section[rest] = value
    elif head in SECTIONS and rest:
        raw["fixed"] = dict(raw.get("fixed") or {}, **{key: value})
    elif key in TOP_KEYS:
        raw[key] = value
    else:
        options = list(TOP_KEYS) + [f"{s}.{f.name}" for s, c in SECTION_SPECS.items() for f in dataclasses.fields(c)]
        raise UserError(f"{where}: override '{key}': unknown sweep key" + closest(key, options))


def _section(where: str, name: str, cls: type, values: Any) -> Any:
    values = _typed(where, name, values, dict)
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{where}: unknown sweep key '{name}.{key}'" + closest(str(key), list(fields)))
        expected = {"int": int, "str": str}[fields[key]]
        _typed(where, f"{name}.{key}", value, expected)
    return cls(**values)


def _typed(where: str, key: str, value: Any, expected: type) -> Any:
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UserError(f"{where}: sweep key '{key}': expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _seeds(where: str, value: Any) -> list:
    seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"{where}: sweep key 'seeds': expected a seed or a non-empty list of int seeds, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: sweep key 'seeds': {seeds} repeats a seed")
    return seeds


def _check_choice(where: str, key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"{where}: sweep key '{key}': {value!r} is not valid" + closest(str(value), list(choices)))


def _resolve_recipe(where: str, value: Any) -> str:
    """The recipe path: as written (from the working directory), else next to the sweep file."""
    value = _typed(where, "recipe", value, str)
    for candidate in (Path(value), Path(where).parent / value):
        if candidate.is_file():
            return str(candidate)
    raise UserError(f"{where}: sweep key 'recipe': {value} not found (looked in the working directory and next to "
                    "the sweep file)")


def _base_recipe(spec: SweepSpec) -> Recipe:
    try:
        return spec.trial_recipe({}, spec.seeds[0], spec.output_dir, spec.name)
    except UserError as exc:
        raise UserError(f"{spec.source}: recipe {spec.recipe} with the sweep's fixed keys: {exc}") from None


def _categorical_values(prefix: str, param: ParamSpec) -> list:
    if not isinstance(param.choices, list) or not param.choices or param.low is not None or param.high is not None:
        raise UserError(f"{prefix}: a categorical parameter needs a non-empty list 'choices' (and no low / high)")
    return param.choices


def _range_ends(prefix: str, param: ParamSpec) -> list:
    """The two ends of a numeric range (int, float, log_float), after checking low / high / step."""
    kind = param.type
    if param.choices is not None:
        raise UserError(f"{prefix}: 'choices' belongs to type categorical; {kind} takes low / high")
    number = int if kind == "int" else (int, float)
    for bound in ("low", "high") + (("step",) if param.step is not None else ()):
        value = getattr(param, bound)
        if not isinstance(value, number) or isinstance(value, bool):
            raise UserError(f"{prefix}: '{bound}' must be {'an int' if kind == 'int' else 'a number'}, got {value!r}")
    if not param.low < param.high:
        raise UserError(f"{prefix}: 'low' ({param.low}) must be below 'high' ({param.high})")
    if kind == "log_float" and param.low <= 0:
        raise UserError(f"{prefix}: log_float needs 'low' > 0, got {param.low}")
    if param.step is not None and (param.step <= 0 or kind == "log_float"):
        raise UserError(f"{prefix}: 'step' must be > 0 and cannot be combined with log_float")
    return [param.low, param.high]


def _param(where: str, key: str, entry: Any, spec: SweepSpec) -> ParamSpec:
    """One search-space entry: a recipe key with {type, low, high[, step]} or {type: categorical, choices}."""
    prefix = f"{where}: space '{key}'"
    _check_recipe_key(prefix, key)
    entry = _typed(where, f"space.{key}", entry, dict)
    allowed = ("type", "low", "high", "step", "choices")
    for k in entry:
        if k not in allowed:
            raise UserError(f"{prefix}: unknown key '{k}'" + closest(str(k), list(allowed)))
    kind = entry.get("type")
    if kind not in PARAM_TYPES:
        raise UserError(f"{prefix}: type {kind!r} is not one of {', '.join(PARAM_TYPES)}")
    param = ParamSpec(key=key, type=kind, **{k: entry.get(k) for k in allowed[1:]})
    values = _categorical_values(prefix, param) if kind == "categorical" else _range_ends(prefix, param)
    for value in values:  # the recipe itself must accept every value the sampler can draw at the ends
        try:
            spec.trial_recipe({key: value}, spec.seeds[0], spec.output_dir, spec.name)
        except UserError as exc:
            raise UserError(f"{prefix}: value {value!r} is not valid for the recipe ({exc})") from None
    return param


def _check_recipe_key(prefix: str, key: str) -> None:
    section, _, name = key.partition(".")
    if key in RESERVED_RECIPE_KEYS:
        raise UserError(f"{prefix}: the sweep sets '{key}' itself (seeds: sweep key 'seeds')")
    if not name:
        raise UserError(f"{prefix}: not a recipe key (write section.key, e.g. optim.rho)")
    if section not in SECTIONS:
        raise UserError(f"{prefix}: unknown recipe section '{section}'" + closest(section, list(SECTIONS)))
    fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in fields:
        raise UserError(f"{prefix}: unknown recipe key '{key}'" + closest(name, fields))


def _set_keys(raw: dict, keys: dict) -> dict:
    """A copy of a recipe mapping with `section.key: value` entries set."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in keys.items():
        section, _, name = str(key).partition(".")
        if name:
            if not isinstance(out.setdefault(section, {}), dict):
                raise UserError(f"recipe key '{key}': '{section}' is not a section")
            out[section][name] = value
        else:
            out[section] = value
    return out


def require_validation_split(recipe: Recipe, where: str) -> None:
    """The ranking uses validation only: refuse a recipe whose data has no validation split and no
    `data.val_fraction` (the test split never chooses)."""
    d = recipe.data
    if recipe.eval.select_split != "val":
        raise UserError(f"{where}: the sweep ranks trials on the validation split; the recipe has eval.select_split "
                        f"{recipe.eval.select_split!r} (set eval.select_split: val)")
    if d.val_fraction is not None:
        return
    no_val = ((d.dataset == "split_file" and d.val_list is None) or d.dataset == "cifar_lt"
              or (d.dataset == "hf" and d.hf_val_split is None)
              or (d.dataset == "image_folder" and d.root is not None and not (Path(d.root) / "val").is_dir()))
    if no_val:
        raise UserError(f"{where}: recipe {recipe.name} has no validation split and the sweep never ranks on the test "
                        "split: set data.val_fraction (e.g. fixed: {data.val_fraction: 0.1}, a class-stratified "
                        "split of the training set)")
