"""model.family: timm: tiny random-init timm ViTs (and EVA-02 / SigLIP at tiny sizes) with the four
tuning methods, weights from a local safetensors file, preprocessing from timm's pretrained_cfg,
and the one-backward Focal-SAM step on them. Everything offline, nothing downloaded."""

import copy
import logging
import os
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from ft_focal.config import CHOICES, ModelConfig, TuningConfig
from ft_focal.errors import UserError
from ft_focal.models import AdaptFormerMLP, build_classifier, default_lora_targets, preprocess_for, tiny_model_config
from ft_focal.models.classifier import tiny_variant

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "optim"))
from test_one_backward import MODEL_COUNTS as COUNTS  # noqa: E402 (after the sys.path entry it needs)
from test_one_backward import assert_one_backward_matches_exact  # noqa: E402 (after the sys.path entry it needs)

C = 5
TINY = tiny_model_config("timm")["config"]
EVA = "eva02_base_patch14_224.mim_in22k"
SIGLIP = "vit_base_patch16_siglip_224"


def timm_cfg(name=None, **kw):
    """The tiny timm config; `name` keeps the tiny sizes with another timm architecture."""
    cfg = tiny_model_config("timm")
    if name:
        cfg["name"] = name
    return ModelConfig(**{**cfg, **kw})


def build(method="head", name=None, seed=0, model_kw=None, **tuning_kw):
    torch.manual_seed(seed)
    return build_classifier(timm_cfg(name, **(model_kw or {})), TuningConfig(method=method, **tuning_kw), C)


def images(n=3, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_timm_is_a_model_family_choice_with_block_lora_targets():
    assert "timm" in CHOICES["model.family"]
    assert default_lora_targets("timm") == ["qkv", "q_proj", "k_proj", "v_proj", "proj", "fc1", "fc1_g", "fc1_x",
                                            "fc2"]


def test_feature_is_timm_pooled_pre_logits():
    clf = build("head").eval()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).eval()
    ref.load_state_dict(clf.backbone.model.state_dict())
    x = images()
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.equal(clf.features(x), want)
        assert torch.equal(clf.features(x), ref(x))  # num_classes=0: forward is the pre-logits feature
    assert clf.feature_dim == 32 and clf(x).shape == (3, C)


@pytest.mark.parametrize("name,size,mean,interp", [
    ("vit_base_patch16_clip_224.openai", 224, [0.48145466, 0.4578275, 0.40821073], "bicubic"),
    ("vit_base_patch16_224.augreg_in21k", 224, [0.5, 0.5, 0.5], "bicubic"),
    ("vit_base_patch16_siglip_224", 224, [0.5, 0.5, 0.5], "bicubic"),
    (EVA, 224, [0.48145466, 0.4578275, 0.40821073], "bicubic"),
    ("vit_base_patch14_dinov2", 518, [0.485, 0.456, 0.406], "bicubic"),
])
def test_preprocess_of_the_real_architectures_from_the_pretrained_cfg(name, size, mean, interp):
    pre = preprocess_for(ModelConfig(family="timm", name=name, head_init="random"))  # meta device: no weights
    assert pre["image_size"] == size and pre["interpolation"] == interp
    assert pre["mean"] == pytest.approx(mean)


def test_preprocess_follows_img_size_and_the_preprocess_override():
    pre = preprocess_for(ModelConfig(family="timm", name="vit_base_patch14_dinov2", config={"img_size": 224}))
    assert pre["image_size"] == 224 and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    pre = preprocess_for(timm_cfg(config={**TINY, "preprocess_cfg": {"mean": [0.1] * 3, "interpolation": "bilinear"}}))
    assert pre == {"image_size": 32, "mean": [0.1] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}


@pytest.mark.parametrize("method", ["full", "head", "lora", "adaptformer"])
def test_tuning_methods_train_only_their_parameters(method):
    clf = build(method, lora_rank=2)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    backbone = {n for n in trainable if n.startswith("backbone.")}
    assert {"head.weight"} <= trainable
    if method == "full":
        assert all(p.requires_grad for p in clf.parameters())
    elif method == "head":
        assert backbone == set()
    elif method == "lora":
        assert backbone and all(".lora_" in n for n in backbone)
    else:
        assert backbone and all(".adapter." in n for n in backbone)
    loss = clf(images()).logsumexp(-1).sum()
    loss.backward()
    assert all(clf.get_parameter(n).grad is not None for n in trainable)


