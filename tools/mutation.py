"""Mutation testing (mutmut 3) of the numerical core, one module at a time. Not in CI: too slow.

    python tools/mutation.py metrics            # ft_focal/metrics/ against its tests
    python tools/mutation.py losses optim checkpoint builders
    python tools/mutation.py --list             # the modules and the tests each one runs

Each module is mutated in a scratch copy of the repository (ft_focal/, tests/, pyproject.toml with
a [tool.mutmut] section for that module added), so the working tree is never touched. mutmut forks
one child per mutant and, after one stats run, runs only the tests that executed the mutated
function (per-function test selection). The tests given below are the ones that exercise the module;
the full suite would be the same score at many times the cost. Output: one line per module
(killed / survived / timeout / no tests, score = killed / mutants that ran) and the surviving
mutants' names, and the complete `mutmut results` in benchmarks/results/mutation_<module>_<date>.txt.
Read a survivor with `mutmut show NAME` inside the printed scratch directory.
docs/design.md ("Mutation testing") says when to run it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = {   # name -> (paths to mutate, tests that exercise them)
    "metrics": (["ft_focal/metrics/"], ["tests/test_metrics.py", "tests/optim/test_boundaries.py",
                                          "tests/data/test_imagenet_c.py"]),
    "losses": (["ft_focal/losses/"], ["tests/test_losses.py", "tests/test_loss_defaults.py",
                                        "tests/training/test_recipe_wiring.py"]),
    # optim/ in three groups, each about an hour of one core; "optim" below runs all three. The DDP and
    # FSDP2 tests are not listed: mutmut traces its test selection in-process, and code that only
    # spawned processes run is never attributed to them (docs/design.md, "Mutation testing")
    "optim_step": (["ft_focal/optim/_step.py", "ft_focal/optim/_numerics.py", "ft_focal/optim/focal_sam.py"],
                   ["tests/optim/test_optim_methods.py", "tests/optim/test_optim_mechanics.py",
                    "tests/optim/test_boundaries.py", "tests/optim/test_step_contract.py"]),
    "optim_methods": (["ft_focal/optim/sam.py", "ft_focal/optim/erm.py", "ft_focal/optim/imbsam.py",
                       "ft_focal/optim/ccsam.py", "ft_focal/optim/sse_sam.py", "ft_focal/optim/registry.py",
                       "ft_focal/optim/_wrapping.py", "ft_focal/optim/_runtime.py"],
                      ["tests/optim/test_optim_methods.py", "tests/optim/test_optim_mechanics.py",
                       "tests/optim/test_boundaries.py", "tests/optim/test_step_contract.py",
                       "tests/optim/test_optim_reference.py", "tests/optim/test_registry.py"]),
    "one_backward": (["ft_focal/optim/one_backward/"],
                     ["tests/optim/test_one_backward.py", "tests/optim/test_one_backward_check.py",
                      "tests/optim/test_step_proxies.py"]),
    "checkpoint": (["ft_focal/training/checkpoint.py"], ["tests/training/test_checkpoint.py",
                                                         "tests/training/test_checkpoint_contract.py",
                                                         "tests/training/test_resume.py"]),
    "builders": (["ft_focal/training/builders.py"], ["tests/training/test_builders.py", "tests/training/test_recipe_wiring.py",
                                                     "tests/training/test_trainer.py"]),
}
GROUPS = {"optim": ["optim_step", "optim_methods", "one_backward"]}


def run_module(name: str, keep: bool, children: int) -> dict:
    paths, tests = MODULES[name]
    scratch = Path(tempfile.mkdtemp(prefix=f"mutation_{name}_"))
    for part in ("ft_focal", "tests", "recipes", "eval", "benchmarks"):
        shutil.copytree(REPO / part, scratch / part, ignore=shutil.ignore_patterns("__pycache__"))
    config = (REPO / "pyproject.toml").read_text()
    config += ("\n[tool.mutmut]\n"
               f"source_paths = {paths!r}\n"
               # the rest of the package too: mutmut's copy must not import the installed one
               "also_copy = ['ft_focal/', 'recipes/', 'eval/', 'benchmarks/']\n"
               f"pytest_add_cli_args_test_selection = {tests!r}\n"
               "pytest_add_cli_args = ['-p', 'no:cacheprovider', '-x']\n").replace("'", '"')
    (scratch / "pyproject.toml").write_text(config)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONPATH", None)   # mutmut puts its mutants/ copy first itself
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)], cwd=scratch, env=env)
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=scratch, env=env,
                         capture_output=True, text=True).stdout
    counts: dict = {}
    survivors = []
    for line in out.splitlines():
        found = re.match(r"\s*(\S+): (.+)$", line)
        if found:
            counts[found.group(2)] = counts.get(found.group(2), 0) + 1
            if found.group(2) == "survived":
                survivors.append(found.group(1))
    ran = counts.get("killed", 0) + counts.get("survived", 0) + counts.get("timeout", 0)
    score = (counts.get("killed", 0) + counts.get("timeout", 0)) / ran if ran else float("nan")
    today = datetime.date.today().isoformat()
    results = REPO / "benchmarks" / "results" / f"mutation_{name}_{today}.txt"
    results.write_text(f"mutmut over {paths} with {tests}, {today}\n{counts}\nscore {score:.3f}\n\n{out}")
    print(f"{name}: {counts} score {score:.3f}; survivors: {' '.join(survivors) or 'none'}")
    print(f"  details: {results}; scratch copy: {scratch}")
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"any of {', '.join([*MODULES, *GROUPS])}")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (to `mutmut show` survivors)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1,
                        help="mutants run at once (default: one per CPU core)")
    args = parser.parse_args()
    if args.list or not args.modules:
        for name, (paths, tests) in MODULES.items():
            print(f"{name}: {' '.join(paths)}  <- {' '.join(tests)}")
        for name, members in GROUPS.items():
            print(f"{name}: {' '.join(members)}")
        return
    unknown = [m for m in args.modules if m not in MODULES and m not in GROUPS]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; valid: {', '.join([*MODULES, *GROUPS])}")
    for name in [member for m in args.modules for member in GROUPS.get(m, [m])]:
        run_module(name, args.keep, args.children)


if __name__ == "__main__":
    main()
