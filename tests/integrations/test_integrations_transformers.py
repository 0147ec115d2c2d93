"""SharpnessTrainer: each update the HF Trainer applies equals the ft_focal optimizer's own step.

Tiny random-init ViTForImageClassification in float64 on CPU; a recording subclass keeps every batch,
the learning rate and the parameters after every update; a replay with a fresh copy of the model and
a fresh optimizer built the same way must match to 1e-9.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402 (after the importorskip above)

from ft_focal.integrations.transformers import SharpnessTrainer, _AppliedStep  # noqa: E402 (after the importorskip above)
from ft_focal.losses import build_loss  # noqa: E402 (after the importorskip above)
from ft_focal.optim import build_optimizer  # noqa: E402 (after the importorskip above)

COUNTS = [40, 20, 8, 2]   # class counts: 2 head, 2 tail classes for the long-tail methods
METHODS = {
    "focal_sam": {"rho": 0.05, "gamma": 0.5, "lam": 0.8, "momentum": 0.9},   # one-backward path
    "ccsam": {"rho": 1.0, "momentum": 0.9},
    "asam": {"rho": 0.5, "base": "adamw"},
    "sse_sam": {"rho_head": 0.05, "rho_tail": 0.1, "tail_threshold": 10, "switch_fraction": 0.5},
}


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=len(COUNTS))
    return ViTForImageClassification(cfg).double()


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
        self.y = torch.tensor([i % len(COUNTS) for i in range(n)])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Recording(SharpnessTrainer):
    """Keeps (inputs, learning rates) of every micro-batch and the parameters after every update."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.micro, self.updates = [], []

    def training_step(self, model, inputs, num_items_in_batch=None):
        lrs = [g["lr"] for g in self.sharpness_optimizer.param_groups]
        self.micro.append(({k: v.clone() for k, v in inputs.items()}, lrs))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._pending:   # the window closed: an update was applied
            self.updates.append((self.micro, [p.detach().clone() for p in self.model.parameters()]))
            self.micro = []
        return loss


def max_diff(a, b) -> float:
    """max |a_i - b_i| over two parameter lists."""
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a, b, strict=True))


def make_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.05,
                weight_decay=0.01, lr_scheduler_type="linear", max_grad_norm=0.0, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def replay_optimizer(trainer: SharpnessTrainer, model: torch.nn.Module, method: str, kwargs: dict):
    """The same optimizer the Trainer built, on ``model``, without any Trainer code."""
    args = trainer.args
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    cfg = {"lr": args.learning_rate, "weight_decay": args.weight_decay, **kwargs}
    if cfg.get("base") in ("adam", "adamw"):
        cfg["betas"] = (args.adam_beta1, args.adam_beta2)
    if method in ("focal_sam", "imbsam", "sse_sam"):
        cfg["one_backward"] = True
    return build_optimizer(method, groups, COUNTS, model=model, **cfg)


