"""Corruption robustness and evaluation suites, one module per job.

- ft_focal/evaluation/corruption.py: the ImageNet-C loop (`evaluate_corruptions`) and its summary
  (`summarize_corruptions`: CE / mCE, docs/metrics.md; `read_baseline_table`).
- ft_focal/evaluation/suites.py: evaluation-suite YAML files (`load_eval_suite`, `suite_transform`,
  `run_imagenet_c_suite`).
- ft_focal/evaluation/shifts.py: distribution-shift suite kinds (ImageNet-V2 / -R / -A / -Sketch,
  ObjectNet, `shift`): layouts, class mappings, logit masks; shift_eval.py runs suites on a model
  (accuracy by training shot group, drop, effective robustness); robustness_report.py: the table / plot.
- ft_focal/evaluation/wise.py: WiSE-FT interpolation (docs/algorithms.md); wise_sweep.py / wise_report.py:
  `ft-focal wise`.
- The transforms they use live in ft_focal/data/transforms.py (`build_eval_transform`,
  `describe_transform`); sharding in ft_focal/training/sampling.py (`shard_indices`).
"""

from ft_focal.data.transforms import build_eval_transform, describe_transform
from ft_focal.evaluation.corruption import ALL_SEVERITIES, evaluate_corruptions, read_baseline_table, summarize_corruptions
from ft_focal.evaluation.suites import load_eval_suite, run_imagenet_c_suite, suite_transform
from ft_focal.training.sampling import shard_indices

__all__ = [
    "ALL_SEVERITIES",
    "shard_indices",
    "describe_transform",
    "build_eval_transform",
    "evaluate_corruptions",
    "summarize_corruptions",
    "read_baseline_table",
    "load_eval_suite",
    "suite_transform",
    "run_imagenet_c_suite",
]
