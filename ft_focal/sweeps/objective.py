"""The sweep objective: which validation accuracy a trial is ranked by (docs/metrics.md)."""

from __future__ import annotations

from typing import Optional

OBJECTIVES = ("overall", "many", "medium", "few", "group_mean")


def objective_value(val: dict, objective: str) -> Optional[float]:
    """The sweep objective of a validation result (fractions in [0, 1]); `group_mean` is the mean of
    many / medium / few accuracy (docs/metrics.md). None when a group it needs is empty."""
    if objective == "group_mean":
        groups = [val.get(k) for k in ("many", "medium", "few")]
        return None if any(g is None for g in groups) else float(sum(groups) / 3.0)
    value = val.get(objective)
    return None if value is None else float(value)