def assert_replay_matches(trainer: Recording, model0: torch.nn.Module, method: str, kwargs: dict,
                          loss_fn=None, epochs_per_update=None) -> None:
    model = copy.deepcopy(model0)
    opt = replay_optimizer(trainer, model, method, kwargs)
    crit = loss_fn or (lambda logits, y: torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    for k, (micro, params_after) in enumerate(trainer.updates):
        for g, lr in zip(opt.param_groups, micro[-1][1], strict=True):
            g["lr"] = lr
        if epochs_per_update is not None:
            opt.set_epoch(epochs_per_update[k], trainer.state.num_train_epochs)
        closures = [lambda x=x: crit(model(pixel_values=x["pixel_values"]).logits, x["labels"]) for x, _ in micro]
        opt.step(closures=closures, targets=[x["labels"] for x, _ in micro])
        err = max_diff(model.parameters(), params_after)
        assert err <= 1e-9, f"update {k}: max |trainer - own step| = {err:.3g}"


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_updates_equal_own_step_float64(tmp_path, method):
    model = tiny_vit()
    model0 = copy.deepcopy(model)
    trainer = Recording(model=model, args=make_args(tmp_path), train_dataset=ImageSet(), optim=method,
                        optim_kwargs=METHODS[method], class_counts=COUNTS)
    out = trainer.train()
    assert out.global_step == 3 and len(trainer.updates) == 3
    assert isinstance(trainer.optimizer.optimizer, _AppliedStep)
    moved = max_diff(model.parameters(), model0.parameters())
    assert moved > 1e-4   # the check below is not vacuous
    assert_replay_matches(trainer, model0, method, METHODS[method], epochs_per_update=[0, 0, 0])
    assert trainer.sharpness_optimizer.skipped_steps == 0


def test_trainer_sse_sam_switches_at_the_trainers_epoch(tmp_path):
    """12 samples / batch 4 = 3 updates per epoch, 2 epochs, switch at 0.5: stage 2 from update 3."""
    model = tiny_vit()
    model0 = copy.deepcopy(model)
    kwargs = METHODS["sse_sam"]
    trainer = Recording(model=model, args=make_args(tmp_path, max_steps=-1, num_train_epochs=2),
                        train_dataset=ImageSet(), optim="sse_sam", optim_kwargs=kwargs, class_counts=COUNTS)
    trainer.train()
    assert len(trainer.updates) == 6 and trainer.sharpness_optimizer.switched
    assert_replay_matches(trainer, model0, "sse_sam", kwargs, epochs_per_update=[0, 0, 0, 1, 1, 1])


def test_trainer_user_per_sample_loss(tmp_path):
    model = tiny_vit()
    model0 = copy.deepcopy(model)
    ldam = build_loss("ldam", COUNTS)
    kwargs = {"rho": 0.05, "momentum": 0.9}
    trainer = Recording(model=model, args=make_args(tmp_path), train_dataset=ImageSet(), optim="sam",
                        optim_kwargs=kwargs, class_counts=COUNTS, loss_fn=ldam)
    trainer.train()
    assert_replay_matches(trainer, model0, "sam", kwargs, loss_fn=ldam)


def test_trainer_gradient_accumulation_is_exact_big_batch(tmp_path):
    """gradient_accumulation_steps=2 with batches of 2: one step over both micro-batches, equal to the
    optimizer's micro-batch step and to one step on the concatenated batch of 4."""
    model = tiny_vit()
    model0 = copy.deepcopy(model)
    kwargs = METHODS["focal_sam"]
    trainer = Recording(model=model, args=make_args(tmp_path, per_device_train_batch_size=2,
                                                    gradient_accumulation_steps=2),
                        train_dataset=ImageSet(), optim="focal_sam", optim_kwargs=kwargs, class_counts=COUNTS)
    trainer.train()
    assert [len(m) for m, _ in trainer.updates] == [2, 2, 2]
    assert trainer.sharpness_optimizer.pass_counts["forward"] == 3 * 2   # 2 passes per step, not per micro
    assert_replay_matches(trainer, model0, "focal_sam", kwargs, epochs_per_update=[0, 0, 0])
    # the same updates from the concatenated batches
    big = copy.deepcopy(model0)
    opt = replay_optimizer(trainer, big, "focal_sam", kwargs)
    for micro, params_after in trainer.updates:
        for g, lr in zip(opt.param_groups, micro[-1][1], strict=True):
            g["lr"] = lr
        x = torch.cat([m["pixel_values"] for m, _ in micro])
        y = torch.cat([m["labels"] for m, _ in micro])
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(big(pixel_values=x).logits, y, reduction="none"),
                 targets=y)
        err = max_diff(big.parameters(), params_after)
        assert err <= 1e-9


