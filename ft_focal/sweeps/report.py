"""What a sweep leaves for its user, all in the sweep folder and all from the study's storage:

- `sweep.md`: every trial sorted by the objective (validation only), with validation and test
  accuracy overall / many / medium / few (docs/metrics.md), state and time;
- `plots/`: the objective against each hyperparameter, the rho x gamma contour, the optimisation
  history and the parameter importances (Optuna's matplotlib visualisation);
- `best.yaml`: the best configuration's full recipe, ready for `ft-focal train` (first seed);
- `top_trials/`: `ft-focal report` of the best trials' runs.
The test columns are reported, never used to rank or to choose best.yaml.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from ft_focal.config import recipe_to_dict
from ft_focal.sweeps.runner import METRIC_KEYS
from ft_focal.sweeps.spec import SweepSpec
from ft_focal.sweeps.study import CRASHED, DUPLICATE_OF, INTERRUPTED, counts_toward_budget

logger = logging.getLogger(__name__)

TOP_TRIALS = 3
STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2, TrialState.RUNNING: 3, TrialState.WAITING: 4}


def listed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials of the table: no duplicates; a trial lost with its worker (or stopped by the
    timeout) only while its retry is not in the study."""
    return sorted((t for t in study.get_trials(deepcopy=False) if counts_toward_budget(t)), key=_rank_key)


def _rank_key(trial: FrozenTrial) -> tuple:
    last = list(trial.intermediate_values.values())[-1] if trial.intermediate_values else float("-inf")
    score = trial.value if trial.state == TrialState.COMPLETE else last
    return STATE_ORDER.get(trial.state, 5), -(score if score is not None else float("-inf")), trial.number


def state_text(trial: FrozenTrial) -> str:
    if trial.state == TrialState.PRUNED:
        return f"pruned (epoch {trial.user_attrs.get('pruned_at_epoch')})"
    if trial.state == TrialState.FAIL:
        return f"failed: {trial.user_attrs.get(CRASHED) or trial.user_attrs.get(INTERRUPTED) or 'worker lost'}"
    if trial.state == TrialState.COMPLETE:
        return "complete"
    return trial.state.name.lower()


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sweep_table(spec: SweepSpec, trials: list[FrozenTrial]) -> str:
    keys = [p.key for p in spec.space]
    head = (["rank", "trial"] + keys + [f"objective (val {spec.objective})"] + [f"val {k}" for k in METRIC_KEYS]
            + [f"test {k}" for k in METRIC_KEYS] + ["state", "time (s)", "folder"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, t in enumerate(trials, 1):
        val, test = t.user_attrs.get("val") or {}, t.user_attrs.get("test") or {}
        objective = _pct(t.value) if t.state == TrialState.COMPLETE else "-"
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        folder = os.path.relpath(t.user_attrs["folder"], spec.output_dir) if t.user_attrs.get("folder") else "-"
        row = ([str(rank), str(t.number)] + [_value(t.params.get(k, "-")) for k in keys] + [objective]
               + [_pct(val.get(k)) for k in METRIC_KEYS] + [_pct(test.get(k)) for k in METRIC_KEYS]
               + [state_text(t).replace("|", "/"), "-" if seconds is None else f"{seconds:.0f}", folder])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_sweep_report(spec: SweepSpec, study: optuna.Study, wall_seconds: Optional[float] = None) -> Path:
    """sweep.md, plots/, best.yaml and top_trials/ in the sweep folder; returns sweep.md's path."""
    out = Path(spec.output_dir)
    trials = listed_trials(study)
    counts = {s: sum(t.state == s for t in trials) for s in STATE_ORDER}
    duplicates = sum(t.user_attrs.get(DUPLICATE_OF) is not None for t in study.get_trials(deepcopy=False))
    lines = [f"# Sweep {spec.name}", "",
             f"Recipe `{spec.recipe}`; objective: validation `{spec.objective}` (maximised, mean over seeds "
             f"{spec.seeds}); sampler {spec.sampler.name}, pruner {spec.pruner.name}; {len(trials)} of {spec.trials} "
             f"trials: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
             f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running, {counts[TrialState.WAITING]} "
             f"queued" + (f"; {duplicates} duplicate proposal(s) skipped" if duplicates else "") + ".",
             "Accuracies in %; test accuracy is reported and never used to rank.", ""]
    if wall_seconds is not None:
        lines += [f"Wall time of this worker: {wall_seconds:.0f} s.", ""]
    lines += [sweep_table(spec, trials), ""]
    best = _best(study)
    if best is not None:
        write_best_recipe(spec, best, out / "best.yaml")
        lines += [f"Best: trial {best.number} (val {spec.objective} {_pct(best.value)}%); its full recipe: "
                  f"`best.yaml` (`ft-focal train {out / 'best.yaml'}`).", ""]
        top = [Path(t.user_attrs["folder"]) / f"seed_{spec.seeds[0]}" for t in trials[:TOP_TRIALS]
               if t.state == TrialState.COMPLETE and t.user_attrs.get("folder")]
        report = _top_report(top, out / "top_trials")
        if report is not None:
            lines += [f"Report of the top trials: `{os.path.relpath(report, out)}`.", ""]
    plots = write_plots(spec, study, out / "plots")
    lines += [f"![{name}](plots/{name})" for name in plots]
    path = out / "sweep.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _best(study: optuna.Study) -> Optional[FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def write_best_recipe(spec: SweepSpec, best: FrozenTrial, path: Path) -> None:
    """The best trial's full recipe (its first seed), writing into `<sweep>/best_run`."""
    recipe = spec.trial_recipe(best.params, spec.seeds[0], str(Path(spec.output_dir) / "best_run"), f"{spec.name}_best")
    header = (f"# Best configuration of sweep {spec.name}: trial {best.number}, validation {spec.objective} "
              f"{100 * best.value:.2f}% (mean over seeds {spec.seeds}).\n"
              f"# Its runs: {best.user_attrs.get('folder')}. Retrain: ft-focal train {path}\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    os.replace(tmp, path)


def _top_report(runs: list[Path], out: Path) -> Optional[Path]:
    from ft_focal.evaluation.report import compare_runs, load_metrics, write_run_report

    runs = [r for r in runs if (r / "metrics.json").is_file()]
    try:
        if len(runs) >= 2:
            return compare_runs(runs, out)
        if runs:
            return write_run_report(runs[0], load_metrics(runs[0]))
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the sweep's table
        logger.warning("could not write the report of the top trials: %s", exc)
    return None


def write_plots(spec: SweepSpec, study: optuna.Study, directory: Path) -> list[str]:
    """Optuna's matplotlib plots of the complete trials; the names of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    keys = [p.key for p in spec.space]
    plots = {"objective_vs_params.png": lambda: ov.plot_slice(study, params=keys),
             "history.png": lambda: ov.plot_optimization_history(study)}
    if {"optim.rho", "optim.gamma"} <= set(keys):
        plots["rho_gamma_contour.png"] = lambda: ov.plot_contour(study, params=["optim.rho", "optim.gamma"])
    if len(keys) >= 2 and len(complete) >= 2:
        plots["importances.png"] = lambda: ov.plot_param_importances(study)
    written = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(directory / name, dpi=110, bbox_inches="tight")
            plt.close(figure)
            written.append(name)
        except Exception as exc:  # noqa: BLE001 - e.g. too few distinct values for a contour
            logger.warning("sweep plot %s not written: %s", name, exc)
    return written
