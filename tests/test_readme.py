"""The README is a test: every fenced block of README.md, recipes/accelerate/README.md and
eval/README.md is parsed with the real command-line parser and run end to end, offline, on the CPU.

HOW TO REGISTER A NEW README BLOCK (the one table to edit is the REGISTRY below)
  * A shell command: add its text to SHELL, spelled as `shell_commands` normalises it
    (continuation lines joined, whitespace collapsed, `a && b` split), with `runs(...)` or
    `skipped(reason)`. Only GPU-only launch configs and pip / pytest lines may be skipped.
    `runs(*append, needs=..., provides=..., tiny_model=..., slow=...)`:
      append      overrides the test adds to the command (e.g. `train.epochs=2` for the demo);
      needs       names of other registered commands' `provides` that must have run first
                  (e.g. eval on the demo run needs "demo"); they are run on demand, once;
      tiny_model  swap the recipe's ViT-B/16 for the tiny open_clip model of the same family
                  (the weights placeholder then points at that tiny model's file);
      slow        the part takes over a minute: `pytest -m slow` runs it.
    The program (first word after any `VAR=value`) picks the runner in RUNNERS: `ft-focal`
    (in-process `ft_focal.cli.main`) or `accelerate` (a real `accelerate launch` subprocess).
    A new program (say `torchrun`) needs a runner there too. A new `ft-focal` subcommand
    (`ft-focal sweep ...`, `ft-focal wise ...`) runs through the same runner: add its lines.
    `env={"SWEEP_DB": "postgres_url"}`: `$SWEEP_DB` in the command takes the value of that pytest
    fixture (a real PostgreSQL server for the README's cluster sweep).
  * A Python snippet: add an entry to PYTHON keyed by a string only that snippet contains, with
    the placeholder paths it uses (mapped to fixtures) and the providers it needs.
  * A placeholder path (an absolute `/data/...` path): add it to PLACEHOLDERS with the fixture
    it stands for (tests/readme_support.py builds them). Relative outputs (`runs/...`,
    `exports/...`) need nothing: every command runs in a scratch folder with `recipes/`,
    `sweeps/` and (a copy of) `eval/` in it.
A block or command that is not in the registry, or a registry entry the README no longer has,
fails `test_every_readme_block_is_registered` / `test_every_registry_entry_is_in_a_readme`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
from readme_support import (
    REPO,
    Block,
    Workspace,
    fenced_blocks,
    make_workspace,
    shell_commands,
    split_env,
    tiny_open_clip_overrides,
)

README_FILES = ("README.md", "recipes/accelerate/README.md", "eval/README.md")
IMAGENET_RECIPE = "recipes/imagenet_lt/clip_vit_b16_adaptformer_focal_sam.yaml"
DEMO_RUN = "runs/demo/digits_lt_focal_sam"


@dataclass(frozen=True)
class Plan:
    """How the test treats one registered command (see the module docstring)."""

    skip_reason: Optional[str] = None
    append: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    provides: Optional[str] = None
    tiny_model: bool = False
    slow: bool = False
    check: Optional[Callable[[Path], None]] = None  # more than exit code 0: what must exist afterwards
    env: tuple[tuple[str, str], ...] = ()  # ("$VAR" in the command, the pytest fixture whose value it takes)


def runs(*append: str, needs: tuple[str, ...] = (), provides: Optional[str] = None, tiny_model: bool = False,
         slow: bool = False, check: Optional[Callable[[Path], None]] = None,
         env: Optional[dict[str, str]] = None) -> Plan:
    return Plan(None, tuple(append), tuple(needs), provides, tiny_model, slow, check, tuple((env or {}).items()))


def skipped(reason: str) -> Plan:
    return Plan(skip_reason=reason)


def _files(*paths: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        for path in paths:
            assert (root / path).exists(), f"{path} was not written"
    return check


def _demo_trained(root: Path) -> None:
    metrics = json.loads((root / DEMO_RUN / "metrics.json").read_text())
    assert metrics["updates"] == 2 * 17 and metrics["test"]["overall"] is not None  # 2 epochs of 17 updates
    assert (root / DEMO_RUN / "final" / "model.safetensors").is_file()


def _two_processes(run: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert json.loads((root / run / "metrics.json").read_text())["world_size"] == 2
    return check


def _robustness_evaluated(root: Path) -> None:
    result = json.loads((root / DEMO_RUN / "final" / "eval.json").read_text())
    assert len(result["robustness"]) == 2, result["robustness"]  # the blur shift and the -C suite


SWEEP_SMALL = ("trials=2", "train.epochs=1", "train.eval_every_epochs=1", "pruner.name=none")

PIP = skipped("pip: installs the package; this test runs from the checkout")
GPU = "GPU-only: a bf16 CUDA launch config (the recipe and its overrides are still parsed)"

# ============================================================================ THE REGISTRY
SHELL: dict[str, Plan] = {
    # README.md, Quickstart
    'pip install -e ".[dev]"': PIP,
    "ft-focal train recipes/demo/digits_lt_focal_sam.yaml":
        runs("train.epochs=2", provides="demo", check=_demo_trained),
    "pytest": skipped("pytest: the test suite itself"),
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
    "--dynamo_backend no -m ft_focal.train recipes/demo/digits_lt_focal_sam.yaml "
    "output_dir=runs/demo/digits_lt_focal_sam_2proc":
        runs("train.epochs=2", slow=True, check=_two_processes("runs/demo/digits_lt_focal_sam_2proc")),
    # README.md, on the finished demo run
    "ft-focal eval runs/demo/digits_lt_focal_sam":
        runs(needs=("demo",), check=_files(f"{DEMO_RUN}/final/eval.json", f"{DEMO_RUN}/final/eval_report.md")),
    "ft-focal report runs/demo/digits_lt_focal_sam": runs(needs=("demo",), check=_files(f"{DEMO_RUN}/report.md")),
    "ft-focal export runs/demo/digits_lt_focal_sam exports/digits_lt_focal_sam":
        runs(needs=("demo",), check=_files("exports/digits_lt_focal_sam/README.md")),
    "ft-focal sharpness runs/demo/digits_lt_focal_sam/final --iters 5 --trace-samples 5 --batches 1":
        runs(needs=("demo",), check=_files(f"{DEMO_RUN}/sharpness/sharpness.json")),
    "ft-focal corrupt recipes/demo/digits_lt_focal_sam.yaml --out runs/demo/digits_c --corruptions gaussian_noise "
    "contrast --limit 50": runs(provides="digits_c", check=_files("runs/demo/digits_c/contrast/5")),
    "ft-focal eval runs/demo/digits_lt_focal_sam --imagenet-c runs/demo/digits_c --out runs/demo/digits_c_eval.json":
        runs(needs=("demo", "digits_c"), check=_files("runs/demo/digits_c_eval.json")),
    # README.md, A real run
    f"ft-focal train {IMAGENET_RECIPE} --dry-run data.root=/data/imagenet "
    "model.pretrained=/data/weights/clip/ViT-B-16.openai.safetensors": runs(),
    f"ft-focal check-data {IMAGENET_RECIPE} data.root=/data/imagenet": runs(),
    f"accelerate launch --config_file recipes/accelerate/single_gpu_bf16.yaml -m ft_focal.train {IMAGENET_RECIPE} "
    "data.root=/data/imagenet model.pretrained=/data/weights/clip/ViT-B-16.openai.safetensors": skipped(GPU),
    # README.md, zero-shot baseline
    f"ft-focal train {IMAGENET_RECIPE} --zero-shot data.root=/data/imagenet "
    "model.pretrained=/data/weights/clip/ViT-B-16.openai.safetensors":
        runs("data.num_workers=0", tiny_model=True, provides="imagenet_model",
             check=_files("runs/imagenet_lt/clip_vit_b16_adaptformer_focal_sam_zero_shot/final/model.safetensors")),
    # recipes/accelerate/README.md
    f"accelerate launch --config_file recipes/accelerate/single_gpu_bf16.yaml -m ft_focal.train {IMAGENET_RECIPE}":
        skipped(GPU),
    "accelerate launch --config_file recipes/accelerate/multi_gpu_bf16.yaml --num_processes 8 -m ft_focal.train "
    "recipes/inat2018/clip_vit_b16_adaptformer_focal_sam.yaml": skipped(GPU),
    "ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m ft_focal.train "
    "recipes/demo/digits_lt_focal_sam.yaml output_dir=runs/demo_2proc":
        runs("train.epochs=2", slow=True, check=_two_processes("runs/demo_2proc")),
    # README.md, Robustness (on the demo run)
    "ft-focal corrupt recipes/demo/digits_lt_focal_sam.yaml --out runs/demo/digits_c --corruptions "
    "gaussian_noise,gaussian_blur --severities 3 --workers 2":
        runs("--limit", "50", provides="digits_c_blur", check=_files("runs/demo/digits_c/gaussian_blur/3")),
    'ft-focal eval runs/demo/digits_lt_focal_sam/final --suite eval/digits_blur.yaml --suite "eval/imagenet_c.yaml '
    "root=runs/demo/digits_c corruptions=[gaussian_noise] extra_corruptions=[gaussian_blur] severities=[3] "
    'classnames=null preprocessing.resize=32 preprocessing.crop=32 num_workers=0"':
        runs(needs=("demo", "digits_c_blur"), check=_robustness_evaluated),
    "ft-focal wise runs/demo/digits_lt_focal_sam --alphas 0:1:0.1 --suite eval/digits_blur.yaml --export "
    "runs/demo/digits_lt_focal_sam_wise_export":
        runs(needs=("demo",), check=_files(f"{DEMO_RUN}/wise/wise.md", f"{DEMO_RUN}/wise/final",
                                           "runs/demo/digits_lt_focal_sam_wise_export/README.md")),
    # README.md, Sweeps (2 trials of 1 epoch instead of 12 of 6)
    "ft-focal sweep sweeps/demo_focal_sam.yaml":
        runs(*SWEEP_SMALL, slow=True, provides="demo_sweep",
             check=_files("runs/sweeps/demo_focal_sam/sweep.md", "runs/sweeps/demo_focal_sam/best.yaml")),
    "ft-focal train runs/sweeps/demo_focal_sam/best.yaml":
        runs("train.epochs=1", needs=("demo_sweep",), slow=True,
             check=_files("runs/sweeps/demo_focal_sam/best_run/final/model.safetensors")),
    'ft-focal sweep sweeps/demo_focal_sam.yaml --storage "$SWEEP_DB"':
        runs(*SWEEP_SMALL, "output_dir=runs/sweeps/demo_focal_sam_postgres", slow=True,
             env={"SWEEP_DB": "postgres_url"}, check=_files("runs/sweeps/demo_focal_sam_postgres/best.yaml")),
    # README.md, FSDP2
    "ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m ft_focal.train "
    "recipes/demo/digits_lt_focal_sam.yaml train.fsdp=true output_dir=runs/demo_fsdp2":
        runs("train.epochs=2", slow=True, provides="demo_fsdp2", check=_two_processes("runs/demo_fsdp2")),
    "ft-focal eval runs/demo_fsdp2/final":
        runs(needs=("demo_fsdp2",), slow=True, check=_files("runs/demo_fsdp2/final/eval.json")),
}


@dataclass(frozen=True)
class Snippet:
    """A Python snippet: `paths` maps each placeholder string in it to a fixture or provider
    name (see `resolve`); `needs_module`: skipped when that optional package is not installed."""

    paths: tuple[tuple[str, str], ...] = ()
    needs_module: Optional[str] = None
    stub_robustbench: bool = False
    slow: bool = False


PYTHON: dict[str, Snippet] = {
    "SharpnessTrainer(": Snippet(paths=(("path/to/vit", "fixture:hf_vit"),)),
    "SharpnessLightningMixin": Snippet(needs_module="lightning"),
    "from robustbench": Snippet(stub_robustbench=True, paths=(
        ("runs/imagenet_lt/clip_vit_b16_adaptformer_focal_sam/final", "provider:imagenet_model"),
        ("/data/imagenet-c", "fixture:empty"), ("/data/imagenet", "fixture:imagenet_lt"))),
    'suite = load_eval_suite("eval/imagenet_c.yaml", ["root=/data/ImageNet-C", "classnames=/data/ImageNet_LT/'
    'classnames.txt"])': Snippet(paths=(("/data/ImageNet-C", "fixture:empty"),
                                        ("/data/ImageNet_LT/classnames.txt", "fixture:imagenet_lt_classnames"))),
    "run_imagenet_c_suite(": Snippet(slow=True, paths=(
        ("runs/imagenet_lt/clip_vit_b16_adaptformer_focal_sam/final", "provider:imagenet_model"),
        ("/data/ImageNet-C", "provider:imagenet_c"),
        ("/data/ImageNet_LT/classnames.txt", "fixture:imagenet_lt_classnames"))),
}

# Absolute placeholder paths -> the fixture (tests/readme_support.py) they stand for.
PLACEHOLDERS: dict[str, str] = {
    "/data/weights/clip/ViT-B-16.openai.safetensors": "open_clip_weights",
    "/data/imagenet": "imagenet_lt",
}
# ============================================================================ end of the registry


def _blocks() -> list[Block]:
    return [block for file in README_FILES for block in fenced_blocks(file)]


def _snippet_key(block: Block) -> Optional[str]:
    keys = [key for key in PYTHON if key in block.body]
    return keys[0] if len(keys) == 1 else None


def _shell_params() -> list:
    params = []
    for block in _blocks():
        if block.language == "bash":
            for command in shell_commands(block.body):
                plan = SHELL.get(command)
                marks = [pytest.mark.slow] if plan is not None and plan.slow else []
                params.append(pytest.param(command, id=f"{block.where} {command[:60]}", marks=marks))
    return params


def _python_params() -> list:
    params = []
    for block in _blocks():
        if block.language == "python":
            key = _snippet_key(block)
            marks = [pytest.mark.slow] if key is not None and PYTHON[key].slow else []
            params.append(pytest.param(block, id=block.where, marks=marks))
    return params


# ----------------------------------------------------------------------------- the registry is complete


def test_every_readme_block_is_registered():
    unknown = []
    for block in _blocks():
        if block.language == "bash":
            unknown += [f"{block.where}: {c}" for c in shell_commands(block.body) if c not in SHELL]
        elif block.language == "python":
            if _snippet_key(block) is None:
                unknown.append(f"{block.where}: python snippet matching none (or several) of PYTHON's keys")
        else:
            unknown.append(f"{block.where}: a ```{block.language or '(no language)'} block: give it `bash` or "
                           "`python` and register it, or write it as indented text")
    assert not unknown, "README blocks the test does not know (register them in tests/test_readme.py):\n" + \
        "\n".join(unknown)


def test_every_registry_entry_is_in_a_readme():
    commands = {c for b in _blocks() if b.language == "bash" for c in shell_commands(b.body)}
    bodies = [b.body for b in _blocks() if b.language == "python"]
    stale = [c for c in SHELL if c not in commands] + [k for k in PYTHON if not any(k in body for body in bodies)]
    assert not stale, f"registry entries no README has any more: {stale}"


def test_skips_are_only_gpu_pip_or_pytest():
    """A skipped command is a pip / pytest line, or a launch whose accelerate config is not a CPU one."""
    import yaml

    for command, plan in SHELL.items():
        if plan.skip_reason is None:
            continue
        _, words = split_env(command)
        assert plan.skip_reason.startswith(("GPU-only", "pip", "pytest")), command
        assert words[0] == plan.skip_reason.split(":")[0] or plan.skip_reason.startswith("GPU-only"), command
        if plan.skip_reason.startswith("GPU-only"):
            assert words[:2] == ["accelerate", "launch"] and "--config_file" in words, command
            config = yaml.safe_load((REPO / words[words.index("--config_file") + 1]).read_text())
            assert not config.get("use_cpu") and "ACCELERATE_USE_CPU" not in command, command


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("readme"))


def _localize(words: list[str], ws: Workspace, tiny_model: bool) -> list[str]:
    out = []
    for word in words:
        for placeholder in sorted(PLACEHOLDERS, key=len, reverse=True):
            if placeholder in word:
                fixture = PLACEHOLDERS[placeholder]
                word = word.replace(placeholder, str(ws.fixture(fixture)))
        assert "/data/" not in word, f"placeholder without a fixture (add it to PLACEHOLDERS): {word}"
        out.append(word)
    return out + (tiny_open_clip_overrides() if tiny_model else [])


def run_ft_focal(env: dict, words: list[str], ws: Workspace, monkeypatch) -> None:
    from ft_focal.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(words[1:]) == 0, f"exit code not 0: {' '.join(words)}"


def run_accelerate(env: dict, words: list[str], ws: Workspace, monkeypatch) -> None:
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(accelerate), *words[1:]], cwd=ws.root, env=full_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if "ft_focal.train" in words:  # INFO lines come from the main process only, once each
        assert done.stderr.count(" INFO data: ") == 1, done.stderr[-3000:]


RUNNERS: dict[str, Callable] = {"ft-focal": run_ft_focal, "accelerate": run_accelerate}


def run_registered(command: str, ws: Workspace, monkeypatch, request=None) -> None:
    """Run one README command (its `needs` first) in the workspace; each provider runs once."""
    plan = SHELL[command]
    for name in plan.needs:
        ensure(name, ws, monkeypatch)
    env, words = split_env(command)
    for variable, fixture in plan.env:
        assert request is not None, f"{command}: a command that needs a fixture cannot be a provider"
        words = [word.replace(f"${variable}", str(request.getfixturevalue(fixture))) for word in words]
    words = _localize(words, ws, plan.tiny_model) + list(plan.append)
    assert words[0] in RUNNERS, f"no runner for '{words[0]}' (add one to RUNNERS)"
    monkeypatch.chdir(ws.root)
    RUNNERS[words[0]](env, words, ws, monkeypatch)
    if plan.check is not None:
        plan.check(ws.root)


def ensure(name: str, ws: Workspace, monkeypatch) -> None:
    """Run the registered command that `provides` `name`, unless it already ran."""
    if name in ws.done:
        return
    if name == "imagenet_c":
        ws.done[name] = _render_imagenet_c(ws, monkeypatch)
        return
    providers = [c for c, p in SHELL.items() if p.provides == name]
    assert len(providers) == 1, f"one README command must provide '{name}', found {providers}"
    run_registered(providers[0], ws, monkeypatch)
    ws.done[name] = providers[0]


def _render_imagenet_c(ws: Workspace, monkeypatch) -> Path:
    """Every benchmark and extra corruption at every severity, of the tiny ImageNet-LT test split
    (`ft-focal corrupt` on the recipe): what `/data/ImageNet-C` stands for."""
    from ft_focal.cli import main

    out = ws.root / "fixtures" / "imagenet_c"
    monkeypatch.chdir(ws.root)
    assert main(["corrupt", IMAGENET_RECIPE, f"data.root={ws.fixture('imagenet_lt')}", "--out", str(out),
                 "--corruptions", "all", "--limit", "3", "--workers", "2"]) == 0
    return out


@pytest.mark.parametrize("command", _shell_params())
def test_readme_command(command, workspace, monkeypatch, request):
    assert command in SHELL, "unregistered (see test_every_readme_block_is_registered)"
    plan = SHELL[command]
    if plan.skip_reason is not None:
        _parse_skipped(command)
        pytest.skip(plan.skip_reason)
    if plan.provides is not None and plan.provides in workspace.done:
        return  # ran already as another command's prerequisite (with its check)
    run_registered(command, workspace, monkeypatch, request)
    if plan.provides is not None:
        workspace.done[plan.provides] = command


def _parse_skipped(command: str) -> None:
    """A skipped launch line is still parsed by `ft_focal.train`'s parser, and its recipe loads with
    its overrides (placeholder paths need not exist for that)."""
    from ft_focal.commands.train import build_parser
    from ft_focal.config import load_recipe

    _, words = split_env(command)
    if "-m" in words and words[words.index("-m") + 1] == "ft_focal.train":
        args = build_parser().parse_command(words[words.index("-m") + 2:])
        load_recipe(REPO / args.recipe, args.overrides)


def resolve(target: str, ws: Workspace, monkeypatch) -> Path:
    kind, _, name = target.partition(":")
    if kind == "fixture":
        return ws.fixture(name)
    ensure(name, ws, monkeypatch)
    if name == "imagenet_model":
        return ws.root / "runs/imagenet_lt/clip_vit_b16_adaptformer_focal_sam_zero_shot/final"
    return Path(ws.done[name])


def robustbench_stub() -> types.ModuleType:
    """`robustbench.benchmark` as far as the README uses it: checks the model contract (an eval-mode
    nn.Module on RGB in [0, 1] at its image size) and returns (clean, corrupt) accuracies."""
    import torch

    def benchmark(model, dataset, threat_model, data_dir, corruptions_data_dir, preprocessing, n_examples,
                  device, batch_size):
        assert isinstance(model, torch.nn.Module) and not model.training
        assert os.path.isdir(data_dir) and os.path.isdir(corruptions_data_dir)
        assert (dataset, threat_model, preprocessing) == ("imagenet", "corruptions", "Res256Crop224")
        images = torch.rand(4, 3, model.image_size, model.image_size)
        with torch.no_grad():
            logits = model(images)
        assert logits.shape == (4, len(model.classnames)) and torch.isfinite(logits).all()
        return 0.0, 0.0

    module = types.ModuleType("robustbench")
    module.benchmark = benchmark
    return module


@pytest.mark.parametrize("block", _python_params())
def test_readme_python_snippet(block, workspace, monkeypatch):
    key = _snippet_key(block)
    assert key is not None, "unregistered (see test_every_readme_block_is_registered)"
    snippet = PYTHON[key]
    if snippet.needs_module:
        pytest.importorskip(snippet.needs_module)
    code = block.body
    for placeholder, target in snippet.paths:
        assert placeholder in code, f"{block.where}: no '{placeholder}' any more (update PYTHON)"
        code = code.replace(placeholder, str(resolve(target, workspace, monkeypatch)))
    assert "/data/" not in code, f"{block.where}: a placeholder path without a fixture (map it in PYTHON)"
    if snippet.stub_robustbench:
        monkeypatch.setitem(sys.modules, "robustbench", robustbench_stub())
    monkeypatch.chdir(workspace.root)
    # A fresh namespace: the snippet must import what it uses.
    exec(compile(code, block.where, "exec"), {"__name__": "__readme__"})


def test_files_the_readmes_cite_exist():
    """`docs/algorithms.md`, `tests/models/test_timm.py`, ...: a cited repository file exists (a README once
    cited ALGORITHMS.md, which is not in the repository)."""
    import re

    top = {p.name for p in REPO.iterdir() if p.is_dir()}
    missing = []
    for file in README_FILES:
        for cited in re.findall(r"[A-Za-z0-9_./-]+\.(?:md|py|yaml)\b", (REPO / file).read_text()):
            in_repo = cited.split("/")[0] in top and "/" in cited
            stem = cited.split(".")[0]  # one capital letter (`A.yaml`) is a placeholder, not a document
            shouted = "/" not in cited and len(stem) > 1 and stem.isupper() and cited != "README.md"
            if (in_repo or shouted) and not (REPO / cited).exists():
                missing.append(f"{file}: {cited}")
    assert not missing, missing
