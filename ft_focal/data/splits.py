"""Split lists and class-name files of the long-tailed benchmarks.

Split list (ImageNet-LT, iNaturalist 2018, Places-LT as distributed by Liu et al. 2019):
one image per line, `relative/path label`, the path relative to `data.root` (paths may contain
spaces: the label is the last field). Blank lines and lines starting with `#` are ignored.
Lists may be gzipped (detected from the content, not the name).

Class-name files:

* text, one class per line, `<id> <name>` (ImageNet-LT `classnames.txt`: `n01440764 tench`).
  If every id is an integer, the id is the label (each of 0..C-1 exactly once); otherwise the
  label is the line number (0-based, blank lines not counted) and, when every id looks like an
  ImageNet synset (`n01440764`), the ids are kept as WordNet ids. A line with a single field is
  a class name without id (label = line number). Names keep their underscores.
* JSON (optionally gzipped): the iNaturalist `categories.json` (a list of objects with `id`
  and `name`; label = id), a list of names (label = position) or an object `{"id": "name"}`.

`builtin:<path>` names a file shipped in `ft_focal/resources/` (e.g.
`builtin:imagenet_lt/classnames.txt`, `builtin:inat2018/categories.json.gz`).

Errors are `UserError`s naming `file:line`. With an `errors` list the parsers collect every
problem instead of stopping at the first (used by `ft-focal check-data`).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ft_focal.errors import UserError

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
WNID_RE = re.compile(r"^n\d{8}$")


def resolve_path(path: str, key: str, root: Optional[str] = None) -> Path:
    """Find a list / class-name file: `builtin:` resource, as given, or relative to `root`."""
    if path.startswith("builtin:"):
        p = RESOURCES / path[len("builtin:"):]
        if not p.is_file():
            shipped = sorted(str(q.relative_to(RESOURCES)) for q in RESOURCES.rglob("*") if q.is_file())
            raise UserError(f"{key}: '{path}' is not a shipped resource (available: {', '.join(shipped)})")
        return p
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if root is not None and not p.is_absolute() and (Path(root).expanduser() / p).is_file():
        return Path(root).expanduser() / p
    if p.exists():
        raise UserError(f"{key}: {path} is not a file")
    where = f" (nor under data.root {root})" if root is not None and not p.is_absolute() else ""
    raise UserError(f"{key}: file not found: {path}{where}")


def read_text_lines(path: Path) -> list[str]:
    """All lines of a text file, gunzipped if it is gzip-compressed; UserError otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: corrupt gzip file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    return text.splitlines()


@dataclass
class SplitList:
    """A parsed split list: image paths relative to the root and their labels.

    Paths are stored as a numpy bytes array (UTF-8), not a list of str, so that DataLoader
    workers forked from the main process do not copy the list page by page (reference counts).
    `lines` holds the 1-based line number of each entry for error messages.
    """

    source: str
    paths: np.ndarray  # dtype S, UTF-8
    labels: np.ndarray  # int64
    lines: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return self.paths[i].decode("utf-8")


