"""The Trainer: CPU smoke tests of the whole training path (recipe -> data -> model -> optimizer ->
loop -> final/ + metrics.json, for each backbone family and tuning method, plus two processes), its
logs (train_log.jsonl, progress lines, learning curves), its hot path (no host reads between log
steps) and the rough edges a new user hits first, one test each."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_focal.config import load_recipe, recipe_from_dict
from ft_focal.errors import UserError
from ft_focal.models import tiny_model_config
from ft_focal.training.trainer import train

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo" / "digits_lt_focal_sam.yaml"


def _tiny(out: Path, **train: object) -> object:
    return recipe_from_dict({
        "name": "tiny", "output_dir": str(out), "seed": 0, "model": tiny_model_config("open_clip"),
        "tuning": {"method": "lora", "lora_rank": 4},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 4, "synthetic_train_size": 64,
                 "synthetic_eval_size": 8, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "optim": {"name": "erm", "lr": 0.01},
        "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "save_every_steps": 1000, "threads": 1,
                  **train},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run (6 updates, log every 2, validation at updates 4 and 6) with its captured stdout."""
    import contextlib
    import io

    from ft_focal.training.trainer import train

    out = tmp_path_factory.mktemp("trainer") / "run"
    recipe = _tiny(out, max_steps=6, log_every_steps=2)
    recipe.data.synthetic_train_size = 32  # 4 updates per epoch
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # not a terminal: plain progress lines
        metrics = train(recipe)
    return out, metrics, stdout.getvalue()


def test_train_log_jsonl_has_one_line_per_log_step(run):
    out, metrics, _ = run
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    lines = [r for r in records if "val" not in r]  # the others: one line per validation
    assert [r["update"] for r in lines] == [2, 4, 6]
    assert [(r["update"], r["val"]) for r in records if "val" in r] == [(h["step"], h["val"]) for h in metrics["history"]]
    for r in lines:
        assert set(r) >= {"update", "epoch", "loss", "lr", "images_per_s", "elapsed_s", "skipped_updates"}
        assert r["loss"] > 0 and r["lr"] >= 0 and r["skipped_updates"] == 0
    assert [r["epoch"] for r in lines] == [0, 0, 1]
    assert lines[-1]["elapsed_s"] <= metrics["train_seconds"] + 1


def test_progress_lines_when_stdout_is_not_a_terminal(run):
    _, _, stdout = run
    lines = [line for line in stdout.splitlines() if line.startswith("update ")]
    assert len(lines) == 3 and lines[0].startswith("update 2/6") and "ETA" in lines[-1] and "img/s" in lines[1]


