"""Distribution-shift suites: class lists, layouts, masks, max over mapped logits, scoring, effective robustness."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ft_focal.errors import UserError
from ft_focal.evaluation.shift_eval import (
    compare_to_id,
    effective_robustness,
    prepare_suites,
    score_shift,
)
from ft_focal.evaluation.shifts import (
    V2_VARIANTS,
    build_shift_sets,
    imagenet_synsets,
    objectnet_classes,
    project_logits,
    subset_classes,
)
from ft_focal.evaluation.suites import load_eval_suite

EVAL = Path(__file__).resolve().parents[2] / "eval"


def _image(path: Path, size: int = 12, color=(40, 80, 120), border=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), color)
    if border is not None:
        for x in range(size):
            for y in (0, size - 1):
                img.putpixel((x, y), border)
                img.putpixel((y, x), border)
    img.save(path)


def _imagenet_model(seed: int = 0) -> SimpleNamespace:
    """A model over ImageNet's 1000 classes in a SHUFFLED label order (so mappings are tested)."""
    wnids = list(imagenet_synsets())
    order = np.random.default_rng(seed).permutation(1000)
    wnids = [wnids[i] for i in order]
    counts = [150 if i % 3 == 0 else (50 if i % 3 == 1 else 5) for i in range(1000)]
    return SimpleNamespace(wnids=wnids, classnames=wnids, class_counts=counts,
                           preprocess={"mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 8},
                           transform=lambda: (lambda im: torch.zeros(3, 8, 8)))


def _suite(name: str, **over: str) -> dict:
    return load_eval_suite(EVAL / name, [f"{k}={v}" for k, v in over.items()])


# ----------------------------------------------------------------------------- class lists


@pytest.mark.parametrize("name", ["imagenet_r", "imagenet_a"])
def test_r_a_index_lists_match_the_imagenet_synsets(name):
    wnids, indices = subset_classes(name)
    shipped = Path(__file__).resolve().parents[2] / "ft_focal/resources/imagenet_lt/classnames.txt"
    synsets = [line.split()[0] for line in shipped.read_text().splitlines()]
    assert len(wnids) == len(indices) == 200 == len(set(wnids))
    assert [synsets[i] for i in indices] == list(wnids)
    assert list(indices) == sorted(indices)


def test_r_a_lists_are_timms_when_timm_is_installed():
    pytest.importorskip("timm")
    import pkgutil

    for name in ("imagenet_r", "imagenet_a"):
        for part in ("synsets", "indices"):
            theirs = pkgutil.get_data("timm.data", f"_info/{name}_{part}.txt").decode().split()
            ours = list(subset_classes(name)[0 if part == "synsets" else 1])
            assert [str(x) for x in ours] == theirs


# ----------------------------------------------------------------------------- masks and max over mapped logits


def test_restricted_logits_choose_only_among_allowed_classes():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 9.0, -2.0, -1.0]])
    scores = project_logits(logits, allowed=[2, 3])
    assert scores.argmax(1).tolist() == [2, 3]  # class 0 (5.0) and class 1 (9.0) are masked away
    assert torch.isinf(scores[:, [0, 1]]).all() and torch.equal(scores[:, [2, 3]], logits[:, [2, 3]])


def test_objectnet_score_is_the_max_over_the_mapped_logits():
    logits = torch.tensor([[1.0, 7.0, 2.0, 6.5, 0.0], [4.0, 0.0, 3.0, 5.0, 9.0]])
    columns = [[0, 1], [2, 3], [4]]  # class 0 <- {0, 1} (many-to-one), class 1 <- {2, 3}, class 2 <- {4}
    scores = project_logits(logits, columns=columns)
    assert scores.tolist() == [[7.0, 6.5, 0.0], [4.0, 5.0, 9.0]]


# ----------------------------------------------------------------------------- layouts


def test_imagenet_v2_numeric_folders_map_through_the_model_order(tmp_path):
    model = _imagenet_model()
    for variant, folder in V2_VARIANTS.items():
        for k in (0, 5, 999):
            _image(tmp_path / folder / str(k) / f"{variant}_{k}.jpeg")
    sets = build_shift_sets(_suite("imagenet_v2.yaml", root=tmp_path), model.wnids, model.classnames, model.class_counts)
    assert [s.name.split("/")[-1] for s in sets] == list(V2_VARIANTS)
    position = {w: i for i, w in enumerate(model.wnids)}
    want = [position[imagenet_synsets()[k]] for k in (0, 5, 999)]
    for s in sets:
        assert len(s.paths) == 3 and s.labels.tolist() == want and s.allowed is None


