"""Skipped (non-finite) updates are visible under the HF Trainer and Lightning: logged as NaN,
counted, warned about once, and max_bad_steps in a row stop training (ft_focal/integrations/skips.py)."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("transformers")
from test_integrations_transformers import COUNTS, METHODS, ImageSet, make_args, tiny_vit  # noqa: E402 (after the importorskip above)

from ft_focal.config import TrainConfig  # noqa: E402 (after the importorskip above)
from ft_focal.integrations.skips import NonFiniteUpdates  # noqa: E402 (after the importorskip above)
from ft_focal.integrations.transformers import SharpnessTrainer  # noqa: E402 (after the importorskip above)


def _poisoned(n: int, bad: list[int]) -> ImageSet:
    data = ImageSet(n)
    data.x[bad] = float("nan")
    return data


def _skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipped: non-finite loss or gradients" in r.getMessage()]


def test_hf_trainer_one_nan_sample_in_50_logs_its_step_as_nan_and_counts_it(tmp_path, caplog):
    trainer = SharpnessTrainer(model=tiny_vit(), args=make_args(tmp_path, max_steps=13), train_dataset=_poisoned(50, [7]),
                               optim="focal_sam", optim_kwargs=METHODS["focal_sam"], class_counts=COUNTS)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 13
    bad = [h for h in steps if math.isnan(h["loss"])]
    assert len(bad) == 1 and math.isnan(bad[0]["grad_norm"])   # the one batch holding sample 7
    assert all(h["loss"] > 0 and h["grad_norm"] > 0 for h in steps if h not in bad)
    assert trainer.state.skipped_steps == 1 == trainer.sharpness_optimizer.skipped_steps
    assert steps[-1]["skipped_steps"] == 1
    assert len(_skip_warnings(caplog)) == 1


def test_hf_trainer_nan_in_every_sample_stops_after_max_bad_steps(tmp_path, caplog):
    trainer = SharpnessTrainer(model=tiny_vit(), args=make_args(tmp_path, max_steps=21),
                               train_dataset=_poisoned(50, list(range(50))), optim="focal_sam",
                               optim_kwargs=METHODS["focal_sam"], class_counts=COUNTS)
    assert trainer.skip_guard.max_bad_steps == TrainConfig.max_bad_steps == 20   # our own loop's default
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteUpdates) as stop:
        trainer.train()
    message = str(stop.value)
    assert "\n" not in message
    assert message.startswith("training stopped at update 20: 20 consecutive updates had non-finite loss")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 19 and all(math.isnan(v) for v in losses)   # never "loss 0"
    assert trainer.state.skipped_steps == 20
    assert len(_skip_warnings(caplog)) == 1


def _fit_poisoned(bad: list[int], steps: int) -> tuple:
    """Lightning manual optimization (tests/integrations/test_integrations_lightning.py's module) on 50 samples."""
    L = pytest.importorskip("lightning")
    from test_integrations_lightning import Classifier, mlp

    module = Classifier(mlp())
    losses = []
    original = module.sharpness_step

    def recording(*args, **kwargs):
        losses.append(float(original(*args, **kwargs)))
        return torch.tensor(losses[-1])

    module.sharpness_step = recording
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    x[bad] = float("nan")
    data = torch.utils.data.TensorDataset(x, torch.arange(50) % 3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=g))
    finally:
        module.losses = losses
    return module, losses


def test_lightning_one_nan_sample_in_50_is_skipped_counted_and_returned_as_nan(caplog):
    with caplog.at_level(logging.WARNING):
        module, losses = _fit_poisoned([7], steps=13)
    assert len(losses) == 13 and sum(math.isnan(v) for v in losses) == 1
    assert module.sharpness_skip_guard.skipped_steps == 1
    assert len(_skip_warnings(caplog)) == 1


def test_lightning_nan_in_every_sample_stops_after_max_bad_steps(caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteUpdates, match=(
            r"^training stopped at update 20: 20 consecutive updates had non-finite loss")):
        _fit_poisoned(list(range(50)), steps=21)
    assert len(_skip_warnings(caplog)) == 1
