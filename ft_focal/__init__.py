"""ft_focal: fine-tune CLIP / ViT on long-tailed data with Focal-SAM and its family.

`ft_focal.load_model(EXPORT_DIR_OR_REPO_ID)` returns a ready classifier (imported lazily, so
`import ft_focal` stays light); `load_model(..., plain=True)` an `nn.Module` on RGB in [0, 1]
that normalises inside (RobustBench's convention, ft_focal/artifacts/plain.py).
"""

from ft_focal.version import __version__

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from ft_focal.artifacts.hub import load_model

        return load_model
    raise AttributeError(f"module 'ft_focal' has no attribute {name!r}")
