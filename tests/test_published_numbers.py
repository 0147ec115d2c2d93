"""Every measured table in the README, docs/ and the demo recipe headers names its results file, and
each number of it is in that file.

A table counts as measured when its header row names a measurement (ms, x SAM, accuracy groups).
Its results files are the `benchmarks/results/...` paths written in the few lines above it. Each
number of the table (both ends of a range "a–b") must equal, at the table's precision, a number
of one of those files: 1.03 matches 1.031, 62.0 ms matches 62.0 ms. Numbers in the first column
(row labels such as "2F + 3B" or "r=8") are labels, not measurements.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO_RECIPES = sorted((ROOT / "recipes" / "demo").glob("*.yaml"))
MEASURED = re.compile(r"\bms\b|x SAM|× SAM|overall.*many.*few", re.IGNORECASE)
RESULTS = re.compile(r"benchmarks/results/[\w.\-*]+")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
LOOKBACK = 8   # lines above a table searched for its results file(s)


def tables(lines: list[str]):
    """(first line index, rows) of each markdown table."""
    i = 0
    while i < len(lines):
        if lines[i].lstrip("# ").startswith("|"):
            start = i
            while i < len(lines) and lines[i].lstrip("# ").startswith("|"):
                i += 1
            yield start, [line.lstrip("# ") for line in lines[start:i]]
        i += 1


def measured_tables(path: Path):
    lines = path.read_text().splitlines()
    for start, rows in tables(lines):
        if MEASURED.search(rows[0]):
            above = "\n".join(lines[max(0, start - LOOKBACK):start])
            yield start + 1, rows, sorted(set(RESULTS.findall(above)))


def numbers_of(files: list[str]) -> list[str]:
    found = []
    for pattern in files:
        for f in ROOT.glob(pattern):
            found += NUMBER.findall(f.read_text())
    return found


def matches(quoted: str, available: list[str]) -> bool:
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return any(abs(round(float(a), decimals) - float(quoted)) < 10 ** -(decimals + 3) for a in available)


ALL = [(path, line, rows, files) for path in DOCS + DEMO_RECIPES for line, rows, files in measured_tables(path)]


def test_the_measured_tables_are_found():
    names = {p.name for p, *_ in ALL}
    assert "README.md" in names and len(ALL) >= 2


@pytest.mark.parametrize("path,line,rows,files", ALL, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, *_ in ALL])
def test_each_number_of_a_measured_table_is_in_its_results_file(path, line, rows, files):
    assert files, f"{path.name}:{line}: a measured table names no benchmarks/results/ file above it"
    available = numbers_of(files)
    assert available, f"{path.name}:{line}: {files} do not exist or hold no numbers"
    missing = []
    for row in rows[2:]:   # header and separator rows hold no measurements
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for cell in cells[1:]:
            for quoted in NUMBER.findall(cell.replace("–", " ").replace("−", "-")):
                if not matches(quoted, available):
                    missing.append(f"{quoted} ({cells[0]})")
    assert not missing, f"{path.name}:{line}: not in {files}: {', '.join(missing)}"
