"""One place that creates the `accelerate.Accelerator` of a run or an evaluation."""

from __future__ import annotations

from typing import Any

import torch


def reset_stale_state() -> None:
    """Drop Accelerate's process-global state when it does not describe this process.

    Accelerate keeps one state per process: a second run in the same process (tests,
    notebooks, --dry-run sweeps) may ask for another precision, and a forked child inherits
    its parent's single-process state. The process-level state is kept only when it
    describes the process group that is actually running.
    """
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state or PartialState._shared_state:
        group = torch.distributed.is_initialized()
        stale = not group or PartialState._shared_state.get("num_processes") != torch.distributed.get_world_size()
        AcceleratorState._reset_state(reset_partial_state=stale)


def make_accelerator(**kwargs: Any):
    """An Accelerator on the GPU when there is one, else the CPU (one or several processes)."""
    from accelerate import Accelerator

    reset_stale_state()
    return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)
