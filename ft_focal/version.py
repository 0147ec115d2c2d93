"""The package version, in one place: ft_focal.__version__, the model card and pyproject.toml
(tool.setuptools.dynamic) read it."""

__version__ = "0.1.0"
