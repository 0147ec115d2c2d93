"""Launcher: `accelerate launch -m ft_focal.evaluate MODEL_DIR [...]` is `ft-focal eval` on several processes.

Accelerate starts a module, not a console script, so this file exists only to be that module; the
evaluation is ft_focal/evaluation/evaluate.py and the command ft_focal/commands/eval.py.
"""

if __name__ == "__main__":
    import sys

    from ft_focal.commands.eval import main

    sys.exit(main())
