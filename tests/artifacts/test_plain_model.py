"""`ft_focal.load_model(..., plain=True)`: the RobustBench convention — an
`nn.Module` in eval mode taking RGB in [0, 1], normalising inside, with the class order recorded."""

import pytest
import torch

import ft_focal
from ft_focal.artifacts.plain import PlainClassifier
from ft_focal.artifacts.saved import save_model_dir
from ft_focal.config import ModelConfig, Recipe, TuningConfig
from ft_focal.models import build_classifier, tiny_model_config

NAMES = ["zebra", "apple", "mango"]  # not alphabetical: the order must be the label order


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model_cfg = ModelConfig(**tiny_model_config("open_clip"))
    clf = build_classifier(model_cfg, TuningConfig(method="lora"), len(NAMES), classnames=NAMES).eval()
    preprocess = {**clf.preprocess, "mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 0.125]}
    folder = tmp_path_factory.mktemp("plain") / "final"
    save_model_dir(folder, clf, Recipe(model=model_cfg, tuning=TuningConfig(method="lora")), NAMES, [5, 3, 1], preprocess)
    return folder, clf, preprocess


def test_plain_model_normalises_inside_equal_to_classifier_on_normalised_input(saved):
    folder, clf, pre = saved
    plain = ft_focal.load_model(folder, plain=True)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = clf((x - mean) / std)
        got = plain(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, clf(x).detach(), atol=1e-3)  # it does normalise


def test_plain_model_records_the_class_order_of_the_logits(saved):
    folder, _, _ = saved
    plain = ft_focal.load_model(folder, plain=True)
    assert isinstance(plain, PlainClassifier) and isinstance(plain, torch.nn.Module)
    assert plain.classnames == NAMES and plain.class_counts == [5, 3, 1]
    with torch.no_grad():
        assert plain(torch.rand(2, 3, 32, 32)).shape == (2, len(NAMES))


def test_plain_model_is_in_eval_mode(saved):
    folder, _, _ = saved
    plain = ft_focal.load_model(folder, plain=True)
    assert not plain.training and not any(m.training for m in plain.modules())


def test_plain_model_refuses_another_image_size_in_one_line(saved):
    folder, _, _ = saved
    plain = ft_focal.load_model(folder, plain=True)
    with pytest.raises(ValueError, match=r"expected RGB images \[B, 3, 32, 32\] in \[0, 1\], got \[1, 3, 48, 48\]"):
        plain(torch.rand(1, 3, 48, 48))


def test_plain_model_buffers_follow_dtype_and_do_not_enter_the_state_dict(saved):
    folder, _, _ = saved
    plain = ft_focal.load_model(folder, plain=True)
    assert not any(k in ("mean", "std") for k in plain.state_dict())
    with torch.no_grad():
        out = plain.double()(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64
