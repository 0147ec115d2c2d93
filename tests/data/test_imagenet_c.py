"""ImageNet-C scanning, evaluation, CE / mCE summaries, sharding and evaluation suites.

The generated folders hold solid-colour JPEGs whose red channel encodes the class a fake
`predict` will output, so the expected error of every (corruption, severity) subset is known
exactly.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ft_focal.data.imagenet_c import (
    ImageNetCDataset,
    class_to_label_for,
    class_to_label_from_classnames,
    class_to_label_from_split_list,
    read_classnames,
    scan_imagenet_c,
    wnid_mapping,
)
from ft_focal.errors import UserError
from ft_focal.evaluation import (
    build_eval_transform,
    describe_transform,
    evaluate_corruptions,
    load_eval_suite,
    read_baseline_table,
    run_imagenet_c_suite,
    shard_indices,
    summarize_corruptions,
)
from ft_focal.metrics import ALEXNET_CLEAN_ERROR, BENCHMARK_CORRUPTIONS, load_alexnet_errors

REPO = Path(__file__).resolve().parents[2]
# model label order deliberately NOT alphabetical: label i = WNIDS[i]
WNIDS = ["n03000000", "n01000000", "n02000000"]
PER_CLASS = 2
SIZE = 48


def _red(k: int) -> int:
    return 30 + 60 * k


def colour_predict(x: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Logits one-hot on the class encoded in the red channel (x from ToTensor, [0, 1])."""
    red = x[:, 0].mean(dim=(1, 2)) * 255.0
    k = torch.round((red - 30.0) / 60.0).long().clamp(0, num_classes - 1)
    return torch.nn.functional.one_hot(k, num_classes).float()


def n_wrong(ci: int, s: int) -> int:
    return (ci + 2 * s) % (len(WNIDS) * PER_CLASS + 1)


def make_c_folder(root: Path, corruptions, severities=(1, 2, 3, 4, 5), size=SIZE) -> dict:
    """Write root/<c>/<s>/<wnid>/<i>.JPEG; the first n_wrong(ci, s) images (in sorted order)
    encode a wrong class. Returns the expected errors {c: [...]}."""
    expected = {}
    total = len(WNIDS) * PER_CLASS
    for ci, c in enumerate(corruptions):
        expected[c] = []
        for s in severities:
            wrong = n_wrong(ci, s)
            idx = 0
            for wnid in sorted(WNIDS):  # scan order: folders sorted by name
                label = WNIDS.index(wnid)
                d = root / c / str(s) / wnid
                d.mkdir(parents=True, exist_ok=True)
                for i in range(PER_CLASS):
                    shown = (label + 1) % len(WNIDS) if idx < wrong else label
                    img = Image.new("RGB", (size, size), (_red(shown), 128, 128))
                    img.save(d / f"img_{i}.JPEG", quality=95)
                    idx += 1
            expected[c].append(wrong / total)
    return expected


@pytest.fixture(scope="module")
def cfolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_c")
    corrs = ["gaussian_noise", "contrast", "speckle_noise"]
    expected = make_c_folder(root, corrs)
    return root, corrs, expected


# ----------------------------------------------------------------------------- class order

def test_wnid_mapping_and_classnames(tmp_path):
    assert wnid_mapping(WNIDS) == {"n03000000": 0, "n01000000": 1, "n02000000": 2}
    with pytest.raises(UserError, match="twice"):
        wnid_mapping(["a", "b", "a"])
    f = tmp_path / "classnames.txt"
    f.write_text("n03000000 great white shark\n\nn01000000 tench\nn02000000 goldfish\n")
    assert read_classnames(f)[0] == ("n03000000", "great white shark")
    assert class_to_label_from_classnames(f) == wnid_mapping(WNIDS)
    bad = tmp_path / "bad.txt"
    bad.write_text("n01 tench\nlonely\n")
    with pytest.raises(UserError, match=r"bad.txt line 2"):
        read_classnames(bad)


def test_class_to_label_for_a_c_folder(tmp_path):
    for folder in ("great_white_shark", "tench"):
        (tmp_path / "fog" / "1" / folder).mkdir(parents=True)
    assert class_to_label_for(tmp_path, wnids=WNIDS) == wnid_mapping(WNIDS)
    assert class_to_label_for(tmp_path, ["tench", "great white shark"]) == {"tench": 0, "great_white_shark": 1}
    (tmp_path / "fog" / "1" / "goldfish").mkdir()
    with pytest.raises(UserError, match="class folder 'goldfish' matches no class name"):
        class_to_label_for(tmp_path, ["tench", "great white shark"])


