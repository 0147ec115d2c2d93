"""How the host back-propagates: the ``Runtime`` an optimizer owns and its ``Passes`` read.

One constructor per host builds it (backward, GradScaler, DDP ``no_sync``, the model): our Trainer and
the HF Trainer go through Accelerate, a LightningModule through its strategy. The optimizer keywords
are ``Runtime.keywords()``; _wrapping.py's docstring ("Common options") says each option in full.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Runtime:
    """How the host back-propagates (_wrapping.py's docstring, "Common options", says each in full).

    backward: ``backward(loss, retain_graph=..., inputs=...)`` (``accelerator.backward`` in the Trainer).
    scaler: a GradScaler under fp16, else None; ``backward_applies_scaler``: ``backward`` scales itself.
    model: the trained module (normalisation statistics, one-backward layer rules), or None.
    no_sync: a context factory: the passes run under it and the optimizer averages gradients itself.
    sync_perturbation: average the perturbation gradient too (False: m-sharpness, per process).
    sharded: gradients are shards (FSDP / ZeRO): norms all-reduce their squares.
    """
    backward: Callable = torch.Tensor.backward
    scaler: Any = None
    backward_applies_scaler: bool = False
    model: torch.nn.Module | None = None
    no_sync: Callable | None = None
    sync_perturbation: bool = True
    sharded: bool = False

    def keywords(self) -> dict:
        """The optimizer keywords that build this runtime (``build_optimizer(..., **keywords)``)."""
        # not dataclasses.asdict: it deep-copies every value, the model and bound methods included
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def for_accelerate(cls, accelerator: Any, model: torch.nn.Module, wrapped: Callable[[], torch.nn.Module],
                       no_sync: bool = True) -> "Runtime":
        """An Accelerate loop's (ft_focal's Trainer, the HF Trainer): ``accelerator.backward``, which under
        fp16 scales the loss with ``accelerator.scaler`` itself; with several processes every pass runs
        under ``accelerator.no_sync(wrapped())`` (``wrapped`` is called at step time: the DDP module exists
        only after ``accelerator.prepare``) unless ``no_sync=False`` (FSDP2: the optimizer sees shards).
        ``model``: the unwrapped module (layer rules, normalisation statistics)."""
        runtime = cls(backward=accelerator.backward, model=model)
        if accelerator.scaler is not None:
            runtime.scaler, runtime.backward_applies_scaler = accelerator.scaler, True
        if accelerator.num_processes > 1 and no_sync:
            runtime.no_sync = lambda: accelerator.no_sync(wrapped())
        return runtime

    @classmethod
    def for_lightning(cls, module: Any) -> "Runtime":
        """A LightningModule's under manual optimization: ``manual_backward`` (which scales the loss under
        precision="16-mixed" with the precision plugin's scaler); with several processes every pass runs
        under the strategy's ``block_backward_sync`` (looked up at step time: the strategy wraps the
        module after ``configure_optimizers``)."""
        trainer = module.trainer
        runtime = cls(backward=module.manual_backward, model=module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            runtime.scaler, runtime.backward_applies_scaler = scaler, True
        if trainer.world_size > 1:
            runtime.no_sync = lambda: trainer.strategy.block_backward_sync()
        return runtime
