"""Mutation testing (mutmut 3) of the numerical core, one module at a time. Not in CI: too slow.

    python tools/mutation.py metrics            # ft_focal/metrics/ against its tests
    python tools/mutation.py losses optim checkpoint builders
    python tools/mutation.py --list             # the modules and the tests each one runs
    python tools/mutation.py builders --keep    # then, after adding tests for its survivors:
    python tools/mutation.py builders --recheck /tmp/mutation_builders_XXXX

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
    # optim/ in three groups (run times: docs/design.md); "optim" below runs all three. The DDP and
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
                       "tests/optim/test_optim_reference.py", "tests/optim/test_registry.py",
                       "tests/optim/test_wrapper_state.py", "tests/optim/test_method_contract.py"]),
    # mutmut wraps every function in a trampoline, which torch.compile breaks the graph on: the
    # graph-break count test cannot pass on a mutated copy, so it is left out
    "one_backward": (["ft_focal/optim/one_backward/"],
                     ["tests/optim/test_one_backward.py", "tests/optim/test_one_backward_check.py",
                      "tests/optim/test_step_proxies.py",
                      "--deselect=tests/optim/test_step_proxies.py::test_one_backward_forward_compiles_without_graph_breaks"]),
    "checkpoint": (["ft_focal/training/checkpoint.py"], ["tests/training/test_checkpoint.py",
                                                         "tests/training/test_checkpoint_contract.py",
                                                         "tests/training/test_resume.py"]),
    "builders": (["ft_focal/training/builders.py"], ["tests/training/test_builders.py", "tests/training/test_recipe_wiring.py",
                                                     "tests/training/test_trainer.py"]),
}
GROUPS = {"optim": ["optim_step", "optim_methods", "one_backward"]}


def _mutmut(scratch: Path, *args: str, capture: bool = False) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONPATH", None)   # mutmut puts its mutants/ copy first itself
    done = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=scratch, env=env, capture_output=capture,
                          text=True)
    return done.stdout or ""


def _write_config(scratch: Path, paths: list[str], tests: list[str]) -> None:
    config = (REPO / "pyproject.toml").read_text()
    config += ("\n[tool.mutmut]\n"
               f"source_paths = {paths!r}\n"
               # the rest of the package too: mutmut's copy must not import the installed one
               "also_copy = ['ft_focal/', 'recipes/', 'eval/', 'benchmarks/']\n"
               f"pytest_add_cli_args_test_selection = {tests!r}\n"
               "pytest_add_cli_args = ['-p', 'no:cacheprovider', '-x']\n").replace("'", '"')
    for target in (scratch, scratch / "mutants"):
        if target.is_dir():
            (target / "pyproject.toml").write_text(config)


def run_module(name: str, keep: bool, children: int) -> dict:
    paths, tests = MODULES[name]
    scratch = Path(tempfile.mkdtemp(prefix=f"mutation_{name}_"))
    for part in ("ft_focal", "tests", "recipes", "eval", "benchmarks"):
        shutil.copytree(REPO / part, scratch / part, ignore=shutil.ignore_patterns("__pycache__"))
    _write_config(scratch, paths, tests)
    _mutmut(scratch, "run", "--max-children", str(children))
    counts = report(name, scratch)
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return counts


def recheck_survivors(name: str, scratch: Path, children: int) -> dict:
    """After tests were added: copy today's tests into a kept scratch copy and run its surviving
    mutants again (minutes, not the whole module). The mutants are those of the code as it was then."""
    for target in (scratch / "tests", scratch / "mutants" / "tests"):
        shutil.copytree(REPO / "tests", target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    _write_config(scratch, *MODULES[name])   # today's test selection, new test files included
    survivors = _statuses(scratch).get("survived", [])
    if survivors:
        _mutmut(scratch, "run", "--max-children", str(children), *survivors)
    return report(name, scratch, rechecked=len(survivors))


def _statuses(scratch: Path) -> dict[str, list[str]]:
    by_status: dict[str, list[str]] = {}
    for line in _mutmut(scratch, "results", "--all", "true", capture=True).splitlines():
        found = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if found:
            by_status.setdefault(found.group(2), []).append(found.group(1))
    return by_status


def report(name: str, scratch: Path, rechecked: int = 0) -> dict:
    """Print the score and write benchmarks/results/mutation_<module>_<date>.txt."""
    paths, tests = MODULES[name]
    by_status = _statuses(scratch)
    counts = {status: len(names) for status, names in by_status.items()}
    ran = counts.get("killed", 0) + counts.get("survived", 0) + counts.get("timeout", 0)
    score = (counts.get("killed", 0) + counts.get("timeout", 0)) / ran if ran else float("nan")
    today = datetime.date.today().isoformat()
    note = f" (the {rechecked} survivors of the first run rechecked with today's tests)" if rechecked else ""
    listing = "\n".join(f"    {n}: {status}" for status, names in sorted(by_status.items()) for n in sorted(names))
    results = REPO / "benchmarks" / "results" / f"mutation_{name}_{today}.txt"
    results.write_text(f"mutmut over {paths} with {tests}, {today}{note}\n{counts}\nscore {score:.3f}\n\n{listing}\n")
    survivors = by_status.get("survived", [])
    print(f"{name}: {counts} score {score:.3f}; survivors: {' '.join(survivors) or 'none'}")
    print(f"  details: {results}; scratch copy: {scratch}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"any of {', '.join([*MODULES, *GROUPS])}")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (to `mutmut show` survivors)")
    parser.add_argument("--recheck", metavar="SCRATCH", type=Path,
                        help="rerun only the survivors kept in SCRATCH (a --keep copy of ONE module) with today's tests")
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
    names = [member for m in args.modules for member in GROUPS.get(m, [m])]
    if args.recheck:
        if len(names) != 1:
            raise SystemExit("--recheck takes the one module its scratch copy was made for")
        recheck_survivors(names[0], args.recheck, args.children)
        return
    for name in names:
        run_module(name, args.keep, args.children)


if __name__ == "__main__":
    main()
