"""Every test runs offline: without these, each hub call hangs 20-50 s before failing."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "1")

# Tests use tiny models: one intra-op thread is as fast as two and does not thrash when the
# two cores are shared (pytest plus a DataLoader worker or a second process).
import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate's state is process-global (every run / dry run builds an Accelerator); forked test
    children and the next test must not inherit a stale one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
