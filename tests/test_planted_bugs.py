"""The default tests notice the bugs a user would hit: each bug below is planted in a COPY of the
package (a temporary directory put first on PYTHONPATH) and the tests that guard it must fail.

Slow (each case imports torch and builds models in a fresh pytest process). The planted bugs are
those a review found the suite missing; a change that makes one of them pass again has lost the
test that catches it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (name, file in ft_focal/, exact text, its replacement, the default tests that must fail)
BUGS = [
    ("builders drop optim.gamma", "training/builders.py",
     "method = {key: getattr(cfg, key) for key in METHOD_KEYS if getattr(cfg, key) is not None}",
     "method = {key: getattr(cfg, key) for key in METHOD_KEYS if getattr(cfg, key) is not None and key != 'gamma'}",
     ["tests/test_recipe_wiring.py", "-k", "update and cifar10_lt/clip_vit_b16_adaptformer_focal_sam"]),
    ("ImbSAM tail <= threshold", "optim/imbsam.py",
     "self.is_tail = (counts < self.tail_threshold).to(float)",
     "self.is_tail = (counts <= self.tail_threshold).to(float)",
     ["tests/test_boundaries.py", "-k", "imbsam"]),
    ("SSE-SAM tail <= threshold", "optim/sse_sam.py",
     "self.is_tail = (counts < self.tail_threshold).to(float)",
     "self.is_tail = (counts <= self.tail_threshold).to(float)",
     ["tests/test_boundaries.py", "-k", "sse_sam"]),
    ("default eval.many_threshold 50", "config/__init__.py",
     "    many_threshold: int = 100\n", "    many_threshold: int = 50\n",
     ["tests/test_boundaries.py", "-k", "eval_config"]),
    ("checkpoint skips the optimizer's load_state_dict", "training/checkpoint.py",
     "    optimizer.load_state_dict(torch.load(path / \"optimizer.pt\", weights_only=True))\n", "",
     ["tests/test_checkpoint.py"]),
    ("checkpoint skips the scheduler's load_state_dict", "training/checkpoint.py",
     "    scheduler.load_state_dict(torch.load(path / \"scheduler.pt\", weights_only=True))\n", "",
     ["tests/test_checkpoint.py"]),
]


def _plant(tmp: Path, file: str, text: str, replacement: str) -> Path:
    copy = tmp / "src"
    shutil.copytree(ROOT / "ft_focal", copy / "ft_focal", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "ft_focal" / file
    source = target.read_text()
    assert source.count(text) == 1, f"{file}: the text to change is no longer there exactly once: update BUGS"
    target.write_text(source.replace(text, replacement))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("name,file,text,replacement,tests", BUGS, ids=[b[0] for b in BUGS])
def test_default_tests_fail_on_a_planted_bug(name, file, text, replacement, tests, tmp_path):
    copy = _plant(tmp_path, file, text, replacement)
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1")
    # Run from the copy: `python -m` puts the working directory first on sys.path.
    probe = subprocess.run([sys.executable, "-c", "import ft_focal; print(ft_focal.__file__)"], env=env,
                           cwd=copy, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(copy)), probe.stdout + probe.stderr
    args = [str(ROOT / t) if t.startswith("tests/") else t for t in tests]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                          "-c", str(ROOT / "pyproject.toml"), *args], cwd=copy, env=env, capture_output=True,
                         text=True, timeout=900)
    # exit code 1 = tests ran and some failed (2-5: interrupted, internal error, usage, nothing collected)
    assert out.returncode == 1, f"{name}: the tests did not fail (exit {out.returncode})\n{out.stdout[-2000:]}"
    assert "FAILURES" in out.stdout


@pytest.mark.parametrize("name,file,text,replacement,tests", BUGS, ids=[b[0] for b in BUGS])
def test_the_planted_text_is_in_the_package(name, file, text, replacement, tests):
    """Cheap guard run by default: each bug's text still exists once, so the slow test plants it."""
    assert (ROOT / "ft_focal" / file).read_text().count(text) == 1, name
