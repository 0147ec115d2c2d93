"""`build_datasets(data_cfg, preprocess, seed)`: the datasets of a recipe's data section, by source.

Each source (split lists, image folders, Hugging Face datasets, CIFAR-LT, digits-LT) reads its
raw splits in ft_focal/data/sources.py; `sources.finish` applies the long-tail subsampling and
the label order and wraps them in a `DataBundle` (ft_focal/data/datasets.py). Synthetic data is
built directly (`synthetic_bundle`).
"""

from __future__ import annotations

from ft_focal.data import sources
from ft_focal.data.datasets import DataBundle, synthetic_bundle
from ft_focal.errors import UserError


def build_datasets(data_cfg, preprocess: dict, seed: int = 0) -> DataBundle:
    """Build the train / val / test datasets and the training class counts of a recipe's data.

    `preprocess` = {"image_size", "mean", "std", "interpolation"} from the model. `seed` is the
    run's seed; deterministic splits and long-tailed subsampling use `data.split_seed` (fixed
    by default so every run sees the same data), or `seed` when split_seed is null.
    """
    split_seed = getattr(data_cfg, "split_seed", None)
    split_seed = seed if split_seed is None else int(split_seed)
    kind = data_cfg.dataset
    if kind == "synthetic":
        if getattr(data_cfg, "val_fraction", None) is not None:
            raise UserError("data.val_fraction: synthetic data has its own validation split; remove data.val_fraction")
        return synthetic_bundle(data_cfg.synthetic_num_classes, preprocess, data_cfg.synthetic_train_size,
                                data_cfg.synthetic_eval_size, split_seed,
                                imbalance_factor=data_cfg.imbalance_factor or 100, data_cfg=data_cfg)
    builders = sources.SOURCES
    if kind not in builders:
        raise UserError(f"data.dataset: {kind!r} is not one of {', '.join(list(builders) + ['synthetic'])}")
    raw = builders[kind](data_cfg, split_seed)
    return sources.finish(raw, data_cfg, preprocess, split_seed)
