"""Percentiles, computed one way everywhere (the scheduler's controller, alerts, tune)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default method)."""
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q))