def test_trainer_resume_continues_identically(tmp_path):
    """5 updates in one run == 2 updates, checkpoint, a new Trainer resumed from it for the other 3
    (optimizer wrapper state, momentum, LR schedule and data order restored)."""
    kwargs = {"rho": 0.05, "gamma": 0.5, "lam": 0.8, "momentum": 0.9}
    args = dict(max_steps=5, save_strategy="steps", save_steps=2)
    full = tiny_vit()
    t_full = SharpnessTrainer(model=full, args=make_args(tmp_path / "a", **args), train_dataset=ImageSet(),
                              optim="focal_sam", optim_kwargs=kwargs, class_counts=COUNTS)
    t_full.train()
    # transformers 5.24 saves ViT weights under the legacy key names and the Trainer's resume loads
    # them without the key conversion (missing keys, weights left as they are): load them through
    # from_pretrained, which converts; the Trainer restores the rest (optimizer, schedule, RNG, data).
    resumed = ViTForImageClassification.from_pretrained(str(tmp_path / "a" / "checkpoint-2"),
                                                        dtype=torch.float64)
    t_res = SharpnessTrainer(model=resumed, args=make_args(tmp_path / "b", **args), train_dataset=ImageSet(),
                             optim="focal_sam", optim_kwargs=kwargs, class_counts=COUNTS)
    t_res.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    err = max_diff(full.parameters(), resumed.parameters())
    assert err <= 1e-12
    assert t_res.sharpness_optimizer.pass_counts == t_full.sharpness_optimizer.pass_counts


def test_trainer_state_dict_is_the_ft_focal_one(tmp_path):
    model = tiny_vit()
    trainer = SharpnessTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=ImageSet(),
                               optim="sam", optim_kwargs={"rho": 0.05}, class_counts=COUNTS)
    trainer.train()
    sd = trainer.optimizer.state_dict()
    assert set(sd) == {"base_optimizer", "wrapper"} and sd["wrapper"]["pass_counts"]["forward"] == 2


def test_trainer_unknown_method_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'focal'"):
        SharpnessTrainer(model=tiny_vit(), args=make_args(tmp_path), train_dataset=ImageSet(), optim="focal")


def test_integrations_package_imports_no_trainer_library():
    code = ("import sys, ft_focal.integrations; "
            "assert 'transformers' not in sys.modules and 'lightning' not in sys.modules, sorted(sys.modules)")
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.getcwd())
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _mixed_precision_run(tmp_path, device: str, dtype: torch.dtype):
    """Trainer under bf16 / fp16 autocast vs the optimizer's own step under the same autocast (and,
    for fp16, a GradScaler like the accelerator's, growing every 2 good steps)."""
    model = tiny_vit().float()
    model0 = copy.deepcopy(model)
    kwargs = METHODS["focal_sam"]
    flag = {"bf16": True} if dtype == torch.bfloat16 else {"fp16": True}
    trainer = Recording(model=model, args=make_args(tmp_path, use_cpu=device == "cpu", max_steps=6, **flag),
                        train_dataset=ImageSet(24), optim="focal_sam", optim_kwargs=kwargs, class_counts=COUNTS)
    if dtype == torch.float16:
        if trainer.accelerator.scaler is None:
            # Accelerate makes no GradScaler on CPU; give it one so that the CUDA code path
            # (accelerator.backward scaling, AcceleratedOptimizer.step with a scaler) runs here.
            trainer.accelerator.scaler = torch.amp.GradScaler(device)
        trainer.accelerator.scaler._growth_interval = 2
    trainer.train()
    replay = copy.deepcopy(model0).to(device)
    opt = replay_optimizer(trainer, replay, "focal_sam", kwargs)
    own_scaler = None
    if dtype == torch.float16:
        own_scaler = torch.amp.GradScaler(device, init_scale=65536.0, growth_interval=2)
        opt.runtime.scaler = own_scaler
    # Accelerate autocasts fp16 only on accelerators (on CPU the forward stays float32, the GradScaler
    # path is the same): the replay autocasts exactly when the Trainer's forward did.
    autocast = trainer.accelerator.native_amp
    errs = []
    for micro, params_after in trainer.updates:
        for g, lr in zip(opt.param_groups, micro[-1][1], strict=True):
            g["lr"] = lr
        x, y = micro[0][0]["pixel_values"].to(device).float(), micro[0][0]["labels"].to(device)

        def closure(x=x, y=y):
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                logits = replay(pixel_values=x).logits
            return torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")

        opt.step(closure, targets=y)
        errs.append(max_diff(replay.parameters(), params_after))
    return trainer, own_scaler, errs