def test_class_to_label_from_split_list(tmp_path):
    f = tmp_path / "ImageNet_LT_test.txt.gz"
    with gzip.open(f, "wt") as fh:
        fh.write("val/n03000000/a.JPEG 0\nval/n01000000/b.JPEG 1\nval/n03000000/c.JPEG 0\nval/n02000000/d.JPEG 2\n")
    assert class_to_label_from_split_list(f) == wnid_mapping(WNIDS)
    g = tmp_path / "bad.txt"
    g.write_text("val/n01/a.JPEG 0\nval/n01/b.JPEG 1\n")
    with pytest.raises(UserError, match="line 2"):
        class_to_label_from_split_list(g)


# ----------------------------------------------------------------------------- scanning

def test_scan_shuffled_class_folders_map_to_labels(cfolder):
    root, corrs, _ = cfolder
    samples = scan_imagenet_c(root, corrs[:1], [2], wnid_mapping(WNIDS))
    assert len(samples) == len(WNIDS) * PER_CLASS
    for c, s, path, label in samples:
        assert (c, s) == (corrs[0], 2)
        assert WNIDS[label] == Path(path).parent.name


def test_missing_folders_listed_at_once(cfolder, tmp_path):
    root, _, _ = cfolder
    # 'fog' is absent entirely, 'contrast' has only severity 1
    part = tmp_path / "c"
    for c, sev in [("gaussian_noise", (1, 2, 3)), ("contrast", (1,))]:
        for s in sev:
            (part / c / str(s) / WNIDS[0]).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(part / c / str(s) / WNIDS[0] / "x.JPEG")
    with pytest.raises(UserError) as err:
        scan_imagenet_c(part, ["gaussian_noise", "contrast", "fog"], [1, 2, 3], wnid_mapping(WNIDS))
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("contrast/2/", "contrast/3/", "fog/"):
        assert name in msg
    assert "gaussian_noise" not in msg
    assert "3 ImageNet-C folder(s)" in msg


