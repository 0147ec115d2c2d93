"""The one JSON writer: every JSON file ft_focal writes (metrics, manifests, exports, caches) goes through `write_json`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, value: Any, indent: int = 1, fsync: bool = False) -> None:
    """Write `value` as JSON atomically: a temporary file in the same folder, then a rename.

    `fsync`: flush the file to disk before the rename (checkpoint manifests).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(value, indent=indent))
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def with_output_permissions(path: str | os.PathLike) -> None:
    """Give a file the permissions every other output gets (0o666 less the umask).

    safetensors creates its files with mode 0o600 whatever the umask, so weights would be the one
    output a group or a shared results folder cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file` with the permissions of the other outputs."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with_output_permissions(path)
