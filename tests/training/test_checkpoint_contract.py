"""The checkpoint's contract, word for word (ft_focal/training/checkpoint.py): safe loading of every
pickled file, what `verify` says about each kind of damage, the names a refused load lists, the
defaults of `save_checkpoint`, a second checkpoint of the same step, the warnings of a load that
lacks a part, a killed save's leftovers, copies where hard links fail, and the order of checkpoints."""

import json
import logging
import os
import pickle
import sys

import pytest
import torch

from ft_focal.training import checkpoint as ckpt

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpoint import make  # noqa: E402 (after the sys.path entry it needs)

RAN = []


def _record(what):
    RAN.append(what)
    return {}


class _Payload:
    """Unpickling this calls _record: a stand-in for code a tampered checkpoint would run."""

    def __reduce__(self):
        return _record, ("unpickled code ran",)


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=8.0)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_rank0.pt"])
def test_a_pickled_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, name):
    model, opt, sched = make()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, scaler=_scaler())
    torch.save({"state": _Payload()}, path / name)
    RAN.clear()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_checkpoint(path, *make(), scaler=_scaler())
    assert RAN == []


def _saved(tmp_path):
    model, opt, sched = make()
    return ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})


def test_verify_names_each_kind_of_damage(tmp_path):
    path = _saved(tmp_path)
    manifest = path / ckpt.MANIFEST
    listed = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    assert ckpt.verify(path) == "MANIFEST.json is unreadable"
    manifest.write_text("[]")
    assert ckpt.verify(path) == "MANIFEST.json is not a mapping of file names to sha256"
    manifest.write_text(json.dumps({k: v for k, v in listed.items() if k != "optimizer.pt"}))
    assert ckpt.verify(path) == "MANIFEST.json does not list optimizer.pt"
    # a sharded (FSDP2) checkpoint lists .metadata and needs the optimizer wrapper's state instead
    manifest.write_text(json.dumps({**listed, ".metadata": listed["trainer.json"]}))
    assert ckpt.verify(path) == "MANIFEST.json does not list optimizer_wrapper.pt"
    manifest.write_text(json.dumps({**listed, "extra.bin": "0" * 64}))
    assert ckpt.verify(path) == "missing extra.bin"
    manifest.write_text(json.dumps(listed))
    assert ckpt.verify(path) is None


def test_a_refused_load_lists_five_names_and_counts_the_rest():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(7)])
    extra = {f"x{i}": torch.zeros(1) for i in range(6)}
    with pytest.raises(KeyError, match=r"checkpoint has tensors the model does not: x0, x1, x2, x3, x4 and 1 more"):
        ckpt.load_trainable_state(model, extra)
    state = {f"{i}.weight": torch.zeros(2, 2) for i in range(2)}   # lacks 5 of 7: all shown, no "more"
    with pytest.raises(KeyError) as refused:
        ckpt.load_trainable_state(model, state)
    assert str(refused.value).strip("'\"") == \
        "checkpoint lacks trainable tensors of the model: 2.weight, 3.weight, 4.weight, 5.weight, 6.weight"


def test_save_defaults_record_one_process_and_keep_two(tmp_path):
    model, opt, sched = make()
    root = tmp_path / "new" / "nested"   # created with its parents
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, model, opt, sched, {"step": step})
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step_00000002", "step_00000003"]
    assert json.loads((root / "step_00000003" / "trainer.json").read_text()) == {"step": 3, "world_size": 1}


def test_a_second_checkpoint_of_a_step_gets_the_next_serial_and_carries_its_files(tmp_path):
    model, opt, sched = make()
    best = tmp_path / "best_model.safetensors"
    best.write_bytes(b"weights")
    first = ckpt.save_checkpoint(tmp_path / "c", 4, model, opt, sched, {"step": 4}, keep=5)
    second = ckpt.save_checkpoint(tmp_path / "c", 4, model, opt, sched, {"step": 4}, keep=5,
                                  files={"best_model.safetensors": best})
    assert (first.name, second.name) == ("step_00000004", "step_00000004.1")
    assert (second / "best_model.safetensors").read_bytes() == b"weights"
    assert "best_model.safetensors" in json.loads((second / ckpt.MANIFEST).read_text())


def test_a_load_without_scaler_or_rng_state_says_so_in_one_warning_each(tmp_path, caplog):
    path = _saved(tmp_path)
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        ckpt.load_checkpoint(path, *make(), rank=1, scaler=_scaler())
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} has no GradScaler state (saved without fp16?); the loss scale starts afresh",
        f"{path} has no RNG state for process 1 (different world size?)"]


def test_a_temporary_directory_left_by_a_killed_save_is_replaced(tmp_path):
    model, opt, sched = make()
    stale = tmp_path / "step_00000003.tmp"
    stale.mkdir()
    (stale / "half_written.pt").write_bytes(b"\0" * 8)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"step": 3})
    assert not stale.exists() and not (path / "half_written.pt").exists()
    assert ckpt.verify(path) is None


def test_where_hard_links_fail_the_extra_files_are_copied(tmp_path, monkeypatch):
    """Another filesystem, or one without hard links (FAT, some network mounts): copy instead."""
    model, opt, sched = make()
    best = tmp_path / "best_model.safetensors"
    best.write_bytes(b"best weights")

    def no_link(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    path = ckpt.save_checkpoint(tmp_path / "c", 1, model, opt, sched, {"step": 1},
                                files={"best_model.safetensors": best})
    copied = path / "best_model.safetensors"
    assert copied.read_bytes() == b"best weights" and copied.stat().st_ino != best.stat().st_ino
    assert ckpt.verify(path) is None


def test_checkpoints_are_ordered_by_step_then_serial_not_by_name(tmp_path):
    for name in ("step_100000000", "step_99999999", "step_00000002.10", "step_00000002.2", "step_00000002",
                 "step_00000002.tmp", "notes"):
        (tmp_path / name).mkdir()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == [
        "step_00000002", "step_00000002.2", "step_00000002.10", "step_99999999", "step_100000000"]


def test_the_unusable_report_notes_intact_weights_only_when_the_manifest_says_so(tmp_path, caplog):
    path = _saved(tmp_path)
    (path / ckpt.MANIFEST).write_text("{not json")
    assert ckpt.unusable_report(tmp_path) == [f"{path}: MANIFEST.json is unreadable"]
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        assert ckpt.latest_good(tmp_path) is None
    assert caplog.messages == [f"checkpoint {path} is unusable (MANIFEST.json is unreadable); trying the previous one"]
