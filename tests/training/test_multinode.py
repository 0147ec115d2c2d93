"""Several machines: the SLURM example's commands, and the demo as 2 machines x 1 process on one host."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import ENV, _command_two_processes, _run_to_end, assert_bitwise_equal, final_weights, raw_recipe  # noqa: E402 (after the sys.path entry it needs)

SBATCH = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "train_multinode.sbatch"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_slurm_example_runs_one_accelerate_launch_per_node_with_its_machine_rank(tmp_path):
    """srun, scontrol and accelerate replaced by stubs: srun runs its task once per node with that
    node's SLURM_NODEID; accelerate records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "launches.txt"
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                           'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@"; done\n')
    _stub(bin_dir, "scontrol", 'if [ "$1" = show ]; then printf "gpu-a\\ngpu-b\\n"; else echo "$@" >> "$REQUEUE_LOG"; fi\n')
    _stub(bin_dir, "accelerate", 'echo "$@" >> "$LAUNCH_LOG"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "GPUS_PER_NODE": "4", "LAUNCH_LOG": str(log),
           "REQUEUE_LOG": str(tmp_path / "requeue.txt")}
    done = subprocess.run(["bash", str(SBATCH), "recipes/demo/digits_lt_focal_sam.yaml", "train.fsdp=true",
                           "output_dir=/shared/run"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    launches = [line.split() for line in log.read_text().splitlines()]
    assert len(launches) == 2
    for rank, args in enumerate(launches):
        opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        assert opt["--machine_rank"] == str(rank)
        assert opt["--num_machines"] == "2" and opt["--num_processes"] == "8"
        assert opt["--main_process_ip"] == "gpu-a" and opt["--main_process_port"] == str(20000 + 4242)
        assert args[-4:] == ["ft_focal.train", "recipes/demo/digits_lt_focal_sam.yaml", "train.fsdp=true",
                             "output_dir=/shared/run"]
    text = SBATCH.read_text()
    assert "#SBATCH --requeue" in text and "scontrol requeue" in text


def _two_machines(recipe: Path, out: Path, port: int, fsdp: bool) -> None:
    """Machines 0 and 1 (one process each) on this host, rendezvous at 127.0.0.1:port."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "--rdzv_backend", "static", "--same_network",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ft_focal.train", str(recipe),
         f"output_dir={out}"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:] + errors[1][-2000:]
    # DTensors checked on both machines, reported once by the main process
    checked = sum(len(re.findall(r"FSDP2 over 2 process\(es\): (\d+) .* on every rank \(\1, \1\)", e)) for e in errors)
    assert checked == (1 if fsdp else 0), errors[0][-2000:]


def _recipe(tmp_path: Path, fsdp: bool) -> Path:
    raw = raw_recipe(tmp_path / "unused", epochs=1, save_every=100)
    raw["train"].update(fsdp=fsdp, max_steps=4)
    path = tmp_path / f"recipe_{int(fsdp)}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_equal_two_processes_of_one_machine_ddp_bitwise_fsdp2_to_rounding(tmp_path):
    ddp = _recipe(tmp_path, fsdp=False)
    _run_to_end(ddp, tmp_path / "ddp_1machine", _command_two_processes)
    _two_machines(ddp, tmp_path / "ddp_2machines", _port(), fsdp=False)
    assert_bitwise_equal(final_weights(tmp_path / "ddp_2machines"), final_weights(tmp_path / "ddp_1machine"))

    fsdp = _recipe(tmp_path, fsdp=True)
    _run_to_end(fsdp, tmp_path / "fsdp_1machine", _command_two_processes)
    _two_machines(fsdp, tmp_path / "fsdp_2machines", _port(), fsdp=True)
    a, b = final_weights(tmp_path / "fsdp_2machines"), final_weights(tmp_path / "fsdp_1machine")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-12) for k in b) < 1e-6