@pytest.mark.parametrize("name,wrapped", [
    (None, {"qkv", "proj", "fc1", "fc2"}),
    (SIGLIP, {"qkv", "proj", "fc1", "fc2"}),  # not the attention-pool head's proj / fc1 / fc2
    (EVA, {"q_proj", "k_proj", "v_proj", "proj", "fc1_g", "fc1_x", "fc2"}),
])
def test_lora_wraps_the_block_linears_only(name, wrapped):
    clf = build("lora", name=name, lora_rank=2)
    layers = {n for n, m in clf.backbone.named_modules() if hasattr(m, "lora_A")}
    assert layers and all(n.startswith("model.blocks.") for n in layers)
    assert {n.rsplit(".", 1)[-1] for n in layers} == wrapped
    assert len(layers) == 2 * len(wrapped)  # every block (depth 2)


def test_lora_on_eva_fused_qkv_with_separate_biases_is_not_bypassed():
    """EVA's fused qkv with q / v biases runs F.linear(x, qkv.weight) by default: LoRA would train nothing."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    eva = Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_fused=True, qkv_bias=True,
              num_classes=0).eval()
    ref = copy.deepcopy(eva)
    from ft_focal.models.backbones.timm import TimmBackbone
    from ft_focal.models.tuning import apply_lora

    backbone = TimmBackbone(eva)
    apply_lora(backbone, "timm", TuningConfig(method="lora", lora_rank=2))
    assert all(b.attn.qkv_bias_separate for b in eva.blocks)
    x = images()
    with torch.no_grad():  # lora_B = 0: the separate-bias form is the same function
        torch.testing.assert_close(backbone(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
    with torch.no_grad():  # and a trained qkv adapter changes the feature: it is on the call path
        before = backbone(x)
        for block in eva.blocks:
            block.attn.qkv.lora_B["default"].weight.normal_(0, 0.1)
        assert not torch.allclose(before, backbone(x))


@pytest.mark.parametrize("name", [None, EVA, SIGLIP])
@pytest.mark.parametrize("adapter_norm", ["shared", "own"])
def test_adaptformer_on_timm_blocks_starts_as_the_frozen_backbone(name, adapter_norm):
    plain = build("head", name=name).eval()
    clf = build("adaptformer", name=name, adapter_norm=adapter_norm, adapter_bottleneck=4).eval()
    blocks = clf.backbone.model.blocks
    assert all(isinstance(b.mlp, AdaptFormerMLP) for b in blocks)
    assert all(isinstance(b.norm2, torch.nn.Identity) == (adapter_norm == "own") for b in blocks)
    x = images()
    with torch.no_grad():  # up = 0 at init
        torch.testing.assert_close(clf.features(x), plain.features(x))
        blocks[0].mlp.up.weight.normal_()
        assert not torch.allclose(clf.features(x), plain.features(x))


def test_head_init_text_falls_back_to_random_without_a_text_tower(caplog):
    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        clf = build_classifier(timm_cfg(head_init="text"), TuningConfig(method="head"), C, [f"c{i}" for i in range(C)])
    assert "no text tower" in caplog.text and clf(images()).shape == (3, C)


@pytest.mark.parametrize("method", ["full", "lora", "adaptformer"])
def test_rebuild_config_gives_the_same_parameter_names_without_files(method):
    clf = build(method, name=EVA, lora_rank=2)
    again = build_classifier(clf.rebuild_config, TuningConfig(method=method, lora_rank=2), C, load_weights=False)
    assert again.rebuild_config.name == EVA
    assert list(again.state_dict()) == list(clf.state_dict())
    again.load_state_dict(clf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images()), clf.eval()(images()))


# ------------------------------------------------------------------------------ weights file


def _save_timm_file(tmp_path, name="vit_tiny_patch16_224", num_classes=10, seed=3):
    """A timm-format file as the hub's model.safetensors: the backbone plus the file's own classifier."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **TINY).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model.reset_classifier(0)
    return path, model


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", EVA])
def test_weights_from_a_local_safetensors_file_round_trip(tmp_path, name):
    path, ref = _save_timm_file(tmp_path, name)
    x = images()
    for given in (path, tmp_path):  # the file, or a folder holding model.safetensors (hub snapshot layout)
        clf = build("lora", name=name, model_kw={"pretrained": str(given)}, lora_rank=2).eval()
        with torch.no_grad():
            torch.testing.assert_close(clf.features(x), ref(x), rtol=0, atol=0)


def test_weights_round_trip_through_model_pretrained_of_a_saved_backbone(tmp_path):
    clf = build("full", seed=1).eval()
    path = tmp_path / "backbone.safetensors"
    save_file(clf.backbone.model.state_dict(), str(path))
    loaded = build("head", seed=2, model_kw={"pretrained": str(path)}).eval()
    assert all(torch.equal(a, b) for a, b in zip(loaded.backbone.state_dict().values(),
                                                  clf.backbone.state_dict().values(), strict=True))