def test_report_shows_learning_curves_and_report_overlays_runs(run, tmp_path):
    import shutil

    from ft_focal.commands.report import main as report_main

    out, _, _ = run
    assert "learning_curves.png" in (out / "report.md").read_text()
    assert (out / "learning_curves.png").stat().st_size > 5000
    other = tmp_path / "other"
    shutil.copytree(out, other)
    assert report_main([str(out), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert "learning_curves.png" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "learning_curves.png").is_file()


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    from ft_focal.training.log import LOG_FILE, _truncate_after, read_train_log

    path = tmp_path / LOG_FILE
    path.write_text("".join(json.dumps({"update": u, "loss": 1.0}) + "\n" for u in (2, 4, 6)) + '{"upd')
    _truncate_after(path, 4)
    assert [r["update"] for r in read_train_log(tmp_path)] == [2, 4]


class _CountReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts device -> host reads (`aten._local_scalar_dense`: .item(), float(t), bool(t), ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_loop_reads_no_device_value_between_log_steps(tmp_path, monkeypatch):
    """Between two optimizer steps the loop reads nothing from the device, except once at a log step
    (the summed loss). The optimizer's own reads are not the loop's and are not counted here."""
    import ft_focal.training.parts as parts_mod
    import ft_focal.training.trainer as train_mod

    counter, starts, ends = _CountReads(), [], []
    real_build = parts_mod.build_optimizer_from

    def build(*args, **kwargs):
        opt = real_build(*args, **kwargs)
        real_step = opt.step

        def step(_self, *a, **kw):
            starts.append(counter.count)
            counter.paused = True
            try:
                return real_step(*a, **kw)
            finally:
                counter.paused = False
                ends.append(counter.count)
        opt.step = types.MethodType(step, opt)  # LambdaLR re-wraps a bound method
        return opt

    monkeypatch.setattr(parts_mod, "build_optimizer_from", build)
    recipe = _tiny(tmp_path / "run", max_steps=7, log_every_steps=3)
    with counter:
        train_mod.train(recipe)
    between = [starts[i + 1] - ends[i] for i in range(len(ends) - 1)]  # after update i + 1
    assert len(between) == 6
    assert between == [0, 0, 1, 0, 0, 1], between  # updates 3 and 6 are log steps


def test_skip_streak_counts_the_same_on_the_host_and_on_the_device():
    """The longest run of skips between two reads, from bools or from 0-d flags read late."""
    from ft_focal.training.state import SkipStreak

    pattern = [0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1]
    reads_at = {3, 8, 11}
    results = []
    for on_device in (False, True):
        streak, seen = SkipStreak(current=2), []
        for k, bad in enumerate(pattern, 1):
            streak.add(torch.tensor(float(bad)) if on_device else bool(bad))
            assert streak.on_device == on_device
            if k in reads_at:
                seen.append(streak.read())
        results.append(seen)
    assert results[0] == results[1] == [(2, 2), (0, 3), (2, 2)]


@pytest.mark.parametrize("name", ["sam", "focal_sam"])
def test_with_a_fused_base_optimizer_updates_read_the_device_only_at_log_steps(tmp_path, name):
    """optim.fused: the kernel skips a non-finite update on the device, so an update reads no
    device value, optimizer included, except the first (a fused SGD must not skip its first call;
    the one-backward check) and at log steps (summed loss and count, skip streak, skip count)."""
    import ft_focal.training.trainer as train_mod

    counter, starts = _CountReads(), []
    recipe = _tiny(tmp_path / "run", max_steps=7, log_every_steps=3)
    recipe.optim = dataclasses.replace(recipe.optim, name=name, fused=True, momentum=0.9, rho=0.05,
                                       gamma=1.0 if name == "focal_sam" else None,
                                       lam=0.8 if name == "focal_sam" else None)
    real_update = train_mod.Trainer._update

    def update(self, group):
        starts.append(counter.count)
        return real_update(self, group)

    with counter, pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod.Trainer, "_update", update)
        train_mod.train(recipe)
    # consecutive pairs: the last start has no successor, so stopping one short is intended
    per_update = [b - a for a, b in zip(starts, starts[1:], strict=False)]   # update i and the loop after it
    log_reads = per_update[2]
    assert per_update[0] >= 1 and per_update[1:] == [0, log_reads, 0, 0, log_reads] and log_reads <= 5, per_update


# ------------------------------------------------------------------ rough edges


def test_yaml_no_is_accepted_for_mixed_precision(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(DEMO.read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1))
    assert load_recipe(recipe_file).train.mixed_precision == "no"
    assert load_recipe(DEMO, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(UserError, match="mixed_precision"):
        load_recipe(DEMO, ["train.mixed_precision=yes"])


@pytest.mark.parametrize("name,dropped", [("erm", "optim.rho=0.05, optim.gamma=1.0, optim.lam=0.8"),
                                          ("sam", "optim.gamma=1.0, optim.lam=0.8"),
                                          ("imbsam", "optim.gamma=1.0, optim.lam=0.8")])
def test_switching_the_method_drops_keys_it_does_not_take(name, dropped, caplog):
    from ft_focal.training.builders import build_optimizer_from

    recipe = load_recipe(DEMO, [f"optim.name={name}"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 10))
    accelerator = types.SimpleNamespace(num_processes=1, scaler=None, backward=lambda loss, **kw: loss.backward(),
                                        device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="ft_focal"):
        opt = build_optimizer_from(recipe, model, model, [50 - 4 * c for c in range(10)], accelerator)
    assert type(opt).__name__.lower().replace("_", "") == name.replace("_", "")
    lines = [r.getMessage() for r in caplog.records if "does not take" in r.getMessage()]
    assert lines == [f"optim.name={name} does not take {dropped}: ignored"]


def test_precision_conflict_with_accelerate_launch_warns(monkeypatch, caplog, tmp_path):
    from ft_focal.training.builders import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING, logger="ft_focal"):
        make_accelerator(_tiny(tmp_path))
    assert any("'bf16'" in r.getMessage() and "'no'" in r.getMessage() for r in caplog.records)


def test_trackers_only_through_log_with(tmp_path):
    from ft_focal.training.builders import make_accelerator

    assert not make_accelerator(_tiny(tmp_path)).trackers
    with pytest.raises(UserError, match="unknown tracker 'tensorbord'"):
        make_accelerator(_tiny(tmp_path, log_with=["tensorbord"]))


def test_model_card_reports_the_trained_head_init(run, tmp_path):
    from ft_focal.artifacts import hub

    out, _, _ = run
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["head_init"] == "text"
    export = hub.export_run(out, tmp_path / "export")
    assert "initialised from `text`" in (export / "README.md").read_text()
    again = hub.export_run(export, tmp_path / "export2")  # an export of an export keeps it
    assert "initialised from `text`" in (again / "README.md").read_text()


def test_no_log_line_about_a_throwaway_model(caplog):
    from ft_focal.models import preprocess_for

    with caplog.at_level(logging.INFO, logger="ft_focal"):
        preprocess_for(load_recipe(DEMO).model)
    assert not [r for r in caplog.records if "tuning head" in r.getMessage()]


def test_demo_first_step_is_info_and_names_the_passes(tmp_path, caplog):
    from ft_focal.training.trainer import train

    recipe = load_recipe(DEMO, [f"output_dir={tmp_path / 'demo'}", "train.max_steps=2", "train.eval_every_epochs=100"])
    with caplog.at_level(logging.INFO, logger="ft_focal"):
        train(recipe)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert any("2F + 3B" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


@pytest.mark.parametrize("severities", [["1,2"], ["1", "2"]])
def test_corrupt_list_flags_both_ways_and_a_summary_sentence(tmp_path, capsys, severities):
    import numpy as np
    from PIL import Image

    from ft_focal.commands.corrupt import main

    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "src" / cls / "x.png")
    argv = [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--corruptions", "contrast,brightness",
            "--workers", "1", "--severities", *severities]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("Rendered 8 of 8 images (2 source images x 2 corruption(s) x 2 severity level(s))")
    assert "{" not in printed
    assert len(list((tmp_path / "out").rglob("*.JPEG"))) == 8


def test_corrupt_bad_list_flag_is_one_line(tmp_path, capsys):
    from ft_focal.commands.corrupt import main

    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--severities", "1,x"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_preflight_skips_list_paths_for_synthetic_data():
    from ft_focal.training.preflight import missing_paths

    recipe = load_recipe(REPO / "recipes" / "imagenet_lt" / "clip_vit_b16_adaptformer_focal_sam.yaml",
                         ["data.dataset=synthetic", "model.pretrained=null"])
    assert missing_paths(recipe) == []


def test_save_checkpoint_takes_keywords_after_the_state(tmp_path):
    from ft_focal.training import checkpoint as ckpt

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(TypeError):
        ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, 0)
    assert ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep=1).is_dir()


