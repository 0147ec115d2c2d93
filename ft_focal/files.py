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
