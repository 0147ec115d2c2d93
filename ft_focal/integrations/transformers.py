"""The ft_focal optimizers inside ``transformers.Trainer``: ``SharpnessTrainer``.

    from ft_focal.integrations.transformers import SharpnessTrainer
    trainer = SharpnessTrainer(model=model, args=TrainingArguments("out", max_grad_norm=0.0, ...),
                               train_dataset=train_set, optim="focal_sam", class_counts=counts,
                               optim_kwargs={"rho": 0.05, "gamma": 0.5, "lam": 0.8, "momentum": 0.9})
    trainer.train()

How it fits the Trainer's loop (written against transformers 5.x ``Trainer._run_epoch``):

- ``create_optimizer`` builds the method with ``ft_focal.optim.build_optimizer`` over the Trainer's
  two parameter groups (weight decay / none), with ``lr`` / ``weight_decay`` / Adam betas from the
  ``TrainingArguments`` unless ``optim_kwargs`` sets them, ``backward=accelerator.backward`` and,
  under fp16, the accelerator's GradScaler (``backward_applies_scaler=True``), under several
  processes ``no_sync=lambda: accelerator.no_sync(model_wrapped)``. The Trainer gets
  ``_AppliedStep``, a view of it whose ``step()`` does nothing; ``trainer.sharpness_optimizer`` is
  the ft_focal optimizer itself.
- ``training_step`` runs the whole ft_focal step (every forward / backward pass of the method and the
  one base update) with closures returning per-sample losses ``[B]``: cross-entropy on the model's
  ``logits`` by default, else ``loss_fn(logits [B, C], labels [B]) -> [B]`` (e.g.
  ``ft_focal.losses.build_loss(name, counts)``). The Trainer's own ``optimizer.step()``,
  ``zero_grad`` and scheduler calls that follow therefore apply nothing a second time (the scheduler
  still sets the learning rate of the next step; a step the optimizer skipped for non-finite values
  is reported as skipped, so the scheduler waits, as for an fp16 overflow).
- Gradient accumulation (``gradient_accumulation_steps = k``) keeps exact big-batch semantics: the
  first k - 1 micro-batches are only kept (their training_step returns 0), the last one runs
  ``step(closures=[c_1..c_k], targets=[y_1..y_k])``; the returned loss is the mean over the k
  micro-batches, so the Trainer's logged loss is unchanged.
- Gradient clipping is not part of the ft_focal update rules: ``max_grad_norm > 0`` is ignored with
  one warning; the logged ``grad_norm`` is the L2 norm of the gradient the base optimizer applied.
- Skipped updates (non-finite loss or gradients in any pass; weights unchanged): logged with loss
  NaN (when every update since the previous log was skipped) and grad_norm NaN, counted in
  ``trainer.state.skipped_steps`` and in every log record (``skipped_steps``), one warning at the first;
  ``max_bad_steps`` in a row (default 20, as ``train.max_bad_steps``) stop training with
  ``NonFiniteUpdates`` (ft_focal/integrations/skips.py).
- Resume: the Trainer saves ``optimizer.state_dict()``, which is the ft_focal optimizer's (base
  optimizer state plus wrapper state: skipped steps, pass counts, epoch, fp16 growth counter, ...);
  the fp16 scale itself is in the Trainer's ``scaler.pt``.
- Not supported, refused in one line: DeepSpeed (its engine owns the optimizer step) and the
  Trainer's ``fsdp=`` (Accelerate's FSDP plugin: on a CPU it silently falls back to DDP, so its
  sharding cannot be tested here). The ft_focal Trainer's FSDP2 path (``train.fsdp: true``) is
  tested exact on real DTensor shards.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from ft_focal.integrations.skips import DEFAULT_MAX_BAD_STEPS, SkipGuard
from ft_focal.optim import OPTIMIZERS, Runtime, SharpnessOptimizer, build_optimizer

__all__ = ["SharpnessTrainer", "SharpnessTrainerMixin"]

_FSDP_REFUSAL = ("SharpnessTrainer does not support fsdp=: Accelerate's FSDP plugin is untested with the SAM "
                 "family (on a CPU it silently runs DDP); use DDP, or the ft_focal Trainer's FSDP2 path "
                 "(train.fsdp: true)")


logger = logging.getLogger(__name__)


PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _AppliedStep(torch.optim.Optimizer):
    """The Trainer's view of an ft_focal optimizer: same param groups, state and state_dict, and a
    ``step()`` that does nothing, because ``training_step`` has already applied the update.

    ``super().__init__`` is not called on purpose: every piece of state lives in ``inner`` (the
    ft_focal optimizer re-links its groups on ``load_state_dict``, so they are looked up each time).
    """

    def __init__(self, inner: SharpnessOptimizer) -> None:
        self.inner = inner

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.inner.param_groups = groups

    @property
    def state(self) -> Any:
        return self.inner.state

    @state.setter
    def state(self, state: Any) -> None:
        self.inner.state = state

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    @defaults.setter
    def defaults(self, defaults: dict) -> None:
        self.inner.defaults = defaults

    def step(self, closure: Callable | None = None) -> None:  # noqa: ARG002 - the Trainer passes none
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.inner.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"_AppliedStep({type(self.inner).__name__})"


class SharpnessTrainerMixin:
    """Mix into a ``transformers.Trainer`` (sub)class, before it: ``class T(SharpnessTrainerMixin,
    MyTrainer)``. Extra keywords of ``__init__``:

    optim: an ft_focal method name (``ft_focal.optim.OPTIMIZERS``: "erm", "sam", "asam", "imbsam",
        "ccsam", "focal_sam", "sse_sam").
    optim_kwargs: keywords of ``build_optimizer``: ``base`` ("sgd" default, "adamw", "adam"), base
        keywords (``momentum``, ...; ``lr`` / ``weight_decay`` / ``betas`` default to the
        TrainingArguments' ``learning_rate`` / ``weight_decay`` / ``adam_beta1, adam_beta2``),
        method keywords (``rho``, ``gamma``, ...; ``one_backward`` defaults to "auto":
        on where every trainable parameter has a layer rule) and runtime options (``sync_perturbation``, ``sharded``).
    class_counts: training-set count per class (``[C]``), for the methods that need it.
    loss_fn: per-sample loss ``loss_fn(logits [B, C], labels [B]) -> [B]``; default cross-entropy.
        Its ``set_epoch(epoch)``, if any, is called before every step (e.g. LDAM-DRW).
    label_key: the key of the labels in the Trainer's batches (default "labels").
    max_bad_steps: this many consecutive skipped (non-finite) updates stop training.
    """

    def __init__(self, *args: Any, optim: str = "focal_sam", optim_kwargs: Mapping[str, Any] | None = None,
                 class_counts: Sequence[int] | None = None, loss_fn: PerSampleLoss | None = None,
                 label_key: str = "labels", max_bad_steps: int = DEFAULT_MAX_BAD_STEPS, **kwargs: Any) -> None:
        if optim not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optim!r}; valid: {', '.join(OPTIMIZERS)}")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "fsdp", None):   # before Trainer.__init__ builds Accelerate's plugin
            raise ValueError(_FSDP_REFUSAL)
        self.sharpness_method = optim
        self.sharpness_kwargs = dict(optim_kwargs or {})
        self.class_counts = list(class_counts) if class_counts is not None else None
        self.per_sample_loss = loss_fn
        self.label_key = label_key
        self.sharpness_optimizer: SharpnessOptimizer | None = None
        self._pending: list[tuple[dict, torch.Tensor]] = []   # micro-batches of the open accumulation window
        self._applied_grad_norm: float | None = None
        self._clip_warned = False
        self.skip_guard = SkipGuard("SharpnessTrainer", max_bad_steps)
        self._window_updates = self._window_skipped = 0   # since the previous log record
        super().__init__(*args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("SharpnessTrainer does not support DeepSpeed: its engine applies the optimizer step "
                             "itself; use DDP, or the ft_focal Trainer's FSDP2 path (train.fsdp: true)")
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(_FSDP_REFUSAL)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the ft_focal optimizer (once) and give the Trainer its ``_AppliedStep`` view."""
        if isinstance(self.optimizer, _AppliedStep):
            return self.optimizer
        if isinstance(self.optimizer, SharpnessOptimizer):   # passed in through Trainer(optimizers=...)
            self.sharpness_optimizer = self.optimizer
        elif self.optimizer is not None:
            raise ValueError(f"SharpnessTrainer needs an ft_focal optimizer, got {type(self.optimizer).__name__} "
                             "(pass optim= and optim_kwargs= instead of optimizers=)")
        else:
            self.sharpness_optimizer = self._build_sharpness_optimizer(self.model if model is None else model)
        self.optimizer = _AppliedStep(self.sharpness_optimizer)
        return self.optimizer

    def _build_sharpness_optimizer(self, model: torch.nn.Module) -> SharpnessOptimizer:
        cfg = dict(self.sharpness_kwargs)
        base = cfg.setdefault("base", "sgd")
        cfg.setdefault("lr", self.args.learning_rate)
        weight_decay = cfg.pop("weight_decay", self.args.weight_decay)
        if base in ("adam", "adamw"):
            cfg.setdefault("betas", (self.args.adam_beta1, self.args.adam_beta2))
        # model= is the unwrapped module: the one-backward path hooks its layers and normalisation
        # statistics are saved / restored on it.
        runtime = Runtime.for_accelerate(self.accelerator, model, lambda: self.model_wrapped).keywords()
        cfg["backward"] = runtime.pop("backward")
        if runtime["scaler"] is not None:   # fp16: accelerator.backward scales the loss with this scaler
            cfg.update(scaler=runtime.pop("scaler"), backward_applies_scaler=runtime.pop("backward_applies_scaler"))
        for key, value in runtime.items():   # model, no_sync, ...: a caller's sharpness_kwargs win
            cfg.setdefault(key, value)
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("the model has no trainable parameter")
        return build_optimizer(self.sharpness_method, groups, self.class_counts, weight_decay=weight_decay, **cfg)

    # ------------------------------------------------------------------ the step
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """One micro-batch of the Trainer's loop; the whole ft_focal step runs on the last micro-batch
        of each accumulation window. Returns the mean per-sample loss at the pre-step weights over
        the window (0-d, detached; 0 for the window's earlier micro-batches)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        if self.label_key not in inputs:
            raise ValueError(f"the batch has no {self.label_key!r} entry (the labels); set label_key=")
        self._pending.append((inputs, inputs[self.label_key]))
        if not self.accelerator.sync_gradients:   # the window is still open: keep the batch, step later
            return torch.zeros((), device=self.args.device)
        window, self._pending = self._pending, []
        opt = self.sharpness_optimizer
        if opt is None:
            raise RuntimeError("training_step before create_optimizer (use trainer.train())")
        self._set_epoch(opt)
        closures = [functools.partial(self._per_sample_losses, model, x) for x, _ in window]
        loss = opt.step(closures=closures, targets=[y for _, y in window])
        skipped = bool(opt.last_skipped)   # a host read: the Trainer's scheduler needs it
        self._after_step(opt, skipped=skipped)
        self._window_updates += 1
        self._window_skipped += skipped
        self.state.skipped_steps = opt.skipped_steps
        self.skip_guard.record(skipped, self.state.global_step + 1)
        return torch.full((), float("nan"), device=self.args.device) if skipped else loss.to(self.args.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with skipped updates visible: ``loss`` NaN when every update since the
        previous record was skipped (the Trainer's NaN filter would log 0), ``skipped_steps`` in all."""
        if "loss" in logs and self.sharpness_optimizer is not None:
            if self._window_updates and self._window_skipped == self._window_updates:
                logs["loss"] = float("nan")
            logs["skipped_steps"] = self.sharpness_optimizer.skipped_steps
            self._window_updates = self._window_skipped = 0
        super().log(logs, *args, **kwargs)

    def _per_sample_losses(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Forward at the current weights; per-sample losses ``[B]``."""
        labels = inputs[self.label_key]
        # Labels stay out of the forward: the model would compute (and we would discard) its mean loss.
        features = {k: v for k, v in inputs.items() if k != self.label_key}
        with self.compute_loss_context_manager():
            outputs = model(**features)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if logits.dtype in (torch.float16, torch.bfloat16):   # losses in float32 under mixed precision
            logits = logits.float()
        if self.per_sample_loss is None:
            return F.cross_entropy(logits, labels, reduction="none")
        return self.per_sample_loss(logits, labels)

    def _set_epoch(self, opt: SharpnessOptimizer) -> None:
        # state.epoch is fractional (epoch + done / steps_in_epoch); its floor is the 0-based epoch.
        epoch = int(math.floor(self.state.epoch or 0.0))
        total = self.state.num_train_epochs or self.args.num_train_epochs
        opt.set_epoch(epoch, math.ceil(total) if total else None)
        if hasattr(self.per_sample_loss, "set_epoch"):
            self.per_sample_loss.set_epoch(epoch)

    def _after_step(self, opt: SharpnessOptimizer, skipped: bool) -> None:
        """Hand the Trainer's outer step nothing to do."""
        grads = [] if skipped else [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self._applied_grad_norm = (float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.detach().double()) for g in grads]))) if grads else
            float("nan") if skipped else 0.0)
        # The gradients were applied; clearing them keeps the Trainer's clip / norm / fp16-unscale calls
        # from acting on (or unscaling) them.
        opt.zero_grad(set_to_none=True)
        outer = self.optimizer   # AcceleratedOptimizer(_AppliedStep) after accelerator.prepare
        if getattr(outer, "optimizer", None) is not None and hasattr(outer, "scaler"):
            # Under fp16 the AcceleratedOptimizer would run scaler.step / scaler.update itself, a second
            # scale update; the ft_focal optimizer already updated the accelerator's scaler.
            outer.scaler = None
            outer._is_overflow = skipped   # accelerator.optimizer_step_was_skipped: the scheduler waits

    def _clip_grad_norm(self, model: torch.nn.Module) -> float | None:
        if not self._clip_warned:
            self._clip_warned = True
            logger.warning("SharpnessTrainer: max_grad_norm=%s is not applied (ft_focal updates do not clip); "
                           "set max_grad_norm=0 to silence this", self.args.max_grad_norm)
        return self._applied_grad_norm

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> float | None:
        return self._applied_grad_norm


class SharpnessTrainer(SharpnessTrainerMixin, Trainer):
    """``transformers.Trainer`` driving an ft_focal optimizer; see ``SharpnessTrainerMixin``."""
