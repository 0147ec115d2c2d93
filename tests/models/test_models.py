"""ft_focal.models: tiny random-init backbones of the three families x four tuning methods."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.errors import UserError
from ft_focal.models import (
    AdaptFormerMLP,
    CosineHead,
    ImageClassifier,
    build_classifier,
    default_lora_targets,
    tiny_model_config,
    tiny_variant,
)
from ft_focal.models.backbones import default_bottleneck

FAMILIES = ["open_clip", "hf_clip", "hf_vit"]
METHODS = ["full", "head", "lora", "adaptformer"]
C = 5
NAMES = [f"class_{i}" for i in range(C)]


def tiny(family, **kw):
    return ModelConfig(**{**tiny_model_config(family), **kw})


def build(family, method="head", seed=0, model_kw=None, classnames=NAMES, **tuning_kw):
    torch.manual_seed(seed)
    clf = build_classifier(tiny(family, **(model_kw or {})), TuningConfig(method=method, **tuning_kw), C,
                           classnames=classnames)
    return clf.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def trainable_names(clf):
    return {n for n, p in clf.named_parameters() if p.requires_grad}


def _perturb(clf, pattern):
    with torch.no_grad():
        for n, p in clf.named_parameters():
            if pattern in n:
                p.normal_(0, 0.5)


# --------------------------------------------------------------------------- shapes and trainable sets


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_forward_shape_and_trainable_set(family, method, images):
    clf = build(family, method)
    assert isinstance(clf, ImageClassifier)
    logits = clf(images)
    assert logits.shape == (3, C)
    assert clf.features(images).shape == (3, 64)
    names = trainable_names(clf)
    head = {"head." + n for n, _ in clf.head.named_parameters()}
    assert head <= names
    rest = names - head
    if method == "full":
        assert rest == {"backbone." + n for n, _ in clf.backbone.named_parameters()}
    elif method == "head":
        assert rest == set()
    elif method == "lora":
        assert rest and all(".lora_A." in n or ".lora_B." in n for n in rest)
    else:
        assert rest and all(n.rsplit(".", 2)[-2] in ("down", "up") or n.endswith(".scale") for n in rest)
    counts = clf.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for p in clf.parameters() if p.requires_grad)
    assert 0 < counts["trainable"] <= counts["total"]
    assert clf.describe().startswith("trainable ") and "/ total " in clf.describe()
    # gradients reach every trainable parameter
    clf.train()
    clf(images).logsumexp(-1).sum().backward()
    missing = [n for n, p in clf.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocess_dict(family):
    clf = build(family)
    pre = clf.preprocess
    assert set(pre) == {"image_size", "mean", "std", "interpolation"}
    assert pre["image_size"] == 32 and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    if family == "hf_vit":
        assert pre["mean"] == [0.5, 0.5, 0.5]
    else:
        assert pre["mean"][0] == pytest.approx(0.48145466) and pre["interpolation"] == "bicubic"


def test_train_head_false_freezes_head():
    clf = build("hf_vit", "lora", train_head=False)
    assert not any(p.requires_grad for p in clf.head.parameters())
    with pytest.raises(UserError, match="tuning.train_head"):
        build("hf_vit", "head", train_head=False)


# --------------------------------------------------------------------------- features


def test_open_clip_feature_is_cls_after_ln_post_without_proj(images):
    import open_clip

    clf = build("open_clip", "head")
    torch.manual_seed(0)
    ref = open_clip.CLIP(**tiny_model_config("open_clip")["config"]).eval()
    with torch.no_grad():
        full = ref.visual(images)  # pooled @ proj
        ref.visual.proj, proj = None, ref.visual.proj
        pooled = ref.visual(images)
    feats = clf.features(images)
    torch.testing.assert_close(feats, pooled)
    torch.testing.assert_close(feats @ proj, full)
    assert "backbone.visual.proj" not in clf.state_dict()


def test_hf_features_follow_transformers(images):
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    clf = build("hf_clip")
    torch.manual_seed(0)
    ref = CLIPVisionModel(CLIPVisionConfig(**tiny_model_config("hf_clip")["config"])).eval()
    torch.testing.assert_close(clf.features(images), ref(pixel_values=images).pooler_output)
    clf = build("hf_vit")
    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(**tiny_model_config("hf_vit")["config"]), add_pooling_layer=False).eval()
    torch.testing.assert_close(clf.features(images), ref(pixel_values=images).last_hidden_state[:, 0])


# --------------------------------------------------------------------------- heads


def test_cosine_head_bounded_by_scale(images):
    clf = build("hf_vit", "head", model_kw={"head_scale": 7.0})
    assert isinstance(clf.head, CosineHead)
    logits = clf(images * 100)
    assert logits.abs().max() <= 7.0 + 1e-4
    feats = clf.features(images)
    manual = 7.0 * F.normalize(feats, dim=-1) @ F.normalize(clf.head.weight, dim=-1).t()
    torch.testing.assert_close(clf(images), manual)


def test_linear_head(images):
    clf = build("hf_clip", "head", model_kw={"head": "linear"})
    assert isinstance(clf.head, torch.nn.Linear) and clf.head.out_features == C
    torch.testing.assert_close(clf(images), clf.head(clf.features(images)))


def test_text_init_matches_manual_open_clip():
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    names = ["golden_retriever", "tabby cat", "red_fox", "x", "sea_lion"]
    clf = build("open_clip", "adaptformer", classnames=names)
    torch.manual_seed(0)
    cfg = tiny_model_config("open_clip")["config"]
    ref = open_clip.CLIP(**cfg).eval()
    tok = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    prompts = [f"a photo of a {n.replace('_', ' ')}." for n in names]
    with torch.no_grad():
        text = F.normalize(ref.encode_text(tok(prompts)), dim=-1)
        expected = F.normalize(text @ ref.visual.proj.t(), dim=-1)
    torch.testing.assert_close(clf.head.weight.detach(), expected, atol=1e-6, rtol=1e-5)
    # the text tower is not part of the classifier
    assert not any(k.startswith(("text", "token_embedding")) or ".text." in k for k in clf.state_dict())
    assert all(k.startswith(("backbone.visual.", "head.")) for k in clf.state_dict())


def test_text_init_impossible_warns_and_uses_random(caplog):
    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        clf = build("hf_vit", "head", model_kw={"head_init": "text"})
    assert "head_init=text is not possible" in caplog.text
    assert clf.head.weight.abs().sum() > 0
    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        build("open_clip", "head", classnames=None)
    assert "no class names" in caplog.text
    with pytest.raises(UserError, match="3 names for 5 classes"):
        build("open_clip", "head", classnames=["a", "b", "c"])


# --------------------------------------------------------------------------- PEFT behaviour


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_changes_logits_and_merges(family, images):
    clf = build(family, "lora")
    base = build(family, "head")
    with torch.no_grad():
        torch.testing.assert_close(clf(images), base(images))  # B = 0 at init
        _perturb(clf, "lora_B")
        lora_logits = clf(images)
    assert (lora_logits - base(images)).abs().max() > 1e-3
    # every LoRA weight, MultiheadAttention ones included, influences the output
    for name, p in clf.named_parameters():
        if "lora_" in name:
            p.grad = None
    clf(images).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in clf.named_parameters() if "lora_" in n)
    peft_sd = clf.lora_state_dict()
    assert peft_sd and all("lora_" in k and ".default." not in k for k in peft_sd)
    merged = clf.merge_lora()
    assert merged is clf and clf.lora_merged
    assert not any("lora_" in k or "base_layer" in k for k in clf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clf(images), lora_logits, atol=1e-5, rtol=1e-5)
    # the merged model has exactly the names of a plain (head-tuned) model
    assert set(clf.state_dict()) == set(base.state_dict())


def test_lora_default_targets():
    assert default_lora_targets("open_clip") == ["attn", "c_fc", "c_proj"]
    assert default_lora_targets("hf_clip") == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    assert default_lora_targets("hf_vit") == ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    for family in FAMILIES:
        clf = build(family, "lora")
        wrapped = {n.rsplit(".", 1)[-1] for n, m in clf.backbone.named_modules() if hasattr(m, "lora_A")}
        expected = set(default_lora_targets(family)) | ({"out_proj"} if family == "open_clip" else set())
        assert wrapped == expected


def test_lora_bad_targets_are_user_errors():
    with pytest.raises(UserError, match="tuning.lora_targets"):
        build("hf_vit", "lora", lora_targets=["no_such_module"])
    # out_proj of nn.MultiheadAttention is never called by its forward: refuse instead of training nothing
    with pytest.raises(UserError, match="out_proj"):
        build("open_clip", "lora", lora_targets=["out_proj"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("adapter_norm", ["shared", "own"])
def test_adaptformer_starts_as_frozen_backbone_and_adapter_changes_logits(family, adapter_norm, images):
    clf = build(family, "adaptformer", adapter_norm=adapter_norm, adapter_scale_init=0.5)
    base = build(family, "head")
    wrappers = [m for m in clf.modules() if isinstance(m, AdaptFormerMLP)]
    assert len(wrappers) == 2
    for w in wrappers:
        assert isinstance(w.down, torch.nn.Linear) and isinstance(w.up, torch.nn.Linear)
        assert w.down.out_features == 1 and float(w.scale.detach()) == 0.5
        assert (w.adapter_norm is not None) == (adapter_norm == "own")
    with torch.no_grad():
        torch.testing.assert_close(clf(images), base(images))
        _perturb(clf, ".up.")
        assert (clf(images) - base(images)).abs().max() > 1e-3
    trainable = {n for n in trainable_names(clf) if not n.startswith("head.")}
    kinds = {n.rsplit(".", 2)[-2] if not n.endswith("scale") else "scale" for n in trainable}
    assert kinds == ({"down", "up", "scale", "adapter_norm"} if adapter_norm == "own" else {"down", "up", "scale"})


def test_adaptformer_bottleneck():
    assert default_bottleneck(1000) == 32
    assert default_bottleneck(8142) == 256
    assert default_bottleneck(365) == 8
    assert default_bottleneck(10) == 1
    clf = build("hf_clip", "adaptformer", adapter_bottleneck=3)
    assert all(m.down.out_features == 3 for m in clf.modules() if isinstance(m, AdaptFormerMLP))


# --------------------------------------------------------------------------- rebuild without weights


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_rebuild_without_weights_reproduces_logits(family, method, images):
    clf = build(family, method)
    _perturb(clf, "lora_B")
    _perturb(clf, ".up.")
    sd = clf.state_dict()
    torch.manual_seed(123)  # a different random init
    again = build_classifier(tiny(family), TuningConfig(method=method), C, load_weights=False).eval()
    assert list(again.state_dict()) == list(sd)
    again.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(again(images), clf(images))
    if method != "adaptformer":
        return
    # rebuild_config carries the resolved architecture and no weights
    rc = clf.rebuild_config
    assert rc.pretrained is None and rc.family == family and rc.config
    third = build_classifier(rc, TuningConfig(method=method), C, load_weights=False).eval()
    third.load_state_dict(sd)
    assert third.preprocess == clf.preprocess
    with torch.no_grad():
        assert torch.equal(third(images), clf(images))


# --------------------------------------------------------------------------- weights on disk


def _tiny_open_clip_state(seed=7):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**tiny_model_config("open_clip")["config"]).state_dict()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_clip_pretrained_file(tmp_path, fmt, images):
    sd = _tiny_open_clip_state()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    clf = build("open_clip", "lora", model_kw={"pretrained": str(path)})
    got = clf.backbone.visual.state_dict()
    for key, value in sd.items():
        if key.startswith("visual.") and key != "visual.proj":
            name = key[len("visual."):]
            name = {  # peft renames the wrapped layers
                n.replace(".base_layer", ""): n for n in got
            }.get(name, name)
            assert torch.equal(got[name], value), key
    # rebuilding with load_weights=False does not need the file
    path.unlink()
    again = build_classifier(tiny("open_clip", pretrained=str(path)), TuningConfig(method="lora"), C,
                             load_weights=False)
    again.load_state_dict(clf.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(images), clf(images))


def test_open_clip_local_dir(tmp_path):
    from safetensors.torch import save_file

    sd = _tiny_open_clip_state(seed=3)
    cfg = tiny_model_config("open_clip")["config"]
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    ))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "open_clip_model.safetensors"))
    clf = build("open_clip", "head", model_kw={"name": "mine", "config": None, "pretrained": f"local-dir:{tmp_path}"})
    assert torch.equal(clf.backbone.visual.conv1.weight, sd["visual.conv1.weight"])
    assert clf.preprocess["mean"] == [0.1, 0.2, 0.3] and clf.preprocess["image_size"] == 32


@pytest.mark.parametrize("family,pretrained", [
    ("open_clip", "/nonexistent/dir/clip.pt"),
    ("open_clip", "local-dir:/nonexistent/clipdir"),
    ("hf_clip", "/nonexistent/hfclip"),
    ("hf_vit", "/nonexistent/hfvit"),
])
def test_missing_pretrained_is_user_error(family, pretrained):
    with pytest.raises(UserError) as err:
        build(family, "head", model_kw={"pretrained": pretrained})
    path = pretrained.split("local-dir:")[-1]
    assert path in str(err.value) and "model.pretrained" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_open_clip_name_is_user_error():
    with pytest.raises(UserError, match="model.name"):
        build("open_clip", model_kw={"name": "ViT-Nope", "config": None})


def test_corrupt_checkpoint_is_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="bad.pt"):
        build("open_clip", model_kw={"pretrained": str(bad)})


def _write_tiny_clip_tokenizer(directory):
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    (directory / "vocab.json").unlink()
    (directory / "merges.txt").unlink()
    tok.save_pretrained(str(directory))
    return tok, len(vocab)


def test_hf_clip_from_directory_with_text_init(tmp_path, images):
    from transformers import CLIPConfig, CLIPModel

    tok, vocab_size = _write_tiny_clip_tokenizer(tmp_path)
    vision = tiny_model_config("hf_clip")["config"]
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=vocab_size, max_position_embeddings=32, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(5)
    ref = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).eval()
    ref.save_pretrained(str(tmp_path))
    names = ["snow_leopard", "cat", "dog", "fox", "owl"]
    clf = build("hf_clip", "lora", classnames=names, model_kw={"pretrained": str(tmp_path), "config": None,
                                                              "head_init": "text"})
    with torch.no_grad():
        batch = tok([f"a photo of a {n.replace('_', ' ')}." for n in names], padding=True, return_tensors="pt")
        t = F.normalize(ref.get_text_features(**batch).pooler_output, dim=-1)
        expected = F.normalize(t @ ref.visual_projection.weight, dim=-1)
        torch.testing.assert_close(clf.head.weight.detach(), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(clf.features(images), ref.vision_model(pixel_values=images).pooler_output)
    assert all(k.startswith(("backbone.model.", "head.")) for k in clf.state_dict())
    assert clf.preprocess["image_size"] == 32


def test_hf_vit_from_directory(tmp_path, images):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(9)
    ref = ViTModel(ViTConfig(**tiny_model_config("hf_vit")["config"]), add_pooling_layer=False).eval()
    ref.save_pretrained(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32},
         "resample": 2}
    ))
    clf = build("hf_vit", "full", model_kw={"pretrained": str(tmp_path), "config": None})
    with torch.no_grad():
        torch.testing.assert_close(clf.features(images), ref(pixel_values=images).last_hidden_state[:, 0])
    assert clf.preprocess == {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}


# --------------------------------------------------------------------------- tiny configs


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_variant_keeps_head_settings(family):
    real = ModelConfig(family=family, name="ViT-B-16", pretrained="/data/weights.bin", head="linear",
                       head_init="random", head_scale=10.0)
    t = tiny_variant(real)
    assert isinstance(t, ModelConfig)
    assert t.family == family and t.pretrained is None and t.config
    assert (t.head, t.head_init, t.head_scale) == ("linear", "random", 10.0)
    kw = tiny_model_config(family)
    assert kw["pretrained"] is None and ModelConfig(**kw).family == family
    with pytest.raises(UserError):
        tiny_model_config("resnet")


def test_open_clip_torchscript_checkpoint_is_refused_with_a_safe_alternative(tmp_path, images):
    """OpenAI's original CLIP files are TorchScript archives: loading one would deserialise code,
    so it is refused with a one-line error naming the file and the safetensors alternative."""
    import warnings

    import open_clip

    torch.manual_seed(11)
    ref = open_clip.CLIP(**tiny_model_config("open_clip")["config"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ref, (images[:1], torch.randint(0, 100, (1, 16))), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    with pytest.raises(UserError, match=r"model.pretrained: .*ViT-tiny.pt is a TorchScript archive.*safetensors"):
        build("open_clip", "head", model_kw={"pretrained": str(path)})


def test_open_clip_custom_attention_block_lora(images):
    """open_clip blocks with its own Attention (in_proj_weight parameter, e.g. qk_norm) get LoRA through
    peft target_parameters; it changes the logits and merges."""
    kw = tiny_model_config("open_clip")
    kw["config"]["vision_cfg"]["qk_norm"] = True
    torch.manual_seed(0)
    clf = build_classifier(ModelConfig(**kw), TuningConfig(method="lora"), C, classnames=NAMES).eval()
    names = trainable_names(clf)
    assert any("attn.lora_A" in n for n in names) and any("out_proj.lora_B" in n for n in names)
    with torch.no_grad():
        before = clf(images)
        _perturb(clf, "lora_B")
        after = clf(images)
    assert (after - before).abs().max() > 1e-3
    clf.merge_lora()
    assert not any("lora_" in k or "base_layer" in k for k in clf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clf(images), after, atol=1e-5, rtol=1e-5)


def test_deepcopy_keeps_behaviour(images):
    import copy

    for method in ("lora", "adaptformer"):
        clf = build("open_clip", method, adapter_norm="own") if method == "adaptformer" else build("open_clip", method)
        _perturb(clf, "lora_B")
        _perturb(clf, ".up.")
        twin = copy.deepcopy(clf)
        with torch.no_grad():
            assert torch.equal(twin(images), clf(images))


def test_open_clip_lora_attention_leaves_frozen_weights_bitwise_unchanged(images):
    """peft merges the delta into the frozen MultiheadAttention weights and subtracts it after
    each forward, which drifts them by rounding; our forward forms W + delta out of place and
    still gives peft's logits."""
    from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention

    clf = build("open_clip", "lora")
    _perturb(clf, "lora_B")
    frozen = {n: p.detach().clone() for n, p in clf.named_parameters() if not p.requires_grad}
    for _ in range(3):
        clf(images).pow(2).sum().backward()
    now = dict(clf.named_parameters())
    assert all(torch.equal(now[n], value) for n, value in frozen.items())
    with torch.no_grad():
        ours = clf(images)
        for module in clf.modules():
            if isinstance(module, LoraMultiheadAttention):
                del module.forward  # peft's own (merge / unmerge) forward
        torch.testing.assert_close(clf(images), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_lora_attention_on_activations_equals_merged_weights(batch_first, with_mask):
    """CLIP's self-attention call applies LoRA to the activations (so the one-backward step can
    see its per-sample gradients); any other call uses the merged weights W + s B A. Same function."""
    from peft import LoraConfig, inject_adapter_in_model

    from ft_focal.models.tuning import _use_functional_mha

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).double()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["attn"]), holder)
    _use_functional_mha(holder)
    _perturb(holder, "lora_B")
    x = torch.randn((3, 5, 16) if batch_first else (5, 3, 16), dtype=torch.float64)
    mask = torch.randn(5, 5, dtype=torch.float64) if with_mask else None
    fast = holder.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    merged = holder.attn(x, x, x.clone(), need_weights=False, attn_mask=mask)[0]  # value is not query
    torch.testing.assert_close(fast, merged, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(fast.pow(2).sum(), [p for p in holder.parameters() if p.requires_grad])
    assert all(float(g.abs().sum()) > 0 for g in grads)  # every adapter tensor is on the activation path


def test_the_recipe_accepts_exactly_the_families_the_backbones_package_finds():
    """config validates model.family when the recipe is read (before any data is loaded), so it keeps
    its own list: the library's base cannot import models (models imports config). This pins the two."""
    from ft_focal.config import CHOICES
    from ft_focal.models.backbones import loaders

    assert set(CHOICES["model.family"]) == set(loaders())
