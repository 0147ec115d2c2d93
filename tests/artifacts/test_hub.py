"""Export / push / load of a trained model (ft_focal.artifacts.hub, ft_focal.artifacts.card). Offline and fast:
one tiny LoRA run trained with the real loop is shared by the whole module."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ft_focal
from ft_focal.artifacts import card, hub, provenance
from ft_focal.artifacts.saved import load_model_dir
from ft_focal.cli import main as cli_main
from ft_focal.config import ModelConfig, recipe_from_dict
from ft_focal.errors import UserError

TOKEN = "hf_ThisIsNotARealTokenButMustNeverLeak123"
PICKLE = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from ft_focal.models import tiny_model_config
    from ft_focal.training.trainer import train

    out = tmp_path_factory.mktemp("hub") / "run"
    recipe = recipe_from_dict({
        "name": "tiny-lora-focal-sam",
        "output_dir": str(out),
        "seed": 0,
        "model": tiny_model_config("open_clip"),
        "tuning": {"method": "lora", "lora_rank": 4, "lora_alpha": 8.0},
        "data": {"dataset": "digits_lt", "num_workers": 0, "image_size": 32},
        "optim": {"name": "focal_sam", "rho": 0.05, "gamma": 0.5, "lam": 0.8, "lr": 0.05},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 16, "eval_batch_size": 256,
                  "log_every_steps": 1, "save_every_steps": 100},
    })
    train(recipe)
    assert (out / "final" / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    return hub.export_run(run_dir, tmp_path_factory.mktemp("exp") / "export")


@pytest.fixture(scope="module")
def merged_dir(run_dir, tmp_path_factory) -> Path:
    return hub.export_run(run_dir, tmp_path_factory.mktemp("exp") / "merged", merge_lora=True)


@pytest.fixture(scope="module")
def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _probe(size: int = 32) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model, x):
    model.eval()
    return model(x)


def _no_pickles(folder: Path) -> list:
    return [p for pattern in PICKLE for p in folder.rglob(pattern)]


# ----------------------------------------------------------------------------- export


def test_export_folder_contents(export_dir, run_dir):
    names = {p.name for p in export_dir.iterdir()}
    for required in ("README.md", "model.safetensors", "recipe.yaml", "classnames.json", "class_counts.json",
                     "preprocess.json", "preprocessor_config.json", "metrics.json", "export.json",
                     "adapter_config.json", "adapter_model.safetensors", "trained_tensors.safetensors"):
        assert required in names, required
    assert not _no_pickles(export_dir)
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]

    adapter_cfg = json.loads((export_dir / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    adapter = load_file(str(export_dir / "adapter_model.safetensors"))
    full = load_file(str(export_dir / "model.safetensors"))
    assert adapter and all(k.startswith("base_model.model.") and "lora_" in k for k in adapter)
    # every adapter tensor is the trained one inside the full weights (peft drops the adapter name)
    for key, value in adapter.items():
        inner = key[len("base_model.model."):].replace(".lora_A.", ".lora_A.default.").replace(
            ".lora_B.", ".lora_B.default.")
        assert torch.equal(full["backbone." + inner], value), key
    # training moved LoRA B away from its zero init, so the merge test below is not vacuous
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0
    extra = load_file(str(export_dir / "trained_tensors.safetensors"))
    assert "head.weight" in extra and not any("lora_" in k for k in extra)
    assert torch.equal(extra["head.weight"], full["head.weight"])

    pre = json.loads((export_dir / "preprocessor_config.json").read_text())
    saved_pre = json.loads((export_dir / "preprocess.json").read_text())
    assert pre["crop_size"] == {"height": saved_pre["image_size"], "width": saved_pre["image_size"]}
    assert pre["image_mean"] == saved_pre["mean"] and pre["image_std"] == saved_pre["std"]
    # the export's recipe rebuilds without any weight file; the run's recipe is untouched
    exported = yaml.safe_load((export_dir / "recipe.yaml").read_text())
    assert exported["model"]["pretrained"] is None and exported["tuning"]["method"] == "lora"
    assert json.loads((export_dir / "metrics.json").read_text()) == json.loads((run_dir / "metrics.json").read_text())


def test_model_card_front_matter(export_dir, metrics):
    text = (export_dir / "README.md").read_text()
    meta = card.read_front_matter(text)
    assert meta == yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "ft_focal"
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["metrics"] == ["accuracy"]
    for tag in ("long-tail", "focal-sam", "clip", "peft", "lora"):
        assert tag in meta["tags"], tag
    assert "base_model" not in meta  # a random-init tiny model has no Hub base model
    assert "datasets" not in meta  # digits-LT is not a Hub dataset
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"]["split"] == "test"
    values = [m["value"] for m in result["metrics"]]
    expected = [metrics["test"][k] for k in ("overall", "many", "medium", "few") if metrics["test"][k] is not None]
    assert values == expected
    assert all(m["type"] == "accuracy" for m in result["metrics"])

    body = text.split("---\n", 2)[2]
    for needle in ("Focal-SAM", "`rho` = 0.05", "`gamma` = 0.5", "`lam` = 0.8", "LoRA", "float32",
                   "Processes**: 1", "Model selection", metrics["selected"], "ft_focal.load_model",
                   "@inproceedings{li2025focalsam", "@inproceedings{foret2021sam", "torch ", "peft ",
                   "open_clip ", "transformers ", "CenterCrop(32)"):
        assert needle in body, needle


def test_card_base_model_and_corruption(tmp_path):
    oc = ModelConfig(family="open_clip", name="ViT-B-16", pretrained="openai")
    assert provenance.base_model_id(oc) == "openai/clip-vit-base-patch16"
    assert provenance.base_model_id(dataclasses.replace(oc, name="ViT-B-32", pretrained="laion2b_s34b_b79k")) == \
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert provenance.base_model_id(dataclasses.replace(oc, pretrained=None)) is None
    cached = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    (cached / "open_clip_model.safetensors").write_bytes(b"")
    assert provenance.base_model_id(dataclasses.replace(oc, pretrained=str(cached / "open_clip_model.safetensors"))) == \
        "timm/vit_base_patch16_clip_224.openai"
    (tmp_path / "ViT-B-16.pt").write_bytes(b"")
    assert provenance.base_model_id(dataclasses.replace(oc, pretrained=str(tmp_path / "ViT-B-16.pt"))) == \
        "openai/clip-vit-base-patch16"
    (tmp_path / "mystery.safetensors").write_bytes(b"")
    assert provenance.base_model_id(dataclasses.replace(oc, pretrained=str(tmp_path / "mystery.safetensors"))) is None
    hf_dir = tmp_path / "clip-dir"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"_name_or_path": "openai/clip-vit-large-patch14"}))
    hf = ModelConfig(family="hf_clip", name="clip", pretrained=str(hf_dir))
    assert provenance.base_model_id(hf) == "openai/clip-vit-large-patch14"
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert provenance.base_model_id(hf) is None

    recipe = recipe_from_dict({"name": "r", "optim": {"name": "imbsam"}, "tuning": {"method": "adaptformer"},
                               "data": {"dataset": "hf", "hf_path": "someone/some-lt-dataset"}})
    metrics = {"test": {"overall": 0.7, "many": 0.8, "medium": 0.6, "few": None}, "selected": "last", "world_size": 2}
    text = card.render_card(recipe, metrics, {"corruption": {"mCE": 61.25, "baseline": "alexnet"}},
                            {"base_model": "openai/clip-vit-base-patch16", "files": []})
    meta = card.read_front_matter(text)
    assert meta["base_model"] == "openai/clip-vit-base-patch16"
    assert meta["datasets"] == ["someone/some-lt-dataset"]
    assert "imbsam" in meta["tags"] and "adaptformer" in meta["tags"] and "peft" not in meta["tags"]
    results = meta["model-index"][0]["results"]
    assert [m["value"] for m in results[0]["metrics"]] == [0.7, 0.8, 0.6]  # few is None: left out
    assert results[1]["dataset"]["name"] == "ImageNet-C" and results[1]["metrics"][0] == {
        "type": "mCE", "value": 61.25, "name": "mCE (%, lower is better)"}
    assert "@inproceedings{zhou2023imbsam" in text and "@inproceedings{li2025focalsam" in text
    assert "Processes**: 2" in text


# ----------------------------------------------------------------------------- reload


def test_reload_gives_the_trained_logits(run_dir, export_dir):
    x = _probe()
    trained = _logits(load_model_dir(run_dir / "final").model, x)
    loaded = ft_focal.load_model(str(export_dir))
    assert torch.equal(_logits(loaded.model, x), trained)
    assert torch.equal(ft_focal.load_model(run_dir).logits(x), trained)  # a run folder works too
    from PIL import Image

    image = Image.new("RGB", (40, 30), (120, 30, 200))
    names = loaded.predict([image, image])
    assert len(names) == 2 and set(names) <= set(loaded.classnames)
    assert loaded.predict_proba(image).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_merge_lora_gives_the_adapter_logits(export_dir, merged_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    assert not _no_pickles(merged_dir)
    recipe = yaml.safe_load((merged_dir / "recipe.yaml").read_text())
    assert recipe["tuning"]["method"] == "full"
    info = json.loads((merged_dir / "export.json").read_text())
    assert info["merged_lora"] is True and info["trained_tuning"] == "lora"
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    meta = card.read_front_matter((merged_dir / "README.md").read_text())
    assert "merged-lora" in meta["tags"] and "peft" not in meta["tags"]
    x = _probe()
    adapter = _logits(ft_focal.load_model(export_dir).model, x)
    merged = _logits(ft_focal.load_model(merged_dir).model, x)
    assert (adapter - merged).abs().max().item() < 1e-5


def test_eval_of_export_reproduces_metrics(export_dir, metrics, tmp_path):
    out = tmp_path / "eval.json"
    assert cli_main(["eval", str(export_dir), "--out", str(out), "--no-report"]) == 0
    result = json.loads(out.read_text())
    for key in ("overall", "many", "medium", "few"):
        assert result["test"][key] == metrics["test"][key], key


def test_export_command_line_and_errors(run_dir, export_dir, tmp_path, capsys):
    target = tmp_path / "again"
    assert cli_main(["export", str(run_dir / "final"), str(target)]) == 0
    assert (target / "README.md").is_file()
    assert cli_main(["export", str(run_dir), str(target)]) == 0  # a previous export is replaced
    capsys.readouterr()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli_main(["export", str(run_dir), str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and "\n" not in err and "Traceback" not in err
    assert (busy / "notes.txt").read_text() == "mine"
    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(["export", str(run_dir), str(run_dir / "final" / "inside")]) == 2
    assert "outside" in capsys.readouterr().err


# ----------------------------------------------------------------------------- push


class FakeHfApi:
    """Records the calls push makes; keeps a copy of the uploaded folder."""

    def __init__(self, store: Path):
        self.calls: list = []
        self.store = store

    def whoami(self):
        self.calls.append(("whoami", {}))
        return {"name": "me"}

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        shutil.copytree(kwargs["folder_path"], self.store / f"upload{len(self.calls)}")
        return None


def _all_bytes(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file())


def test_push_run_with_a_fake_api(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeHfApi(tmp_path)
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    assert cli_main(["push", str(run_dir), "me/tiny-lora", "--private", "--revision", "dev"]) == 0
    out = capsys.readouterr()
    calls = dict((name, kwargs) for name, kwargs in api.calls)
    assert [name for name, _ in api.calls] == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert calls["create_repo"] == {"repo_id": "me/tiny-lora", "private": True, "exist_ok": True, "repo_type": "model"}
    assert calls["create_branch"]["branch"] == "dev" and calls["create_branch"]["exist_ok"] is True
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/tiny-lora" and upload["revision"] == "dev" and upload["repo_type"] == "model"
    assert "*.bin" in upload["ignore_patterns"] and "*.pt" in upload["ignore_patterns"]
    uploaded = tmp_path / "upload4"
    names = {p.name for p in uploaded.iterdir()}
    assert {"README.md", "model.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= names
    assert not _no_pickles(uploaded)
    assert 'ft_focal.load_model("me/tiny-lora")' in (uploaded / "README.md").read_text()
    assert not Path(upload["folder_path"]).exists()  # the temporary export is cleaned up
    assert "me/tiny-lora" in out.out
    assert TOKEN not in out.out + out.err
    assert TOKEN.encode() not in _all_bytes(uploaded, run_dir)


def test_push_export_folder_uploads_it_as_is(export_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeHfApi(tmp_path)
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    url = hub.push_run(export_dir, "me/exported")
    assert url == "https://huggingface.co/me/exported"
    calls = dict((name, kwargs) for name, kwargs in api.calls)
    assert "create_branch" not in calls
    assert calls["create_repo"]["private"] is False
    assert Path(calls["upload_folder"]["folder_path"]) == export_dir and calls["upload_folder"]["revision"] is None
    assert TOKEN.encode() not in _all_bytes(export_dir)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_push_offline_with_the_real_api_is_one_line(export_dir, capsys):
    # conftest sets HF_HUB_OFFLINE=1; _hf_api is the real factory here
    assert cli_main(["push", str(export_dir), "me/tiny-lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert "offline" in err and "HF_HUB_OFFLINE" in err


def _hub_http_client():
    """The HTTP client huggingface_hub raises errors from: httpx2 for huggingface_hub 2.x, httpx for 1.x."""
    import importlib

    import huggingface_hub

    major = int(huggingface_hub.__version__.split(".")[0])
    return importlib.import_module("httpx2" if major >= 2 else "httpx")


def test_push_errors_from_the_hub_are_one_line(export_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import errors as hf_errors

    httpx2 = _hub_http_client()

    def failing(exc):
        class Api(FakeHfApi):
            def whoami(self):
                raise exc

        return lambda: Api(tmp_path)

    request = httpx2.Request("GET", "https://huggingface.co/api/whoami-v2")
    cases = [
        (hf_errors.HfHubHTTPError("401 Client Error", response=httpx2.Response(401, request=request)), "not authorised"),
        (hf_errors.HfHubHTTPError("403 Client Error", response=httpx2.Response(403, request=request)), "forbidden"),
        (hf_errors.LocalTokenNotFoundError("no token"), "no Hugging Face token"),
        (hf_errors.OfflineModeIsEnabled("offline"), "offline"),
        (httpx2.ConnectError("boom", request=request), "cannot reach"),
    ]
    for exc, message in cases:
        monkeypatch.setattr(hub, "_hf_api", failing(exc))
        assert cli_main(["push", str(export_dir), "me/x"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, (exc, err)


# ----------------------------------------------------------------------------- load_model from the Hub


def test_load_model_repo_id(export_dir, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, revision=None, ignore_patterns=None, **_):
        seen.update(repo_id=repo_id, revision=revision, ignore_patterns=ignore_patterns)
        return str(export_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = ft_focal.load_model("me/tiny-lora", revision="dev")
    assert seen["repo_id"] == "me/tiny-lora" and seen["revision"] == "dev" and "*.bin" in seen["ignore_patterns"]
    assert loaded.classnames == json.loads((export_dir / "classnames.json").read_text())


def test_load_model_offline_not_cached(tmp_path):
    with pytest.raises(UserError, match="offline"):
        ft_focal.load_model("nobody-here/not-a-cached-model")
    with pytest.raises(UserError, match="not found"):
        ft_focal.load_model(str(tmp_path / "no" / "such" / "folder"))