def test_imagenet_v2_lists_every_missing_variant_at_once(tmp_path):
    model = _imagenet_model()
    _image(tmp_path / V2_VARIANTS["top_images"] / "3" / "a.jpeg")
    with pytest.raises(UserError) as err:
        build_shift_sets(_suite("imagenet_v2.yaml", root=tmp_path), model.wnids, model.classnames, model.class_counts)
    text = str(err.value)
    assert "missing 2" in text and V2_VARIANTS["matched_frequency"] in text and V2_VARIANTS["threshold_0.7"] in text
    assert "\n" not in text


def test_imagenet_v2_rejects_a_non_numeric_folder(tmp_path):
    model = _imagenet_model()
    for folder in V2_VARIANTS.values():
        _image(tmp_path / folder / "n01440764" / "a.jpeg")
    with pytest.raises(UserError, match="class number 0..999"):
        build_shift_sets(_suite("imagenet_v2.yaml", root=tmp_path), model.wnids, model.classnames, model.class_counts)


@pytest.mark.parametrize("kind", ["imagenet_r", "imagenet_a"])
def test_imagenet_r_a_wnid_subset_and_mask(tmp_path, kind):
    model = _imagenet_model()
    wnids, indices = subset_classes(kind)
    for w in wnids[:3]:
        _image(tmp_path / w / "x.jpg")
    s, = build_shift_sets(_suite(f"{kind}.yaml", root=tmp_path), model.wnids, model.classnames, model.class_counts)
    position = {w: i for i, w in enumerate(model.wnids)}
    assert s.labels.tolist() == [position[w] for w in wnids[:3]]
    assert s.allowed == sorted(position[w] for w in wnids)  # all 200 classes, not only those present
    outside = next(w for w in imagenet_synsets() if w not in wnids)
    _image(tmp_path / outside / "y.jpg")
    with pytest.raises(UserError, match=f"'{outside}' is not one of the 200"):
        build_shift_sets(_suite(f"{kind}.yaml", root=tmp_path), model.wnids, model.classnames, model.class_counts)


def test_imagenet_sketch_wnid_folders(tmp_path):
    model = _imagenet_model()
    for w in ("n01440764", "n15075141"):
        _image(tmp_path / w / "s.JPEG")
    s, = build_shift_sets(_suite("imagenet_sketch.yaml", root=tmp_path), model.wnids, model.classnames,
                          model.class_counts)
    assert s.labels.tolist() == [model.wnids.index("n01440764"), model.wnids.index("n15075141")]


@pytest.mark.parametrize("suite", ["imagenet_v2.yaml", "imagenet_r.yaml", "imagenet_a.yaml", "imagenet_sketch.yaml",
                                   "objectnet.yaml"])
def test_imagenet_suites_refuse_a_model_that_is_not_over_imagenet_1k(tmp_path, suite):
    with pytest.raises(UserError, match="needs a model over ImageNet's 1000 classes") as err:
        build_shift_sets(_suite(suite, root=tmp_path), None, [str(i) for i in range(10)], [5] * 10)
    assert "\n" not in str(err.value)


def _objectnet(root: Path) -> None:
    """An ObjectNet download in miniature: 3 ObjectNet classes, one of them mapped to TWO ImageNet classes,
    plus a folder outside ImageNet. The 2012 ids are a permutation of the torchvision indices, as in the real files."""
    maps = root / "mappings"
    maps.mkdir(parents=True)
    names_2012 = [f"imagenet class {i}" for i in range(1000)]
    torch_to_2012 = {str(k): (k * 7 + 3) % 1000 for k in range(1000)}  # a bijection
    (maps / "imagenet_to_label_2012_v2").write_text("\n".join(names_2012) + "\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(torch_to_2012))
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "bench": "Bench", "sponge": "Sponge"}))
    # torchvision index t has 2012 id (7t + 3) % 1000, i.e. the name "imagenet class <that id>"
    name_of_torch = {t: f"imagenet class {(t * 7 + 3) % 1000}" for t in (409, 530, 954, 703)}
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps({
        "Alarm clock": f"{name_of_torch[409]}; {name_of_torch[530]}",  # analog + digital clock
        "Banana": name_of_torch[954], "Bench": name_of_torch[703]}))
    for folder in ("alarm_clock", "banana", "bench", "sponge"):
        _image(root / "images" / folder / "1.png", size=10, border=(255, 0, 0))