def test_unknown_class_and_empty_subset(tmp_path):
    (tmp_path / "fog" / "1" / "n09999999").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "fog" / "1" / "n09999999" / "x.JPEG")
    with pytest.raises(UserError, match=r"class folder 'fog/1/n09999999' is not in the model's class list"):
        scan_imagenet_c(tmp_path, ["fog"], [1], wnid_mapping(WNIDS))
    (tmp_path / "fog" / "2" / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(UserError, match=r"no images in subset\(s\) fog/2"):
        scan_imagenet_c(tmp_path, ["fog"], [2], wnid_mapping(WNIDS))
    with pytest.raises(UserError, match="not found"):
        scan_imagenet_c(tmp_path / "nope", ["fog"], [1], wnid_mapping(WNIDS))
    with pytest.raises(UserError, match="severity"):
        scan_imagenet_c(tmp_path, ["fog"], [6], wnid_mapping(WNIDS))


def test_dataset_decodes_any_mode_to_rgb(tmp_path):
    d = tmp_path / "fog" / "1" / WNIDS[1]
    d.mkdir(parents=True)
    Image.new("L", (20, 10), 77).save(d / "a.png")
    Image.new("RGBA", (20, 10), (10, 20, 30, 0)).save(d / "b.png")  # transparent -> white
    Image.new("P", (20, 10), 3).save(d / "c.png")
    Image.new("CMYK", (20, 10), (0, 0, 0, 0)).save(d / "d.JPEG")
    Image.fromarray(np.full((10, 20), 65535, np.uint16)).save(d / "e.png")
    ds = ImageNetCDataset.from_root(tmp_path, ["fog"], [1], wnid_mapping(WNIDS), build_eval_transform(crop=None))
    assert len(ds) == 5 and ds.subsets == [("fog", 1)]
    for i in range(len(ds)):
        x, y, sidx = ds[i]
        assert x.shape == (3, 10, 20) and y == 1 and sidx == 0
    assert torch.allclose(ds[0][0], torch.full((3, 10, 20), 77 / 255))
    assert torch.allclose(ds[1][0], torch.ones(3, 10, 20))
    assert torch.allclose(ds[4][0], torch.ones(3, 10, 20))


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluate_exact_errors(cfolder, num_workers):
    root, corrs, expected = cfolder
    out = evaluate_corruptions(
        colour_predict, root, wnid_mapping(WNIDS), corrs, [1, 2, 3, 4, 5],
        transform=build_eval_transform(crop=None), batch_size=4, num_workers=num_workers, progress=False,
    )
    assert out["errors"].keys() == expected.keys()
    for c in corrs:
        assert out["errors"][c] == pytest.approx(expected[c], abs=1e-12)
        assert out["counts"][c]["total"] == [len(WNIDS) * PER_CLASS] * 5
    assert out["num_images"] == len(corrs) * 5 * len(WNIDS) * PER_CLASS
    assert out["severities"] == [1, 2, 3, 4, 5]
    assert out["preprocessing"].startswith("PIL decode -> RGB -> ToTensor")
    json.dumps(out)  # report-ready


def test_evaluate_subset_of_severities_and_crop_preprocessing(cfolder):
    root, corrs, expected = cfolder
    tf = build_eval_transform(resize=None, crop=32, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    out = evaluate_corruptions(colour_predict, root, wnid_mapping(WNIDS), corrs[1:2], [4, 2],
                               transform=tf, batch_size=5, num_workers=0, progress=False)
    assert out["errors"] == {corrs[1]: [expected[corrs[1]][3], expected[corrs[1]][1]]}
    assert out["preprocessing"] == (
        "PIL decode -> RGB -> CenterCrop(32) + ToTensor([0,1]) + Normalize(mean=(0, 0, 0), std=(1, 1, 1))"
    )
    with pytest.raises(UserError, match="all five severities"):
        summarize_corruptions(out)


def test_five_crop_batches_are_averaged(cfolder):
    root, corrs, expected = cfolder
    tf = build_eval_transform(crop=32, five_crop=True, five_crop_resize=40)
    assert "FiveCrop(32" in describe_transform(tf)
    out = evaluate_corruptions(colour_predict, root, wnid_mapping(WNIDS), corrs[:1], [1, 2],
                               transform=tf, batch_size=3, num_workers=0, progress=False)
    assert out["errors"][corrs[0]] == pytest.approx(expected[corrs[0]][:2])


def test_labels_beyond_model_classes_are_refused(cfolder):
    root, corrs, _ = cfolder
    mapping = dict(wnid_mapping(WNIDS), n09999999=7)
    with pytest.raises(UserError, match="label 7 but the model outputs 3 classes"):
        evaluate_corruptions(colour_predict, root, mapping, corrs[:1], [1], num_workers=0, progress=False)


def test_bad_image_is_one_line_user_error(tmp_path):
    make_c_folder(tmp_path, ["fog"], [1])
    bad = tmp_path / "fog" / "1" / WNIDS[2] / "zz_broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for workers in (0, 2):
        with pytest.raises(UserError) as err:
            evaluate_corruptions(colour_predict, tmp_path, wnid_mapping(WNIDS), ["fog"], [1],
                                 batch_size=2, num_workers=workers, progress=False)
        msg = str(err.value)
        assert "\n" not in msg and "zz_broken.JPEG" in msg and "cannot decode" in msg


# ----------------------------------------------------------------------------- CE / mCE

def test_mce_and_relative_mce_against_hand_baseline(cfolder):
    root, corrs, expected = cfolder
    out = evaluate_corruptions(colour_predict, root, wnid_mapping(WNIDS), corrs,
                               transform=build_eval_transform(crop=None), batch_size=8, num_workers=0, progress=False)
    baseline = {
        "gaussian_noise": [0.5, 0.6, 0.7, 0.8, 0.9],
        "contrast": [0.4, 0.5, 0.6, 0.7, 0.8],
        "speckle_noise": [0.3, 0.4, 0.5, 0.6, 0.7],
    }
    clean, base_clean = 0.1, 0.2
    res = summarize_corruptions(out, clean_error=clean, baseline=baseline, baseline_clean_error=base_clean)

    def ce(c):
        return 100 * sum(expected[c]) / sum(baseline[c])

    def rel(c):
        return 100 * sum(e - clean for e in expected[c]) / sum(b - base_clean for b in baseline[c])

    assert res["CE"] == pytest.approx({"gaussian_noise": ce("gaussian_noise"), "contrast": ce("contrast")})
    assert res["mCE"] == pytest.approx((ce("gaussian_noise") + ce("contrast")) / 2)
    assert res["relative_mCE"] == pytest.approx((rel("gaussian_noise") + rel("contrast")) / 2)
    assert res["mCE_complete"] is False and len(res["missing"]) == 13
    # the extra corruption is reported apart, never in mCE
    assert "speckle_noise" not in res["CE"]
    assert res["extra"]["CE"] == pytest.approx({"speckle_noise": ce("speckle_noise")})
    assert res["extra"]["errors"] == {"speckle_noise": pytest.approx(expected["speckle_noise"])}
    assert res["extra"]["mean_error"]["speckle_noise"] == pytest.approx(100 * np.mean(expected["speckle_noise"]))
    for s in range(1, 6):
        want = 100 * (expected["gaussian_noise"][s - 1] + expected["contrast"][s - 1]) / 2
        assert res["per_severity"][str(s)] == pytest.approx(want)
    assert res["baseline"] == "custom"
    json.dumps(res)


def test_summary_of_alexnet_itself_is_100(tmp_path):
    table = read_baseline_table(REPO / "eval" / "alexnet_errors.csv")
    assert table == load_alexnet_errors()
    assert list(table) == list(BENCHMARK_CORRUPTIONS)
    errors = dict(table, saturate=[0.1, 0.2, 0.3, 0.4, 0.5])
    res = summarize_corruptions(errors, clean_error=ALEXNET_CLEAN_ERROR)
    assert res["mCE"] == pytest.approx(100.0) and res["relative_mCE"] == pytest.approx(100.0)
    assert res["mCE_complete"] is True and res["mCE_name"] == "mCE" and res["mCE_corruptions"] == 15
    from ft_focal.metrics import describe_mce, imagenet_classes

    assert describe_mce(res) == f"mCE {res['mCE']:.2f}, relative mCE {res['relative_mCE']:.2f}"
    assert imagenet_classes([f"n{i:08d}" for i in range(1000)]) and not imagenet_classes([str(i) for i in range(10)])
    assert res["extra"]["CE"] == {} and res["extra"]["mean_error"]["saturate"] == pytest.approx(30.0)
    res2 = summarize_corruptions(table, None, baseline=str(REPO / "eval" / "alexnet_errors.csv"))
    assert res2["mCE"] == pytest.approx(100.0) and "relative_mCE" not in res2
    bad = tmp_path / "b.csv"
    bad.write_text("corruption,s1,s2,s3,s4,s5\nfog,0.1,0.2,0.3,0.4,1.5\n")
    with pytest.raises(UserError, match="b.csv line 2"):
        read_baseline_table(bad)


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_indices_cover_each_index_once(world):
    for n in range(0, 23):
        shards = [list(shard_indices(n, world, r)) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


def _distributed_eval(root: str, corrs: list, out_dir: str, use_accelerator: bool):
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator(cpu=True) if use_accelerator else None  # else: the bare process group
    res = evaluate_corruptions(colour_predict, root, wnid_mapping(WNIDS), corrs, [1, 2, 3, 4, 5],
                               transform=build_eval_transform(crop=None), batch_size=4, num_workers=0,
                               progress=False, accelerator=acc)
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(res))


@pytest.mark.parametrize("world,use_accelerator", [(2, True), (3, True), (2, False)])
def test_distributed_evaluation_is_exact(cfolder, tmp_path, world, use_accelerator):
    from accelerate import debug_launcher

    root, corrs, expected = cfolder
    # 3 x 5 x 6 = 90 images: uneven per-rank batches for world 2 and 3 with batch 4
    debug_launcher(_distributed_eval, args=(str(root), corrs, str(tmp_path), use_accelerator), num_processes=world)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for res in results:
        assert res["world_size"] == world
        for c in corrs:
            assert res["errors"][c] == pytest.approx(expected[c], abs=1e-12)
            assert res["counts"][c]["total"] == [len(WNIDS) * PER_CLASS] * 5


# ----------------------------------------------------------------------------- suites

def test_shipped_suites_load():
    names = {}
    for f in sorted((REPO / "eval").glob("*.yaml")):
        suite = load_eval_suite(f)
        names[suite["name"]] = suite
    assert set(names) == {"imagenet_lt", "inat2018", "places_lt", "imagenet_c", "imagenet_v2", "imagenet_r",
                          "imagenet_a", "imagenet_sketch", "objectnet", "digits_blur"}
    c = names["imagenet_c"]
    assert c["corruptions"] == list(BENCHMARK_CORRUPTIONS) and len(c["extra_corruptions"]) == 4
    assert c["severities"] == [1, 2, 3, 4, 5]
    assert Path(c["baseline"]["table"]) == REPO / "eval" / "alexnet_errors.csv"
    assert c["preprocessing"]["resize"] is None and c["preprocessing"]["crop"] == 224
    lt = names["imagenet_lt"]
    assert lt["preprocessing"]["resize"] == 224 and lt["shots"] == {"many": 100, "few": 20}
    assert names["inat2018"]["data"]["label_order"] == "alphabetical"


SUITE_ERRORS = [   # suite file text -> what the one-line error must say
    ("kind: imagenet_c\nroot: /x\nbatchsize: 3\n", r"s.yaml: unknown key 'batchsize' \(did you mean 'batch_size'\?\)"),
    ("kind: imagenet_c\nroot: /x\npreprocessing:\n  crops: 3\n", r"unknown key 'preprocessing.crops'"),
    ("kind: imagenet_c\nroot: /x\ncorruptions: [gausian_noise]\n",
     r"'gausian_noise' is not an ImageNet-C corruption \(did you mean 'gaussian_noise'"),
    ("kind: imagenet_c\nroot: /x\nseverities: [0, 1]\n", "severities"),
    ("kind: long_tail\ndata: {root: /x}\n", r"key 'data.split_list' is required"),
    ("kind: nope\n", "kind"),
    ("kind: imagenet_c\nroot: /x\nbatch_size: true\n", "'batch_size' must be int"),
]


@pytest.mark.parametrize("text,message", SUITE_ERRORS)
def test_suite_validation_errors(tmp_path, text, message):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=message):
        load_eval_suite(f)


def test_run_imagenet_c_suite_end_to_end(cfolder, tmp_path):
    root, corrs, expected = cfolder
    (tmp_path / "classnames.txt").write_text("".join(f"{w} class{i}\n" for i, w in enumerate(WNIDS)))
    f = tmp_path / "suite.yaml"
    f.write_text(
        "kind: imagenet_c\nroot: /placeholder\nclassnames: classnames.txt\n"
        "corruptions: [gaussian_noise, contrast]\nextra_corruptions: [speckle_noise]\n"
        "preprocessing: {crop: null}\nnum_workers: 0\nbatch_size: 7\n"
    )
    suite = load_eval_suite(f, overrides=[f"root={root}"])
    assert suite["root"] == str(root) and suite["classnames"] == str(tmp_path / "classnames.txt")
    res = run_imagenet_c_suite(colour_predict, suite, clean_error=0.2, progress=False)
    for c in corrs:
        assert res["evaluation"]["errors"][c] == pytest.approx(expected[c])
    alex = load_alexnet_errors()
    want = 100 * sum(expected["contrast"]) / sum(alex["contrast"])
    assert res["summary"]["CE"]["contrast"] == pytest.approx(want)
    assert list(res["summary"]["extra"]["errors"]) == ["speckle_noise"]
    assert res["summary"]["preprocessing"] == "PIL decode -> RGB -> ToTensor([0,1])"


def _distributed_eval_failing(root: str, out_dir: str):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    try:
        evaluate_corruptions(colour_predict, root, wnid_mapping(WNIDS), ["fog"], [1], batch_size=2,
                             num_workers=0, progress=False, accelerator=acc)
        msg = "no error"
    except UserError as exc:
        msg = str(exc)
    Path(out_dir, f"rank{acc.process_index}.txt").write_text(msg)


def test_distributed_failure_on_one_rank_stops_all(tmp_path):
    from accelerate import debug_launcher

    root = tmp_path / "c"
    make_c_folder(root, ["fog"], [1])
    (root / "fog" / "1" / WNIDS[2] / "zz_broken.JPEG").write_bytes(b"junk")  # seen by one rank only
    debug_launcher(_distributed_eval_failing, args=(str(root), str(tmp_path)), num_processes=2)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert sum("another process" in m for m in msgs) == 1
    assert sum("zz_broken.JPEG: cannot decode image" in m for m in msgs) == 1


def test_normalize_on_device_gives_identical_batches(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "fog" / "1" / WNIDS[0]
    d.mkdir(parents=True)
    for i in range(5):
        Image.fromarray((rng.random((40, 36, 3)) * 255).astype(np.uint8)).save(d / f"{i}.JPEG")
    tf = build_eval_transform(resize=None, crop=32, mean=[0.48, 0.45, 0.40], std=[0.27, 0.26, 0.28])
    seen = {True: [], False: []}
    for flag in (True, False):
        def predict(x, flag=flag):
            seen[flag].append(x.clone())
            return torch.zeros(x.shape[0], 3)

        res = evaluate_corruptions(predict, tmp_path, wnid_mapping(WNIDS), ["fog"], [1], transform=tf,
                                   batch_size=2, num_workers=0, progress=False, normalize_on_device=flag)
        assert res["preprocessing"].endswith("Normalize(mean=(0.48, 0.45, 0.4), std=(0.27, 0.26, 0.28))")
    for a, b in zip(seen[True], seen[False], strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
