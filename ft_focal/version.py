"""The package version (one place; ft_focal.__version__ and the model card read it)."""

__version__ = "0.1.0"
