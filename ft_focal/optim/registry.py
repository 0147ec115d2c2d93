"""The method registry: every fact about a method of the SAM family written once.

One `MethodInfo` per method (in the style of timm's `OptimInfo`). Everything else reads it:
the recipe's `optim.name` choices (ft_focal/config/__init__.py), which `optim.*` recipe keys reach the
optimizer (ft_focal/training/builders.py), `build_optimizer` (ft_focal/optim/__init__.py) and the model
card's label, tags and citations (ft_focal/artifacts/card.py).

Naming: a method's `name` is its recipe name (`optim.name`), its module (`ft_focal/optim/<name>.py`,
except `asam`, which is SAM with `adaptive=True` in `sam.py`) and its citation key in the model
card. The class keeps the paper's spelling (`SSESAM`, `FocalSAM`, `CCSAM`).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Mapping

from ._step import SharpnessOptimizer
from .ccsam import CCSAM
from .erm import ERM
from .focal_sam import FocalSAM
from .imbsam import ImbSAM
from .sam import SAM
from .sse_sam import SSESAM

# Every method hyperparameter a recipe's `optim` section can set, in the order of its fields
# (ft_focal/config/__init__.py OptimConfig). Each method takes a subset (`MethodInfo.recipe_keys`).
RECIPE_KEYS = ("rho", "gamma", "lam", "tail_threshold", "tail_weight", "rho_head", "rho_tail", "switch_fraction",
               "scope", "flat_ratio")


@dataclass(frozen=True)
class MethodInfo:
    """One method of the SAM family.

    name: the recipe name (`optim.name`), module and citation key.
    cls: the optimizer class; `fixed`: keywords always passed to it (ASAM = SAM + adaptive).
    display: the name a reader knows it by (model card, logs).
    recipe_keys: the `optim.*` recipe keys it takes (a subset of RECIPE_KEYS).
    cite: the methods whose papers it builds on, its own included (the model card cites their `bibtex`).
    tags: Hugging Face Hub tags of a model trained with it.
    one_backward: it has the exact one-backward path (`one_backward=True`, on by default).
    needs_classifier_params: `build_optimizer` passes it the classifier head's parameters
        (`classifier_params`: CC-SAM perturbs the head apart from the feature extractor).
    bibtex: the BibTeX entry of its own paper ("" for ERM, which has none).
    """

    name: str
    cls: type[SharpnessOptimizer]
    display: str
    recipe_keys: tuple[str, ...] = ()
    cite: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    one_backward: bool = False
    needs_classifier_params: bool = False
    bibtex: str = ""
    fixed: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))


_SAM_TAG = "sharpness-aware-minimization"

_FOCAL_SAM_BIBTEX = """@inproceedings{li2025focalsam,
  title     = {Focal-{SAM}: Focal Sharpness-Aware Minimization for Long-Tailed Classification},
  author    = {Li, Sicong and Xu, Qianqian and Yang, Zhiyong and Wang, Zitai and Zhang, Linchao and
               Cao, Xiaochun and Huang, Qingming},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  year      = {2025}
}"""

_SAM_BIBTEX = """@inproceedings{foret2021sam,
  title     = {Sharpness-Aware Minimization for Efficiently Improving Generalization},
  author    = {Foret, Pierre and Kleiner, Ariel and Mobahi, Hossein and Neyshabur, Behnam},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021}
}"""

_ASAM_BIBTEX = """@inproceedings{kwon2021asam,
  title     = {{ASAM}: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks},
  author    = {Kwon, Jungmin and Kim, Jeongseop and Park, Hyunseo and Choi, In Kwon},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  year      = {2021}
}"""

_IMBSAM_BIBTEX = """@inproceedings{zhou2023imbsam,
  title     = {{ImbSAM}: A Closer Look at Sharpness-Aware Minimization in Class-Imbalanced Recognition},
  author    = {Zhou, Yixuan and Qu, Yi and Xu, Xing and Shen, Hengtao},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""

_CCSAM_BIBTEX = """@inproceedings{zhou2023ccsam,
  title     = {Class-Conditional Sharpness-Aware Minimization for Deep Long-Tailed Recognition},
  author    = {Zhou, Zhipeng and Li, Lanqing and Zhao, Peilin and Heng, Pheng-Ann and Gong, Wei},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""

_SSE_SAM_BIBTEX = """@inproceedings{lyu2025ssesam,
  title     = {{SSE-SAM}: Balancing Head and Tail Classes Gradually through Stage-Wise {SAM}},
  author    = {Lyu, Xingyu and Xu, Qianqian and Yang, Zhiyong and Lyu, Shaojie and Huang, Qingming},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2025}
}"""

METHODS: dict[str, MethodInfo] = {info.name: info for info in (
    MethodInfo("erm", ERM, "ERM (plain base optimizer)"),
    MethodInfo("sam", SAM, "SAM", ("rho",), ("sam",), ("sam", _SAM_TAG), bibtex=_SAM_BIBTEX),
    MethodInfo("asam", SAM, "ASAM (adaptive SAM)", ("rho",), ("sam", "asam"), ("asam", _SAM_TAG),
               bibtex=_ASAM_BIBTEX, fixed=types.MappingProxyType({"adaptive": True})),
    MethodInfo("imbsam", ImbSAM, "ImbSAM", ("rho", "tail_threshold", "tail_weight"), ("sam", "imbsam"),
               ("imbsam", _SAM_TAG), one_backward=True, bibtex=_IMBSAM_BIBTEX),
    MethodInfo("ccsam", CCSAM, "CC-SAM", ("rho", "scope", "flat_ratio"), ("sam", "ccsam"), ("cc-sam", _SAM_TAG),
               needs_classifier_params=True, bibtex=_CCSAM_BIBTEX),
    MethodInfo("focal_sam", FocalSAM, "Focal-SAM", ("rho", "gamma", "lam"), ("sam", "focal_sam"),
               ("focal-sam", _SAM_TAG), one_backward=True, bibtex=_FOCAL_SAM_BIBTEX),
    MethodInfo("sse_sam", SSESAM, "SSE-SAM", ("tail_threshold", "rho_head", "rho_tail", "switch_fraction"),
               ("sam", "imbsam", "sse_sam"), ("sse-sam", _SAM_TAG), one_backward=True, bibtex=_SSE_SAM_BIBTEX),
)}

ONE_BACKWARD_METHODS = tuple(name for name, info in METHODS.items() if info.one_backward)


def method_info(name: str) -> MethodInfo:
    """The registry entry of `name`; ValueError naming the valid ones for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def _check() -> None:
    """Each entry's recipe keys are recipe keys its class takes (a typo fails at import)."""
    for info in METHODS.values():
        taken = set(info.cls.method_kwargs) - set(info.fixed)
        wrong = [k for k in info.recipe_keys if k not in RECIPE_KEYS or k not in taken]
        if wrong:
            raise AssertionError(f"registry entry {info.name!r}: recipe keys {wrong} are not taken by {info.cls.__name__}")


_check()
