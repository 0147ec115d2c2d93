"""Deterministic, resumable data order for one or many processes.

Why not a shuffled DataLoader: exact resume needs the data order and every augmentation to be
a pure function of (seed, epoch, position), independent of how many steps ran before a crash
and of DataLoader worker scheduling. Here:
  * epoch e visits `torch.randperm(N, generator=seed + e)`, cut into GLOBAL batches
    (the last incomplete global batch is dropped, as with drop_last=True);
  * global batch s is split into equal contiguous slices, one per process, and each slice into
    `accumulation` micro-batches;
  * the augmentation of sample i in epoch e is seeded from (seed, epoch, i) (`SeededDataset`).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def steps_per_epoch(dataset_size: int, global_batch: int) -> int:
    return dataset_size // global_batch


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches (lists of indices) from global step `start_step` on.

    Args:
        dataset_size: N samples. global_batch: samples per optimizer step over all processes.
        rank / world_size: this process. accumulation: micro-batches per optimizer step.
        seed / epoch: the permutation. start_step: first global step of the epoch to yield.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        if global_batch % (world_size * accumulation):
            raise ValueError(
                f"global batch {global_batch} is not divisible by processes x accumulation = {world_size * accumulation}"
            )
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.seed = seed
        self.epoch = epoch
        self.start_step = start_step

    def permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.dataset_size, self.global_batch) - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        per_process = self.global_batch // self.world_size
        micro = per_process // self.accumulation
        for step in range(self.start_step, steps_per_epoch(self.dataset_size, self.global_batch)):
            start = step * self.global_batch + self.rank * per_process
            mine = order[start : start + per_process].tolist()
            for k in range(self.accumulation):
                yield mine[k * micro : (k + 1) * micro]


class SeededDataset(Dataset):
    """Wraps a dataset so the random transform of item i in epoch e is seeded by (seed, e, i).

    The global RNG of the calling process is forked, so drawing augmentations never disturbs
    the training RNG (dropout etc.), whether the item is loaded in the main process or a worker;
    and the item depends on nothing but (seed, epoch, index), whichever worker loads it.

    `generators`: the global generators seeded per item ("torch", "random", "numpy"). The
    toolkit's training transforms (torchvision) draw only from torch's, and saving / restoring
    numpy's state costs ~0.13 ms per item (most of this wrapper's cost), so the training loop asks
    for "torch" only; the default seeds all three, for transforms that use any of them.
    """

    GENERATORS = ("torch", "random", "numpy")

    def __init__(self, dataset: Dataset, seed: int, generators: tuple = GENERATORS) -> None:
        unknown = set(generators) - set(self.GENERATORS)
        if unknown or "torch" not in generators:
            raise ValueError(f"generators must include 'torch' and be among {self.GENERATORS}, got {generators}")
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.python_rng, self.numpy_rng = "random" in generators, "numpy" in generators

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item_seed = (self.seed * 1_000_003 + self.epoch * 7_919 + index * 104_729) % (2**63 - 1)
        py_state = random.getstate() if self.python_rng else None
        np_state = np.random.get_state() if self.numpy_rng else None
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator (what transforms draw from): torch.manual_seed would also seed
            # every CUDA device, and on a CUDA build before CUDA init it formats a stack trace per
            # call (~2 ms per item here).
            torch.default_generator.manual_seed(item_seed)
            if py_state is not None:
                random.seed(item_seed)
            if np_state is not None:
                np.random.seed(item_seed % (2**32))
            try:
                return self.dataset[index]
            finally:
                if py_state is not None:
                    random.setstate(py_state)
                if np_state is not None:
                    np.random.set_state(np_state)


def shard_indices(n: int, world_size: int, rank: int) -> range:
    """Indices of an n-sample list owned by `rank` out of `world_size`: i % world_size == rank.

    Every index belongs to exactly one rank for any n (uneven sizes included; a rank may get
    one sample fewer than another, or none). No padding, unlike DistributedSampler, so gathered
    predictions and summed counts are exact.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard: rank {rank} of world size {world_size}")
    return range(rank, n, world_size)


def eval_batches(size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    indices = list(shard_indices(size, world_size, rank))
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def unshard(parts: list[torch.Tensor], sizes: Optional[list[int]] = None) -> torch.Tensor:
    """Inverse of `shard_indices`: interleave per-rank results back into dataset order."""
    world = len(parts)
    total = sum(p.shape[0] for p in parts) if sizes is None else sum(sizes)
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        count = len(range(rank, total, world))
        out[rank::world] = part[:count]
    return out


_END = object()


def gather_in_order(local: torch.Tensor, accelerator: Any, total: int) -> torch.Tensor:
    """All-gather per-process shards [n_r, ...] of `shard_indices` (padded to equal length for the
    collective) and interleave them back to dataset order, [total, ...]. One process: `local`."""
    if accelerator is None or accelerator.num_processes == 1:
        return local
    world = accelerator.num_processes
    longest = len(range(0, total, world))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu()
    return unshard(list(gathered.reshape(world, longest, *local.shape[1:])), [total])


def prefetch_to_device(groups: Iterator[list], device: torch.device,
                       tag: Optional[Callable[[], Any]] = None) -> Iterator[tuple[list, Any]]:
    """Yield (group on `device`, tag) for each group of (images, labels) micro-batches, one group ahead.

    The next group is loaded and its copy issued before the current one is handed out, so loading
    and copying overlap the update. On CUDA the copies are `non_blocking` (from the DataLoader's
    pinned memory) on a side stream; the compute stream waits for its own group's copy only, and
    the tensors are marked as used there so the caching allocator does not reuse them early. On
    the CPU the tensors are passed through unchanged. `tag()` is called right after each group is
    loaded (e.g. the count of unreadable images skipped so far, so that a checkpoint counts only
    the groups the loop has consumed). A None micro-batch (every image unreadable) stays None.
    """
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None

    def load() -> Any:
        group = next(groups, _END)
        if group is _END:
            return _END
        label = tag() if tag is not None else None
        if device.type == "cpu":
            return group, label, None
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            moved = [None if m is None else tuple(t.to(device, non_blocking=True) for t in m) for m in group]
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record(stream)
        return moved, label, event

    upcoming = load()
    while upcoming is not _END:
        (group, label, event), upcoming = upcoming, load()
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for micro in group:
                for tensor in micro or ():
                    tensor.record_stream(current)
        yield group, label

