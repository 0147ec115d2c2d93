"""CIFAR-10 / CIFAR-100 from the standard "python version" pickles, read safely.

The CIFAR python distribution (cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta;
cifar-100-python: train, test, meta) consists of pickled dicts of numpy arrays and lists.
`pickle.load` would execute whatever a tampered file asks for, so the files are read with a
restricted Unpickler that resolves only the few globals that numpy arrays need
(`numpy.core.multiarray._reconstruct` / `numpy._core...`, `numpy.ndarray`, `numpy.dtype`,
`numpy._core.numeric._frombuffer` for protocol-5 pickles, and `_codecs.encode`, which
protocol-2 pickles written by Python 3 use for bytes). Any other global is refused with a
UserError. Files are decoded with encoding="latin1", as torchvision does.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from ft_focal.errors import UserError

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array _reconstruct function


def _frombuffer(*args, **kwargs):  # numpy's protocol-5 helper, re-implemented (it is private)
    buf, dtype, shape, order = args
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_pickle(path: Path) -> dict:
    """A CIFAR pickle (dict of arrays / lists), keys as str; UserError if unreadable."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path}: CIFAR file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise UserError(f"{path}: not a CIFAR python pickle ({' '.join(str(exc).split())})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _images(d: dict, path: Path) -> np.ndarray:
    if "data" not in d:
        raise UserError(f"{path}: no 'data' entry (keys: {', '.join(map(str, d))})")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' should be N x 3072 (32x32x3), got shape {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # N, H, W, C


def _labels(d: dict, key: str, path: Path) -> np.ndarray:
    if key not in d:
        raise UserError(f"{path}: no '{key}' entry (keys: {', '.join(map(str, d))})")
    return np.asarray(d[key], dtype=np.int64)


def _names(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def find_cifar_dir(root: str | None) -> Path:
    if root is None:
        raise UserError("data.dataset=cifar_lt needs 'data.root' (the cifar-10-batches-py or cifar-100-python directory)")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise UserError(f"data.root: directory not found: {root}")
    if (p / "batches.meta").is_file() or (p / "meta").is_file():
        return p
    found = [p / n for n in ("cifar-10-batches-py", "cifar-100-python") if (p / n).is_dir()]
    if len(found) == 1:
        return found[0]
    if len(found) == 2:
        raise UserError(f"data.root: {root} holds both cifar-10-batches-py and cifar-100-python; point it to one")
    raise UserError(f"data.root: {root} is not a CIFAR python directory (no batches.meta / meta file)")


def load_cifar(root: str | None):
    """(train_images, train_labels, test_images, test_labels, classnames, name) from the pickles."""
    d = find_cifar_dir(root)
    if (d / "batches.meta").is_file():  # CIFAR-10
        meta = load_pickle(d / "batches.meta")
        names = _names(meta.get("label_names", []))
        parts = [load_pickle(d / f"data_batch_{i}") for i in range(1, 6)]
        xtr = np.concatenate([_images(p, d / f"data_batch_{i + 1}") for i, p in enumerate(parts)])
        ytr = np.concatenate([_labels(p, "labels", d / f"data_batch_{i + 1}") for i, p in enumerate(parts)])
        test = load_pickle(d / "test_batch")
        xte, yte = _images(test, d / "test_batch"), _labels(test, "labels", d / "test_batch")
        kind = "cifar10"
    else:  # CIFAR-100 (fine labels)
        meta = load_pickle(d / "meta")
        names = _names(meta.get("fine_label_names", []))
        train, test = load_pickle(d / "train"), load_pickle(d / "test")
        xtr, ytr = _images(train, d / "train"), _labels(train, "fine_labels", d / "train")
        xte, yte = _images(test, d / "test"), _labels(test, "fine_labels", d / "test")
        kind = "cifar100"
    n = int(max(ytr.max(initial=-1), yte.max(initial=-1)) + 1)
    if not names:
        names = [f"class_{c}" for c in range(n)]
    if n > len(names) or min(ytr.min(initial=0), yte.min(initial=0)) < 0:
        raise UserError(f"{d}: labels out of range for {len(names)} class names")
    return xtr, ytr, xte, yte, names, kind, d