def test_log_with_accepts_one_name():
    assert load_recipe(DEMO, ["train.log_with=tensorboard"]).train.log_with == ["tensorboard"]
    assert load_recipe(DEMO, ["train.log_with=[wandb, trackio]"]).train.log_with == ["wandb", "trackio"]


def test_a_run_stopped_mid_epoch_leaves_no_dataloader_worker_behind(tmp_path, monkeypatch):
    """DataLoader workers ignore SIGTERM (SLURM signals every process of a job step; the main process
    stops at its next safe point), so only the loop can end them. A run stopped mid-epoch by an error
    must do so at once: its traceback keeps the loop's frames alive, and the interpreter's exit would
    otherwise wait for the workers forever."""
    import multiprocessing

    import ft_focal.training.trainer as train_mod

    recipe = _tiny(tmp_path / "run", max_steps=6)
    recipe.data.num_workers = 1
    real_update, calls = train_mod.Trainer._update, []

    def update(self, group):
        calls.append(group)
        if len(calls) == 2:
            raise RuntimeError("stopped mid-epoch")
        return real_update(self, group)

    before = set(multiprocessing.active_children())
    monkeypatch.setattr(train_mod.Trainer, "_update", update)
    with pytest.raises(RuntimeError, match="stopped mid-epoch") as stopped:
        train_mod.train(recipe)
    assert stopped.tb is not None   # the frames are still referenced here, as in any caller's handler
    left = [p for p in multiprocessing.active_children() if p not in before and p.is_alive()]
    assert not left, left


