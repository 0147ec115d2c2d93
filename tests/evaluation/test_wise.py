"""WiSE-FT: alpha = 0 is the zero-shot (initial) model and alpha = 1 the fine-tuned one, for full,
LoRA, AdaptFormer and head tuning; the per-method interpolation rules; alpha parsing and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ft_focal.config import ModelConfig, TuningConfig, recipe_from_dict
from ft_focal.errors import UserError
from ft_focal.evaluation.wise import (
    INITIAL,
    interpolate_model,
    load_initial_state,
    parse_alphas,
)
from ft_focal.models import build_classifier, tiny_model_config

METHODS = ["full", "lora", "adaptformer", "head"]


def _raw(out: Path, method: str, epochs: int = 1, **model: object) -> dict:
    return {
        "name": f"wise_{method}", "output_dir": str(out), "seed": 0,
        "model": {**tiny_model_config("open_clip"), **model},
        "tuning": {"method": method},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 4, "synthetic_train_size": 32,
                 "synthetic_eval_size": 8, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "optim": {"name": "sam", "lr": 0.5, "rho": 0.05},
        "train": {"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "threads": 1},
    }


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


# ----------------------------------------------------------------------------- the rules, without training


@pytest.mark.parametrize("method", METHODS)
def test_interpolation_is_exact_at_both_ends(method):
    """Simulated training (every trainable tensor moved), then alpha 0 = the initial model's logits
    and alpha 1 = the trained model's weights, bit for bit."""
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(**tiny_model_config("open_clip")), TuningConfig(method=method), 5,
                             ["a", "b", "c", "d", "e"]).eval()
    x = torch.randn(3, 3, 32, 32)
    initial_logits = _logits(model, x)
    head0 = {"head." + k: v.clone() for k, v in model.head.state_dict().items()}
    backbone0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    trained_logits = _logits(model, x)
    assert not torch.equal(initial_logits, trained_logits)
    zero = interpolate_model(model, method, 0.0, head0, backbone0 if method == "full" else None)
    one = interpolate_model(model, method, 1.0, head0, backbone0 if method == "full" else None)
    assert torch.equal(_logits(zero, x), initial_logits)
    for (name, a), (_, b) in zip(one.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    half = interpolate_model(model, method, 0.5, head0, backbone0 if method == "full" else None)
    w0, w1 = head0["head.weight"], model.head.weight
    assert torch.allclose(half.head.weight, 0.5 * w0 + 0.5 * w1)
    if method == "lora":
        name = next(n for n, _ in model.backbone.named_parameters() if "lora_B" in n)
        assert torch.equal(dict(half.backbone.named_parameters())[name], 0.5 * dict(model.backbone.named_parameters())[name])
    if method == "adaptformer":
        from ft_focal.models.tuning import BottleneckAdapter

        scales = [(m.scale, h.scale) for m, h in zip(model.modules(), half.modules(), strict=True)
                  if isinstance(m, BottleneckAdapter)]
        assert scales and all(torch.equal(h, 0.5 * m) for m, h in scales)


def test_alpha_grids_and_their_refusals():
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("1,0.5,0,0.5") == [0.0, 0.5, 1.0]
    assert len(parse_alphas("0:1:0.1")) == 11
    for bad in ("0:2:0.5", "a,b", "0:1:0", "-0.1"):
        with pytest.raises(UserError):
            parse_alphas(bad)


def test_a_run_without_the_initial_head_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="alpha = 0, its initial model, is not defined") as err:
        load_initial_state(tmp_path)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- trained runs end to end


_RUNS: dict = {}


def _trained(method: str, tmp_path_factory) -> tuple[Path, Path]:
    """A one-epoch run of `method` and the zero-shot run of the same recipe (made once per module)."""
    from ft_focal.training.trainer import train
    from ft_focal.training.zero_shot import zero_shot_recipe

    if method not in _RUNS:
        out = tmp_path_factory.mktemp(method) / "run"
        recipe = recipe_from_dict(_raw(out, method))
        train(recipe)
        zero = zero_shot_recipe(recipe)
        train(zero)
        _RUNS[method] = (out, Path(zero.output_dir))
    return _RUNS[method]


# head-only runs take the features-once path; the others rebuild the model per alpha (slow: two
# trainings each, the interpolation rules themselves are checked above for every method)
_END_TO_END = [pytest.param(m, marks=() if m == "head" else pytest.mark.slow) for m in METHODS]


