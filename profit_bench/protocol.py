"""The selection protocol: which trials count, which configurations are confirmed, what the fronts are measured
against. The sweep (choosing what to confirm) and the analysis (stating and checking it) both call these
functions, so the rule is written once.

Everything here reads *validation* columns (`old_val`, `new_val` and the pretrained `old_val_before`,
`new_val_before`); test metrics are only ever reported, never chosen on. Pure numpy/pandas: no Ray, no MLflow.

Objectives: both metrics share one direction (`higher_is_better`: accuracy) or the other (MSE).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["SELECTION_RULE", "DIVERGENCE_RULE", "MSE_BLOWUP", "TRIAL_BLOWUP", "TRIAL_DIVERGENCE_RULE",
           "trial_divergence_reason", "divergence_reason", "mark_diverged", "to_maximize",
           "pareto_mask", "hypervolume", "knee_index", "confirm_choices", "fresh_seeds", "reference_point",
           "SATURATION_RULE", "SATURATION_GAIN", "hypervolume_trace", "saturation", "TIE_BREAK_RULE",
           "canonical_order"]

MSE_BLOWUP = 10.0  # a lower-is-better metric this many times worse than both anchors has diverged

SELECTION_RULE = (
    "Hyperparameters are chosen on validation metrics only. Per method (arm), the validation Pareto set of its "
    "non-diverged search trials gives up to three configurations: best old-task, best new-task, and the knee "
    "(the point closest to the ideal after scaling each axis by |pretrained − best|). Each is re-run on fresh "
    "seeds never used in the search; only those confirmation runs give the test numbers reported.")

TIE_DIGITS = 12  # validation values equal to this many significant digits are a tie (float noise is not a ranking)

TIE_BREAK_RULE = (
    f"Ties (validation values equal to {TIE_DIGITS} significant digits: accuracies on a small validation split "
    f"tie often) are broken by the other objective, then by the earlier search trial (lower search_index, the "
    f"trial's place in its arm's study; none = 0), then by the smaller config_key, then the smaller seed. The sweep "
    f"(choosing what to confirm) and the report (checking it) apply this one order, whatever order their rows come "
    f"in.")

DIVERGENCE_RULE = (
    f"A trial has diverged when a final validation metric is not finite; for error metrics (MSE) also when it is "
    f"more than {MSE_BLOWUP:g}× the pretrained model's value and more than {MSE_BLOWUP:g}× the median of the "
    f"sweep's finite values (the median, not the best: plain fine-tuning legitimately forgets 10–30× the "
    f"pretrained old-task MSE, while an explosion is orders of magnitude above every ordinary trial); for "
    f"accuracy, in the search stage, when either accuracy is below chance (1 / number of classes): a "
    f"configuration that loses a task entirely is kept out of the choice. A confirmation or ablation run is an "
    f"outcome being measured, so its accuracy rule is stricter: it has diverged only when both accuracies are "
    f"below chance (a model that no longer works at all); forgetting the old task down to chance is a result, "
    f"kept in every mean.")


TRIAL_BLOWUP = 10.0  # a trial whose new-task validation loss ends this many times the pretrained one's exploded

TRIAL_DIVERGENCE_RULE = (
    f"A trial flags itself diverged, whatever sweep it is in, when its training objective explodes: its final "
    f"new-task validation loss is not finite, or is at least {TRIAL_BLOWUP:g}× the pretrained model's new-task "
    f"validation loss (where fine-tuning started), or a loss turned non-finite during training. Fine-tuning "
    f"lowers that loss; ending {TRIAL_BLOWUP:g}× above its starting point is an explosion, not a trade-off.")


def trial_divergence_reason(new_val_loss, new_val_loss_before) -> str | None:
    """Why one trial, on its own, has diverged (TRIAL_DIVERGENCE_RULE), or None. run_trial calls this."""
    if not _finite(new_val_loss):
        return "new_val_loss is not finite"
    if _finite(new_val_loss_before) and float(new_val_loss_before) > 0 and \
            float(new_val_loss) >= TRIAL_BLOWUP * float(new_val_loss_before):
        return (f"new_val_loss {float(new_val_loss):.4g} >= {TRIAL_BLOWUP:g}× the pretrained model's "
                f"{float(new_val_loss_before):.4g}")
    return None


SATURATION_GAIN = 0.01  # an arm's validation hypervolume may still grow by less than this share over its last third

SATURATION_RULE = (
    f"An arm's search has saturated when the hypervolume of its validation Pareto set (non-diverged trials, in the "
    f"order they were suggested, against the sweep's validation reference point) grew by less than "
    f"{SATURATION_GAIN:.0%} of its final value over the arm's last third of trials (the last ceil(n/3)). An arm "
    f"whose front was still moving may not have had its best shot: more trials could change its choice. Fewer "
    f"than 3 trials: not judged.")


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def divergence_reason(row, *, higher_is_better: bool, typical_old: float, typical_new: float,
                      chance_old: float | None = None, chance_new: float | None = None,
                      outcome: bool = False) -> str | None:
    """Why the trial in `row` (old_val, new_val, old_val_before, new_val_before) counts as diverged, or None.
    `typical_*`: the sweep's median finite value of that metric (see DIVERGENCE_RULE). `outcome`: a confirmation
    or ablation run (accuracy: diverged only when both tasks are below chance)."""
    below = []  # the sides below chance (accuracy)
    for side, typical, chance in (("old", typical_old, chance_old), ("new", typical_new, chance_new)):
        v = row.get(f"{side}_val")
        if not _finite(v):
            return f"{side}_val is not finite"
        v = float(v)
        if higher_is_better:
            if _finite(chance) and v < chance:
                below.append(f"{side}_val {v:.4g}")
                if not outcome:
                    return f"{side}_val {v:.4g} below chance {chance:.4g}"
        else:
            before = row.get(f"{side}_val_before")
            anchors = [a for a in (before, typical) if _finite(a)]
            if anchors and all(v > MSE_BLOWUP * float(a) for a in anchors):
                return (f"{side}_val {v:.4g} > {MSE_BLOWUP:g}× pretrained ({float(before):.4g}) and "
                        f"the sweep's median ({float(typical):.4g})" if _finite(before) and _finite(typical)
                        else f"{side}_val {v:.4g} > {MSE_BLOWUP:g}× its anchor")
    return " and ".join(below) + " both below chance" if len(below) == 2 else None


def _median(values) -> float:
    v = pd.to_numeric(pd.Series(values, dtype=float), errors="coerce")
    v = v[np.isfinite(v)]
    return float(v.median()) if len(v) else float("nan")


def mark_diverged(df: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """A copy of `df` with `diverged` (bool) and `diverged_reason` columns. The sweep's median is taken over every
    row of `df` (one sweep, one task × backbone); chance comes from `chance_old`/`chance_new` columns when
    present. Rows whose `status` is not ok/diverged (failed, killed) are marked diverged=False:
    they are counted separately. Rows with a `stage` of confirm or ablation get the outcome rule."""
    out = df.copy()
    typical_old, typical_new = _median(out.get("old_val", [])), _median(out.get("new_val", []))
    reasons = []
    for _, row in out.iterrows():
        status = row.get("status", "ok")
        if status not in ("ok", "diverged", None) and not (isinstance(status, float) and math.isnan(status)):
            reasons.append(None)
            continue
        reason = divergence_reason(row, higher_is_better=higher_is_better, typical_old=typical_old,
                                   typical_new=typical_new, chance_old=row.get("chance_old"),
                                   chance_new=row.get("chance_new"), outcome=row.get("stage") in ("confirm", "ablation"))
        if reason is None and status == "diverged":  # the trial's own rule (TRIAL_DIVERGENCE_RULE) flagged it
            own = row.get("diverged_reason")
            reason = own if isinstance(own, str) and own else "the trial flagged itself diverged"
        reasons.append(reason)
    out["diverged_reason"] = reasons
    out["diverged"] = [r is not None for r in reasons]
    return out


# ---------------------------------------------------------------------------------------------- Pareto
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


def hypervolume(points, reference, higher_is_better=(True, True)) -> float:
    """Area dominated by `points` and bounded by `reference` (exact, 2-D). Points that do not strictly beat the
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


