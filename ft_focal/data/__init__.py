"""Datasets of ft_focal: split lists, image folders, Hugging Face datasets, CIFAR-LT, the
embedded digits demo and synthetic data, with training-set class counts and CLIP transforms.

Public API (used by the training loop, evaluation and --dry-run):

    bundle = build_datasets(data_cfg, preprocess, seed)   # -> DataBundle
    bundle.train / bundle.val / bundle.test, bundle.class_counts, bundle.classnames,
    bundle.num_classes, bundle.wnids, bundle.splits_info, bundle.split(name),
    bundle.eval_dataset(name, five_crop=False), bundle.collate_fn, bundle.skipped_images()
    synthetic_bundle(num_classes, preprocess, train_size, eval_size, seed, imbalance_factor=100)
    build_transform(preprocess, data_cfg, train), longtail_counts(...), class_counts_from_labels(...)
    check_data(data_cfg, workers) -> list of problems (ft-focal check-data)

This package imports nothing from ft_focal.models, ft_focal.optim or the training loop.
"""

from ft_focal.data.build import build_datasets
from ft_focal.data.check import check_data
from ft_focal.data.datasets import DataBundle, LabelledImages, collate_skip_bad, synthetic_bundle
from ft_focal.data.images import DataError, open_rgb, to_rgb
from ft_focal.data.longtail import class_counts_from_labels, longtail_counts, subsample_longtail
from ft_focal.data.splits import alphabetical_permutation, parse_classnames, parse_split_list
from ft_focal.data.transforms import build_five_crop_transform, build_transform

__all__ = [
    "DataBundle", "DataError", "LabelledImages", "alphabetical_permutation", "build_datasets",
    "build_five_crop_transform", "build_transform", "check_data", "class_counts_from_labels",
    "collate_skip_bad", "longtail_counts", "open_rgb", "parse_classnames", "parse_split_list",
    "subsample_longtail", "synthetic_bundle", "to_rgb",
]
