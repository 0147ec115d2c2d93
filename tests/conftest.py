"""Every test runs offline: without these, each hub call hangs 20-50 s before failing."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "1")
# One OpenMP thread from the start, and back to one after every test (below): tests fork
# (accelerate.debug_launcher), and a child forked after the parent ran an OpenMP team of several
# threads hangs in its first parallel region (seen in a oneDNN reorder of a Conv2d). The variable
# also keeps libraries that size the pool themselves when it is unset (Lightning) at one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests use tiny models: one intra-op thread is as fast as two and does not thrash when the
# two cores are shared (pytest plus a DataLoader worker or a second process).
import torch  # noqa: E402 (after the environment it reads is set)

torch.set_num_threads(1)

import pytest  # noqa: E402 (after the setup line above)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate's state is process-global (every run / dry run builds an Accelerator); forked test
    children and the next test must not inherit a stale one."""
    yield
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def pytest_sessionfinish(session, exitstatus):
    """A child process a test left alive would make the interpreter's exit wait forever (a DataLoader
    worker ignores SIGTERM, the signal multiprocessing's exit handler sends): name each one, end it."""
    import multiprocessing
    import sys

    for child in multiprocessing.active_children():
        if child.is_alive():
            print(f"\nconftest: a test left process {child.name} (pid {child.pid}) alive; killing it", file=sys.stderr)
            child.kill()
            child.join(5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own in a temporary directory (initdb / pg_ctl run as the
    `postgres` user when the tests run as root, which PostgreSQL refuses); used by the sweep tests
    and the README's cluster sweep."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    if shutil.which("initdb") is None:
        if os.environ.get("CI"):
            pytest.fail("initdb is not installed: CI must test the sweep on PostgreSQL")
        pytest.skip("PostgreSQL (initdb) is not installed")
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="ft_focal_pg_", dir="/tmp"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(as_user + ["initdb", "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=''"
    subprocess.run(as_user + ["pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run(as_user + ["pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
