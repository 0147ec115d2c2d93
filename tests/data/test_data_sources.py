"""Split lists, image folders and HF datasets on tiny generated trees; errors name file and line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gzip
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ft_focal.config import DataConfig
from ft_focal.data import DataError, build_datasets, check_data, collate_skip_bad, open_rgb, parse_classnames
from ft_focal.data.splits import RESOURCES, resolve_path
from ft_focal.errors import UserError

PRE = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}


def _rgb(seed=0, size=(20, 16)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_images(d):
    """One image per awkward mode; returns {kind: relative path}."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    _rgb(1).save(d / "rgb.jpg")
    out["rgb"] = "rgb.jpg"
    Image.new("CMYK", (18, 14), (10, 200, 30, 5)).save(d / "cmyk.jpg")
    out["cmyk"] = "cmyk.jpg"
    Image.fromarray(np.full((12, 12), 65535, dtype=np.uint16)).save(d / "deep16.png")
    out["deep16"] = "deep16.png"
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png")
    out["palette"] = "palette.png"
    Image.new("L", (9, 9), 128).save(d / "gray.png")
    out["gray"] = "gray.png"
    Image.new("RGBA", (11, 11), (0, 255, 0, 100)).save(d / "rgba.png")
    out["rgba"] = "rgba.png"
    Image.new("LA", (11, 11), (50, 128)).save(d / "la.png")
    out["la"] = "la.png"
    return out


def write_tree(tmp_path, train_lines=None, test_lines=None, gz=False):
    root = tmp_path / "root"
    kinds = make_images(root / "imgs")
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("n00000001 zebra\nn00000002 apple pie\nn00000003 mango\n")
    if train_lines is None:
        train_lines = [f"imgs/{p} {i % 3}" for i, p in enumerate(kinds.values())]
    if test_lines is None:
        test_lines = ["imgs/rgb.jpg 0", "imgs/gray.png 1", "imgs/cmyk.jpg 2"]
    train = tmp_path / ("train.txt.gz" if gz else "train.txt")
    data = ("\n".join(train_lines) + "\n").encode()
    train.write_bytes(gzip.compress(data) if gz else data)
    test = tmp_path / "test.txt"
    test.write_text("\n".join(test_lines) + "\n")
    cfg = DataConfig(dataset="split_file", root=str(root), train_list=str(train), test_list=str(test),
                     classnames=str(classnames))
    return cfg, root, kinds


@pytest.mark.parametrize("gz", [False, True])
def test_split_file_all_modes_load_as_rgb(tmp_path, gz):
    cfg, root, kinds = write_tree(tmp_path, gz=gz)
    b = build_datasets(cfg, PRE, seed=0)
    assert b.num_classes == 3 and b.classnames == ["zebra", "apple pie", "mango"]
    assert b.wnids == ["n00000001", "n00000002", "n00000003"]
    assert len(b.train) == len(kinds) and b.val is None and len(b.test) == 3
    assert b.class_counts == [3, 2, 2]
    for i in range(len(b.train)):
        x, y = b.train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 3
    x, _ = b.eval_dataset("test", five_crop=True)[0]
    assert x.shape == (5, 3, 32, 32)
    assert b.split("val") is None and b.eval_dataset("val") is None


def test_modes_are_converted(tmp_path):
    kinds = make_images(tmp_path)
    for kind, rel in kinds.items():
        img = open_rgb(tmp_path / rel)
        assert img.mode == "RGB", kind
    assert np.asarray(open_rgb(tmp_path / kinds["deep16"])).min() == 255  # scaled, not clipped to 8 bits
    assert np.asarray(open_rgb(tmp_path / kinds["gray"]))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(open_rgb(tmp_path / kinds["palette"]))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(open_rgb(tmp_path / kinds["rgba"]))[0, 0].tolist() == [0, 255, 0]  # alpha dropped
    cmyk = np.asarray(open_rgb(tmp_path / kinds["cmyk"]))[0, 0].astype(int)
    expected = np.asarray(Image.new("CMYK", (1, 1), (10, 200, 30, 5)).convert("RGB"))[0, 0].astype(int)
    assert np.abs(cmyk - expected).max() <= 3  # JPEG round trip of a flat colour
    half = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    half.save(tmp_path / "half16.png")
    assert np.asarray(open_rgb(tmp_path / "half16.png"))[0, 0, 0] == 128


