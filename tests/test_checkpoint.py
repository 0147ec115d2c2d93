"""Checkpoints: complete round trip, corrupt / partial detection, pruning keeps a good one."""

import json

import torch

from ft_focal import checkpoint as ckpt


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
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
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