def test_pretrained_dinov2_style_file_is_resampled_to_the_model_img_size(tmp_path):
    torch.manual_seed(0)
    big = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0,
                            **{**TINY, "img_size": 64})  # pos_embed for an 8x8 grid
    save_file(big.state_dict(), str(tmp_path / "w.safetensors"))
    clf = build("head", name="vit_base_patch14_dinov2", model_kw={"pretrained": str(tmp_path / "w.safetensors")})
    assert clf.backbone.model.pos_embed.shape[1] == 1 + 4 * 4 and clf.preprocess["image_size"] == 32


def test_pretrained_errors_are_one_line_and_name_the_key(tmp_path):
    def fails(**model_kw):
        with pytest.raises(UserError) as info:
            build("head", model_kw=model_kw)
        msg = str(info.value)
        assert "\n" not in msg
        return msg

    assert fails(pretrained=str(tmp_path / "none.safetensors")).startswith("model.pretrained: file not found")
    (tmp_path / "w.pth").write_bytes(b"x")
    assert "not a .safetensors file" in fails(pretrained=str(tmp_path / "w.pth"))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert fails(pretrained=str(tmp_path / "bad.safetensors")).startswith("model.pretrained: cannot read")
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "partial.safetensors"))
    msg = fails(pretrained=str(tmp_path / "partial.safetensors"))
    assert msg.startswith("model.pretrained:") and "1 missing keys (e.g. blocks.1.mlp.fc2.weight)" in msg
    assert "1 unexpected keys (e.g. extra.weight)" in msg
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY, "embed_dim": 64})
    save_file(wide.state_dict(), str(tmp_path / "wide.safetensors"))
    assert "does not fit timm model" in fails(pretrained=str(tmp_path / "wide.safetensors"))


def test_bad_name_and_config_name_their_key():
    with pytest.raises(UserError, match=r"^model.name: 'no_such_vit' is not a timm model"):
        build_classifier(timm_cfg("no_such_vit"), TuningConfig(method="head"), C)
    with pytest.raises(UserError, match=r"^model.config: not valid kwargs for timm model"):
        build_classifier(timm_cfg(config={"no_such_kwarg": 1}), TuningConfig(method="head"), C)
    with pytest.raises(UserError, match=r"^model.name: timm model 'resnet18' is not a ViT"):
        build_classifier(timm_cfg("resnet18", config={}), TuningConfig(method="head"), C)


def test_tiny_variant_keeps_the_timm_architecture_when_it_can():
    for name in (EVA, SIGLIP, "vit_base_patch14_dinov2"):
        assert tiny_variant(ModelConfig(family="timm", name=name)).name == name
    assert tiny_variant(ModelConfig(family="timm", name="resnet18")).name == "vit_tiny_patch16_224"


def test_tiny_variant_swap_is_logged_and_the_dry_run_plan_records_it(caplog):
    from ft_focal.commands.dry_run import format_plan

    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        assert tiny_variant(ModelConfig(family="timm", name="resnet18")).name == "vit_tiny_patch16_224"
    swap = [r.getMessage() for r in caplog.records if "instead" in r.getMessage()]
    assert len(swap) == 1 and "'resnet18'" in swap[0] and "vit_tiny_patch16_224" in swap[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        tiny_variant(ModelConfig(family="timm", name=EVA))
    assert not caplog.records   # no swap, no line
    plan = {"recipe": "r", "dry_run_updates": 2, "dry_run_pass_counts": {}, "family": "timm", "model": "resnet18",
            "weights": None, "tuning": "head", "parameters": None, "optimizer": "erm", "classes": 3,
            "train_images": None, "updates_per_epoch": None, "missing_paths": [],
            "dry_run_model": "vit_tiny_patch16_224", "dry_run_model_swapped": True}
    assert "vit_tiny_patch16_224 ran INSTEAD of a tiny resnet18" in format_plan(plan)


# ------------------------------------------------------------------------- one backward


@pytest.mark.parametrize("name,method,backward", [
    (None, "lora", 2), (None, "adaptformer", 2), (None, "head", 2), (EVA, "lora", 2), (EVA, "adaptformer", 2),
    (SIGLIP, "lora", 2),
    (None, "full", 3),  # cls / position embeddings and the patch Conv2d have no rule: the exact path
])
def test_one_backward_equals_default_on_timm(name, method, backward):
    """One-backward Focal-SAM on timm LoRA / AdaptFormer / head: the default path's update to 1e-9
    in float64, at SAM's 2 forward + 2 backward passes (full tuning: the same update in 2F + 3B)."""
    torch.manual_seed(0)
    model = build_classifier(timm_cfg(name), TuningConfig(method=method, lora_rank=4), len(COUNTS)).double()
    assert_one_backward_matches_exact(model, backward)
