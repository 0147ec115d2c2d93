"""The command line as a person types it: flags and `key=value` overrides in any order in every
command (ft_focal/commands/args.py), one-line errors, `eval RUN_DIR`, percentages, `--version`,
and the edges of export / push / load_model."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import ft_focal
from ft_focal.cli import main
from ft_focal.version import __version__

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "recipes/demo/digits_lt_focal_sam.yaml")
IMAGENET = str(REPO / "recipes/imagenet_lt/clip_vit_b16_adaptformer_focal_sam.yaml")
FAST = ["train.epochs=1", "train.max_steps=2", "data.num_workers=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", DEMO, f"output_dir={out}", *FAST]) == 0
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- any order


def test_train_dry_run_takes_overrides_after_the_flag(monkeypatch):
    """The README's own command: `--dry-run` before the overrides."""
    seen = []
    monkeypatch.setattr("ft_focal.commands.dry_run.dry_run", lambda recipe, *args, **kwargs: seen.append(recipe))
    assert main(["train", IMAGENET, "--dry-run", "data.root=/data/imagenet", "model.pretrained=/x.safetensors"]) == 0
    assert seen[0].data.root == "/data/imagenet" and seen[0].model.pretrained == "/x.safetensors"
    seen.clear()  # and the flag last, an override first, the recipe in between
    assert main(["train", "optim.rho=0.1", IMAGENET, "data.root=/d", "--dry-run"]) == 0
    assert seen[0].optim.rho == 0.1 and seen[0].data.root == "/d"


def test_train_zero_shot_takes_overrides_after_the_flag(monkeypatch):
    seen = []
    monkeypatch.setattr("ft_focal.training.trainer.train", lambda recipe, *args, **kwargs: seen.append(recipe))
    assert main(["train", IMAGENET, "--zero-shot", "data.root=/data/imagenet", "optim.rho=0.1"]) == 0
    assert seen[0].data.root == "/data/imagenet" and seen[0].train.epochs == 0
    assert seen[0].output_dir.endswith("_zero_shot")


def test_a_later_override_of_the_same_key_wins(monkeypatch):
    seen = []
    monkeypatch.setattr("ft_focal.commands.dry_run.dry_run", lambda recipe, *args, **kwargs: seen.append(recipe))
    assert main(["train", IMAGENET, "optim.rho=0.1", "--dry-run", "optim.rho=0.2"]) == 0
    assert seen[0].optim.rho == 0.2


def test_unknown_flag_is_one_line_in_every_command(capsys):
    for command in (["train", DEMO], ["eval", "x"], ["corrupt", DEMO, "--out", "x"], ["check-data", DEMO],
                    ["export", "a", "b"], ["push", "a", "me/b"], ["report", "a"], ["sharpness", "x"],
                    ["wise", "x"], ["sweep", "x.yaml"]):
        assert main([*command, "--bogus", "data.root=/d"]) == 2, command
        err = _one_line_error(capsys)
        assert "--bogus" in err and f"ft-focal {command[0]}" in err


def test_missing_argument_is_one_line(capsys):
    assert main(["train", "--dry-run"]) == 2
    assert "recipe" in _one_line_error(capsys)


def test_commands_without_a_recipe_refuse_overrides_in_one_line(run, tmp_path, capsys):
    assert main(["export", str(run), str(tmp_path / "e"), "data.root=/x"]) == 2
    assert "data.root=/x" in _one_line_error(capsys)
    assert not (tmp_path / "e").exists()
    assert main(["report", str(run), "train.epochs=3"]) == 2
    assert "key=value" in _one_line_error(capsys)


def test_flag_values_shaped_like_overrides_stay_flag_values(monkeypatch):
    """`--message lr=0.1`: the value of a one-value flag is never taken for an override."""
    seen = {}

    def fake_push(source, repo_id, **kwargs):
        seen.update(kwargs, source=source, repo_id=repo_id)
        return "https://hub/x"

    monkeypatch.setattr("ft_focal.artifacts.hub.push_run", fake_push)
    assert main(["push", "--private", "--message", "lr=0.1", "some/run", "me/model"]) == 0
    assert seen["commit_message"] == "lr=0.1" and seen["private"] and seen["repo_id"] == "me/model"