def _err(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_malformed_line_names_file_and_line(tmp_path):
    cfg, _, _ = write_tree(tmp_path, train_lines=["imgs/rgb.jpg 0", "", "imgs/gray.png"])
    with pytest.raises(UserError) as e:
        build_datasets(cfg, PRE, 0)
    msg = _err(e)
    assert "train.txt:3" in msg and "malformed" in msg
    cfg, _, _ = write_tree(tmp_path, train_lines=["imgs/rgb.jpg zero"])
    with pytest.raises(UserError) as e:
        build_datasets(cfg, PRE, 0)
    assert "train.txt:1" in _err(e) and "not an integer" in str(e.value)


def test_label_out_of_range_names_file_and_line(tmp_path):
    cfg, _, _ = write_tree(tmp_path, test_lines=["imgs/rgb.jpg 0", "imgs/gray.png 3"])
    with pytest.raises(UserError) as e:
        build_datasets(cfg, PRE, 0)
    msg = _err(e)
    assert "test.txt:2" in msg and "label 3 out of range for 3 classes" in msg


def test_missing_list_file(tmp_path):
    cfg, _, _ = write_tree(tmp_path)
    cfg.val_list = str(tmp_path / "nope.txt")
    with pytest.raises(UserError) as e:
        build_datasets(cfg, PRE, 0)
    msg = _err(e)
    assert "data.val_list" in msg and "nope.txt" in msg and "not found" in msg


def test_missing_and_truncated_images_name_the_file(tmp_path):
    cfg, root, _ = write_tree(tmp_path, train_lines=["imgs/rgb.jpg 0", "imgs/gone.jpg 1", "imgs/cut.jpg 2",
                                                     "imgs/junk.png 0"])
    raw = (root / "imgs" / "rgb.jpg").read_bytes()
    (root / "imgs" / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    (root / "imgs" / "junk.png").write_bytes(b"this is not a png")
    b = build_datasets(cfg, PRE, 0)  # files are opened lazily
    with pytest.raises(UserError) as e:
        b.train[1]
    msg = _err(e)
    assert "gone.jpg" in msg and "not found" in msg and "train.txt line 2" in msg
    with pytest.raises(UserError) as e:
        b.train[2]
    msg = _err(e)
    assert "cut.jpg" in msg and "truncated" in msg and "line 3" in msg
    with pytest.raises(UserError) as e:
        b.train[3]
    assert "junk.png" in _err(e)


def test_dataloader_worker_error_stays_one_line(tmp_path):
    """A worker's exception is re-raised by torch with the traceback in the message; DataError undoes that."""
    from torch._utils import ExceptionWrapper  # what DataLoader workers use to ship exceptions

    cfg, _, _ = write_tree(tmp_path, train_lines=["imgs/rgb.jpg 0", "imgs/gone.jpg 1"])
    b = build_datasets(cfg, PRE, 0)
    try:
        b.train[1]
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as e:
        wrapped.reraise()
    assert isinstance(e.value, DataError)
    msg = _err(e)
    assert msg.startswith(str(tmp_path)) and "gone.jpg" in msg and "Traceback" not in msg


def test_skip_bad_images_counts_across_workers(tmp_path):
    lines = ["imgs/rgb.jpg 0", "imgs/gone.jpg 1", "imgs/gray.png 2", "imgs/gone2.jpg 0", "imgs/cmyk.jpg 1",
             "imgs/gone3.jpg 2"]
    cfg, _, _ = write_tree(tmp_path, train_lines=lines)
    cfg.skip_bad_images = True
    b = build_datasets(cfg, PRE, 0)
    assert b.collate_fn is collate_skip_bad
    assert b.train[1] is None
    assert b.train.bad_count == 1
    loader = torch.utils.data.DataLoader(b.eval_dataset("train"), batch_size=2, num_workers=2,
                                         collate_fn=b.collate_fn)
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 3
    assert loader.dataset.bad_count == 3  # counted in the worker processes
    assert collate_skip_bad([None, None]) is None


def test_empty_training_class_is_allowed_with_one_warning(tmp_path, caplog):
    cfg, _, _ = write_tree(tmp_path, train_lines=["imgs/rgb.jpg 0", "imgs/gray.png 0"])
    with caplog.at_level(logging.WARNING, logger="ft_focal.data"):
        b = build_datasets(cfg, PRE, 0)
    assert b.class_counts == [2, 0, 0]
    warnings = [r.getMessage() for r in caplog.records if "no training images" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 classes")
    assert b.splits_info["empty_train_classes"] == 2


def test_alphabetical_remap_inat_style(tmp_path):
    root = tmp_path / "root"
    make_images(root / "imgs")
    cats = [{"id": 0, "name": "Zostera marina"}, {"id": 1, "name": "Acer rubrum"},
            {"id": 2, "name": "Mola mola"}, {"id": 3, "name": "Acer negundo"}]
    (tmp_path / "categories.json.gz").write_bytes(gzip.compress(json.dumps(cats).encode()))
    (tmp_path / "train.txt").write_text("imgs/rgb.jpg 0\nimgs/gray.png 1\nimgs/cmyk.jpg 2\nimgs/la.png 3\nimgs/rgba.png 3\n")
    (tmp_path / "val.txt").write_text("imgs/rgb.jpg 3\n")
    cfg = DataConfig(dataset="split_file", root=str(root), train_list=str(tmp_path / "train.txt"),
                     val_list=str(tmp_path / "val.txt"), test_list=str(tmp_path / "val.txt"),
                     classnames=str(tmp_path / "categories.json.gz"), label_order="alphabetical")
    b = build_datasets(cfg, PRE, 0)
    assert b.classnames == ["Acer negundo", "Acer rubrum", "Mola mola", "Zostera marina"]
    # old 0 Zostera -> 3, 1 Acer rubrum -> 1, 2 Mola -> 2, 3 Acer negundo -> 0
    assert b.train.labels.tolist() == [3, 1, 2, 0, 0]
    assert b.class_counts == [2, 1, 1, 1]
    assert b.val[0][1] == 0 and b.test.labels.tolist() == [0]
    assert b.splits_info["labels_remapped"] == 2
    cfg.label_order = "given"
    assert build_datasets(cfg, PRE, 0).train.labels.tolist() == [0, 1, 2, 3, 3]


def test_shipped_classnames():
    c = parse_classnames(resolve_path("builtin:imagenet_lt/classnames.txt", "data.classnames"))
    assert len(c.names) == 1000 and c.ids[0] == "n01440764" and c.names[0] == "tench"
    assert c.names[2] == "great white shark" and len(set(c.ids)) == 1000
    inat = parse_classnames(resolve_path("builtin:inat2018/categories.json.gz", "data.classnames"))
    assert len(inat.names) == 8142
    from ft_focal.data import alphabetical_permutation

    moved = int((alphabetical_permutation(inat.names) != np.arange(8142)).sum())
    assert moved == 8138  # docs/algorithms.md: the given order permutes all but 4 classes
    with pytest.raises(UserError, match="not a shipped resource"):
        resolve_path("builtin:nope.txt", "data.classnames")
    assert (RESOURCES / "imagenet_lt" / "classnames.txt").is_file()


def test_classnames_formats(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("2 cat\n0 dog\n1 bird house\n")
    assert parse_classnames(p).names == ["dog", "bird house", "cat"]
    p.write_text("0 dog\n0 cat\n")
    with pytest.raises(UserError, match=r"c.txt:2: class id 0 appears twice"):
        parse_classnames(p)
    p.write_text("airfield\nabbey\n")
    assert parse_classnames(p).names == ["airfield", "abbey"] and parse_classnames(p).ids is None
    p.write_text('["a", "b"]')
    assert parse_classnames(p).names == ["a", "b"]


def test_image_folder(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("test", 1)):
        for c, cls in enumerate(("dog", "cat")):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n - c if split == "train" else n):
                _rgb(k).save(d / f"{k}.png")
            (d / "notes.txt").write_text("ignored")
    cfg = DataConfig(dataset="image_folder", root=str(root))
    b = build_datasets(cfg, PRE, 0)
    assert b.classnames == ["cat", "dog"] and b.class_counts == [2, 3]
    assert b.val is None and len(b.test) == 2 and b.train[0][0].shape == (3, 32, 32)
    (root / "test" / "cow").mkdir()
    with pytest.raises(UserError, match="cow: class folder not among the training classes"):
        build_datasets(cfg, PRE, 0)


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["ant", "bee", "cow"])})

    def split(n, seed):
        return datasets.Dataset.from_dict({"img": [_rgb(seed + i, (12, 10)) for i in range(n)],
                                           "y": [i % 3 for i in range(n)]}, features=feats)

    dd = datasets.DatasetDict(train=split(7, 0), validation=split(3, 50), test=split(4, 100))
    dd.save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(dataset="hf", hf_path=str(tmp_path / "hf"), image_key="img", label_key="y",
                     hf_val_split="validation")
    b = build_datasets(cfg, PRE, 0)
    assert b.classnames == ["ant", "bee", "cow"] and b.class_counts == [3, 2, 2]
    assert (len(b.train), len(b.val), len(b.test)) == (7, 3, 4)
    x, y = b.train[4]
    assert x.shape == (3, 32, 32) and y == 1
    cfg.imbalance_factor = 3.0
    lt = build_datasets(cfg, PRE, 0)
    assert lt.class_counts == [3, 1, 1]  # longtail_counts(3, 3, 3)
    assert lt.train[2][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match="data.label_key: column 'label' not in split"):
        build_datasets(DataConfig(dataset="hf", hf_path=str(tmp_path / "hf"), image_key="img"), PRE, 0)
    with pytest.raises(UserError, match="split 'nope' not in"):
        build_datasets(DataConfig(dataset="hf", hf_path=str(tmp_path / "hf"), image_key="img", label_key="y",
                                  hf_test_split="nope"), PRE, 0)