def test_objectnet_mapping_many_to_one_and_merged_counts(tmp_path):
    _objectnet(tmp_path)
    folders, indices = objectnet_classes(tmp_path / "mappings", "test")
    assert folders == ["alarm_clock", "banana", "bench"] and indices == [[409, 530], [954], [703]]
    model = _imagenet_model()
    s, = build_shift_sets(_suite("objectnet.yaml", root=tmp_path), model.wnids, model.classnames, model.class_counts)
    position = {w: i for i, w in enumerate(model.wnids)}
    label_of = [position[imagenet_synsets()[t]] for t in range(1000)]
    assert s.columns == [[label_of[409], label_of[530]], [label_of[954]], [label_of[703]]]
    assert s.labels.tolist() == [0, 1, 2]  # "sponge" is outside ImageNet: not scored
    assert s.counts[0] == model.class_counts[label_of[409]] + model.class_counts[label_of[530]]
    logits = torch.full((1, 1000), -1.0)
    logits[0, label_of[530]] = 4.0  # the digital-clock logit alone makes the alarm-clock prediction
    assert s.project(logits).argmax(1).tolist() == [0]


def test_objectnet_border_crop_and_missing_mappings_listed_at_once(tmp_path):
    _objectnet(tmp_path)
    model = _imagenet_model()
    item, = prepare_suites([_suite("objectnet.yaml", root=tmp_path, **{"preprocessing.resize": "null",
                                                                        "preprocessing.crop": "null"})], model)
    image, _ = item.dataset[0]
    assert tuple(image.shape) == (3, 6, 6)  # 10 px - 2 px per side: the red frame is gone
    assert float(image[0].max()) < 0  # no red (normalised 255 -> +1) pixel left
    for name in ("objectnet_to_imagenet_1k.json", "imagenet_to_label_2012_v2"):
        (tmp_path / "mappings" / name).unlink()
    with pytest.raises(UserError, match="missing 2") as err:
        build_shift_sets(_suite("objectnet.yaml", root=tmp_path), model.wnids, model.classnames, model.class_counts)
    assert "objectnet_to_imagenet_1k.json" in str(err.value) and "imagenet_to_label_2012_v2" in str(err.value)


def test_generic_shift_from_class_folders_and_from_a_split_list(tmp_path):
    classnames = ["cat", "sea lion", "dog"]
    _image(tmp_path / "f" / "cat" / "a.png")
    _image(tmp_path / "f" / "sea_lion" / "b.png")
    _image(tmp_path / "f" / "2" / "c.png")
    suite = _suite("digits_blur.yaml", root=tmp_path / "f")
    s, = build_shift_sets(suite, None, classnames, [200, 50, 3])
    assert s.labels.tolist() == [2, 0, 1]  # folders sorted: "2", "cat", "sea_lion"
    (tmp_path / "list.txt").write_text("f/cat/a.png 0\nf/2/c.png 2\n")
    s, = build_shift_sets(_suite("digits_blur.yaml", root=tmp_path, split_list=tmp_path / "list.txt"), None,
                          classnames, [200, 50, 3])
    assert s.labels.tolist() == [0, 2] and s.paths[1].endswith("c.png")
    _image(tmp_path / "f" / "horse" / "d.png")
    with pytest.raises(UserError, match="'horse' is not a class name"):
        build_shift_sets(suite, None, classnames, [200, 50, 3])


# ----------------------------------------------------------------------------- suites and scores


def test_shift_suite_keys_are_checked():
    with pytest.raises(UserError, match="unknown key 'rot'"):
        _suite("imagenet_r.yaml", rot="/x")
    with pytest.raises(UserError, match="needs intercept, slope AND source"):
        _suite("imagenet_r.yaml", **{"effective_robustness.slope": "0.8"})
    suite = _suite("imagenet_r.yaml", **{"effective_robustness.slope": "0.8", "effective_robustness.intercept": "-0.2",
                                         "effective_robustness.source": "a fit"})
    assert suite["effective_robustness"] == {"intercept": -0.2, "slope": 0.8, "source": "a fit"}
    assert suite["preprocessing"]["resize"] == 224 and suite["preprocessing"]["crop"] == 224


