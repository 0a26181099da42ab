"""Which models are worth it: the Pareto front of (latency, Dice) points, lower latency and higher Dice.

One implementation for the λ × size search (``distill/pareto.py``, trials) and the benchmark report
(``benchmarks/report.py``, rows).
"""
from __future__ import annotations

import math
from typing import Any, Sequence


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether ``a`` = (latency, Dice) is at least as fast and as accurate as ``b``, and strictly better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[Any, Any]]) -> list[int]:
    """Indices of the points no other point dominates, in order of latency (then higher Dice, then index).

    Points with a NaN/None coordinate are never on the front; equal points dominate neither.

    Args:
        points: ``(latency, dice)`` pairs.
    """
    valid = [(i, float(lat), float(dice)) for i, (lat, dice) in enumerate(points) if _finite(lat) and _finite(dice)]
    front = [(lat, -dice, i) for i, lat, dice in valid
             if not any(dominates((l2, d2), (lat, dice)) for j, l2, d2 in valid if j != i)]
    return [i for _, _, i in sorted(front)]


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