def test_trainer_bf16_cpu_matches_own_step_under_autocast(tmp_path):
    trainer, _, errs = _mixed_precision_run(tmp_path, "cpu", torch.bfloat16)
    assert trainer.accelerator.native_amp   # the forward really ran under bf16 autocast
    assert len(errs) == 6 and max(errs) <= 1e-6, errs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_trainer_fp16_matches_own_step_and_scaler(tmp_path, device):
    """fp16 with the accelerator's GradScaler: updates equal the own step with its own scaler, and
    the scale is updated by the optimizer only (after 6 good steps, growing every 2: x2^3; an extra
    scaler.update per step from the Trainer's optimizer.step would differ)."""
    trainer, own_scaler, errs = _mixed_precision_run(tmp_path, device, torch.float16)
    assert len(errs) == 6 and max(errs) <= 1e-5, errs
    assert trainer.accelerator.scaler.get_scale() == own_scaler.get_scale() == 65536.0 * 2 ** 3
    assert trainer.sharpness_optimizer.skipped_steps == 0


_DDP_WORKER = """
import faulthandler, os, sys, torch
faulthandler.dump_traceback_later(150, exit=True)   # a hung collective fails the test instead of blocking it
sys.path.insert(0, {tests!r})
from test_integrations_transformers import COUNTS, METHODS, ImageSet, Recording, make_args, tiny_vit
torch.set_num_threads(1)
model = tiny_vit()
trainer = Recording(model=model, args=make_args({out!r}, per_device_train_batch_size=2, max_steps=2),
                    train_dataset=ImageSet(), optim={method!r}, optim_kwargs=METHODS[{method!r}],
                    class_counts=COUNTS)
trainer.train()
assert trainer.accelerator.num_processes == 2
wrapped = type(trainer.model_wrapped).__name__
torch.save({{"updates": trainer.updates, "wrapped": wrapped}},
           os.path.join({out!r}, "rank%d.pt" % trainer.args.process_index))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["focal_sam", "ccsam"])
def test_trainer_ddp_two_processes_equals_own_step_on_global_batch(tmp_path, method):
    """2 CPU processes (gloo, torchrun): each update equals the optimizer's own single-process step
    on the concatenation of both ranks' batches (no_sync + the optimizer's own all-reduce)."""
    import subprocess

    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER.format(tests=tests, out=str(tmp_path), method=method))
    import socket

    with socket.socket() as s:   # torchrun's static rendezvous needs a concrete free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(tests), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    str(script)], check=True, env=env, timeout=200)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    model = tiny_vit()
    opt = replay_optimizer(SharpnessTrainer(model=tiny_vit(), args=make_args(tmp_path / "r")), model,
                           method, METHODS[method])
    for (m0, p0), (m1, _) in zip(ranks[0]["updates"], ranks[1]["updates"], strict=True):
        for g, lr in zip(opt.param_groups, m0[-1][1], strict=True):
            g["lr"] = lr
        x = torch.cat([m0[0][0]["pixel_values"], m1[0][0]["pixel_values"]])
        y = torch.cat([m0[0][0]["labels"], m1[0][0]["labels"]])
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y, reduction="none"),
                 targets=y)
        assert max_diff(model.parameters(), p0) <= 1e-9


def test_trainer_fsdp_refused_in_one_line_pointing_at_train_fsdp(tmp_path):
    """On a CPU, Accelerate's FSDP plugin silently runs DDP: refused instead of untested. (One process:
    TrainingArguments refuses fsdp= itself, so the option is set as a distributed launch would.)"""
    args = make_args(tmp_path)
    args.fsdp = ["full_shard"]
    with pytest.raises(ValueError, match=r"does not support fsdp=.*train\.fsdp: true"):
        SharpnessTrainer(model=tiny_vit(), args=args, train_dataset=ImageSet(), optim="focal_sam", class_counts=COUNTS)
