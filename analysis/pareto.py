"""Pareto fronts and 2-D hypervolume over (old metric, new metric), plus mean ± standard error.

Every metric carries a direction (`higher_is_better`). The functions here first map points into a
"larger is better" space (negate lower-is-better coordinates), so MSE and accuracy go through the same code.
"""
from __future__ import annotations

import numpy as np


def to_maximize(points, higher_is_better) -> np.ndarray:
    """Copy of `points` [N, D] with every lower-is-better coordinate negated (so larger is always better)."""
    p = np.asarray(points, dtype=float).reshape(-1, len(higher_is_better))
    return p * np.where(np.asarray(higher_is_better, dtype=bool), 1.0, -1.0)


def pareto_mask(points, higher_is_better=(True, True)) -> np.ndarray:
    """Boolean mask of the non-dominated 2-D points. Duplicates of a front point are all kept (neither dominates
    the other); NaN points are never on the front.

    Sweep in O(N log N): visit points by first coordinate descending, grouping ties; a point is on the front when
    its second coordinate is the best of its tie group and strictly beats every point with a larger first one.
    """
    p = to_maximize(points, higher_is_better)
    mask = np.zeros(len(p), dtype=bool)
    finite = np.flatnonzero(np.isfinite(p).all(axis=1))
    if finite.size == 0:
        return mask
    order = finite[np.lexsort((-p[finite, 1], -p[finite, 0]))]  # x descending, then y descending
    best_y = -np.inf
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and p[order[j], 0] == p[order[i], 0]:
            j += 1
        group = order[i:j]
        group_best = p[group, 1].max()
        if group_best > best_y:
            mask[group[p[group, 1] == group_best]] = True
            best_y = group_best
        i = j
    return mask


def hypervolume_2d(points, reference, higher_is_better=(True, True)) -> float:
    """Area dominated by `points` and bounded by `reference` (exact). Points that do not strictly beat the
    reference in both coordinates add nothing, as in the usual definition."""
    p = to_maximize(points, higher_is_better)
    r = to_maximize([reference], higher_is_better)[0]
    p = p[np.isfinite(p).all(axis=1) & (p[:, 0] > r[0]) & (p[:, 1] > r[1])]
    area, best_y = 0.0, r[1]
    for x, y in p[np.lexsort((-p[:, 1], -p[:, 0]))]:  # x descending: each new higher y adds one slab
        if y > best_y:
            area += (x - r[0]) * (y - best_y)
            best_y = y
    return float(area)


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) over the finite values; s.e. = sample std (ddof=1) / sqrt(n),
    NaN when n < 2."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se, n