def hypervolume_trace(points, reference, higher_is_better=(True, True)) -> np.ndarray:
    """Hypervolume of the first k points, for k = 1..N (`points` in trial order; NaN rows add nothing)."""
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    return np.array([hypervolume(p[:k], reference, higher_is_better) for k in range(1, len(p) + 1)])


def saturation(points, reference, higher_is_better: bool) -> dict:
    """SATURATION_RULE for one arm: `points` [N, 2] (old_val, new_val) of its search trials in trial order, with
    diverged trials as NaN rows (they count as trials, add nothing). Returns n, final (hypervolume), gain (over
    the last ceil(n/3) trials), gain_share (gain / final; 0 when both are 0) and saturated (None below 3)."""
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    n = len(p)
    if n < 3:
        return dict(n=n, final=math.nan, gain=math.nan, gain_share=math.nan, saturated=None)
    trace = hypervolume_trace(p, reference, (higher_is_better, higher_is_better))
    last = math.ceil(n / 3)
    final, before = float(trace[-1]), float(trace[n - last - 1])
    gain = final - before
    share = gain / final if final > 0 else (0.0 if gain == 0 else math.inf)
    return dict(n=n, final=final, gain=gain, gain_share=share, saturated=bool(share < SATURATION_GAIN))


def reference_point(df: pd.DataFrame, higher_is_better: bool, chance: tuple | None = None) -> tuple[float, float]:
    """The hypervolume corner of one task × backbone: per axis the worst of the pretrained value and every
    non-diverged trial (`diverged` column if present), and no better than chance for accuracy. Diverged trials
    never move it, so one explosion cannot flatten every method's hypervolume."""
    ok = df[~df["diverged"].astype(bool)] if "diverged" in df else df
    worst = np.nanmin if higher_is_better else np.nanmax
    ref = []
    for i, side in enumerate(("old", "new")):
        vals = [pd.to_numeric(ok[c], errors="coerce").to_numpy(dtype=float)
                for c in (f"{side}_val", f"{side}_val_before") if c in ok]
        v = np.concatenate(vals) if vals else np.array([np.nan])
        r = float(worst(v)) if np.isfinite(v).any() else float("nan")
        if higher_is_better and chance is not None and chance[i] is not None and math.isfinite(chance[i]):
            r = min(r, float(chance[i])) if math.isfinite(r) else float(chance[i])
        ref.append(r)
    return ref[0], ref[1]


