"""What tests/test_readme.py needs besides its registry: reading the fenced blocks of a Markdown
file, splitting a shell block into commands, and the workspace of tiny fixtures that the
README's placeholder paths are mapped to (nothing downloaded, CPU only)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence
    language: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def fenced_blocks(file: str) -> list[Block]:
    """Every fenced block of a Markdown file of the repository, in order."""
    text = (REPO / file).read_text()
    return [Block(file, text.count("\n", 0, m.start()) + 1, m.group(1).lower(), m.group(2))
            for m in FENCE.finditer(text)]


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines left
    out, `a && b` split, whitespace collapsed (the form the registry spells them in)."""
    joined = re.sub(r"\\\n", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#.*$", "", line) if " #" in line else line
        commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


def split_env(command: str) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 prog args` -> ({"A": "1", "B": "2"}, ["prog", "args"])."""
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


# ----------------------------------------------------------------------------- the workspace

IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850")


def make_imagenet_lt_root(root: Path) -> Path:
    """An ImageNet-LT layout (train/ and val/ folders, the three official lists) with 3 classes
    of ImageNet's 1000 and a few JPEGs each: what `data.root=/data/imagenet` is mapped to."""
    from PIL import Image

    for split, folder in (("train", "train"), ("test", "val")):
        for k, wnid in enumerate(IMAGENET_WNIDS):
            (root / folder / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(4 if split == "train" else 2):
                Image.new("RGB", (48, 40), (60 * i, 40 * k, 90)).save(root / folder / wnid / f"{split}{i}.JPEG")
    train = "".join(f"train/{w}/train{i}.JPEG {k}\n" for k, w in enumerate(IMAGENET_WNIDS) for i in range(4))
    test = "".join(f"val/{w}/test{i}.JPEG {k}\n" for k, w in enumerate(IMAGENET_WNIDS) for i in range(2))
    (root / "ImageNet_LT_train.txt").write_text(train)
    (root / "ImageNet_LT_val.txt").write_text("".join(train.splitlines(True)[::2]))
    (root / "ImageNet_LT_test.txt").write_text(test)
    return root


def make_tiny_open_clip_weights(path: Path) -> Path:
    """A safetensors file of the tiny random-init open_clip model (ft_focal.models.tiny_model_config):
    what the ViT-B/16 weights placeholder is mapped to when a command really loads weights."""
    from safetensors.torch import save_file

    from ft_focal.models import tiny_model_config
    from ft_focal.models.backbones.open_clip import _instantiate_open_clip

    model = _instantiate_open_clip(tiny_model_config("open_clip")["config"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_open_clip_overrides() -> list[str]:
    """Overrides that swap a recipe's open_clip ViT-B/16 for the tiny architecture of the same family
    (a CPU test cannot run ViT-B/16 over ImageNet's 1000 classes)."""
    from ft_focal.models import tiny_model_config

    tiny = tiny_model_config("open_clip")
    return [f"model.name={tiny['name']}", "model.config=" + json.dumps(tiny["config"])]


def make_tiny_hf_vit(folder: Path) -> Path:
    """A `save_pretrained` folder of a tiny random-init ViT at 224 px: `path/to/vit`."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=224, patch_size=32, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(str(folder))
    return folder


@dataclass
class Workspace:
    """A scratch folder standing in for a clone: `recipes/` and `sweeps/` link to the repository's,
    `eval/` is a copy,
    the README's relative outputs (`runs/...`, `exports/...`) land here, and the placeholders of
    absolute paths map to fixtures built on first use."""

    root: Path
    builders: dict[str, Callable[[Path], Path]] = field(default_factory=dict)
    built: dict[str, Path] = field(default_factory=dict)
    done: dict[str, object] = field(default_factory=dict)  # providers already run (see test_readme.ensure)

    def fixture(self, name: str) -> Path:
        if name not in self.built:
            self.built[name] = self.builders[name](self.root / "fixtures" / name)
        return self.built[name]


def make_workspace(root: Path) -> Workspace:
    for name in ("recipes", "sweeps"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    # copied, not linked: a suite file's relative root (`../runs/demo/...`) is resolved against the
    # file's real folder, which must be the workspace's
    shutil.copytree(REPO / "eval", root / "eval")
    return Workspace(root, builders={
        "imagenet_lt": make_imagenet_lt_root,
        "open_clip_weights": lambda p: make_tiny_open_clip_weights(p / "open_clip_model.safetensors"),
        "hf_vit": make_tiny_hf_vit,
        "empty": lambda p: (p.mkdir(parents=True), p)[1],
        "imagenet_lt_classnames": lambda p: REPO / "ft_focal/resources/imagenet_lt/classnames.txt",
    })
