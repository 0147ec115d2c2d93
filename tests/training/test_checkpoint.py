"""Checkpoints: complete round trip, corrupt / partial detection, pruning keeps a good one."""

import json

import pytest
import torch

from ft_focal.training import checkpoint as ckpt


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = make()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"step": 3, "best": 0.5})
    expected_draw = torch.rand(3)
    model2, opt2, sched2 = make()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    trainer = ckpt.load_checkpoint(path, model2, opt2, sched2)
    assert trainer["step"] == 3 and trainer["best"] == 0.5
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        if n != "0.bias":  # frozen: not stored, rebuilt from the recipe in a real run
            assert torch.equal(a, b), n
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)


def test_corrupt_or_partial_checkpoint_falls_back_to_previous(tmp_path):
    model, opt, sched = make()
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep=5)
    bad = ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2}, keep=5)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated on disk
    assert ckpt.verify(bad).startswith("checksum mismatch")
    assert ckpt.latest_good(tmp_path) == good
    (tmp_path / "step_00000003").mkdir()  # a directory without MANIFEST (killed while renaming)
    assert ckpt.verify(tmp_path / "step_00000003") == "incomplete (no MANIFEST.json)"
    assert ckpt.latest_good(tmp_path) == good


def test_pruning_keeps_newest_good_and_never_the_only_good_one(tmp_path):
    model, opt, sched = make()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    # Corrupt the newest: pruning after the next save must keep the last GOOD ones only.
    manifest = tmp_path / "step_00000003" / "MANIFEST.json"
    entries = json.loads(manifest.read_text())
    entries["trainer.json"] = "0" * 64
    manifest.write_text(json.dumps(entries))
    ckpt.prune(tmp_path, keep=1)
    # the corrupt newest one stays: no checkpoint that verifies supersedes it
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000009.tmp").mkdir()
    ckpt.prune(tmp_path, keep=1)
    assert not (tmp_path / "step_00000009.tmp").exists()
    assert ckpt.latest_good(tmp_path).name == "step_00000002"
    # a newer good checkpoint supersedes both: now they go
    ckpt.save_checkpoint(tmp_path, 4, model, opt, sched, {"step": 4}, keep=1)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000004"]


def test_rotation_never_deletes_checkpoints_no_newer_verified_one_supersedes(tmp_path):
    """Both checkpoints unverifiable (one with intact weights): saving an OLDER step rotates nothing away."""
    model, opt, sched = make()
    for step in (6, 7):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep=5)
    (tmp_path / "step_00000007" / "trainer.json").write_text("{}")          # weights intact
    (tmp_path / "step_00000006" / "model.safetensors").write_bytes(b"x")    # weights broken
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep=1)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000001", "step_00000006", "step_00000007"]
    report = ckpt.unusable_report(tmp_path)
    assert len(report) == 2
    assert report[0].endswith("step_00000006: checksum mismatch in model.safetensors")
    assert report[1].endswith("step_00000007: checksum mismatch in trainer.json (its model.safetensors is intact)")


# ------------------------------------------------ restore into a DIFFERENT state, compare each part


def _sse_sam_run(seed: int, steps: int, epoch: int):
    """A model + SSE-SAM (SGD momentum) + LR schedule + GradScaler, `steps` updates in, at `epoch`."""
    from ft_focal.optim import SSESAM

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = SSESAM(list(model.parameters()), torch.optim.SGD, class_counts=[50, 10, 5], tail_threshold=20,
                 lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (8 + seed), growth_interval=7)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    opt.set_epoch(epoch, 10)
    for _ in range(steps):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y, reduction="none"), targets=y)
        sched.step()
    opt.skipped_steps = 2 + seed
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler._growth_tracker.fill_(3 + seed)
    return model, opt, sched, scaler


def test_load_restores_each_part_into_a_run_in_a_different_state(tmp_path):
    """Saved after 3 updates in SSE-SAM's second stage; loaded into a run 1 update in, first stage,
    another loss scale and RNG: every part must come from the file (a missing load_state_dict leaves
    the second run's own value, which differs from the saved one in each comparison below)."""
    model, opt, sched, scaler = _sse_sam_run(seed=0, steps=3, epoch=8)
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"step": 3}, scaler=scaler)
    draw = torch.rand(4)
    model2, opt2, sched2, scaler2 = _sse_sam_run(seed=1, steps=1, epoch=0)
    saved_opt, other_opt = opt.state_dict(), opt2.state_dict()
    momentum = [s["momentum_buffer"] for s in saved_opt["base_optimizer"]["state"].values()]
    other_momentum = [s["momentum_buffer"] for s in other_opt["base_optimizer"]["state"].values()]
    assert not any(torch.equal(a, b) for a, b in zip(momentum, other_momentum, strict=True))   # the states differ before
    assert sched2.last_epoch != sched.last_epoch and scaler2.get_scale() != scaler.get_scale()
    assert opt2.switched != opt.switched and opt2.skipped_steps != opt.skipped_steps

    ckpt.load_checkpoint(path, model2, opt2, sched2, scaler=scaler2)

    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    loaded = [s["momentum_buffer"] for s in opt2.state_dict()["base_optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, loaded, strict=True))                      # momentum
    assert sched2.last_epoch == sched.last_epoch == 3                                     # scheduler step
    assert sched2.get_last_lr() == sched.get_last_lr() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert scaler2.get_scale() == scaler.get_scale()                                      # GradScaler
    assert int(scaler2._growth_tracker) == int(scaler._growth_tracker) == 3
    assert torch.equal(torch.rand(4), draw)                                               # RNG
    assert opt2.switched and (opt2.epoch, opt2.num_epochs) == (8, 10)                     # SAM-family wrapper
    assert opt2.skipped_steps == 2 and opt2.pass_counts == opt.pass_counts


def test_load_refuses_a_checkpoint_without_a_trainable_tensor_of_the_model(tmp_path):
    model, opt, sched = make()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    bigger[0].bias.requires_grad_(False)
    opt2 = torch.optim.SGD([p for p in bigger.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    with pytest.raises(KeyError) as info:
        ckpt.load_checkpoint(path, bigger, opt2, sched2)
    message = str(info.value)
    assert "lacks trainable tensors" in message and "2.weight, 2.bias" in message and "\n" not in message
    assert "0.bias" not in message   # frozen tensors are not stored, and not asked for
