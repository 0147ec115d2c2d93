"""End to end on the digits demo: a blurred copy of its test split (a generated folder + split file)
as a `kind: shift` suite, `ft-focal eval --suite` (one table and plot), `ft-focal wise` (alpha table,
ID-OOD curve by shot group) and the export's model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import ImageFilter

from ft_focal.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "demo" / "digits_lt_focal_sam.yaml"
SUITE = ROOT / "eval" / "digits_blur.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A short demo run (2 epochs) and a blurred test split written as images + split list."""
    from ft_focal.config import load_recipe
    from ft_focal.data.build import build_datasets
    from ft_focal.models import preprocess_for

    base = tmp_path_factory.mktemp("demo")
    run = base / "run"
    assert cli(["train", str(RECIPE), f"output_dir={run}", "train.epochs=2", "train.eval_every_epochs=1"]) == 0
    recipe = load_recipe(RECIPE)
    test = build_datasets(recipe.data, preprocess_for(recipe.model), recipe.seed).test
    lines = []
    for i in range(len(test)):
        name = f"blur/{i:04d}.png"
        (base / "blur").mkdir(exist_ok=True)
        test.load_image(i).filter(ImageFilter.GaussianBlur(1.0)).save(base / name)
        lines.append(f"{name} {int(test.labels[i])}")
    (base / "blur.txt").write_text("\n".join(lines) + "\n")
    return run, f"{SUITE} root={base} split_list={base / 'blur.txt'}"


def test_eval_with_several_suites_writes_one_robustness_table_and_plot(demo, tmp_path):
    run, suite = demo
    out = tmp_path / "eval.json"
    assert cli(["eval", str(run / "final"), "--out", str(out), "--suite", suite, "--suite", suite + " name=blur_2"]) == 0
    result = json.loads(out.read_text())
    rows = result["robustness"]["shifts"]
    assert [r["name"] for r in rows] == ["digits_blur", "blur_2"]
    assert rows[0]["result"]["num_samples"] == result["test"]["num_samples"] == 300
    assert rows[0]["result"]["overall"] == rows[1]["result"]["overall"]
    assert rows[0]["drop"]["overall"] == pytest.approx(result["test"]["overall"] - rows[0]["result"]["overall"])
    assert rows[0]["effective_robustness"] is None  # the suite gives no fit
    report = (tmp_path / "eval_report.md").read_text()
    assert "## Robustness: in-distribution vs distribution shifts" in report
    assert "| digits_blur |" in report and "| blur_2 |" in report
    assert (tmp_path / "eval_robustness.png").stat().st_size > 0


def test_wise_on_the_demo_with_a_shift_suite_reports_alpha_by_shot_group(demo, tmp_path, capsys):
    run, suite = demo
    export = tmp_path / "export"
    assert cli(["wise", str(run), "--alphas", "0,0.5,1", "--suite", suite, "--export", str(export)]) == 0
    printed = capsys.readouterr().out
    wise = json.loads((run / "wise" / "wise.json").read_text())
    assert [r["alpha"] for r in wise["rows"]] == [0.0, 0.5, 1.0]
    assert wise["chosen_alpha"] in (0.0, 0.5, 1.0) and wise["chosen_by"].startswith("best validation")
    val = [r["val"]["overall"] for r in wise["rows"]]
    assert wise["rows"][[0.0, 0.5, 1.0].index(wise["chosen_alpha"])]["val"]["overall"] == max(val)
    run_test = json.loads((run / "metrics.json").read_text())["test"]
    assert wise["rows"][-1]["test"]["overall"] == pytest.approx(run_test["overall"], abs=1e-12)
    for row in wise["rows"]:
        shift = row["shifts"][0]["result"]
        assert set(shift) >= {"overall", "many", "medium", "few"} and shift["num_samples"] == 300
    md = (run / "wise" / "wise.md").read_text()
    assert "| alpha | val | ID (test) | digits_blur |" in md and "| 0.5" in md and "| digits_blur" in printed
    assert (run / "wise" / "wise_curve.png").stat().st_size > 0
    assert (run / "wise" / "final" / "model.safetensors").is_file()
    card = (export / "README.md").read_text()
    assert "Robustness (`ft-focal eval --suite`)" in card and "| digits_blur |" in card
    assert "WiSE-FT alpha=" in card  # the model selection names the interpolation
