"""Head initialisations beyond one text prompt: class means (LIFT) and prompt
ensembles, with values computed by hand."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ft_focal.config import ModelConfig, TuningConfig, recipe_from_dict
from ft_focal.errors import UserError
from ft_focal.models import build_classifier, tiny_model_config
from ft_focal.models.head_init import class_feature_sums, class_mean_weights, init_head_from_class_means, text_head_weights


def _tiny_clf(family: str, num_classes: int, seed: int = 0, **model_kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**tiny_model_config(family), **model_kw})
    names = [f"class_{i}" for i in range(num_classes)]
    return build_classifier(cfg, TuningConfig(method="head"), num_classes, classnames=names)


def test_class_mean_weights_are_normalised_means_of_unit_features_by_hand():
    # class 0: (3, 4) -> (0.6, 0.8) and (0, 2) -> (0, 1); mean (0.3, 0.9) -> (1, 3) / sqrt(10)
    # class 1: (-5, 0) -> (-1, 0)
    feats = torch.tensor([[3.0, 4.0], [-5.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 0])
    sums, counts = class_feature_sums(lambda x: x, [(feats, labels)], 2, torch.device("cpu"))
    weights = class_mean_weights(sums, counts)
    assert counts.tolist() == [2, 1]
    expected = torch.tensor([[1 / math.sqrt(10), 3 / math.sqrt(10)], [-1.0, 0.0]])
    torch.testing.assert_close(weights, expected, atol=1e-7, rtol=0)


def test_class_mean_head_equals_per_image_backbone_means_on_a_tiny_vit():
    clf = _tiny_clf("hf_vit", 3, head_init="class_mean").eval()
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 2, 0, 1, 2])
    init_head_from_class_means(clf, TensorDataset(images, labels), batch_size=2)
    with torch.no_grad():  # one image at a time: no batching shared with the code under test
        unit = [F.normalize(clf.backbone(images[i:i + 1])[0], dim=-1) for i in range(5)]
    expected = torch.stack([F.normalize((unit[0] + unit[2]) / 2, dim=-1), unit[3],
                            F.normalize((unit[1] + unit[4]) / 2, dim=-1)])
    torch.testing.assert_close(clf.head.weight.detach(), expected, atol=1e-5, rtol=0)
    # and the cosine logits of an image of class 1 (its class's only image) peak at scale
    assert clf(images[3:4])[0, 1].item() == pytest.approx(clf.head.scale, abs=1e-3)


def test_class_mean_keeps_the_initial_row_of_a_class_without_images_and_warns(caplog):
    clf = _tiny_clf("hf_vit", 3, head_init="class_mean")
    before = clf.head.weight.detach().clone()
    images = torch.rand(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        counts = init_head_from_class_means(clf, TensorDataset(images, torch.tensor([0, 2])), ["a", "b", "c"])
    assert counts.tolist() == [1, 0, 1]
    torch.testing.assert_close(clf.head.weight[1].detach(), before[1], atol=0, rtol=0)
    assert not torch.equal(clf.head.weight[0].detach(), before[0])
    assert "1 of 3 classes have no training image (e.g. 'b')" in caplog.text


def _fake_encoder(table: dict):
    def encode(prompts):
        return F.normalize(torch.tensor([table[p] for p in prompts], dtype=torch.float32), dim=-1)
    return encode


def test_prompt_ensemble_averages_unit_embeddings_then_renormalises_by_hand():
    table = {"a photo of a sea lion.": [1.0, 0.0, 0.0], "a sketch of a sea lion.": [0.0, 3.0, 0.0],
             "a photo of a cat.": [0.0, 0.0, 2.0], "a sketch of a cat.": [0.0, 0.0, 5.0]}
    weights = text_head_weights(_fake_encoder(table), ["sea_lion", "cat"],
                                ["a photo of a {}.", "a sketch of a {}."])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(weights, torch.tensor([[r, r, 0.0], [0.0, 0.0, 1.0]]), atol=1e-7, rtol=0)


def test_single_template_string_gives_the_encoder_output_unchanged():
    table = {"a photo of a cat.": [0.0, 3.0, 4.0], "a photo of a dog.": [1.0, 0.0, 0.0]}
    weights = text_head_weights(_fake_encoder(table), ["cat", "dog"], "a photo of a {}.")
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]]), atol=1e-7, rtol=0)


def test_build_classifier_with_a_template_list_equals_the_mean_of_single_template_heads():
    one = _tiny_clf("open_clip", 3, prompt_template="a photo of a {}.").head.weight.detach()
    two = _tiny_clf("open_clip", 3, prompt_template="a drawing of the {}").head.weight.detach()
    both = _tiny_clf("open_clip", 3, prompt_template=["a photo of a {}.", "a drawing of the {}"])
    torch.testing.assert_close(both.head.weight.detach(), F.normalize(one + two, dim=-1), atol=1e-6, rtol=0)
    assert both.head_init_used == "text"


@pytest.mark.parametrize("value, message", [
    ("a photo", "recipe key 'model.prompt_template'"),
    ([], "recipe key 'model.prompt_template'"),
    (["a {}.", 3], "recipe key 'model.prompt_template'"),
    (7, "recipe key 'model.prompt_template'"),
])
def test_bad_prompt_template_is_one_line_naming_the_key(value, message):
    with pytest.raises(UserError) as info:
        recipe_from_dict({"model": {"prompt_template": value}})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_prompt_template_list_and_class_mean_are_valid_recipe_values():
    recipe = recipe_from_dict({"model": {"prompt_template": ["a {}.", "a photo of a {}."], "head_init": "class_mean"}})
    assert recipe.model.prompt_template == ["a {}.", "a photo of a {}."] and recipe.model.head_init == "class_mean"


def test_unknown_head_init_names_the_key_and_lists_class_mean():
    with pytest.raises(UserError, match=r"'model.head_init': 'mean' is not one of text, class_mean, random"):
        recipe_from_dict({"model": {"head_init": "mean"}})