def test_check_data_lists_every_problem(tmp_path):
    lines = ["imgs/rgb.jpg 0", "imgs/gone.jpg 1", "broken-line", "imgs/cut.jpg 2", "imgs/gray.png 7",
             "imgs/cmyk.jpg 1", "imgs/deep16.png 2"]
    cfg, root, _ = write_tree(tmp_path, train_lines=lines, test_lines=["imgs/gone_too.png 0", "imgs/la.png 1"])
    raw = (root / "imgs" / "rgb.jpg").read_bytes()
    (root / "imgs" / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    problems = check_data(cfg, workers=3)
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for needle in ("gone.jpg", "train.txt:3", "cut.jpg", "train.txt:5: label 7 out of range", "gone_too.png"):
        assert needle in text
    good, _, _ = write_tree(tmp_path / "ok")
    assert check_data(good, workers=2) == []
    assert check_data(DataConfig(dataset="digits_lt"), workers=1) == []


# The public ImageNet-LT test split list (Liu et al. 2019, OLTR's ImageNet_LT_test.txt), shipped with
# the tests (gzip, 0.2 MB) so that this check runs everywhere.
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "imagenet_lt", "ImageNet_LT_test.txt.gz")


def test_real_imagenet_lt_test_list_matches_shipped_classnames():
    from pathlib import Path

    from ft_focal.data import parse_split_list

    names = parse_classnames(resolve_path("builtin:imagenet_lt/classnames.txt", "data.classnames"))
    lst = parse_split_list(Path(SHARED), num_classes=len(names.names))
    assert len(lst) == 50000 and np.bincount(lst.labels, minlength=1000).tolist() == [50] * 1000
    wnid_of_path = [lst.path(i).split("/")[1] for i in range(0, 50000, 997)]
    assert wnid_of_path == [names.ids[lst.labels[i]] for i in range(0, 50000, 997)]


