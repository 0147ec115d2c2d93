"""The torch.optim side of every method (ft_focal/optim/_wrapping.py): the documented defaults of the
common options, the one-line refusals of a wrong construction, and the state dict restored into a
fresh optimizer, including dicts written before the one-backward rename ("sb_*") or without a
"wrapper" entry (docs/design.md: checkpoints of older runs still resume)."""
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from ft_focal.optim import ERM, SAM, FocalSAM

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_reference import batch, mlp, run  # noqa: E402 (after the sys.path entry it needs)

COUNTS = [100, 30, 8, 3]


def _focal(m, **kwargs):
    return FocalSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1, momentum=0.9, model=m, **kwargs)


def test_the_common_options_default_to_averaged_unsharded_and_a_checked_one_backward_path():
    m = mlp(0)
    opt = _focal(m)
    rt = opt.runtime
    assert (rt.sync_perturbation, rt.sharded, rt.no_sync, rt.scaler, rt.backward_applies_scaler) == \
        (True, False, None, None, False)
    # Focal-SAM's one_backward="auto" with every trainable tensor in a Linear: on, checked at step 1
    assert opt.one_backward is not None and opt.one_backward.validated is False and opt.one_backward_check is True
    assert (opt.last_skipped, opt.last_check_backwards, opt.epoch, opt.num_epochs) == (False, 0, 0, None)
    assert opt.describe_last_passes() == "0F + 0B (forward / backward passes over the batch)"
    assert _focal(m, one_backward=False).one_backward is None
    assert SAM(m.parameters(), torch.optim.SGD, lr=0.1, model=m).one_backward is None   # the wrapper's default
    trusted = _focal(m, one_backward=True, one_backward_check=False)
    assert trusted.one_backward.validated is True and trusted.one_backward_check is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(base=torch.optim.SGD(mlp(0).parameters(), lr=0.1)),
     r"^base_optimizer_cls must be a torch.optim.Optimizer class, got SGD \("),
    (dict(base=dict), r"^base_optimizer_cls must be a torch.optim.Optimizer class, got <class 'dict'>$"),
    (dict(backward_applies_scaler=True),
     r"^backward_applies_scaler=True needs the scaler the backward uses \(scaler=\.\.\.\)$"),
    (dict(one_backward=True, model=None), r"^one_backward=True needs model= \(the nn.Module, for the layer rules\)$"),
    (dict(one_backward="sometimes"), r"^one_backward must be True, False or 'auto', got 'sometimes'$"),
])
def test_a_wrong_construction_is_one_line(kwargs, message):
    kwargs = dict(kwargs)   # the parameter's dict outlives this run (pytest.main called again in one process)
    m = mlp(0)
    base = kwargs.pop("base", torch.optim.SGD)
    kwargs.setdefault("model", m)
    with pytest.raises(ValueError, match=message):
        FocalSAM(m.parameters(), base, class_counts=COUNTS, lr=0.1, **kwargs)


def test_auto_says_once_why_it_keeps_the_exact_path(caplog):
    m = mlp(0)
    m.register_parameter("free", torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)))   # no layer rule
    with caplog.at_level("INFO", logger="ft_focal.optim"):
        opt = _focal(m, one_backward="auto")
    assert opt.one_backward is None
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("one_backward='auto': off (")
    assert caplog.messages[0].endswith("); the exact path runs (same update, one more backward)")


def test_the_old_keyword_names_still_work_with_a_deprecation_warning():
    m = mlp(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _focal(m, single_backward=True, single_backward_check=False)
    assert opt.one_backward is not None and opt.one_backward_check is False
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        "the optimizer keyword single_backward= is now one_backward=",
        "the optimizer keyword single_backward_check= is now one_backward_check="]


def _trained(steps=3):
    x, y = batch()
    m = mlp(0)
    opt = _focal(m, one_backward=True)
    opt.set_epoch(2, 9)
    run(opt, m, x, y, steps)
    opt.one_backward.disabled = "a reason kept across the restart"
    return opt


def test_the_state_dict_restores_counters_epoch_and_one_backward_state_into_a_fresh_optimizer():
    trained = _trained()
    state = trained.state_dict()
    fresh = _focal(mlp(1), one_backward=True)
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == trained.skipped_steps == 0
    assert fresh.pass_counts == trained.pass_counts and fresh.pass_counts["forward"] == 6
    assert (fresh.epoch, fresh.num_epochs) == (2, 9)
    assert fresh.one_backward.validated is True
    assert fresh.one_backward.disabled == "a reason kept across the restart"
    assert fresh.skips_on_device() is False   # not fused; but the base optimizer has stepped:
    assert fresh._base_stepped is True
    momentum = [s["momentum_buffer"] for s in fresh.base_optimizer.state.values()]
    assert len(momentum) == 4 and all(b.abs().sum() > 0 for b in momentum)


def test_a_state_dict_from_before_the_rename_or_without_a_wrapper_entry_loads_with_defaults():
    trained = _trained()
    base = trained.state_dict()["base_optimizer"]
    old = _focal(mlp(1), one_backward=True)
    old.load_state_dict({"base_optimizer": base, "wrapper": {"sb_validated": True, "sb_disabled": "old reason",
                                                             "skipped_steps": 2}})
    assert (old.one_backward.validated, old.one_backward.disabled, old.skipped_steps) == (True, "old reason", 2)
    bare = _focal(mlp(1), one_backward=True)
    bare.one_backward.disabled = "its own reason"
    bare.load_state_dict({"base_optimizer": base})
    assert (bare.skipped_steps, bare.pass_counts, bare.epoch, bare.num_epochs) == \
        (0, {"forward": 0, "backward": 0}, 0, None)
    assert bare.one_backward.validated is False and bare.one_backward.disabled == "its own reason"   # kept
    assert bare.state_dict()["wrapper"]["growth_tracker"] == 0


def test_loading_something_else_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^not a state_dict of an ft_focal optimizer \(no 'base_optimizer' entry\)$"):
        _focal(mlp(0)).load_state_dict(torch.optim.SGD(mlp(0).parameters(), lr=0.1).state_dict())


def test_an_added_param_group_is_stepped_by_the_base_optimizer():
    x, y = batch()
    m = mlp(0)
    extra = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = SAM(list(m.parameters()), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 2
    run(opt, m, x, y, closure=lambda: F.cross_entropy(m(x) + extra, y, reduction="none"))
    assert not torch.equal(extra.detach(), torch.ones(4, dtype=torch.float64))
    erm = ERM(m.parameters(), torch.optim.SGD, lr=0.1)
    assert erm.state is erm.base_optimizer.state
