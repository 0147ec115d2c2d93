"""Kept for existing imports: `ft_focal.robustness` is now `ft_focal.evaluation` (corruption.py: the
ImageNet-C loop and CE / mCE summary; suites.py: evaluation-suite files)."""

from ft_focal.evaluation import *  # noqa: F401,F403
from ft_focal.evaluation import __all__  # noqa: F401
