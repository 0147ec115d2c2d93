"""Launcher: `accelerate launch -m ft_focal.train RECIPE.yaml [key=value ...]` is `ft-focal train`.

Accelerate (and torchrun) start a module, not a console script, so this file exists only to be
that module; the Trainer is ft_focal/training/trainer.py and the command ft_focal/commands/train.py.
"""

if __name__ == "__main__":
    import sys

    from ft_focal.commands.train import main

    sys.exit(main())
