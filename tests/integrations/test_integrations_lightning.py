"""Lightning manual optimization: each update equals the ft_focal optimizer's own step (float64, CPU).

lightning is in the ``dev`` extra, so CI runs these; without it installed they are skipped.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from ft_focal.integrations.lightning import SharpnessLightningMixin  # noqa: E402 (after the importorskip above)
from ft_focal.optim import build_optimizer  # noqa: E402 (after the importorskip above)

COUNTS = [30, 10, 3]
KW = {"lr": 0.05, "momentum": 0.9, "rho": 0.05, "gamma": 0.5, "lam": 0.8}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()


class Classifier(SharpnessLightningMixin, L.LightningModule):
    def __init__(self, net: torch.nn.Module, micro: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net, self.micro = net, micro
        self.seen = []   # (x, y, parameters after the update) per step

    def configure_optimizers(self):
        return self.build_sharpness_optimizer("focal_sam", class_counts=COUNTS, **KW)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.to(next(self.net.parameters()).dtype)   # float32 net for the bf16 test
        xs, ys = x.chunk(self.micro), y.chunk(self.micro)
        closures = [lambda a=a, b=b: F.cross_entropy(self.net(a), b, reduction="none") for a, b in zip(xs, ys, strict=True)]
        loss = self.sharpness_step(closures=closures, targets=list(ys))
        self.seen.append((x.clone(), y.clone(), [p.detach().clone() for p in self.net.parameters()]))
        self.log("train_loss", loss)


def fit(model: L.LightningModule, steps: int = 3, **kw) -> L.Trainer:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6, generator=g, dtype=torch.float64),
                                          torch.arange(16) % len(COUNTS))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=g))
    return trainer


@pytest.mark.parametrize("micro", [1, 2])
def test_lightning_updates_equal_own_step_float64(micro):
    """micro=2: the batch split into two micro-batch closures (big-batch semantics) - same updates
    as the own step on the whole batch."""
    net = mlp()
    net0 = copy.deepcopy(net)
    module = Classifier(net, micro=micro)
    trainer = fit(module)
    assert trainer.global_step == 3 and len(module.seen) == 3   # the step counter advanced
    own = copy.deepcopy(net0)
    opt = build_optimizer("focal_sam", list(own.parameters()), COUNTS, model=own, one_backward=True, **KW)
    for x, y, after in module.seen:
        opt.step(lambda x=x, y=y: F.cross_entropy(own(x), y, reduction="none"), targets=y)
        err = max(float((p.detach() - q).abs().max()) for p, q in zip(own.parameters(), after, strict=True))
        assert err <= 1e-9, err
    assert max(float((p.detach() - q).abs().max()) for p, q in zip(net0.parameters(), module.seen[-1][2], strict=True)) > 1e-4


def test_lightning_bf16_mixed_equals_own_step_under_autocast():
    """bf16-mixed: only the forward closures are autocast (the optimizer's arithmetic is not)."""
    net = mlp().float()
    net0 = copy.deepcopy(net)
    module = Classifier(net)
    fit(module, precision="bf16-mixed")
    own = copy.deepcopy(net0)
    opt = build_optimizer("focal_sam", list(own.parameters()), COUNTS, model=own, one_backward=True, **KW)
    for x, y, after in module.seen:
        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):   # as Lightning's autocast
                return F.cross_entropy(own(x), y, reduction="none")

        opt.step(closure, targets=y)
        err = max(float((p.detach() - q).abs().max()) for p, q in zip(own.parameters(), after, strict=True))
        assert err <= 1e-6, err


def test_lightning_automatic_optimization_refused():
    class Auto(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = True

    with pytest.raises(ValueError, match="automatic_optimization = False"):
        fit(Auto(mlp()), steps=1)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_lightning_strategies_are_refused_in_one_line(strategy):
    from ft_focal.integrations.lightning import refuse_sharded_strategy

    fake = type(strategy, (), {})()
    with pytest.raises(ValueError, match=rf"{strategy}.*train\.fsdp: true"):
        refuse_sharded_strategy(fake)
    refuse_sharded_strategy(type("DDPStrategy", (), {})())   # DDP passes
