"""Long-tailed profiles, CIFAR-LT from (fake) pickles, the digits demo, transforms, synthetic data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ft_focal.config import DataConfig
from ft_focal.data import (
    build_datasets,
    build_five_crop_transform,
    build_transform,
    class_counts_from_labels,
    longtail_counts,
    subsample_longtail,
    synthetic_bundle,
)
from ft_focal.errors import UserError

PRE = {"image_size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}


def groups(counts, many=100, few=20):
    return ["many" if n > many else "few" if n < few else "medium" for n in counts]


def test_cifar_lt_counts_exact():
    assert longtail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(longtail_counts(5000, 10, 100)) == 12406
    assert sum(longtail_counts(500, 100, 100)) == 10847  # CIFAR-100-LT IF 100
    assert sum(longtail_counts(500, 100, 50)) == 12608
    assert sum(longtail_counts(500, 100, 10)) == 19573
    assert longtail_counts(100, 10, 10, "step") == [100] * 5 + [10] * 5
    assert longtail_counts(100, 5, 10, "step") == [100, 100, 10, 10, 10]
    assert longtail_counts(7, 1, 100) == [7]
    assert longtail_counts(10, 3, 1000) == [10, 1, 1]  # never below 1
    with pytest.raises(UserError, match="imbalance_factor"):
        longtail_counts(10, 3, 0.5)


def test_subsample_is_seeded_and_exact():
    labels = np.repeat(np.arange(4), 10)
    a = subsample_longtail(labels, [10, 5, 2, 1], seed=3)
    assert class_counts_from_labels(labels[a], 4) == [10, 5, 2, 1]
    assert np.array_equal(a, subsample_longtail(labels, [10, 5, 2, 1], seed=3))
    assert not np.array_equal(a, subsample_longtail(labels, [10, 5, 2, 1], seed=4))
    assert class_counts_from_labels([0, 2, 2], 4) == [1, 0, 2, 0]


def _write_cifar10(d, per_class, protocol):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), per_class)
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    chunks = np.array_split(np.arange(len(labels)), 5)
    for i, idx in enumerate(chunks, start=1):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": "training batch", "data": data[idx], "labels": labels[idx].tolist(),
                         "filenames": [f"img{j}.png" for j in idx]}, f, protocol=protocol)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": data[:50], "labels": np.tile(np.arange(10), 5).tolist()}, f, protocol=protocol)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f, protocol=protocol)
    return data, labels


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_lt_from_pickles(tmp_path, protocol):
    data, labels = _write_cifar10(tmp_path / "cifar-10-batches-py", per_class=40, protocol=protocol)
    cfg = DataConfig(dataset="cifar_lt", root=str(tmp_path), imbalance_factor=10.0)
    b = build_datasets(cfg, PRE, seed=0)
    assert b.class_counts == longtail_counts(40, 10, 10) == [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]
    assert b.classnames[0] == "airplane" and b.num_classes == 10 and b.val is None
    assert class_counts_from_labels(b.test.labels, 10) == [5] * 10  # test stays balanced
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # pixels come through unchanged: the raw image of a training item equals a CIFAR row
    raw = np.asarray(b.train.load_image(0))
    rows = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert any(np.array_equal(raw, rows[j]) for j in np.flatnonzero(labels == y))
    # null imbalance factor = the standard IF 100 (capped at one image per class here)
    cfg.imbalance_factor = None
    assert build_datasets(cfg, PRE, 0).class_counts == longtail_counts(40, 10, 100)


def test_cifar_pickle_refuses_arbitrary_objects(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar10(d, per_class=2, protocol=2)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": Evil()}, f, protocol=2)
    with pytest.raises(UserError, match=r"batches.meta: not a CIFAR python pickle \(refusing to load posix.getcwd\)"):
        build_datasets(DataConfig(dataset="cifar_lt", root=str(d)), PRE, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a CIFAR python directory"):
        build_datasets(DataConfig(dataset="cifar_lt", root=str(tmp_path / "empty")), PRE, 0)


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    y = np.tile(np.arange(100), 3)
    for split in ("train", "test"):
        with open(d / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (300, 3072), dtype=np.uint8), "fine_labels": y.tolist(),
                         "coarse_labels": (y // 5).tolist()}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f, protocol=2)
    b = build_datasets(DataConfig(dataset="cifar_lt", root=str(d), imbalance_factor=3.0), PRE, 0)
    assert b.num_classes == 100 and b.class_counts == longtail_counts(3, 100, 3)
    assert len(b.test) == 300


def test_digits_lt_demo():
    b = build_datasets(DataConfig(dataset="digits_lt"), PRE, seed=0)
    assert b.class_counts == [134, 103, 80, 62, 48, 37, 28, 22, 17, 13]
    assert groups(b.class_counts) == ["many"] * 2 + ["medium"] * 6 + ["few"] * 2
    assert (len(b.train), len(b.val), len(b.test)) == (544, 100, 300)
    assert class_counts_from_labels(b.test.labels, 10) == [30] * 10
    assert class_counts_from_labels(b.val.labels, 10) == [10] * 10
    assert b.classnames[:3] == ["zero", "one", "two"]
    x, y = b.train[5]
    assert x.shape == (3, 32, 32)
    tx, _ = b.test[0]
    assert torch.allclose(tx[0], tx[1] * PRE["std"][1] / PRE["std"][0] + (PRE["mean"][1] - PRE["mean"][0]) / PRE["std"][0],
                          atol=1e-5)  # grey image: the three channels carry the same pixels
    # the splits are disjoint: no (image, label) pair of the test split appears in train / val
    pool = {(b.train.images[i].tobytes(), int(b.train.labels[i])) for i in range(len(b.train))}
    pool |= {(b.val.images[i].tobytes(), int(b.val.labels[i])) for i in range(len(b.val))}
    test = [(b.test.images[i].tobytes(), int(b.test.labels[i])) for i in range(len(b.test))]
    assert sum(t in pool for t in test) <= 2  # the digits data holds a few exact duplicates
    # deterministic, and the fixed split seed ignores the run seed
    again = build_datasets(DataConfig(dataset="digits_lt"), PRE, seed=7)
    assert np.array_equal(again.train.images, b.train.images)
    other = build_datasets(DataConfig(dataset="digits_lt", split_seed=1), PRE, seed=0)
    assert not np.array_equal(other.test.images, b.test.images)
    assert build_datasets(DataConfig(dataset="digits_lt", imbalance_factor=1.0), PRE, 0).class_counts == [134] * 10


def test_transforms_shapes_and_resize():
    cfg = DataConfig()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    for size in (32, 48):
        pre = dict(PRE, image_size=size)
        assert build_transform(pre, cfg, train=True)(img).shape == (3, size, size)
        assert build_transform(pre, cfg, train=False)(img).shape == (3, size, size)
        assert build_five_crop_transform(pre, cfg)(img).shape == (5, 3, size, size)
    t = build_transform(dict(PRE, image_size=224), DataConfig(test_resize=256), train=False)
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)
    t = build_transform(dict(PRE, image_size=336), DataConfig(test_resize=256), train=False)
    assert t.transforms[0].size == 384  # same crop ratio as 256 : 224
    assert build_five_crop_transform(dict(PRE, image_size=224), cfg).transforms[0].size == 248
    train = build_transform(PRE, DataConfig(hflip=False, train_crop_scale=[0.5, 1.0]), train=True)
    assert [type(s).__name__ for s in train.transforms] == ["RandomResizedCrop", "ToTensor", "Normalize"]
    assert train.transforms[0].scale == (0.5, 1.0)
    # normalisation uses the model's mean / std
    flat = Image.new("RGB", (32, 32), (255, 255, 255))
    out = build_transform(PRE, cfg, train=False)(flat)
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor(PRE["mean"])) / torch.tensor(PRE["std"]), atol=1e-4)
    with pytest.raises(UserError, match="train_crop_scale"):
        build_transform(PRE, DataConfig(train_crop_scale=[0.9, 0.1]), train=True)


def test_synthetic_bundle():
    b = synthetic_bundle(1000, PRE, train_size=64, eval_size=20, seed=0)
    assert b.num_classes == 1000 and len(b.class_counts) == 1000
    assert b.class_counts[0] == 500 and b.class_counts[-1] == 5 and min(b.class_counts) >= 1
    assert set(groups(b.class_counts)) == {"many", "medium", "few"}
    assert (len(b.train), len(b.val), len(b.test)) == (64, 20, 20)
    x, y = b.train[3]
    assert x.shape == (3, 32, 32) and 0 <= y < 1000
    assert torch.equal(b.train[3][0], synthetic_bundle(1000, PRE, 64, 20, 0).train[3][0])
    assert b.eval_dataset("test", five_crop=True)[0][0].shape == (5, 3, 32, 32)
    small = synthetic_bundle(10, PRE, train_size=64, eval_size=8, seed=1)
    assert small.class_counts == longtail_counts(500, 10, 100)
    counts = small.splits_info["train_label_counts"]
    assert sum(counts) == 64 and min(counts) >= 1 and counts == sorted(counts, reverse=True)
    assert class_counts_from_labels(small.train.labels, 10) == counts
    loader = torch.utils.data.DataLoader(small.train, batch_size=16)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 32, 32) and yb.shape == (16,)
    via_cfg = build_datasets(DataConfig(dataset="synthetic", synthetic_num_classes=7), PRE, 0)
    assert via_cfg.num_classes == 7 and len(via_cfg.train) == 64 and len(via_cfg.test) == 32
