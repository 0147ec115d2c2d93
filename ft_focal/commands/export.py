"""`ft-focal export RUN_DIR EXPORT_DIR [--merge-lora]`: a Hub-ready folder from a run (ft_focal/artifacts/export.py).

No network."""

from __future__ import annotations

import sys
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import run_guarded


def main(argv: Optional[list[str]] = None) -> int:
    return run_guarded(lambda: _run(argv))


def _run(argv: Optional[list[str]]) -> int:
    from ft_focal.artifacts.export import export_run

    parser = CommandParser(
        overrides=False, prog="ft-focal export",
        description="Write a Hub-ready folder (safetensors weights, peft adapter, model card) from a run. No network.")
    parser.add_argument("run_dir", help="a run's output_dir (its final/ is exported) or a final/ folder")
    parser.add_argument("export_dir", help="folder to write (new, empty, or a previous export to replace)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge the LoRA adapter into the weights and export a plain model")
    args = parser.parse_command(argv)
    out = export_run(args.run_dir, args.export_dir, merge_lora=args.merge_lora)
    names = sorted(p.name for p in out.iterdir())
    print(f"exported to {out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