def tiny_recipe(tmp_path, family="open_clip", tuning="lora", optim="focal_sam", **extra):
    model = tiny_model_config(family)
    raw = {
        "name": f"smoke_{family}_{tuning}_{optim}",
        "output_dir": str(tmp_path / "run"),
        "model": model,
        "tuning": {"method": tuning, "lora_rank": 4},
        "data": {"dataset": "synthetic", "synthetic_num_classes": 6, "synthetic_train_size": 48,
                 "synthetic_eval_size": 24, "image_size": 32, "test_resize": 32, "num_workers": 0},
        "loss": {"name": "la"},
        "optim": {"name": optim, "lr": 0.01, **({"rho": 0.05, "gamma": 1.0, "lam": 0.8} if optim == "focal_sam" else {})},
        "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "save_every_steps": 4, "threads": 1},
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return recipe_from_dict(raw)


def check_run(out: Path, world_size: int = 1) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == world_size
    test = metrics["test"]
    for key in ("overall", "many", "medium", "few"):
        assert test[key] is None or 0.0 <= test[key] <= 1.0
    assert len(test["per_class"]) == len(metrics["class_counts"])
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "recipe.yaml").is_file()
    assert (out / "report.md").is_file() and (out / "per_class_accuracy.png").stat().st_size > 1000
    return metrics


FAST = [("open_clip", "lora"), ("hf_clip", "adaptformer"), ("hf_vit", "full")]
SLOW = [(f, t) for f in ("open_clip", "hf_clip", "hf_vit") for t in ("full", "lora", "adaptformer", "head")
        if (f, t) not in FAST]


