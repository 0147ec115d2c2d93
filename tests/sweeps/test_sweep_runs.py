"""`ft-focal sweep` end to end on the CPU with tiny trials of the digits demo (each trial a fresh
`python -m ft_focal.train` process): concurrent workers, pruning, a worker killed mid-trial on
SQLite and on a real PostgreSQL server, and retraining best.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[2]
DEMO_RECIPE = str(REPO / "recipes/demo/digits_lt_focal_sam.yaml")
pytestmark = pytest.mark.slow

# tiny trials: the demo recipe for one to three epochs, a checkpoint every 5 updates
FIXED = {"train.epochs": 1, "train.eval_every_epochs": 1, "train.warmup_steps": 0, "train.save_every_steps": 5,
         "train.log_every_steps": 5}
HEAD_INIT_GRID = {"model.head_init": {"type": "categorical", "choices": ["class_mean", "random"]}}


def write_sweep(tmp_path: Path, name: str, space: dict, **changes) -> Path:
    sweep = {"name": name, "recipe": DEMO_RECIPE, "output_dir": str(tmp_path / name), "fixed": dict(FIXED),
             "space": space, "objective": "overall", "sampler": {"name": "grid", "seed": 1},
             "pruner": {"name": "none"}, "trials": 2, "seeds": [0]}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(sweep.get(key), dict):
            sweep[key] = dict(sweep[key], **value)
        else:
            sweep[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def sweep_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def start_worker(path: Path, *args: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ft_focal.cli", "sweep", str(path), *args], env=sweep_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(worker: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, out[-3000:]
    return out


def load(path: Path, storage: str | None = None) -> optuna.Study:
    spec = yaml.safe_load(path.read_text())
    url = storage or f"sqlite:///{Path(spec['output_dir']).resolve() / 'study.db'}"
    return optuna.load_study(study_name=spec["name"], storage=url)


def finished(study: optuna.Study) -> list:
    """Trials that ran to an end (complete, pruned, crashed); not the skipped duplicate proposals."""
    return [t for t in study.get_trials() if t.user_attrs.get("duplicate_of") is None and (
            t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.user_attrs.get("crashed")))]


def wait_for(condition, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def run_processes(recipe: Path) -> list[int]:
    """Pids of processes whose command line names this run's recipe (a run that outlived its worker)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(recipe).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def stop_all(*workers: subprocess.Popen) -> None:
    """A failed test leaves no worker behind (its runs die with it)."""
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()


