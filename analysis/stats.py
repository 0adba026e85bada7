"""Statistics of the report: selection on validation (via profit_bench.protocol), confirmed cells (mean ± s.e.,
95 % t-interval, n), paired PROFIT − baseline differences per seed, hypervolume with a bootstrap CI over seeds.

A *cell* is one confirmed configuration: the stage=confirm runs of one experiment × task × backbone × arm ×
config_key, over the confirmation seeds. Only settled, non-diverged runs enter a cell; the rest are counted.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.stats

from profit_bench import protocol

LEVEL = 0.95
GROUP = ["experiment", "task", "model"]
CELL_KEYS = GROUP + ["arm", "config_key"]
CELL_METRICS = ["old_test", "new_test", "old_test_before", "new_test_before", "forgetting_test", "gain_test",
                "old_val", "new_val", "step_time_median_s", "peak_mem_bytes"]
N_BOOT = 1000


class Stat(NamedTuple):
    mean: float
    se: float
    lo: float
    hi: float
    n: int


def mean_ci(values, level: float = LEVEL) -> Stat:
    """Mean, standard error (ddof=1) and the two-sided t-interval over the finite values; s.e./CI NaN for n < 2."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if n < 2:
        return Stat(m, math.nan, math.nan, math.nan, 1)
    se = float(v.std(ddof=1) / math.sqrt(n))
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return Stat(m, se, m - half, m + half, n)


