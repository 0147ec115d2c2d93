"""The method and loss registries are the one place their facts are written: everything else reads them."""

import dataclasses
import typing

import pytest

from ft_focal import config
from ft_focal.artifacts import card
from ft_focal.losses import LOSSES, RECIPE_LOSSES, loss_kwargs
from ft_focal.optim import OPTIMIZERS, RECIPE_KEYS, build_optimizer, optimizer_kwargs
from ft_focal.optim.registry import METHODS, MethodInfo
from ft_focal.training.builders import LOSS_KEYS, METHOD_KEYS


def test_method_info_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["sam"].name = "x"  # type: ignore[misc]
    assert isinstance(METHODS["focal_sam"], MethodInfo)


def test_everything_reads_the_method_registry():
    assert config.CHOICES["optim.name"] == tuple(METHODS)
    assert OPTIMIZERS == {name: info.cls for name, info in METHODS.items()}
    assert METHOD_KEYS == RECIPE_KEYS
    assert card.METHOD_KEYS[: len(RECIPE_KEYS)] == RECIPE_KEYS


def test_recipe_keys_are_the_optim_fields_in_order_and_what_each_class_takes():
    fields = [f.name for f in dataclasses.fields(config.OptimConfig)]
    assert [k for k in fields if k in RECIPE_KEYS] == list(RECIPE_KEYS)
    for name, info in METHODS.items():
        assert set(info.recipe_keys) == set(optimizer_kwargs(name)) & set(RECIPE_KEYS), name


def test_one_name_per_method_module_and_citation():

    for name, info in METHODS.items():
        module = "sam" if name == "asam" else name
        assert info.cls.__module__ == f"ft_focal.optim.{module}", name
        if name != "erm":
            assert name in info.cite and all(METHODS[key].bibtex.startswith("@") for key in info.cite), name


def test_every_method_builds_from_its_registry_entry():
    import torch

    model = torch.nn.Linear(3, 2)
    for name in METHODS:
        extra = {"classifier_params": list(model.parameters())} if name == "ccsam" else {}
        opt = build_optimizer(name, list(model.parameters()), [5, 1], lr=0.1, **extra)
        assert isinstance(opt, METHODS[name].cls)
        for key, value in METHODS[name].fixed.items():
            assert opt.param_groups[0].get(key, getattr(opt, key, value)) == value


def test_loss_registry_matches_the_recipe():
    hints = typing.get_type_hints(config.LossConfig)
    assert config.CHOICES["loss.name"] == RECIPE_LOSSES
    for name in RECIPE_LOSSES:
        info = LOSSES[name]
        assert LOSS_KEYS[name] == tuple(k for k, _ in info.recipe_keys)
        for key, kwarg in info.recipe_keys:
            assert key in hints and kwarg in loss_kwargs(name), (name, key)
