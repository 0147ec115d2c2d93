"""The ft_focal optimizers under Lightning manual optimization (extra ``lightning``).

    import lightning as L
    from ft_focal.integrations.lightning import SharpnessLightningMixin

    class Classifier(SharpnessLightningMixin, L.LightningModule):
        def __init__(self, net, counts):
            super().__init__()
            self.automatic_optimization = False          # the ft_focal step runs every pass itself
            self.net, self.counts = net, counts

        def configure_optimizers(self):
            return self.build_sharpness_optimizer("focal_sam", class_counts=self.counts, lr=0.01,
                                                  momentum=0.9, rho=0.05, gamma=0.5, lam=0.8)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.sharpness_step(lambda: F.cross_entropy(self.net(x), y, reduction="none"), targets=y)
            self.log("train_loss", loss)

How it fits Lightning (2.x): the optimizer back-propagates through ``self.manual_backward`` (so the
precision plugin scales the loss under ``precision="16-mixed"``, with its GradScaler handed to the
optimizer, ``backward_applies_scaler=True``); under several processes every pass runs in
``trainer.strategy.block_backward_sync()`` (DDP ``no_sync``) and the optimizer averages the gradients
itself. ``sharpness_step`` calls the ft_focal ``step`` directly, not ``LightningOptimizer.step``:
Lightning's step would run the precision plugin's ``scaler.step`` / ``scaler.update`` (a second
scale update) and treat our forward closure as its own; it still advances Lightning's step counter
(``trainer.global_step``). Step LR schedulers yourself (``self.lr_schedulers().step()``), as in any
manual optimization. Lightning saves ``optimizer.state_dict()`` in checkpoints, which is the ft_focal
optimizer's (wrapper state included) and loads back on resume; the fp16 scale is in the precision
plugin's state.

Skipped updates (non-finite loss or gradients in any pass; weights unchanged) return loss NaN, are
counted in ``module.sharpness_skip_guard.skipped_steps``, warned about once, and ``max_bad_steps`` in a
row (default 20, as ``train.max_bad_steps``) stop training with ``NonFiniteUpdates``
(ft_focal/integrations/skips.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ft_focal.integrations.skips import DEFAULT_MAX_BAD_STEPS, SkipGuard
from ft_focal.optim import Runtime, SharpnessOptimizer, build_optimizer

__all__ = ["SharpnessLightningMixin", "build_lightning_optimizer", "sharpness_step"]


def refuse_sharded_strategy(strategy: Any) -> None:
    """One-line refusal of Lightning's FSDP and DeepSpeed strategies: neither runs on these CPU test
    machines with real sharding (Lightning's FSDP needs CUDA), so the SAM family's exactness under
    them is untested; the toolkit's own Trainer shards with FSDP2 and is tested (train.fsdp)."""
    kind = type(strategy).__name__
    if "FSDP" in kind or "DeepSpeed" in kind:
        raise ValueError(f"ft_focal optimizers do not support Lightning's {kind}: its sharding is untested with "
                         "the SAM family here; use strategy='ddp', or the ft_focal Trainer's FSDP2 path "
                         "(train.fsdp: true; see the README, 'FSDP2')")


def build_lightning_optimizer(module: Any, name: str, class_counts: Sequence[int] | None = None,
                              params: Iterable[torch.nn.Parameter] | Iterable[dict] | None = None,
                              **cfg: Any) -> SharpnessOptimizer:
    """Build ft_focal optimizer ``name`` for a LightningModule; call it from ``configure_optimizers``.

    ``params``: default every trainable parameter of ``module``. ``cfg``: the keywords of
    ``ft_focal.optim.build_optimizer`` (``base``, ``lr``, ``momentum``, ``rho``, ...;
    ``one_backward`` defaults to "auto": on where every trainable parameter has a layer rule). The
    runtime options ``model``, ``backward``, ``scaler`` and ``no_sync`` are set from the module's Trainer.
    """
    if getattr(module, "automatic_optimization", True):
        raise ValueError("ft_focal optimizers need Lightning manual optimization: set "
                         "self.automatic_optimization = False in the LightningModule's __init__")
    trainer = module.trainer
    refuse_sharded_strategy(trainer.strategy)
    runtime = Runtime.for_lightning(module).keywords()
    if params is None:
        params = [p for p in module.parameters() if p.requires_grad]
    return build_optimizer(name, params, class_counts, **{**runtime, **cfg})


def sharpness_step(module: Any, closure: Callable[[], torch.Tensor] | None = None,
                   targets: torch.Tensor | None = None, *,
                   closures: Sequence[Callable[[], torch.Tensor]] | None = None,
                   optimizer: Any = None, max_bad_steps: int = DEFAULT_MAX_BAD_STEPS) -> torch.Tensor:
    """One ft_focal step from a LightningModule's ``training_step``.

    ``closure()``: forward at the current weights, per-sample losses ``[B]`` (``reduction='none'``);
    ``targets``: labels ``[B]``. Micro-batches: ``closures=[c1, ...]`` and ``targets=[y1, ...]``
    (exact big-batch semantics). ``optimizer``: which of ``module.optimizers()`` (default: the only
    one). Returns the mean loss at the pre-step weights (0-d, detached; NaN for a skipped update).
    ``max_bad_steps`` consecutive skipped updates raise ``NonFiniteUpdates`` (counts in
    ``module.sharpness_skip_guard``).
    """
    lopt = module.optimizers() if optimizer is None else optimizer
    if isinstance(lopt, (list, tuple)):
        raise ValueError("the module has several optimizers: pass optimizer= (one of self.optimizers())")
    opt = getattr(lopt, "optimizer", lopt)   # LightningOptimizer -> the ft_focal optimizer
    if not isinstance(opt, SharpnessOptimizer):
        raise ValueError(f"sharpness_step needs an ft_focal optimizer, got {type(opt).__name__}")
    trainer = module.trainer
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    opt.set_epoch(trainer.current_epoch, max_epochs)
    # Lightning runs all of training_step under the precision plugin's autocast; only the forward
    # closures should: the optimizer's own arithmetic (norms, one-backward weighting) stays in the
    # parameters' dtype, as with the HF Trainer and ft_focal's own loop.
    precision = trainer.precision_plugin
    closures = [_in_context(precision.forward_context, c) for c in (closures if closures is not None else [closure])]
    if isinstance(targets, torch.Tensor) or targets is None:
        targets = [targets]
    # The progress hooks LightningOptimizer.step itself calls: they count the step (global_step).
    before = getattr(lopt, "_on_before_step", None)
    after = getattr(lopt, "_on_after_step", None)
    if before is not None:
        before()
    try:
        with torch.autocast(module.device.type, enabled=False):
            loss = opt.step(closures=closures, targets=targets)
    finally:
        if after is not None:
            after()
    guard = getattr(module, "sharpness_skip_guard", None)
    if guard is None or guard.max_bad_steps != max_bad_steps:
        guard = module.sharpness_skip_guard = SkipGuard("sharpness_step", max_bad_steps)
    skipped = bool(opt.last_skipped)
    guard.record(skipped, int(trainer.global_step))   # global_step already counts this update
    return torch.full_like(loss, float("nan")) if skipped else loss


def _in_context(context: Callable[[], Any], closure: Callable[[], torch.Tensor] | None) -> Callable[[], torch.Tensor]:
    if closure is None:
        raise ValueError("sharpness_step needs a closure returning per-sample losses (or closures=[...])")

    def run() -> torch.Tensor:
        with context():
            return closure()
    return run


class SharpnessLightningMixin:
    """Mix into a LightningModule (before it): ``build_sharpness_optimizer`` for
    ``configure_optimizers`` and ``sharpness_step`` for ``training_step``; see the module docstring."""

    def build_sharpness_optimizer(self, name: str, class_counts: Sequence[int] | None = None,
                                  params: Iterable[torch.nn.Parameter] | Iterable[dict] | None = None,
                                  **cfg: Any) -> SharpnessOptimizer:
        """``build_lightning_optimizer(self, ...)``."""
        return build_lightning_optimizer(self, name, class_counts, params, **cfg)

    def sharpness_step(self, closure: Callable[[], torch.Tensor] | None = None,
                       targets: torch.Tensor | None = None, *,
                       closures: Sequence[Callable[[], torch.Tensor]] | None = None,
                       optimizer: Any = None, max_bad_steps: int = DEFAULT_MAX_BAD_STEPS) -> torch.Tensor:
        """``sharpness_step(self, ...)``: one ft_focal step; mean loss at the pre-step weights."""
        return sharpness_step(self, closure, targets, closures=closures, optimizer=optimizer,
                              max_bad_steps=max_bad_steps)