def knee_index(points: np.ndarray, pretrained: tuple[float, float], higher_is_better: bool) -> int:
    """Index of the point closest to the ideal (best old, best new among `points`) after scaling each axis by
    |pretrained − best| (or by the points' own spread when that is 0)."""
    p = to_maximize(points, (higher_is_better, higher_is_better))
    ideal = p.max(axis=0)
    pre = to_maximize([pretrained], (higher_is_better, higher_is_better))[0]
    scale = np.abs(ideal - pre)
    spread = p.max(axis=0) - p.min(axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.where(spread > 0, spread, 1.0))
    dist = settle(np.sqrt((((ideal - p) / scale) ** 2).sum(axis=1)))
    return int(np.argmin(dist))  # ties: the first point (confirm_choices passes them in TIE_BREAK_RULE's order)


def canonical_order(df: pd.DataFrame) -> pd.DataFrame:
    """`df` in TIE_BREAK_RULE's order (search_index, config_key, seed; columns that are absent are skipped), so
    that "the first of equal rows" means the same row to the sweep and to the report."""
    keys = {}
    if "search_index" in df:
        keys["_tie_index"] = pd.to_numeric(df["search_index"], errors="coerce").fillna(0)
    for c in ("config_key", "seed"):
        if c in df:
            keys[f"_tie_{c}"] = df[c].astype(str) if c == "config_key" else pd.to_numeric(df[c], errors="coerce")
    if not keys:
        return df
    return df.assign(**keys).sort_values(list(keys), kind="stable").drop(columns=list(keys))


