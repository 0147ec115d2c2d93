"""Recipe loading: types, overrides, unknown keys, one-line errors."""

import pytest
import yaml

from ft_focal.config import Recipe, apply_overrides, load_recipe, parse_override, recipe_from_dict, save_recipe
from ft_focal.errors import UserError


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_name_from_file(tmp_path):
    recipe = load_recipe(write(tmp_path, {"optim": {"name": "sam", "rho": 0.1}}, "my_run.yaml"))
    assert isinstance(recipe, Recipe)
    assert recipe.name == "my_run"
    assert recipe.optim.name == "sam" and recipe.optim.rho == 0.1
    assert recipe.train.batch_size == 128


def test_overrides_convert_types(tmp_path):
    recipe = load_recipe(write(tmp_path, {}), ["optim.lr=5e-4", "train.epochs=3", "data.hflip=false",
                                               "model.pretrained=null", "data.train_crop_scale=[0.5, 1.0]", "seed=7"])
    assert recipe.optim.lr == 5e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.train.epochs == 3 and recipe.data.hflip is False
    assert recipe.model.pretrained is None and recipe.data.train_crop_scale == [0.5, 1.0]
    assert recipe.seed == 7


def test_int_accepted_for_float_but_not_string(tmp_path):
    assert load_recipe(write(tmp_path, {"optim": {"lr": 1}})).optim.lr == 1.0
    with pytest.raises(UserError, match=r"'optim.lr': expected float, got str"):
        load_recipe(write(tmp_path, {"optim": {"lr": "fast"}}))


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(UserError, match=r"unknown recipe key 'optim.lamda'.*did you mean 'optim.lam'"):
        load_recipe(write(tmp_path, {"optim": {"lamda": 0.8}}))
    with pytest.raises(UserError, match=r"unknown recipe key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path, {"trian": {}}))
    with pytest.raises(UserError, match=r"unknown recipe key 'train.epoch'.*'train.epochs'"):
        load_recipe(write(tmp_path, {}), ["train.epoch=3"])


def test_choice_and_cross_field_errors(tmp_path):
    with pytest.raises(UserError, match=r"'optim.name': 'focalsam' is not one of"):
        load_recipe(write(tmp_path, {"optim": {"name": "focalsam"}}))
    with pytest.raises(UserError, match="divisible"):
        load_recipe(write(tmp_path, {"train": {"batch_size": 10, "grad_accum_steps": 3}}))
    with pytest.raises(UserError, match="split_file needs 'data.root'"):
        load_recipe(write(tmp_path, {"data": {"dataset": "split_file", "train_list": "a", "test_list": "b"}}))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(UserError, match="must look like key=value"):
        parse_override("optim.lr")


def test_yaml_safe_load_only(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, {"optim": {"name": "focal_sam", "rho": 0.05, "gamma": 0.5, "lam": 0.8}}))
    save_recipe(recipe, tmp_path / "out" / "recipe.yaml")
    again = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert again == recipe


def test_apply_overrides_does_not_mutate_input():
    raw = {"optim": {"lr": 0.1}}
    apply_overrides(raw, ["optim.lr=0.2"])
    assert raw["optim"]["lr"] == 0.1
    assert recipe_from_dict(apply_overrides(raw, ["optim.lr=0.2"])).optim.lr == 0.2


def test_a_renamed_recipe_key_still_works_with_one_deprecation_line(caplog):
    """optim.single_backward is now optim.one_backward: recipes and overrides written with the old
    name load as before; both names at once are refused."""
    recipe = "recipes/demo/digits_lt_focal_sam.yaml"
    with caplog.at_level("WARNING"):
        loaded = load_recipe(recipe, ["optim.single_backward=true"])
    assert loaded.optim.one_backward is True
    lines = [r.getMessage() for r in caplog.records if "single_backward" in r.getMessage()]
    assert lines == ["recipe key 'optim.single_backward' is now 'optim.one_backward'; the old name still works "
                     "but will be removed"]
    raw = yaml.safe_load(open(recipe))
    raw["optim"]["single_backward"] = False
    with pytest.raises(UserError, match="'optim.single_backward' and 'optim.one_backward' are the same key"):
        recipe_from_dict(raw)