def paired_difference(a, b, level: float = LEVEL) -> Stat:
    """Mean of a_i − b_i over the pairs where both are finite, with its t-interval (a paired t-test's CI)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return mean_ci(a - b, level)


def excludes_zero(s: Stat) -> bool:
    return s.n >= 2 and (s.lo > 0 or s.hi < 0)


# ---------------------------------------------------------------------------------------------- formatting
def scale_of(metric: str) -> tuple[float, str]:
    """Accuracy prints in percent (ours are fractions), anything else with 4 significant digits."""
    return (100.0, ".2f") if metric == "accuracy" else (1.0, ".4g")


def fmt_num(v, metric: str = "mse") -> str:
    if v is None or not np.isfinite(v):
        return "—"
    scale, spec = scale_of(metric)
    return format(v * scale, spec)


def fmt_stat(s: Stat, metric: str = "mse", ci: bool = True) -> str:
    """"m ± se [lo, hi] (n=k)"; n = 1 prints "m (n=1)", never "± nan"; no value prints "—"."""
    if s.n == 0:
        return "—"
    if s.n == 1:
        return f"{fmt_num(s.mean, metric)} (n=1)"
    se = 0.0 if s.se < 1e-12 * max(1.0, abs(s.mean)) else s.se  # identical values: float noise, not spread
    text = f"{fmt_num(s.mean, metric)} ± {fmt_num(se, metric)}"
    return text + (f" [{fmt_num(s.lo, metric)}, {fmt_num(s.hi, metric)}] (n={s.n})" if ci else f" (n={s.n})")


# ---------------------------------------------------------------------------------------------- selection
def selection(runs: pd.DataFrame) -> pd.DataFrame:
    """The report's own selection, from search-stage validation metrics only (protocol.confirm_choices), per
    experiment × task × backbone: arm, config_key, choice, old_val, new_val."""
    parts = []
    search = runs[(runs["stage"] == "search") & (runs["status"] == "ok")]
    for key, g in search.groupby(GROUP, sort=True):
        chosen = merge_choices(protocol.confirm_choices(g, bool(g["higher_is_better"].iloc[0]), arm_col="arm"))
        if not chosen.empty:
            parts.append(chosen[["arm", "config_key", "choice", "old_val", "new_val"]].assign(**dict(zip(GROUP, key))))
    cols = GROUP + ["arm", "config_key", "choice", "old_val", "new_val"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def merge_choices(chosen: pd.DataFrame) -> pd.DataFrame:
    """One row per config_key: with several search seeds, two roles can pick two seeds of one configuration
    (one confirmation of it, under both names)."""
    if chosen.empty:
        return chosen
    names = chosen.groupby("config_key", sort=False)["choice"].agg(
        lambda s: ",".join(sorted({c for x in s for c in x.split(",")}, key=choice_order)))
    first = chosen.drop_duplicates("config_key").set_index("config_key")
    return first.assign(choice=names).reset_index()


# ---------------------------------------------------------------------------------------------- cells
def with_gain(runs: pd.DataFrame) -> pd.DataFrame:
    """`gain_test`: new-task improvement over the pretrained model, signed so positive = better."""
    sign = np.where(runs["higher_is_better"], 1.0, -1.0)
    return runs.assign(gain_test=sign * (runs["new_test"] - runs["new_test_before"]))


def confirmed_cells(runs: pd.DataFrame, hyper: list[str], chosen: pd.DataFrame,
                    extra_metrics: list[str] = ()) -> pd.DataFrame:
    """One row per confirmed configuration: identity, hyperparameters, choice, and for every metric m the
    columns m (mean), m_stat (Stat); `n` good runs, `n_bad` diverged/failed, `seeds`."""
    conf = with_gain(runs[runs["stage"] == "confirm"])
    rows = []
    for key, g in conf.groupby(CELL_KEYS, sort=True):
        ok = g[g["status"] == "ok"]
        first = g.iloc[0]
        row = dict(zip(CELL_KEYS, key))
        row.update({c: first[c] for c in ["label", "method", "optimizer", "profit", "is_profit", "metric_name",
                                          "higher_is_better", "table"] + hyper if c in g})
        row.update(n=len(ok), n_bad=len(g) - len(ok), seeds=sorted(ok["seed"].astype(int)), run_ids=list(ok["run_id"]),
                   choice=_choice(g, chosen, key))
        for m in list(CELL_METRICS) + list(extra_metrics):
            st = mean_ci(ok[m]) if m in ok else mean_ci([])
            row[m], row[m + "_stat"] = st.mean, st
        rows.append(row)
    return pd.DataFrame(rows)


def _choice(g: pd.DataFrame, chosen: pd.DataFrame, key) -> str:
    """The confirm runs' `choice` tag, else the report's own selection of that config_key, else "—"."""
    tag = g["choice"].dropna()
    if len(tag):
        return ",".join(sorted(str(tag.iloc[0]).split(","), key=choice_order))
    hit = chosen[(chosen[CELL_KEYS[:-1]].astype(str).values == np.array(key[:-1], dtype=str)).all(axis=1)
                 & (chosen["config_key"] == key[-1])] if len(chosen) else chosen
    return str(hit["choice"].iloc[0]) if len(hit) else "—"


def choice_order(choice: str) -> int:
    """Rows sort best-old, knee, best-new (the front from the old task's end to the new task's)."""
    return min((["best-old", "knee", "best-new"].index(c) for c in str(choice).split(",")
                if c in ("best-old", "knee", "best-new")), default=3)


# ---------------------------------------------------------------------------------------------- paired
def paired_rows(runs: pd.DataFrame, cells: pd.DataFrame) -> list[dict]:
    """PROFIT arm vs each baseline arm of the same experiment × task × backbone, matched by selection choice
    (PROFIT's knee vs the baseline's knee, ...) and by confirmation seed (same backbone, same data order).
    Differences are PROFIT − baseline in the metric's own units, for old_test and new_test."""
    conf = runs[(runs["stage"] == "confirm") & (runs["status"] == "ok")]
    out = []
    for key, c in cells.groupby(GROUP, sort=True) if len(cells) else ():
        for _, p in c[c["is_profit"]].iterrows():
            for _, b in c[~c["is_profit"]].iterrows():
                shared = set(str(p["choice"]).split(",")) & set(str(b["choice"]).split(","))
                if not shared:
                    continue
                mine = conf[(conf[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)]
                pr = per_seed(mine, p["config_key"], ["old_test", "new_test"])
                br = per_seed(mine, b["config_key"], ["old_test", "new_test"])
                seeds = sorted(set(pr.index) & set(br.index))
                row = dict(zip(GROUP, key), profit=p["arm"], baseline=b["arm"],
                           choice=",".join(sorted(shared, key=choice_order)), seeds=seeds,
                           metric_name=p["metric_name"], higher_is_better=bool(p["higher_is_better"]))
                for m in ("old_test", "new_test"):
                    row[m] = paired_difference(pr.loc[seeds, m], br.loc[seeds, m]) if seeds else mean_ci([])
                out.append(row)
    return out


def per_seed(conf: pd.DataFrame, config_key: str, cols: list[str]) -> pd.DataFrame:
    """A configuration's confirmation runs indexed by seed (a seed run twice counts once, as its mean)."""
    return conf[conf["config_key"] == config_key].groupby("seed")[cols].mean()


# ---------------------------------------------------------------------------------------------- hypervolume
def test_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Confirm runs with test columns under the validation names protocol.reference_point reads."""
    conf = runs[runs["stage"] == "confirm"]
    return pd.DataFrame({"old_val": conf["old_test"], "new_val": conf["new_test"],
                         "old_val_before": conf["old_test_before"], "new_val_before": conf["new_test_before"],
                         "diverged": conf["status"] != "ok"})


def chance(runs: pd.DataFrame) -> tuple | None:
    vals = [pd.to_numeric(runs.get(c), errors="coerce").median() if c in runs else math.nan
            for c in ("chance_old", "chance_new")]
    return tuple(None if not np.isfinite(v) else float(v) for v in vals)


def test_reference(runs: pd.DataFrame) -> tuple[float, float]:
    """Hypervolume corner of one group's confirmed fronts: pretrained and worst non-diverged confirm runs, and
    chance for accuracy (protocol.reference_point on test columns)."""
    return protocol.reference_point(test_frame(runs), bool(runs["higher_is_better"].iloc[0]), chance(runs))


def val_reference(runs: pd.DataFrame) -> tuple[float, float]:
    search = runs[runs["stage"] == "search"].assign(diverged=lambda d: d["status"] != "ok")
    return protocol.reference_point(search, bool(runs["higher_is_better"].iloc[0]), chance(runs))


def hypervolume_ci(runs: pd.DataFrame, cells: pd.DataFrame, ref, rng_seed: int = 0) -> dict[str, tuple]:
    """Per arm: hypervolume of its confirmed cell means (test) against `ref`, and a percentile bootstrap CI
    over confirmation seeds (one resample of seeds per replicate, shared by the arm's cells); (hv, lo, hi, n)."""
    hib = bool(cells["higher_is_better"].iloc[0])
    dirs = (hib, hib)
    conf = runs[(runs["stage"] == "confirm") & (runs["status"] == "ok")]
    rng = np.random.default_rng(rng_seed)
    out = {}
    for arm, c in cells.groupby("arm", sort=True):
        per_cell = [per_seed(conf, k, ["old_test", "new_test"]) for k in c["config_key"]]
        seeds = sorted(set().union(*(set(p.index) for p in per_cell)))
        hv = protocol.hypervolume(c[["old_test", "new_test"]].to_numpy(float), ref, dirs)
        if len(seeds) < 2:
            out[arm] = (hv, math.nan, math.nan, len(seeds))
            continue
        table = np.stack([p.reindex(seeds).to_numpy(float) for p in per_cell])  # cells × seeds × 2, NaN = absent
        idx = rng.integers(0, len(seeds), size=(N_BOOT, len(seeds)))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample that misses every seed of a cell
            means = np.nanmean(table[:, idx], axis=2)  # cells × replicates × 2
        reps = [protocol.hypervolume(means[:, r], ref, dirs) for r in range(N_BOOT)]
        lo, hi = np.percentile(reps, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
        out[arm] = (hv, float(lo), float(hi), len(seeds))
    return out