def test_scores_by_training_shot_group(tmp_path):
    item = SimpleNamespace(shift=SimpleNamespace(labels=np.array([0, 0, 1, 2, 2]), counts=[500, 50, 5], subsets=None),
                           suite={"kind": "shift", "shots": {"many": 100, "few": 20}})
    res = score_shift(item, torch.tensor([0, 1, 1, 2, 0]))
    assert res["overall"] == pytest.approx(3 / 5)
    assert (res["many"], res["medium"], res["few"]) == (0.5, 1.0, 0.5)


def test_effective_robustness_is_ood_minus_the_logit_fit():
    # logit(0.8) = ln 4; fit: logit(ood) = 0.5 + 0.9 logit(id)
    z = 0.5 + 0.9 * math.log(4.0)
    assert effective_robustness(0.8, 0.7, 0.5, 0.9) == pytest.approx(0.7 - 1 / (1 + math.exp(-z)))
    assert effective_robustness(0.8, 0.7, 0.0, 1.0) == pytest.approx(-0.1)  # the y = x line: ER = OOD - ID
    row = compare_to_id({"overall": 0.8, "many": 0.9, "medium": 0.8, "few": None}, {"overall": 0.6, "many": 0.7,
                        "medium": 0.5, "few": 0.2}, {"intercept": None, "slope": None, "source": None})
    assert row["effective_robustness"] is None  # no fit: the plain drop only
    assert row["drop"]["overall"] == pytest.approx(0.2) and row["drop"]["few"] is None


class _ImagesOfIndex(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int):
        return torch.full((3, 2, 2), float(i)), i % 3


def _outputs_on_two_processes(out_dir: str) -> None:
    from accelerate import Accelerator

    from ft_focal.evaluation.shift_eval import model_outputs

    acc = Accelerator(cpu=True)
    out = model_outputs(lambda x: torch.stack([x.mean(dim=(1, 2, 3)), -x.sum(dim=(1, 2, 3))], 1), _ImagesOfIndex(),
                        batch_size=2, accelerator=acc)
    torch.save(out, f"{out_dir}/rank{acc.process_index}.pt")


def test_model_outputs_of_two_processes_are_every_sample_once_in_order(tmp_path):
    from accelerate import debug_launcher

    from ft_focal.evaluation.shift_eval import model_outputs

    def fn(x):
        return torch.stack([x.mean(dim=(1, 2, 3)), -x.sum(dim=(1, 2, 3))], 1)

    single = model_outputs(fn, _ImagesOfIndex(), batch_size=2)
    assert single[:, 0].tolist() == [float(i) for i in range(7)]
    debug_launcher(_outputs_on_two_processes, args=(str(tmp_path),), num_processes=2)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), single)


def test_imagenet_c_in_a_robustness_run_scores_subsets_and_shot_groups_over_the_benchmark(tmp_path):
    """An imagenet_c suite through --suite: error per (corruption, severity); groups over benchmark corruptions only."""
    from ft_focal.evaluation.shift_eval import prepare_suites

    for corruption in ("fog", "spatter"):
        for label in ("0", "1"):
            _image(tmp_path / corruption / "2" / label / "a.png")
            _image(tmp_path / corruption / "2" / label / "b.png")
    model = SimpleNamespace(wnids=None, classnames=["zero", "one"], class_counts=[500, 5],
                            preprocess={"mean": [0.5] * 3, "std": [0.5] * 3}, transform=None)
    suite = load_eval_suite(EVAL / "imagenet_c.yaml", [f"root={tmp_path}", "corruptions=[fog]",
                                                       "extra_corruptions=[spatter]", "severities=[2]",
                                                       "classnames=null"])
    item, = prepare_suites([suite], model)
    assert item.shift.subset_names == [("fog", 2), ("spatter", 2)]
    assert item.shift.labels.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    preds = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])  # fog: 3 of 4 right; spatter: 2 of 4
    res = score_shift(item, preds)
    assert res["errors"] == {"fog": [0.25], "spatter": [0.5]}
    assert res["overall"] == 0.75 and res["many"] == 1.0 and res["few"] == 0.5  # fog only
    assert "mCE" not in res  # one severity: no CE