@pytest.mark.parametrize("method", _END_TO_END)
def test_wise_alpha_0_is_the_zero_shot_model_and_alpha_1_the_run(tmp_path_factory, method):
    from ft_focal.artifacts.saved import load_model_dir
    from ft_focal.evaluation.wise_sweep import run_wise

    run, zero = _trained(method, tmp_path_factory)
    assert (run / INITIAL).is_file()
    out = run_wise(run, [0.0, 0.5, 1.0])
    rows = {r["alpha"]: r for r in out["rows"]}
    zero_metrics = json.loads((zero / "metrics.json").read_text())
    run_metrics = json.loads((run / "metrics.json").read_text())
    for alpha, metrics in ((0.0, zero_metrics), (1.0, run_metrics)):
        for split in ("val", "test"):
            for key in ("overall", "many", "medium", "few"):
                assert rows[alpha][split][key] == pytest.approx(metrics[split][key], abs=1e-12), (alpha, split, key)
    # the same predictions: the chosen model folder at alpha 0 / 1 against the zero-shot / final model
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for alpha, folder in ((0.0, zero / "final"), (1.0, run / "final")):
        run_wise(run, [alpha], alpha=alpha)
        chosen = load_model_dir(run / "wise" / "final").model
        reference = load_model_dir(folder).model
        assert torch.allclose(_logits(chosen, x), _logits(reference, x), atol=1e-5)
        assert torch.equal(_logits(chosen, x).argmax(1), _logits(reference, x).argmax(1))
    assert list(run.glob("wise.prev-*")), "an earlier wise/ is moved aside, not deleted"


@pytest.mark.slow
def test_full_tuning_from_pretrained_weights_rebuilds_w0_and_checks_it(tmp_path):
    """w0 of a full run with a weights file is re-read from it; a changed file is refused in one line."""
    import open_clip
    from safetensors.torch import save_file

    from ft_focal.evaluation.wise_sweep import run_wise
    from ft_focal.training.trainer import train
    from ft_focal.training.zero_shot import zero_shot_recipe

    torch.manual_seed(3)
    weights = tmp_path / "clip.safetensors"
    state = open_clip.CLIP(**tiny_model_config("open_clip")["config"]).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    recipe = recipe_from_dict(_raw(tmp_path / "run", "full", pretrained=str(weights)))
    train(recipe)
    zero = zero_shot_recipe(recipe)
    train(zero)
    out = run_wise(tmp_path / "run", [0.0])
    zero_test = json.loads((Path(zero.output_dir) / "metrics.json").read_text())["test"]
    assert out["rows"][0]["test"]["overall"] == pytest.approx(zero_test["overall"], abs=1e-12)
    state["visual.conv1.weight"] += 1.0
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    with pytest.raises(UserError, match="not the ones this run started from"):
        run_wise(tmp_path / "run", [0.0])


def test_no_validation_split_needs_a_given_alpha(tmp_path_factory, monkeypatch):
    import ft_focal.data.build as build
    from ft_focal.evaluation.wise_sweep import run_wise

    real = build.build_datasets

    def without_val(*args, **kwargs):
        bundle = real(*args, **kwargs)
        bundle.val = None
        return bundle

    monkeypatch.setattr(build, "build_datasets", without_val)
    run, _ = _trained("head", tmp_path_factory)
    with pytest.raises(UserError, match="no validation split to choose alpha on: give --alpha"):
        run_wise(run, [0.0, 1.0])
    out = run_wise(run, [0.0, 1.0], alpha=0.5)
    assert out["chosen_alpha"] == 0.5 and [r["alpha"] for r in out["rows"]] == [0.0, 0.5, 1.0]


def test_a_head_only_run_computes_the_features_once_for_all_alphas(tmp_path_factory, monkeypatch):
    from ft_focal.evaluation import wise_sweep

    calls = []
    real = wise_sweep._Evaluator._predict

    def counting(self, module, dataset):
        calls.append(type(module).__name__)
        return real(self, module, dataset)

    monkeypatch.setattr(wise_sweep._Evaluator, "_predict", counting)
    run, _ = _trained("head", tmp_path_factory)
    out = wise_sweep.run_wise(run, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert len(out["rows"]) == 5
    assert len(calls) == 2  # val and test, once each, through the backbone only
    assert "ImageClassifier" not in calls
