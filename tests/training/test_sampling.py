"""Deterministic, resumable data order and exact evaluation sharding."""

import pytest
import torch

from ft_focal.training.sampling import ResumableBatchSampler, SeededDataset, eval_batches, unshard


def test_processes_and_micro_batches_partition_each_global_batch():
    n, gb = 50, 12
    per_rank = [list(ResumableBatchSampler(n, gb, rank=r, world_size=2, accumulation=3, seed=1, epoch=0)) for r in range(2)]
    single = list(ResumableBatchSampler(n, gb, seed=1, epoch=0))
    assert len(single) == n // gb
    for step, batch in enumerate(single):
        parts = per_rank[0][3 * step: 3 * step + 3] + per_rank[1][3 * step: 3 * step + 3]
        assert sorted(i for p in parts for i in p) == sorted(batch)
        assert all(len(p) == 2 for p in parts)


def test_resume_yields_the_remaining_batches_exactly():
    full = list(ResumableBatchSampler(40, 8, seed=3, epoch=2))
    resumed = list(ResumableBatchSampler(40, 8, seed=3, epoch=2, start_step=3))
    assert resumed == full[3:]
    assert full != list(ResumableBatchSampler(40, 8, seed=3, epoch=1))


def test_seeded_dataset_augmentation_is_a_function_of_epoch_and_index():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededDataset(Noisy(), seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ds[2]
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG is untouched
    assert torch.equal(a, ds[2])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[2])


def test_seeded_dataset_seeds_python_and_numpy_only_when_asked():
    import random

    import numpy as np

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(1).item(), random.random(), float(np.random.rand())

    every, torch_only = SeededDataset(Draws(), seed=1), SeededDataset(Draws(), seed=1, generators=("torch",))
    random.seed(0)
    np.random.seed(0)
    first = every[1]
    assert every[1] == first  # all three generators seeded per item
    assert (random.random(), float(np.random.rand())) == (random.Random(0).random(), np.random.RandomState(0).rand())
    a, b = torch_only[1], torch_only[1]
    assert a[0] == b[0] == first[0] and a[1:] != b[1:]  # torch seeded; python / numpy left running
    with pytest.raises(ValueError, match="generators"):
        SeededDataset(Draws(), seed=1, generators=("numpy",))


def test_eval_shards_cover_uneven_datasets_exactly_once():
    for size in (0, 1, 7, 10):
        for world in (1, 2, 3):
            shards = [sum(eval_batches(size, 2, r, world), []) for r in range(world)]
            assert sorted(sum(shards, [])) == list(range(size))
            parts = [torch.tensor(s, dtype=torch.float32) for s in shards]
            assert unshard(parts, [size]).tolist() == list(range(size))