def parse_split_list(path: Path, num_classes: Optional[int] = None,
                     errors: Optional[list] = None) -> SplitList:
    """Parse a `relative/path label` list; check labels against `num_classes` when known."""
    paths, labels, lines = [], [], []
    for n, line in enumerate(read_text_lines(path), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.rsplit(None, 1)
        problem = None
        if len(parts) != 2:
            problem = f"malformed line, expected 'relative/path label', got {s[:80]!r}"
        else:
            rel, lab = parts
            try:
                label = int(lab)
            except ValueError:
                problem = f"malformed line, the label {lab!r} is not an integer"
            else:
                if label < 0:
                    problem = f"label {label} is negative"
                elif num_classes is not None and label >= num_classes:
                    problem = f"label {label} out of range for {num_classes} classes (valid 0..{num_classes - 1})"
        if problem is not None:
            msg = f"{path}:{n}: {problem}"
            if errors is None:
                raise UserError(msg)
            errors.append(msg)
            continue
        paths.append(rel.encode("utf-8"))
        labels.append(label)
        lines.append(n)
    if not labels and errors is None:
        raise UserError(f"{path}: the split list has no entries")
    return SplitList(
        source=str(path),
        paths=np.array(paths, dtype=np.bytes_) if paths else np.zeros(0, dtype="S1"),
        labels=np.asarray(labels, dtype=np.int64),
        lines=np.asarray(lines, dtype=np.int32),
    )


@dataclass
class ClassNames:
    names: list[str]
    ids: Optional[list[str]]  # WordNet ids (ImageNet) in label order, when the file has them
    source: str


def _parse_json_classnames(path: Path, text: str) -> ClassNames:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and "categories" in data:  # a COCO-style annotation file
        data = data["categories"]
    if isinstance(data, dict):
        try:
            items = {int(k): str(v) for k, v in data.items()}
        except ValueError:
            raise UserError(f"{path}: a JSON object of class names must map integer ids to names") from None
    elif isinstance(data, list) and all(isinstance(x, str) for x in data):
        items = dict(enumerate(data))
    elif isinstance(data, list) and all(isinstance(x, dict) for x in data):
        items = {}
        for i, x in enumerate(data):
            if "id" not in x or "name" not in x:
                raise UserError(f"{path}: category {i} has no 'id' or 'name' field")
            if not isinstance(x["id"], int) or isinstance(x["id"], bool):
                raise UserError(f"{path}: category {i}: id {x['id']!r} is not an integer")
            if x["id"] in items:
                raise UserError(f"{path}: category id {x['id']} appears twice")
            items[x["id"]] = str(x["name"])
    else:
        raise UserError(f"{path}: expected a list of categories ({{'id', 'name'}}), a list of names or an object id -> name")
    return ClassNames(_dense(path, items), None, str(path))


def _dense(path: Path, items: dict[int, str]) -> list[str]:
    n = len(items)
    missing = [i for i in range(n) if i not in items]
    if missing:
        raise UserError(f"{path}: class ids must be 0..{n - 1}, each once; missing id {missing[0]}")
    return [items[i] for i in range(n)]


def _classname_entries(lines: list[str]) -> list[tuple[int, Optional[str], str]]:
    """(line number, id or None, name) of every line that is neither blank nor a comment."""
    entries = []
    for n, line in enumerate(lines, start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split(None, 1)
        if len(parts) == 1:
            entries.append((n, None, parts[0]))
        else:
            entries.append((n, parts[0], parts[1].strip()))
    return entries


def _numbered_classnames(path: Path, entries: list[tuple[int, Optional[str], str]]) -> ClassNames:
    items: dict[int, str] = {}
    for n, i, name in entries:
        if int(i) in items:
            raise UserError(f"{path}:{n}: class id {i} appears twice")
        if int(i) < 0:
            raise UserError(f"{path}:{n}: class id {i} is negative")
        items[int(i)] = name
    n_cls = len(items)
    for n, i, _ in entries:
        if int(i) >= n_cls:
            raise UserError(f"{path}:{n}: class id {i} out of range: ids must be 0..{n_cls - 1}, each once")
    return ClassNames(_dense(path, items), None, str(path))


def _named_classnames(path: Path, entries: list[tuple[int, Optional[str], str]]) -> ClassNames:
    """Names in line order; the first column is kept as wnids when every line has a WordNet id."""
    ids = [e[1] for e in entries]
    names = [e[2] for e in entries]
    wnids = ids if all(i is not None and WNID_RE.match(i) for i in ids) else None
    if wnids is not None:
        seen: dict[str, int] = {}
        for n, i, _ in entries:
            if i in seen:
                raise UserError(f"{path}:{n}: WordNet id {i} appears twice (first on line {seen[i]})")
            seen[i] = n
    return ClassNames(names, wnids, str(path))


def parse_classnames(path: Path) -> ClassNames:
    """Parse a class-name file (text `<id> <name>` lines or JSON); see the module docstring."""
    lines = read_text_lines(path)
    text = "\n".join(lines)
    if path.name.endswith((".json", ".json.gz")) or text.lstrip()[:1] in ("[", "{"):
        return _parse_json_classnames(path, text)
    entries = _classname_entries(lines)
    if not entries:
        raise UserError(f"{path}: the class-name file is empty")
    if all(i is not None and re.fullmatch(r"-?\d+", i) for _, i, _ in entries):
        return _numbered_classnames(path, entries)
    return _named_classnames(path, entries)


def alphabetical_permutation(classnames: list[str]) -> np.ndarray:
    """new_label[old_label] so that labels follow the sorted class names (ties: old order).

    iNaturalist 2018's ids are not in alphabetical order of the names; a head initialised from
    text embeddings of the sorted names needs labels in that order (LIFT; docs/algorithms.md).
    Sorting is by Python string order (code points), stable.
    """
    order = sorted(range(len(classnames)), key=lambda i: (classnames[i], i))
    new_of_old = np.empty(len(classnames), dtype=np.int64)
    new_of_old[np.asarray(order, dtype=np.int64)] = np.arange(len(classnames), dtype=np.int64)
    return new_of_old
