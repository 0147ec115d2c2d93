"""End to end: train on digits-LT, render a digits-C set, evaluate CE / mCE against a baseline
run's own errors through the command line, with the report's plots."""

import json
from pathlib import Path

import pytest

from ft_focal.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "recipes/demo/digits_lt_focal_sam.yaml")
FAST = ["train.epochs=1", "train.max_steps=4", "train.eval_every_epochs=1", "data.num_workers=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    for name, recipe in (("erm", "digits_lt_erm.yaml"), ("focal", "digits_lt_focal_sam.yaml")):
        assert main(["train", str(REPO / "recipes/demo" / recipe), f"output_dir={root / name}", *FAST]) == 0
    corrupt = root / "digits_c"
    assert main(["corrupt", DEMO, "--out", str(corrupt), "--corruptions", "gaussian_noise", "contrast",
                 "--severities", "1", "2", "3", "4", "5", "--workers", "1", "--limit", "40"]) == 0
    return root, corrupt


def test_corrupt_writes_the_imagenet_c_layout(runs):
    _, corrupt = runs
    for corruption in ("gaussian_noise", "contrast"):
        for severity in range(1, 6):
            files = list((corrupt / corruption / str(severity)).glob("*/*.JPEG"))
            assert len(files) == 40
    assert not list(corrupt.rglob("*.tmp"))


def test_eval_reports_ce_and_mce_relative_to_a_baseline_run(runs, capsys):
    root, corrupt = runs
    erm_json, focal_json = root / "erm_eval.json", root / "focal_eval.json"
    assert main(["eval", str(root / "erm" / "final"), "--out", str(erm_json), "--imagenet-c", str(corrupt)]) == 0
    assert main(["eval", str(root / "focal" / "final"), "--out", str(focal_json), "--imagenet-c", str(corrupt),
                 "--baseline", str(erm_json)]) == 0
    erm, focal = json.loads(erm_json.read_text()), json.loads(focal_json.read_text())
    # Same test accuracy as the run's own metrics.json.
    run_metrics = json.loads((root / "focal" / "metrics.json").read_text())
    assert focal["test"]["overall"] == pytest.approx(run_metrics["test"]["overall"], abs=1e-12)
    errors, base = focal["corruption"]["errors"], erm["corruption"]["errors"]
    for corruption in ("gaussian_noise", "contrast"):
        expected = 100 * sum(errors[corruption]) / sum(base[corruption])
        assert focal["corruption"]["CE"][corruption] == pytest.approx(expected, rel=1e-9)
    assert focal["corruption"]["mCE"] == pytest.approx(
        (focal["corruption"]["CE"]["gaussian_noise"] + focal["corruption"]["CE"]["contrast"]) / 2, rel=1e-9)
    erm_clean, focal_clean = 1 - erm["test"]["overall"], 1 - focal["test"]["overall"]
    rel = {c: 100 * sum(e - focal_clean for e in errors[c]) / sum(e - erm_clean for e in base[c])
           for c in ("gaussian_noise", "contrast") if sum(e - erm_clean for e in base[c]) > 0}
    if len(rel) == 2:
        assert focal["corruption"]["relative_mCE"] == pytest.approx(sum(rel.values()) / 2, rel=1e-9)
    assert "Resize" in focal["preprocessing"]
    for png in ("eval_corruption_ce.png", "eval_error_vs_severity.png", "eval_group_accuracy.png"):
        assert (root / png).stat().st_size > 1000
    report = (root / "eval_report.md").read_text()
    assert "mCE" in report and "eval_corruption_ce.png" in report


def test_partial_imagenet_c_is_never_reported_as_mce(runs, capsys, monkeypatch, tmp_path):
    """2 of the 15 benchmark corruptions, AlexNet baseline on digit classes: every place the number
    appears (console, eval.json, eval_report.md, plot, model card) says it is a partial mean and
    that AlexNet's errors are not a valid baseline for these classes."""
    import shutil

    from ft_focal.artifacts import card
    from ft_focal.evaluation import plots

    root, corrupt = runs
    run = tmp_path / "focal"
    shutil.copytree(root / "focal", run)
    drawn = []
    original_save = plots._save

    def recording_save(fig, path):
        ax = fig.axes[0]
        legend = ax.get_legend()
        drawn.append((Path(path).name, ax.get_title(), [t.get_text() for t in legend.get_texts()] if legend else []))
        return original_save(fig, path)

    monkeypatch.setattr(plots, "_save", recording_save)
    capsys.readouterr()
    assert main(["eval", str(run / "final"), "--imagenet-c", str(corrupt)]) == 0
    partial = "mCE over 2 of 15 corruptions (incomplete)"
    invalid = "AlexNet's ImageNet-C errors are not a valid baseline for this model's 10 non-ImageNet classes"
    printed = [line for line in capsys.readouterr().out.splitlines() if "mCE" in line]
    assert len(printed) == 1 and printed[0].startswith(f"{partial} ") and invalid in printed[0], printed

    corruption = json.loads((run / "final" / "eval.json").read_text())["corruption"]
    assert corruption["mCE_name"] == partial and corruption["mCE_corruptions"] == 2
    assert corruption["mCE_complete"] is False and corruption["baseline_valid"] is False
    assert corruption["baseline_note"].startswith(invalid)

    report_lines = [ln for ln in (run / "final" / "eval_report.md").read_text().splitlines() if "mCE" in ln]
    assert report_lines and all(partial in ln for ln in report_lines), report_lines
    assert any(invalid in ln for ln in report_lines)
    (title_plot,) = [d for d in drawn if d[0] == "eval_corruption_ce.png"]
    assert partial in title_plot[1] and all(partial in text for text in title_plot[2] if "mCE" in text)

    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    readme = (tmp_path / "export" / "README.md").read_text()
    meta = card.read_front_matter(readme)
    names = [m["name"] for r in meta["model-index"][0]["results"] for m in r["metrics"] if "mCE" in m["name"]]
    assert names and all(partial in name for name in names), names
    assert all(m["type"] != "mCE" for r in meta["model-index"][0]["results"] for m in r["metrics"])
    body_lines = [ln for ln in readme.split("---", 2)[2].splitlines() if "mCE" in ln]
    assert body_lines and all(partial in ln for ln in body_lines), body_lines
