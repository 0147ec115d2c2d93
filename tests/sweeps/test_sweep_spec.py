"""Sweep files (validated like recipes), the held-out validation split, and the study logic that
needs no training run: duplicates, the study budget, pruning from inside a run."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from ft_focal.cli import main as cli_main
from ft_focal.config import load_recipe
from ft_focal.data.datasets import ArrayDataset
from ft_focal.data.longtail import stratified_holdout
from ft_focal.data.sources import RawData, finish
from ft_focal.errors import UserError
from ft_focal.sweeps.objective import objective_value
from ft_focal.sweeps.pruning import PRUNED_EXIT_CODE, PRUNED_MARKER, TRIAL_ENV, validation_hook_from_env
from ft_focal.sweeps.spec import load_sweep
from ft_focal.sweeps.study import CRASHED, DUPLICATE_OF, StudyBudget, counts_toward_budget, find_duplicate

REPO = Path(__file__).resolve().parents[2]
DEMO_RECIPE = str(REPO / "recipes/demo/digits_lt_focal_sam.yaml")


def write_sweep(tmp_path: Path, **changes) -> Path:
    sweep = {"name": "t", "recipe": DEMO_RECIPE, "output_dir": str(tmp_path / "out"),
             "space": {"optim.rho": {"type": "log_float", "low": 0.01, "high": 0.2}}, "trials": 3}
    sweep.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_validate(path):
    spec = load_sweep(path)
    assert spec.space and spec.trials >= 1
    recipe = spec.trial_recipe({p.key: (p.choices or [p.low])[0] for p in spec.space}, spec.seeds[0], "x", "x")
    assert recipe.eval.select_split == "val"


def test_demo_sweep_searches_rho_gamma_lambda_with_pruning():
    spec = load_sweep(REPO / "sweeps/demo_focal_sam.yaml")
    assert {p.key for p in spec.space} == {"optim.rho", "optim.gamma", "optim.lam"}
    assert spec.pruner.name != "none" and 10 <= spec.trials <= 14


@pytest.mark.parametrize("space, expected", [
    ({"optim.rhoo": {"type": "float", "low": 0.0, "high": 1.0}}, "did you mean 'rho'"),
    ({"optim.rho": {"type": "floot", "low": 0.0, "high": 1.0}}, "type 'floot' is not one of"),
    ({"optim.rho": {"type": "float", "low": 0.5, "high": 0.1}}, "must be below 'high'"),
    ({"optim.rho": {"type": "log_float", "low": 0.0, "high": 0.1}}, "log_float needs 'low' > 0"),
    ({"optim.rho": {"type": "float", "lo": 0.0, "high": 0.1}}, "did you mean 'low'"),
    ({"optim.lr": {"type": "float", "low": -1.0, "high": 0.1}}, "optim.lr' must be > 0"),
    ({"optim.base": {"type": "categorical", "choices": ["sgd", "adamm"]}}, "'adamm' is not one of"),
    ({"seed": {"type": "int", "low": 0, "high": 3}}, "the sweep sets 'seed' itself"),
    ({"train.epochs": {"type": "int", "low": 1.5, "high": 3}}, "'low' must be an int"),
])
def test_bad_search_space_is_one_line_error(tmp_path, capsys, space, expected):
    path = write_sweep(tmp_path, space=space)
    assert cli_main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert str(path) in err and not (tmp_path / "out").exists()


def test_unknown_sweep_keys_get_the_closest_key(tmp_path):
    with pytest.raises(UserError, match="unknown sweep key 'trails'.*did you mean 'trials'"):
        load_sweep(write_sweep(tmp_path, trails=3))
    with pytest.raises(UserError, match="did you mean 'startup_trials'"):
        load_sweep(write_sweep(tmp_path, pruner={"startup_trial": 2}))
    with pytest.raises(UserError, match="'sampler.name': 'tpee' is not valid.*did you mean 'tpe'"):
        load_sweep(write_sweep(tmp_path), ["sampler.name=tpee"])
    with pytest.raises(UserError, match="unknown recipe key 'train.epoch'"):
        load_sweep(write_sweep(tmp_path), ["train.epoch=2"])


def test_overrides_set_sweep_keys_and_fixed_recipe_keys(tmp_path):
    spec = load_sweep(write_sweep(tmp_path), ["trials=5", "pruner.name=hyperband", "train.epochs=2", "seeds=[1, 2]"])
    assert (spec.trials, spec.pruner.name, spec.seeds) == (5, "hyperband", [1, 2])
    recipe = spec.trial_recipe({"optim.rho": 0.1}, 2, str(tmp_path / "run"), "r")
    assert (recipe.train.epochs, recipe.optim.rho, recipe.seed) == (2, 0.1, 2)


def test_grid_sampler_needs_a_finite_space(tmp_path):
    with pytest.raises(UserError, match="grid sampler needs a finite set"):
        load_sweep(write_sweep(tmp_path, sampler={"name": "grid"}))
    spec = load_sweep(write_sweep(tmp_path, sampler={"name": "grid"},
                                  space={"optim.gamma": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25}}))
    assert spec.space[0].grid_values() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_recipe_without_validation_split_is_refused_unless_val_fraction(tmp_path):
    inat = yaml.safe_load((REPO / "sweeps/inat2018_focal_sam.yaml").read_text())
    inat["recipe"] = str(REPO / inat["recipe"])
    fixed = inat.pop("fixed")
    (tmp_path / "inat.yaml").write_text(yaml.safe_dump(dict(inat, fixed={"eval.select_split": "val"})))
    with pytest.raises(UserError, match="no validation split.*data.val_fraction"):
        load_sweep(tmp_path / "inat.yaml")
    (tmp_path / "inat.yaml").write_text(yaml.safe_dump(dict(inat, fixed=fixed)))
    assert load_sweep(tmp_path / "inat.yaml").fixed["data.val_fraction"] == 0.05


def test_stratified_holdout_takes_each_class_share_with_its_own_seed():
    labels = np.repeat(np.arange(4), [100, 20, 3, 1])
    kept, held = stratified_holdout(labels, 0.1, seed=0)
    assert np.bincount(labels[held], minlength=4).tolist() == [10, 2, 1, 0]
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))
    assert np.array_equal(held, stratified_holdout(labels, 0.1, seed=0)[1])
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=1)[1])
    # a class's split does not depend on the other classes
    only_first = stratified_holdout(labels[:100], 0.1, seed=0)[1]
    assert np.array_equal(only_first, held[labels[held] == 0])


def test_val_fraction_holds_out_a_split_independent_of_the_run_seed():
    recipe = load_recipe(DEMO_RECIPE, ["data.val_fraction=0.2"])
    labels = np.repeat(np.arange(3), [30, 10, 5])
    images = np.zeros((len(labels), 8, 8), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels))  # each image knows its index

    def build(seed: int):
        raw = RawData(ArrayDataset(images, labels), None, ArrayDataset(images[:3], [0, 1, 2]), ["a", "b", "c"],
                      longtail_done=True)
        recipe.data.num_classes = 3
        return finish(raw, recipe.data, {"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
                      seed)

    first, second = build(0), build(7)
    assert first.class_counts == [24, 8, 4] and len(first.val) == 9
    assert np.array_equal(first.val.images[:, 0, 0], second.val.images[:, 0, 0])
    with_val = RawData(ArrayDataset(images, labels), ArrayDataset(images[:3], [0, 1, 2]), ArrayDataset(images[:3], [0, 1, 2]),
                       ["a", "b", "c"], longtail_done=True)
    with pytest.raises(UserError, match="already has a validation split"):
        finish(with_val, recipe.data, {"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}, 0)
    with pytest.raises(UserError, match="data.val_fraction' must be between 0 and 1"):
        load_recipe(DEMO_RECIPE, ["data.val_fraction=1.5"])


def test_objective_of_a_validation_result():
    val = {"overall": 0.5, "many": 0.9, "medium": 0.6, "few": 0.3}
    assert objective_value(val, "few") == 0.3
    assert objective_value(val, "group_mean") == pytest.approx(0.6)
    assert objective_value(dict(val, few=None), "group_mean") is None


def _trial(state, params, number, **attrs):
    dist = {k: optuna.distributions.FloatDistribution(0.0, 1.0) for k in params}
    system = attrs.pop("system", {})
    trial = optuna.trial.create_trial(state=state, params=params, distributions=dist, user_attrs=attrs,
                                      system_attrs=system, value=0.5 if state == optuna.trial.TrialState.COMPLETE else None)
    return trial


def test_duplicates_and_the_study_budget():
    S = optuna.trial.TrialState
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(S.COMPLETE, {"a": 0.1}, 0))
    study.add_trial(_trial(S.FAIL, {"a": 0.2}, 1))                          # worker lost
    study.add_trial(_trial(S.FAIL, {"a": 0.3}, 2, **{CRASHED: "loss is NaN"}))
    study.add_trial(_trial(S.WAITING, {"a": 0.2}, 3, system={"failed_trial": 1, "retry_history": [1]}))
    trials = study.get_trials()
    assert [counts_toward_budget(t) for t in trials] == [True, False, True, True]
    budget = StudyBudget(3)
    assert budget.spent(study) and not StudyBudget(4).spent(study)
    # the retry of trial 1 is not a duplicate of it; a new proposal of a finished / crashed config is
    assert find_duplicate(study, trials[3]) is None
    study.add_trial(_trial(S.COMPLETE, {"a": 0.1}, 4))
    study.add_trial(_trial(S.COMPLETE, {"a": 0.3}, 5))
    assert find_duplicate(study, study.trials[4]) == 0 and find_duplicate(study, study.trials[5]) == 2
    # of two running trials of one configuration the later one yields
    study.add_trial(_trial(S.COMPLETE, {"a": 0.9}, 6, **{DUPLICATE_OF: 99}))
    assert not counts_toward_budget(study.trials[6])


class _Acc:
    is_main_process, num_processes = True, 1

    def wait_for_everyone(self):
        pass


def test_a_run_reports_each_validation_and_stops_when_pruned(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    good.report(0.8, 0)
    good.report(0.9, 1)
    study.tell(good, 0.8)
    trial = study.ask()
    monkeypatch.setenv(TRIAL_ENV, json.dumps({"storage": url, "study": "s", "trial_id": trial._trial_id,
                                              "objective": "overall", "step_offset": 0,
                                              "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0}}))
    hook = validation_hook_from_env()
    closed = []
    trainer = types.SimpleNamespace(parts=types.SimpleNamespace(accelerator=_Acc()), out=tmp_path / "run",
                                    state=types.SimpleNamespace(step=17),
                                    log=types.SimpleNamespace(close=lambda: closed.append(1)))
    trainer.out.mkdir()
    hook(trainer, 0, {"overall": 0.85})  # above the median at epoch 0: goes on
    with pytest.raises(SystemExit) as stop:
        hook(trainer, 1, {"overall": 0.1})
    assert stop.value.code == PRUNED_EXIT_CODE and closed
    assert json.loads((trainer.out / PRUNED_MARKER).read_text())["epoch"] == 1
    assert study.trials[1].intermediate_values == {0: 0.85, 1: 0.1}