def _smoke(tmp_path, family, tuning, monkeypatch):
    import ft_focal.models as models

    built = {}
    original = models.build_classifier

    def recording_build(*args, **kwargs):  # keep the initial weights of the model train() builds
        model = original(*args, **kwargs)
        built["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        built["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return model

    monkeypatch.setattr(models, "build_classifier", recording_build)
    recipe = tiny_recipe(tmp_path, family, tuning)
    metrics = train(recipe)
    out = Path(recipe.output_dir)
    check_run(out)
    assert metrics["updates"] == 2 * (48 // 16)
    assert metrics["skipped_steps"] == 0
    # Exactly the tuning method's parameters moved; every frozen tensor is bit-identical.
    final = load_file(str(out / "final" / "model.safetensors"))
    changed = {n for n, p in built["initial"].items() if not torch.equal(final[n], p)}
    assert changed and changed <= built["trainable"], sorted(changed - built["trainable"])[:3]
    assert any("head" in n for n in changed)
    if tuning != "head":
        assert any("head" not in n for n in changed)


@pytest.mark.parametrize("family,tuning", FAST)
def test_smoke_family_and_tuning(tmp_path, family, tuning, monkeypatch):
    _smoke(tmp_path, family, tuning, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("family,tuning", SLOW)
def test_smoke_family_and_tuning_full_matrix(tmp_path, family, tuning, monkeypatch):
    _smoke(tmp_path, family, tuning, monkeypatch)


@pytest.mark.parametrize("optim", ["erm", "sam", "imbsam", "sse_sam"])
def test_every_optimizer_runs_in_the_loop(tmp_path, optim):
    extra = {"optim__rho_head": 0.05, "optim__rho_tail": 0.1} if optim == "sse_sam" else {}
    if optim in ("sam", "imbsam"):
        extra["optim__rho"] = 0.05
    recipe = tiny_recipe(tmp_path, "hf_vit", "head", optim, train__epochs=1, **extra)
    metrics = train(recipe)
    assert metrics["optimizer"] == optim and metrics["updates"] == 3
    passes = metrics["pass_counts"]
    assert passes["forward"] >= 3 and passes["backward"] >= 3


def test_gradient_accumulation_and_bf16_run(tmp_path):
    recipe = tiny_recipe(tmp_path, "open_clip", "adaptformer", train__grad_accum_steps=2,
                         train__mixed_precision="bf16", train__epochs=1, train__grad_clip=1.0)
    metrics = train(recipe)
    assert metrics["updates"] == 3
    check_run(Path(recipe.output_dir))


def test_rerun_of_a_finished_run_resumes_instead_of_retraining(tmp_path):
    recipe = tiny_recipe(tmp_path, "hf_vit", "head", train__epochs=1)
    first_metrics = train(recipe)
    first = load_file(str(Path(recipe.output_dir) / "final" / "model.safetensors"))
    metrics = train(recipe)
    assert metrics["pass_counts"] == first_metrics["pass_counts"]  # restored, no pass recomputed
    assert metrics["updates"] == first_metrics["updates"]
    again = load_file(str(Path(recipe.output_dir) / "final" / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


# accelerate.debug_launcher forks: in this test process, autograd (and on a GPU machine CUDA) threads
# already exist, and a fork after threads start can hang or fail. It runs in a fresh interpreter instead.
_TWO_PROCESSES = """
import sys
from accelerate import debug_launcher


def body(recipe_path):
    from ft_focal.config import load_recipe
    from ft_focal.training.trainer import train

    train(load_recipe(recipe_path))


if __name__ == "__main__":
    debug_launcher(body, args=(sys.argv[1],), num_processes=2)
"""


def test_two_processes_with_debug_launcher(tmp_path):
    from ft_focal.config import save_recipe

    recipe = tiny_recipe(tmp_path, "hf_vit", "lora", train__epochs=1)
    path = tmp_path / "recipe.yaml"
    save_recipe(recipe, path)
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESSES)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = check_run(Path(recipe.output_dir), world_size=2)
    assert metrics["updates"] == 3


@pytest.mark.slow
def test_demo_recipe_with_accelerate_launch_two_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ft_focal.train",
           str(REPO / "recipes/demo/digits_lt_focal_sam.yaml"), f"output_dir={tmp_path / 'run'}", "train.epochs=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_resolved_recipe_written_to_output_dir(tmp_path):
    recipe = tiny_recipe(tmp_path, "hf_vit", "head", train__epochs=1)
    train(recipe)
    written = yaml.safe_load((Path(recipe.output_dir) / "recipe.yaml").read_text())
    assert written["optim"]["lam"] == 0.8 and written["train"]["batch_size"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("one_backward", [False, True])
def test_compiled_model_with_inductor_runs_focal_sam(tmp_path, one_backward):
    """train.compile with inductor: the official step back-propagates one forward twice (and the
    one-backward path does so on its first-step check), which AOT autograd's donated buffers forbid
    unless the loop turns them off; the one-backward path keeps 2F + 2B after the first update."""
    recipe = tiny_recipe(tmp_path, "open_clip", "lora", train__epochs=1, train__compile=True,
                         optim__one_backward=one_backward)
    metrics = train(recipe)
    assert metrics["updates"] == 3 and metrics["skipped_steps"] == 0
    backward = metrics["pass_counts"]["backward"]
    assert backward == (3 * 2 + 1 if one_backward else 3 * 3)   # +1: the first-step check
    check_run(Path(recipe.output_dir))