def kill_when_checkpointed(worker: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the worker once its trial's run wrote a checkpoint (mid-trial), then check the run died with it."""
    wait_for(lambda: any((run_dir / "checkpoints").glob("step_*[0-9]")), 600, f"a checkpoint in {run_dir}")
    worker.kill()
    worker.communicate()
    wait_for(lambda: not run_processes(run_dir / "recipe.yaml"), 60, "the killed worker's run to end")


def test_two_workers_share_one_sqlite_study_and_best_yaml_reproduces(tmp_path):
    batch = {"train.batch_size": {"type": "categorical", "choices": [32, 16, 4096]}}
    path = write_sweep(tmp_path, "two", batch, trials=3)
    workers = [start_worker(path), start_worker(path)]
    try:
        outs = [finish(w) for w in workers]
    finally:
        stop_all(*workers)
    study = load(path)
    done = finished(study)
    assert len(done) == 3, [(t.number, t.state, t.params) for t in study.get_trials()]
    configs = [t.params["train.batch_size"] for t in done]
    assert sorted(configs) == [16, 32, 4096]  # every configuration once, none twice
    assert len({t.user_attrs["worker"]["pid"] for t in done}) == 2  # both workers pulled trials
    crashed = next(t for t in done if t.params["train.batch_size"] == 4096)
    assert crashed.state == TrialState.FAIL and "exceeds the training set" in crashed.user_attrs["crashed"]
    assert any("failed: " in out and "exceeds the training set" in out for out in outs)
    table = (tmp_path / "two" / "sweep.md").read_text()
    assert table.count("| complete |") == 2 and "failed: " in table

    complete = [t for t in done if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number))  # a tie goes to the earlier trial
    best_yaml = tmp_path / "two" / "best.yaml"
    recipe = yaml.safe_load(best_yaml.read_text())
    assert recipe["train"]["batch_size"] == best.params["train.batch_size"] and recipe["seed"] == 0
    subprocess.run([sys.executable, "-m", "ft_focal.train", str(best_yaml)], env=sweep_env(), check=True,
                   capture_output=True, timeout=600)
    retrained = json.loads((Path(recipe["output_dir"]) / "metrics.json").read_text())
    original = json.loads((Path(best.user_attrs["folder"]) / "seed_0" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert retrained[split] == original[split]
    assert retrained["history"] == original["history"]


def test_pruner_stops_a_worse_trial_early(tmp_path):
    path = write_sweep(tmp_path, "prune", HEAD_INIT_GRID, fixed={"train.epochs": 2},
                       pruner={"name": "median", "startup_trials": 1, "warmup_epochs": 0})
    out = finish(start_worker(path))
    study = load(path)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) == 1 and pruned[0].params["model.head_init"] == "random", out[-2000:]
    run = Path(pruned[0].user_attrs["folder"]) / "seed_0"
    marker = json.loads((run / "pruned.json").read_text())
    assert marker["epoch"] < 1 and not (run / "metrics.json").exists()  # stopped before its last epoch
    assert (run / "train_log.jsonl").is_file() and "pruned after epoch 0" in out
    assert "pruned (epoch 0)" in (tmp_path / "prune" / "sweep.md").read_text()


def test_prune_decision_reaches_every_rank_of_a_two_process_trial(tmp_path):
    # --launch: each trial is `accelerate launch` of two CPU processes (DDP over gloo); only rank 0 asks
    # the study, both ranks stop at the same epoch (a rank left behind would wait in a collective).
    path = write_sweep(tmp_path, "ranks", HEAD_INIT_GRID, fixed={"train.epochs": 2},
                       pruner={"name": "median", "startup_trials": 1, "warmup_epochs": 0})
    launch = f"accelerate launch --config_file {REPO / 'recipes/accelerate/cpu_2proc.yaml'}"
    out = finish(start_worker(path, "--launch", launch, ACCELERATE_USE_CPU="1"), timeout=1200)
    study = load(path)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) == 1 and pruned[0].params["model.head_init"] == "random", out[-2000:]
    run = Path(pruned[0].user_attrs["folder"]) / "seed_0"
    assert json.loads((run / "pruned.json").read_text())["epoch"] == 0
    complete = next(t for t in study.get_trials() if t.state == TrialState.COMPLETE)
    metrics = json.loads((Path(complete.user_attrs["folder"]) / "seed_0" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_killed_worker_rerun_resumes_the_trial_from_its_checkpoint(tmp_path):
    path = write_sweep(tmp_path, "kill", HEAD_INIT_GRID, fixed={"train.epochs": 2})
    run = tmp_path / "kill" / "trials" / "trial_0000" / "seed_0"
    kill_when_checkpointed(start_worker(path), run)
    out = finish(start_worker(path))  # the same command again
    study = load(path)
    done = finished(study)
    assert sorted(t.params["model.head_init"] for t in done) == ["class_mean", "random"], out[-2000:]
    assert all(t.state == TrialState.COMPLETE for t in done)
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == 0)
    assert Path(retry.user_attrs["folder"]).name == "trial_0000"
    log = (run / "train.out").read_text()
    assert "resumed from" in log and "the recipe differs" not in log  # the retry resumes the same recipe
    assert json.loads((run / "metrics.json").read_text())["updates"] == 34


def test_postgres_second_worker_takes_over_a_dead_workers_trial(tmp_path, postgres_url):
    # Two "machines" (distinct host names: no process check across hosts), so only the heartbeat can
    # tell that worker A died; B retries A's trial after the grace period, in A's trial folder.
    path = write_sweep(tmp_path, "pg", HEAD_INIT_GRID, fixed={"train.epochs": 2},
                       faults={"heartbeat_seconds": 2, "grace_seconds": 8, "max_retry": 2})
    a = start_worker(path, "--storage", postgres_url, FT_FOCAL_SWEEP_HOST="machine-a")
    b = start_worker(path, "--storage", postgres_url, FT_FOCAL_SWEEP_HOST="machine-b")

    def trial_of_a():
        try:
            running = load(path, postgres_url).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the workers have not created the study yet
            return None
        for t in running:
            if (t.user_attrs.get("worker") or {}).get("host") == "machine-a" and t.user_attrs.get("folder"):
                return t
        return None

    try:
        a_trial = wait_for(trial_of_a, 600, "worker A to start a trial")
        run = Path(a_trial.user_attrs["folder"]) / "seed_0"
        kill_when_checkpointed(a, run)
        out = finish(b)
    finally:
        stop_all(a, b)
    study = load(path, postgres_url)
    done = finished(study)
    assert sorted(t.params["model.head_init"] for t in done) == ["class_mean", "random"], out[-3000:]
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == a_trial.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["worker"]["host"] == "machine-b"
    assert Path(retry.user_attrs["folder"]) == Path(a_trial.user_attrs["folder"])
    assert study.trials[a_trial.number].state == TrialState.FAIL
    log = (run / "train.out").read_text()
    assert "resumed from" in log and "the recipe differs" not in log  # the retry resumes the same recipe
    assert json.loads((run / "metrics.json").read_text())["updates"] == 34


def test_timeout_stops_the_running_trial_and_the_next_run_continues_it(tmp_path):
    # 12 epochs (a few seconds each): the trial cannot finish inside the 15 s budget on any machine
    path = write_sweep(tmp_path, "clock", {"optim.rho": {"type": "categorical", "choices": [0.05]}}, trials=1,
                       fixed={"train.epochs": 12})
    started = time.time()
    out = finish(start_worker(path, "--timeout", "15"))
    assert time.time() - started < 15 + 90, out[-2000:]  # start-up + stopping the run, not a whole trial
    study = load(path)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    assert "stopped by --timeout" in study.trials[0].user_attrs["interrupted"]
    assert "| waiting |" in (tmp_path / "clock" / "sweep.md").read_text()
    finish(start_worker(path))
    done = finished(load(path))
    assert len(done) == 1 and done[0].state == TrialState.COMPLETE
    assert Path(done[0].user_attrs["folder"]).name == "trial_0000"