def test_eval_out_then_overrides(run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", str(run / "final"), "--out", str(out), "data.num_workers=0", "--no-report"]) == 0
    assert json.loads(out.read_text())["test"]["overall"] is not None


def test_corrupt_flags_then_overrides(tmp_path):
    out = tmp_path / "c"
    assert main(["corrupt", DEMO, "--out", str(out), "--limit", "5", "data.num_workers=0", "--corruptions",
                 "contrast", "data.imbalance_factor=10", "--severities", "1", "--workers", "1"]) == 0
    assert len(list((out / "contrast" / "1").glob("*/*.JPEG"))) == 5


def test_sharpness_flags_then_overrides(run, tmp_path):
    out = tmp_path / "s"
    assert main(["sharpness", str(run / "final"), "--iters", "2", "train.threads=1", "--groups", "many",
                 "data.num_workers=0", "--trace-samples", "2", "--batches", "1", "--batch-size", "8",
                 "--out", str(out)]) == 0
    assert list(json.loads((out / "sharpness.json").read_text())["groups"]) == ["many"]


def test_check_data_flag_then_overrides(capsys):
    assert main(["check-data", "--workers", "1", DEMO, "data.num_workers=0"]) == 0
    assert "all images readable" in capsys.readouterr().out


def test_wise_flags_then_overrides(monkeypatch, capsys):
    """`ft-focal wise RUN --alphas 0,1 k=v --suite X k=v`: overrides after and between the flags."""
    seen = {}

    def fake_run_wise(run_dir, alphas, alpha, suites, accelerator, export, overrides):
        seen.update(run_dir=run_dir, alphas=alphas, suites=suites, overrides=overrides)
        return {"chosen_alpha": 0.0, "chosen_by": "validation", "run": run_dir}

    monkeypatch.setattr("ft_focal.evaluation.wise_sweep.run_wise", fake_run_wise)
    monkeypatch.setattr("ft_focal.evaluation.wise_report.wise_table", lambda out: [])
    suite = str(REPO / "eval/digits_blur.yaml")
    assert main(["wise", "some/run", "--alphas", "0,1", "data.num_workers=0", "--suite", suite,
                 "data.root=/d"]) == 0
    assert seen["run_dir"] == "some/run" and list(seen["alphas"]) == [0.0, 1.0] and len(seen["suites"]) == 1
    assert seen["overrides"] == ["data.num_workers=0", "data.root=/d"]
    assert "chosen alpha 0" in capsys.readouterr().out
    assert main(["wise", "some/run", "--bogus", "data.root=/d"]) == 2
    err = _one_line_error(capsys)
    assert "--bogus" in err and "ft-focal wise" in err


def test_sweep_flags_then_overrides(monkeypatch, tmp_path, capsys):
    """`ft-focal sweep SWEEP.yaml --no-wait trials=2 --timeout 5 train.epochs=1`: every override reaches the spec."""
    from types import SimpleNamespace

    seen = {}

    def fake_load_sweep(path, overrides):
        seen.update(path=path, overrides=overrides)
        return SimpleNamespace(name="s", trials=2, output_dir=str(tmp_path))

    def fake_run_worker(spec, storage, launch, gpu, timeout, wait_for_others):
        seen.update(timeout=timeout, wait=wait_for_others)
        return "study"

    monkeypatch.setattr("ft_focal.sweeps.spec.load_sweep", fake_load_sweep)
    monkeypatch.setattr("ft_focal.sweeps.study.default_storage_url", lambda spec: "sqlite:///x.db")
    monkeypatch.setattr("ft_focal.sweeps.worker.run_worker", fake_run_worker)
    monkeypatch.setattr("ft_focal.sweeps.report.write_sweep_report", lambda spec, study, seconds: tmp_path / "s.md")
    sweep = str(REPO / "sweeps/demo_focal_sam.yaml")
    assert main(["sweep", "--no-wait", sweep, "trials=2", "--timeout", "5", "train.epochs=1"]) == 0
    assert seen == {"path": sweep, "overrides": ["trials=2", "train.epochs=1"], "timeout": 5.0, "wait": False}
    assert main(["sweep", sweep, "--bogus", "trials=2"]) == 2
    err = _one_line_error(capsys)
    assert "--bogus" in err and "ft-focal sweep" in err


def test_python_m_ft_focal_train_uses_the_same_parser(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ft_focal.train", DEMO, "--bogus", "train.epochs=1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: ft-focal train: unrecognized arguments: --bogus (see ft-focal train --help)"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ft-focal {__version__}"


# ----------------------------------------------------------------------------- eval


def test_eval_takes_a_run_folder_and_prints_percentages(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "data.num_workers=0"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "final" / "eval.json").read_text())
    assert (run / "final" / "eval_report.md").is_file()
    overall = result["test"]["overall"]
    assert f"overall {100 * overall:.2f}%" in out, out
    metrics = json.loads((run / "metrics.json").read_text())
    assert overall == metrics["test"]["overall"]


# ----------------------------------------------------------------------------- export / push / load


def test_reexport_keeps_what_eval_wrote_in_the_old_export(run, tmp_path, caplog):
    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    assert main(["eval", str(export), "data.num_workers=0"]) == 0
    made = {p.name: p.read_bytes() for p in export.iterdir() if p.name.startswith("eval")}
    assert {"eval.json", "eval_report.md"} <= set(made)
    with caplog.at_level("WARNING"):
        assert main(["export", str(run), str(export)]) == 0
    asides = [p for p in tmp_path.iterdir() if p.name.startswith("export.before-")]
    assert len(asides) == 1
    assert {name: (asides[0] / name).read_bytes() for name in made} == made  # nothing lost
    assert str(asides[0]) in caplog.text
    assert (export / "model.safetensors").is_file() and not (export / "eval_report.md").exists()


def test_reexport_over_a_plain_export_replaces_it_without_a_copy(run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    assert main(["export", str(run), str(export)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_into_the_run_itself_says_contains_not_inside(run, capsys):
    assert main(["export", str(run), str(run)]) == 2
    err = _one_line_error(capsys)
    assert "contains the model folder" in err and "inside" not in err
    assert main(["export", str(run), str(run / "final" / "sub")]) == 2
    assert "inside the model folder" in _one_line_error(capsys)


def test_push_refuses_a_bad_repo_id_before_any_token_lookup(run, monkeypatch, capsys):
    def no_api():
        raise AssertionError("the Hub API was reached")

    monkeypatch.setattr("ft_focal.artifacts.hub._hf_api", no_api)
    for bad in ("../../etc/passwd", "a/b/c", "me/--x", "me/"):
        assert main(["push", str(run), bad]) == 2, bad
        err = _one_line_error(capsys)
        assert "not a Hub repository id" in err and "token" not in err


def test_load_model_of_an_export_without_weights_says_what_is_wrong(run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    (export / "model.safetensors").unlink()
    with pytest.raises(ft_focal.errors.UserError) as caught:
        ft_focal.load_model(export)
    message = str(caught.value)
    assert "not finished" not in message and "export" in message and "model.safetensors" in message


def test_safetensors_outputs_have_the_permissions_of_the_other_outputs(run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    expected = mode(run / "final" / "recipe.yaml")
    weights = [run / "final" / "model.safetensors", export / "model.safetensors",
               export / "trained_tensors.safetensors" if (export / "trained_tensors.safetensors").exists() else None,
               *sorted((run / "checkpoints").rglob("*.safetensors")), *sorted(run.glob("*.safetensors"))]
    weights = [w for w in weights if w is not None]
    assert len(weights) >= 3
    for file in weights:
        assert mode(file) == expected, (file, oct(mode(file)), oct(expected))


def test_plain_model_refuses_input_outside_unit_range_in_one_line(run):
    import torch

    plain = ft_focal.load_model(run, plain=True)
    size = plain.image_size
    images = torch.rand(2, 3, size, size)
    assert plain(images).shape == (2, len(plain.classnames))
    for bad, hint in ((images * 255, "0-255"), ((images - 0.5) / 0.25, "normalised")):
        with pytest.raises(ValueError) as caught:
            plain(bad)
        message = str(caught.value)
        assert "[0, 1]" in message and hint in message and "\n" not in message


# ----------------------------------------------------------------------------- what a person reads


def test_progress_and_train_log_show_validation_with_1_based_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    # 544 training images in batches of 272: 2 updates per epoch, a validation after each epoch
    assert main(["train", DEMO, f"output_dir={out}", "train.epochs=2", "train.batch_size=272",
                 "train.eval_every_epochs=1", "train.log_every_steps=1", "train.warmup_steps=0",
                 "data.num_workers=0"]) == 0
    printed = capsys.readouterr().out  # not a terminal: plain lines
    metrics = json.loads((out / "metrics.json").read_text())
    first, second = (h["val"]["overall"] for h in metrics["history"])
    assert f"validation at update 2/4, epoch 1/2: overall {100 * first:.2f}%" in printed, printed
    assert f"validation at update 4/4, epoch 2/2: overall {100 * second:.2f}%" in printed
    after_first = [line for line in printed.splitlines() if line.startswith("update 3/4")]
    assert after_first and f"val {100 * first:.2f}%" in after_first[0] and "epoch 2/2" in after_first[0]
    assert "epoch 0" not in printed
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["update"], r["val"]["overall"]) for r in records if "val" in r] == [(2, first), (4, second)]
    assert f"at epoch {metrics['history'][0 if first >= second else 1]['epoch'] + 1}" in metrics["selected"]
    assert "| 1 | 2 |" in (out / "report.md").read_text()  # the validation history table


def test_info_lines_on_the_main_process_only():
    code = ("import logging; from ft_focal.commands.guard import setup_logging, BarSafeHandler; setup_logging(); "
            "log = logging.getLogger('ft_focal'); log.info('INFO-LINE'); log.warning('WARN-LINE'); "
            "assert all(isinstance(h, BarSafeHandler) for h in logging.getLogger().handlers)")
    for rank, expected in (("0", ["INFO-LINE", "WARN-LINE"]), ("1", ["WARN-LINE"])):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": rank}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert [w for w in ("INFO-LINE", "WARN-LINE") if w in done.stderr] == expected, (rank, done.stderr)


def test_a_log_line_never_lands_on_a_progress_bar_line():
    import io
    import logging

    from tqdm import tqdm

    from ft_focal.commands.guard import BarSafeHandler

    stream = io.StringIO()
    handler = BarSafeHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    bar = tqdm(total=10, file=stream, desc="train", mininterval=0)
    bar.update(3)
    handler.emit(logging.LogRecord("ft_focal", logging.INFO, __file__, 1, "LOG-MESSAGE", None, None))
    bar.close()
    line = next(line for line in stream.getvalue().split("\n") if "LOG-MESSAGE" in line)
    assert line.split("\r")[-1] == "INFO LOG-MESSAGE", repr(line)


def test_corrupt_writes_no_bar_updates_into_a_redirected_log(tmp_path, capsys):
    assert main(["corrupt", DEMO, "--out", str(tmp_path / "c"), "--limit", "20", "--corruptions", "contrast",
                 "--severities", "1", "--workers", "1", "data.num_workers=0"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "|" not in err, err
    assert "corrupt: 20/20 images (100%)" in err


def test_unknown_key_hint_names_the_full_dotted_key(capsys):
    assert main(["train", DEMO, "optim.rhoo=0.1", "--dry-run"]) == 2
    assert _one_line_error(capsys) == "error: unknown recipe key 'optim.rhoo' (did you mean 'optim.rho'?)"


def test_demo_dry_run_counts_the_embedded_training_images(tmp_path, capsys):
    from ft_focal.commands.dry_run import dry_run
    from ft_focal.config import load_recipe

    plan = dry_run(load_recipe(DEMO), output_dir=str(tmp_path / "run"))
    assert plan["train_images"] == 544  # digits-LT: 134 + 103 + 80 + 62 + 48 + 37 + 28 + 22 + 17 + 13
    assert "train images: 544, updates per epoch 17" in capsys.readouterr().out


def test_skip_bad_images_logs_and_counts_each_bad_file_once(tmp_path, caplog):
    import logging

    import torch
    from PIL import Image

    from ft_focal.data.datasets import FileListDataset, collate_skip_bad

    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "cut.png").write_bytes(b"\x89PNG not really")
    paths = ["a.png", "gone.png", "b.png", "cut.png", "c.png", "d.png"]
    dataset = FileListDataset(str(tmp_path), paths, [0, 1, 0, 1, 0, 1], skip_bad=True, name="train")
    with caplog.at_level(logging.WARNING, logger="ft_focal.data"):
        for _ in range(3):  # three epochs: each bad file drawn three times
            assert [dataset[i] is None for i in range(len(dataset))] == [False, True, False, True, False, False]
    assert dataset.bad_count == 2 and dataset.bad_indices() == [1, 3]
    logged = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(logged) == 2 and any("gone.png" in m for m in logged) and any("cut.png" in m for m in logged)
    # in DataLoader worker processes too, and a resume's marks are neither logged nor counted again
    fresh = FileListDataset(str(tmp_path), paths, [0, 1, 0, 1, 0, 1], skip_bad=True, name="train",
                            transform=lambda image: torch.zeros(1))
    fresh.mark_bad([1])
    loader = torch.utils.data.DataLoader(fresh, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    for _ in range(2):
        assert sum(len(y) for _, y in loader) == 4
    assert fresh.bad_count == 2
