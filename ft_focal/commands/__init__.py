"""Subcommands of `ft-focal` that are not the entry point of a library module (see ft_focal.cli)."""