def test_data_package_imports_no_model_optim_or_loop():
    """docs/design.md import rules, read from the source (no interpreter start-up)."""
    import ast
    from pathlib import Path

    import ft_focal.data

    forbidden = ("ft_focal.models", "ft_focal.optim", "ft_focal.train", "ft_focal.losses", "ft_focal.evaluate",
                 "ft_focal.cli", "ft_focal.artifacts.hub")
    for py in Path(ft_focal.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not [n for n in names if n.startswith(forbidden)], (py.name, names)


def test_declared_num_classes(tmp_path):
    cfg, _, _ = write_tree(tmp_path)
    cfg.num_classes = 3
    assert build_datasets(cfg, PRE, 0).num_classes == 3
    cfg.num_classes = 5
    with pytest.raises(UserError, match=r"data.num_classes is 5 but the data has 3 classes \(.*classnames.txt\)"):
        build_datasets(cfg, PRE, 0)
    cfg.classnames, cfg.num_classes = None, 4  # no class names: the declared count checks the labels
    b = build_datasets(cfg, PRE, 0)
    assert b.num_classes == 4 and b.class_counts[3] == 0
    cfg.num_classes = 2
    with pytest.raises(UserError, match=r"train.txt:3: label 2 out of range for 2 classes"):
        build_datasets(cfg, PRE, 0)
