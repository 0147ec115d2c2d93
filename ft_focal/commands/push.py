"""`ft-focal push RUN_OR_EXPORT_DIR REPO_ID [--private] [--revision BRANCH] [--merge-lora]`.

Uploads an export folder (or exports a run into a temporary folder first) to the Hugging Face
Hub with `huggingface_hub`. The token comes from HF_TOKEN or `hf auth login` and is never
printed or written. Offline mode, a missing / invalid token or no network end with one line
and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import run_guarded


def main(argv: Optional[list[str]] = None) -> int:
    return run_guarded(lambda: _run(argv))


def _run(argv: Optional[list[str]]) -> int:
    from ft_focal.artifacts.hub import push_run

    parser = CommandParser(overrides=False, prog="ft-focal push", description="Upload a model to the Hugging Face Hub.")
    parser.add_argument("source", help="an export folder (ft-focal export), a run's output_dir or a final/ folder")
    parser.add_argument("repo_id", help="Hub repository, e.g. your-name/clip-b16-imagenet-lt-focal-sam")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default main)")
    parser.add_argument("--merge-lora", action="store_true", help="when exporting a LoRA run: merge the adapter")
    parser.add_argument("--message", help="commit message")
    args = parser.parse_command(argv)
    url = push_run(args.source, args.repo_id, private=args.private, revision=args.revision,
                   merge_lora=args.merge_lora, commit_message=args.message)
    print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