def settle(values) -> np.ndarray:
    """`values` rounded to TIE_DIGITS significant digits (NaN stays NaN): the numbers ties are judged on."""
    v = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(np.isfinite(v) & (v != 0), np.floor(np.log10(np.abs(v))), 0.0)
        scale = 10.0 ** (TIE_DIGITS - 1 - mag)
        return np.where(np.isfinite(v), np.round(v * scale) / scale, v)


def _first_best(primary: np.ndarray, secondary: np.ndarray) -> int:
    """Index of the largest `primary`, ties broken by the larger `secondary`, then by position (TIE_BREAK_RULE)."""
    return int(np.lexsort((np.arange(len(primary)), -secondary, -primary))[0])


def confirm_choices(df: pd.DataFrame, higher_is_better: bool, arm_col: str = "arm") -> pd.DataFrame:
    """The configurations to confirm: per arm (and backbone, with a `model` column), on its non-diverged rows
    (`diverged` column, else all finite rows), the validation Pareto set's best-old, best-new and knee rows,
    deduplicated. Returns those rows of `df` with a `choice` column ("best-old,knee", ...). Ties follow
    TIE_BREAK_RULE, so the answer does not depend on the order of `df`'s rows. With a `config_key` column, the
    rows of one configuration (several search seeds) are first averaged."""
    ok = df[~df["diverged"].astype(bool)] if "diverged" in df else df
    ok = canonical_order(ok)
    if "config_key" in ok and len(ok):
        ok = _mean_over_seeds(ok, arm_col)
    by = [arm_col] + (["model"] if "model" in ok else [])
    picked = []
    for _, g in ok.groupby(by, sort=True, dropna=False):
        pts = settle(g[["old_val", "new_val"]].to_numpy(dtype=float))
        front = g[pareto_mask(pts, (higher_is_better, higher_is_better))]
        if front.empty:
            continue
        fp = settle(front[["old_val", "new_val"]].to_numpy(dtype=float))
        m = to_maximize(fp, (higher_is_better, higher_is_better))
        pretrained = (float(np.nanmedian(pd.to_numeric(front.get("old_val_before", np.nan), errors="coerce"))),
                      float(np.nanmedian(pd.to_numeric(front.get("new_val_before", np.nan), errors="coerce"))))
        choices: dict[int, list[str]] = {}
        for name, idx in (("best-old", _first_best(m[:, 0], m[:, 1])), ("best-new", _first_best(m[:, 1], m[:, 0])),
                          ("knee", knee_index(fp, pretrained, higher_is_better))):
            choices.setdefault(idx, []).append(name)
        for idx, names in sorted(choices.items()):
            row = front.iloc[idx].copy()
            row["choice"] = ",".join(names)
            picked.append(row)
    return pd.DataFrame(picked).reset_index(drop=True) if picked else df.iloc[0:0].assign(choice=[])


def _mean_over_seeds(df: pd.DataFrame, arm_col: str) -> pd.DataFrame:
    """One row per (arm, config_key): validation metrics averaged over the search seeds, so a configuration is
    judged once and never confirmed twice for two roles."""
    metrics = [c for c in ("old_val", "new_val", "old_val_before", "new_val_before") if c in df]
    keys = [arm_col, "config_key"]
    means = df.groupby(keys, sort=False)[metrics].mean().reset_index()
    first = df.drop(columns=metrics).drop_duplicates(keys)
    return first.merge(means, on=keys, how="left")[list(df.columns)]


def fresh_seeds(used, n: int, start: int = 1000) -> list[int]:
    """`n` seeds from `start` on that the search never used (so confirmation results are out of sample)."""
    used = {int(s) for s in used}
    out, s = [], start
    while len(out) < n:
        if s not in used:
            out.append(s)
        s += 1
    return out
