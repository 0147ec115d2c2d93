"""The builders called directly (ft_focal/training/builders.py): the LR schedule at its edges, the
recipe's loss keys reaching the loss, and the one-line errors for a bad loss value or tracker.
tests/training/test_recipe_wiring.py checks the same through every shipped recipe's built run."""

import dataclasses
import math
from pathlib import Path

import pytest

from ft_focal.config import load_recipe
from ft_focal.errors import UserError
from ft_focal.training.builders import build_loss_from, check_trackers, lr_lambda

WARMUP, TOTAL = 4, 20


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warm_up_is_linear_from_one_step_and_reaches_the_base_lr_at_its_end(kind):
    factor = lr_lambda(kind, WARMUP, TOTAL)
    assert [factor(s) for s in range(WARMUP)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(WARMUP) == 1.0   # the first update after warm-up: progress 0


def test_cosine_decays_over_the_updates_after_warm_up_to_zero():
    factor = lr_lambda("cosine", WARMUP, TOTAL)
    for step in (5, 9, 12, 17):
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        assert factor(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-15)
    assert factor(TOTAL) == pytest.approx(0.0, abs=1e-15) and factor(TOTAL + 5) == pytest.approx(0.0, abs=1e-15)


def test_linear_decays_to_zero_and_constant_stays_at_one():
    linear, constant = lr_lambda("linear", WARMUP, TOTAL), lr_lambda("constant", WARMUP, TOTAL)
    assert [linear(s) for s in (4, 8, 12, 20, 30)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert [constant(s) for s in (4, 12, 20, 30)] == [1.0, 1.0, 1.0, 1.0]


def test_without_warm_up_the_first_update_is_at_the_base_lr():
    assert lr_lambda("cosine", 0, 10)(0) == 1.0 and lr_lambda("linear", 0, 10)(5) == 0.5
    assert lr_lambda("linear", 0, 1)(0) == 1.0 and lr_lambda("linear", 0, 1)(1) == 0.0   # one update: no division by 0


def _recipe(**loss):
    recipe = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "digits_lt_focal_sam.yaml"))
    return dataclasses.replace(recipe, loss=dataclasses.replace(recipe.loss, **loss))


def test_the_recipes_loss_keys_reach_the_loss_and_unset_ones_keep_the_defaults():
    loss = build_loss_from(_recipe(name="vs", vs_gamma=0.2, vs_tau=None), [50, 10, 5])
    assert (loss.gamma, loss.tau) == (0.2, 0.75)
    loss = build_loss_from(_recipe(name="focal", focal_gamma=1.0), [50, 10, 5])
    assert loss.gamma == 1.0


def test_a_bad_loss_value_is_one_line_naming_the_section():
    with pytest.raises(UserError, match=r"^recipe section 'loss': max_m must be >= 0, got -1.0$"):
        build_loss_from(_recipe(name="ldam", max_m=-1.0), [50, 10, 5])


def test_trackers_unknown_or_not_installed_are_one_line_and_known_ones_pass_once():
    with pytest.raises(UserError, match=r"^recipe key 'train.log_with': unknown tracker 'nope' \(valid: "):
        check_trackers(["nope"])
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - available)
    if missing:
        with pytest.raises(UserError, match=rf"^recipe key 'train.log_with': tracker '{missing[0]}' is not installed"):
            check_trackers([missing[0]])
    if available:
        name = sorted(available)[0]
        assert check_trackers([name, name]) == [name]
    assert check_trackers([]) == []
